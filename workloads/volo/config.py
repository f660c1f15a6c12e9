"""Command-line and YAML configuration, compatible with MindCV's ``config.py``.

Precedence is parser default < YAML recipe (``-c FILE``) < command-line flag, as in MindCV,
so a MindCV recipe runs unchanged here. Two things differ on purpose:

* an unknown YAML key, a YAML file that is missing or not a mapping, or a YAML value of the
  wrong type is a :class:`ConfigError` that names the key and the file (MindCV raises a bare
  ``KeyError``); ``main`` entry points turn it into exit status 2;
* list-valued flags (``--scale 0.08,1.0``) parse as comma-separated numbers, where MindCV's
  ``type=tuple`` would split the string into characters.

Flags added for the fleet (all optional, also accepted as YAML keys) are grouped under
"Fleet parameters".
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from launcher import contract as C

__all__ = [
    "ConfigError",
    "RECIPE_EXCLUDED_KEYS",
    "create_parser",
    "check_recipe_values",
    "parse_args",
    "recipe_dict",
    "recipe_args",
    "recipe_file_problems",
    "recipe_precision",
    "recipe_value_problems",
    "recipe_hash",
    "str2bool",
]


class ConfigError(ValueError):
    """A configuration problem the user must fix; entry points exit with status 2."""


def str2bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "1"):
        return True
    if v.lower() in ("no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def _float_list(v: str | Sequence[float]) -> list[float]:
    if isinstance(v, (list, tuple)):
        return [float(x) for x in v]
    try:
        return [float(x) for x in str(v).replace("(", "").replace(")", "").split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"comma-separated numbers expected, got {v!r}") from e


def _int_list(v: str | Sequence[int]) -> list[int]:
    return [int(x) for x in _float_list(v)]


def _float_or_list(v: str | float | Sequence[float]) -> float | list[float]:
    values = _float_list(v) if not isinstance(v, (int, float)) else [float(v)]
    return values[0] if len(values) == 1 else values


def _optional_int(v: str | int | None) -> int | None:
    if v is None or (isinstance(v, str) and v.lower() in ("", "none", "null")):
        return None
    return int(v)


def _optional_float(v: str | float | None) -> float | None:
    if v is None or (isinstance(v, str) and v.lower() in ("", "none", "null")):
        return None
    return float(v)


def _optional_str(v: str | None) -> str | None:
    if v is None or (isinstance(v, str) and v.lower() in ("none", "null")):
        return None
    return str(v)


# fmt: off
def create_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Return ``(config_parser, main_parser)``; the first only finds ``-c/--config``."""
    parser_config = argparse.ArgumentParser(description="Training Config", add_help=False)
    parser_config.add_argument("-c", "--config", type=str, default="",
                               help="YAML recipe whose keys override the defaults below")

    parser = argparse.ArgumentParser(description="VOLO training (MindCV-compatible flags)",
                                     parents=[parser_config])
    b = str2bool

    g = parser.add_argument_group("System parameters")
    g.add_argument("--mode", type=int, default=0, help="GRAPH_MODE(0) or PYNATIVE_MODE(1)")
    g.add_argument("--distribute", type=b, nargs="?", const=True, default=False,
                   help="Data-parallel over MindSpore's dynamic cluster (also implied by MS_ROLE)")
    g.add_argument("--val_while_train", type=b, nargs="?", const=True, default=False)
    g.add_argument("--val_interval", type=int, default=1, help="Validation interval (epochs)")
    g.add_argument("--log_interval", type=int, default=100, help="Log interval (steps)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--device_target", type=str, default="Ascend", help="Ascend, GPU or CPU")

    g = parser.add_argument_group("Dataset parameters")
    g.add_argument("--dataset", type=str, default="imagenet")
    g.add_argument("--data_dir", type=str, default="./")
    g.add_argument("--train_split", type=str, default="train")
    g.add_argument("--val_split", type=str, default="val")
    g.add_argument("--dataset_download", type=b, nargs="?", const=True, default=False)
    g.add_argument("--num_parallel_workers", type=int, default=8)
    g.add_argument("--shuffle", type=b, nargs="?", const=True, default=True)
    g.add_argument("--num_samples", type=_optional_int, default=None)
    g.add_argument("--batch_size", type=int, default=128, help="Per-device micro-batch")
    g.add_argument("--drop_remainder", type=b, nargs="?", const=True, default=True)

    g = parser.add_argument_group("Augmentation parameters")
    g.add_argument("--image_resize", type=int, default=224)
    g.add_argument("--scale", type=_float_list, default=[0.08, 1.0])
    g.add_argument("--ratio", type=_float_list, default=[0.75, 1.333])
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.0)
    g.add_argument("--color_jitter", type=_float_or_list, default=0.4)
    g.add_argument("--interpolation", type=str, default="bilinear")
    g.add_argument("--auto_augment", type=_optional_str, default=None,
                   help='e.g. "randaug-m9-mstd0.5-inc1" or "autoaug"')
    g.add_argument("--aug_splits", type=int, default=0)
    g.add_argument("--re_prob", type=float, default=0.0)
    g.add_argument("--re_scale", type=_float_list, default=[0.02, 0.33])
    g.add_argument("--re_ratio", type=_float_list, default=[0.3, 3.3])
    g.add_argument("--re_value", default=0)
    g.add_argument("--re_max_attempts", type=int, default=10)
    g.add_argument("--mean", type=_float_list, default=[0.485 * 255, 0.456 * 255, 0.406 * 255])
    g.add_argument("--std", type=_float_list, default=[0.229 * 255, 0.224 * 255, 0.225 * 255])
    g.add_argument("--crop_pct", type=float, default=0.875)
    g.add_argument("--mixup", type=float, default=0.0)
    g.add_argument("--cutmix", type=float, default=0.0)
    g.add_argument("--cutmix_prob", type=float, default=1.0)
    g.add_argument("--aug_repeats", type=int, default=0)

    g = parser.add_argument_group("Model parameters")
    g.add_argument("--model", type=str, default="mobilenet_v2_035_224")
    g.add_argument("--num_classes", type=_optional_int, default=None)
    g.add_argument("--in_channels", type=int, default=3)
    g.add_argument("--drop_rate", type=_optional_float, default=None)
    g.add_argument("--drop_path_rate", type=_optional_float, default=None)
    g.add_argument("--pretrained", type=b, nargs="?", const=True, default=False)
    g.add_argument("--ckpt_path", type=str, default="",
                   help="Initialise (train) or evaluate (validate) from this checkpoint")
    g.add_argument("--resume_opt", type=b, nargs="?", const=True, default=False)
    g.add_argument("--keep_checkpoint_max", type=int, default=10)
    g.add_argument("--ckpt_save_dir", type=str, default="./ckpt")
    g.add_argument("--ckpt_save_interval", type=int, default=1, help="Unit: epoch")
    g.add_argument("--ckpt_save_policy", type=_optional_str, default="latest_k")
    g.add_argument("--epoch_size", "--epochs", dest="epoch_size", type=int, default=90)
    g.add_argument("--dataset_sink_mode", type=b, nargs="?", const=True, default=True)
    g.add_argument("--ema", type=b, nargs="?", const=True, default=False)
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--clip_grad", type=b, nargs="?", const=True, default=False)
    g.add_argument("--clip_value", type=float, default=15.0)
    g.add_argument("--layer_decay", type=_optional_float, default=None)
    g.add_argument("--gradient_accumulation_steps", type=_optional_int, default=None,
                   help="Micro-steps per optimizer step (default: derived from the global batch, "
                        "else 1)")

    g = parser.add_argument_group("Optimizer parameters")
    g.add_argument("--opt", type=str, default="adam",
                   choices=["sgd", "momentum", "adam", "adamw", "lion", "rmsprop", "adagrad",
                            "lamb", "nadam"])
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight_decay", type=float, default=1e-6)
    g.add_argument("--use_nesterov", type=b, nargs="?", const=True, default=False)
    g.add_argument("--weight_decay_filter", type=str, default="disable",
                   choices=["disable", "auto", "norm_and_bias"])
    g.add_argument("--eps", type=float, default=1e-10)

    g = parser.add_argument_group("Scheduler parameters")
    g.add_argument("--scheduler", type=str, default="cosine_decay",
                   choices=["constant", "cosine_decay", "warmup_cosine_decay", "exponential_decay",
                            "step_decay", "multi_step_decay", "one_cycle", "cyclic"])
    g.add_argument("--lr", type=float, default=0.001)
    g.add_argument("--min_lr", type=float, default=1e-6)
    g.add_argument("--warmup_epochs", type=int, default=3)
    g.add_argument("--warmup_factor", type=float, default=0.0)
    g.add_argument("--decay_epochs", type=int, default=100)
    g.add_argument("--decay_rate", type=float, default=0.9)
    g.add_argument("--multi_step_decay_milestones", type=_int_list, default=[30, 60, 90])
    g.add_argument("--lr_epoch_stair", type=b, nargs="?", const=True, default=False)
    g.add_argument("--num_cycles", type=int, default=1)
    g.add_argument("--cycle_decay", type=float, default=1.0)

    g = parser.add_argument_group("Loss parameters")
    g.add_argument("--loss", type=str, default="CE", choices=["BCE", "CE"])
    g.add_argument("--label_smoothing", type=float, default=0.0)
    g.add_argument("--aux_factor", type=float, default=0.0)
    g.add_argument("--reduction", type=str, default="mean")

    g = parser.add_argument_group("Auto mixing precision parameters")
    g.add_argument("--amp_level", type=str, default="O0", choices=["O0", "O1", "O2", "O3"])
    g.add_argument("--val_amp_level", type=str, default="O0", choices=["O0", "O1", "O2", "O3"])
    g.add_argument("--amp_cast_list", type=_optional_str, default=None)
    g.add_argument("--loss_scale_type", type=str, default="fixed",
                   choices=["fixed", "dynamic", "auto"])
    g.add_argument("--loss_scale", type=float, default=1.0)
    g.add_argument("--drop_overflow_update", type=b, nargs="?", const=True, default=False)
    g.add_argument("--eval_shuffle", type=b, nargs="?", const=True, default=False)

    g = parser.add_argument_group("Fleet parameters (ascend-fleet additions)")
    g.add_argument("--global_batch", type=_optional_int, default=None,
                   help="Samples per optimizer step, fixed across resizes "
                        "(default: batch_size x devices x accumulation; env FLEET_GLOBAL_BATCH)")
    g.add_argument("--ckpt_save_steps", type=_optional_int, default=None,
                   help="Checkpoint every N optimizer steps (default: every ckpt_save_interval "
                        "epochs)")
    g.add_argument("--max_steps", type=_optional_int, default=None,
                   help="Stop after this many optimizer steps in total (for smoke tests); the LR "
                        "schedule still spans epoch_size epochs")
    g.add_argument("--resume", type=str, default="auto",
                   help='"auto": newest valid checkpoint in the checkpoint dir; "never"; '
                        "or a checkpoint directory")
    g.add_argument("--force", type=b, nargs="?", const=True, default=False,
                   help="Resume even if the recipe differs from the checkpoint's")
    g.add_argument("--num_threads", type=_optional_int, default=None,
                   help="CPU threads for this rank (env FLEET_NUM_THREADS)")
    g.add_argument("--deterministic", type=b, nargs="?", const=True, default=True,
                   help="Ask MindSpore for deterministic kernels")
    g.add_argument("--raw_weights", type=b, nargs="?", const=True, default=False,
                   help="With ema: validate (in training and validate.py) the trained weights, "
                        "not their moving average")
    return parser_config, parser
# fmt: on


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _coerce(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """Check one YAML value with the flag's own converter, so a bad type names the key."""
    conv = action.type
    if value is None or conv is None:
        return value
    if conv in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{path}: key {key!r} must be a number, got {value!r}")
    try:
        if conv is str and isinstance(value, (list, dict)):
            raise TypeError("a string is expected")
        if conv is int and isinstance(value, float) and not value.is_integer():
            raise TypeError("an integer is expected")
        out = conv(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{path}: key {key!r} has invalid value {value!r}: {e}") from e
    if action.choices is not None and out not in action.choices:
        raise ConfigError(
            f"{path}: key {key!r} must be one of {list(action.choices)}, got {value!r}"
        )
    return out


def load_yaml(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a recipe; every key must be a known flag."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist (pass an existing YAML with -c)")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from e
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"config file {path!r} must be a mapping of flag names to values")
    actions = _actions_by_dest(parser)
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key not in actions or key == "config":
            raise ConfigError(
                f"{path}: unknown key {key!r} (not a MindCV/fleet config flag; "
                "see --help for the accepted names)"
            )
        out[key] = _coerce(actions[key], key, value, path)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Defaults < YAML < command line. Raises :class:`ConfigError` for a bad recipe."""
    parser_config, parser = create_parser()
    args_config, remaining = parser_config.parse_known_args(argv)
    if args_config.config:
        parser.set_defaults(**load_yaml(args_config.config, parser))
        parser.set_defaults(config=args_config.config)
    return parser.parse_args(remaining)


# Keys that may change between attempts of one job without changing the maths of training:
# where things live, how many devices share the global batch, logging and checkpoint cadence.
RECIPE_EXCLUDED_KEYS = frozenset({
    "config", "mode", "distribute", "val_while_train", "val_interval", "log_interval",
    "device_target", "data_dir", "dataset_download", "num_parallel_workers", "batch_size",
    "ckpt_path", "resume_opt", "keep_checkpoint_max", "ckpt_save_dir", "ckpt_save_interval",
    "ckpt_save_policy", "dataset_sink_mode", "gradient_accumulation_steps", "amp_cast_list",
    "val_amp_level", "eval_shuffle", "ckpt_save_steps", "max_steps", "resume", "force",
    "num_threads", "global_batch", "raw_weights",
})


def recipe_value_problems(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(key, what is wrong) for each mixed-precision, loss-scale, EMA or clipping value that
    MindCV would refuse or that cannot mean anything (choices are checked by the parser)."""
    out: list[tuple[str, str]] = []
    if not args.loss_scale >= 1.0:  # also NaN
        out.append(("loss_scale", f"must be >= 1 (MindCV's minimum), got {args.loss_scale!r}"))
    if not 0.0 < args.ema_decay < 1.0:
        out.append(("ema_decay", f"must be in (0, 1), got {args.ema_decay!r}"))
    if not args.clip_value > 0.0:
        out.append(("clip_value", f"must be > 0 (a global gradient norm), got {args.clip_value!r}"))
    if args.loss_scale_type == "dynamic" and not args.drop_overflow_update:
        out.append(("drop_overflow_update", "must be True with loss_scale_type 'dynamic': a "
                                            "dynamic loss scale always drops an overflowed "
                                            "update (as MindCV requires)"))
    return out


def check_recipe_values(args: argparse.Namespace) -> None:
    """Raise :class:`ConfigError` naming the key and the recipe file for the first bad value."""
    problems = recipe_value_problems(args)
    if problems:
        where = args.config or "command line"
        raise ConfigError("; ".join(f"{where}: key {k!r} {why}" for k, why in problems))


def recipe_args(path: str | Path, overrides: Mapping[str, Any] | None = None) -> argparse.Namespace:
    """The recipe file with the launcher's overrides applied, as the train loop parses it
    (without the command line the launcher adds); :class:`ConfigError` names a bad key."""
    _, parser = create_parser()
    values = load_yaml(str(path), parser)
    actions = _actions_by_dest(parser)
    for key, value in (overrides or {}).items():
        if key not in actions or key == "config":
            raise ConfigError(f"override {key!r} is not a MindCV/fleet config flag")
        values[key] = _coerce(actions[key], key, value, f"{path} (overrides)")
    defaults = {a.dest: a.default for a in actions.values()}
    return argparse.Namespace(**{**defaults, **values, "config": str(path)})


def recipe_file_problems(path: str | Path,
                         overrides: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """(key, what is wrong) for a recipe file with the launcher's overrides applied, without
    starting anything: for ``fleet validate`` and ``fleet submit --dry-run``."""
    try:
        args = recipe_args(path, overrides)
    except ConfigError as e:
        bad = next((k for k in (overrides or {}) if f"override {k!r}" in str(e)), "config")
        return [(bad, str(e))]
    return recipe_value_problems(args)


def recipe_precision(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, str]:
    """What the recipe trains with, for the dry-run plan: amp levels, loss scale, EMA, clip."""
    from workloads.volo.loss_scale import LossScaleConfig

    args = recipe_args(path, overrides)
    return {"amp_level": args.amp_level, "val_amp_level": args.val_amp_level,
            "loss_scale": LossScaleConfig.from_args(args).describe(),
            "ema": (f"decay {args.ema_decay:g} (warm-up {args.ema_decay:g} x (1 - exp(-n/2000))), "
                    "validated with EMA weights") if args.ema else "off",
            "clip_grad": f"global norm {args.clip_value:g}" if args.clip_grad else "off"}


def recipe_dict(args: argparse.Namespace, global_batch: int) -> dict[str, Any]:
    """The settings that define a run; the global batch is resolved, devices are not."""
    d = {k: v for k, v in sorted(vars(args).items()) if k not in RECIPE_EXCLUDED_KEYS}
    d["global_batch"] = int(global_batch)
    return d


def recipe_hash(args: argparse.Namespace, global_batch: int) -> str:
    blob = json.dumps(recipe_dict(args, global_batch), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def env_override(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Apply the launcher's FLEET_* variables, which win over YAML and flags."""
    def _int(name: str) -> int | None:
        raw = environ.get(name)
        if raw in (None, ""):
            return None
        try:
            v = int(raw)
        except ValueError as e:
            raise ConfigError(f"environment variable {name}={raw!r} must be an integer") from e
        if v <= 0:
            raise ConfigError(f"environment variable {name}={raw!r} must be positive")
        return v

    if environ.get(C.CHECKPOINT_DIR_ENV):
        args.ckpt_save_dir = environ[C.CHECKPOINT_DIR_ENV]
    if (v := _int(C.GLOBAL_BATCH_ENV)) is not None:
        args.global_batch = v
    if (v := _int(C.MICRO_BATCH_ENV)) is not None:
        args.batch_size = v
    if (v := _int(C.GRAD_ACCUM_ENV)) is not None:
        args.gradient_accumulation_steps = v
    if (v := _int(C.NUM_THREADS_ENV)) is not None:
        args.num_threads = v
