"""Evaluate a VOLO checkpoint on an ImageFolder split (MindCV's validate.py flags).

    python -m workloads.volo.validate -c CONFIG --data_dir DIR --ckpt_path P

``P`` may be a checkpoint directory (``step-00000012``), a checkpoint root (the newest
valid one is used), or a ``.ckpt`` file. Progress goes to stderr; stdout ends with one JSON
line ``{"top1": .., "top5": .., "loss": .., "images": .., "weights": ..}`` (percentages, mean
CE loss). A checkpoint trained with ``ema`` is scored with its EMA weights, as MindCV does,
unless ``--raw_weights``; the network runs at ``val_amp_level``.
Exit status 2 for bad configuration, data or checkpoint paths.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from launcher import contract as C
from workloads.volo.checkpoint import MODEL_FILE, latest_valid, list_checkpoints, verify
from workloads.volo.config import ConfigError, env_override, parse_args
from workloads.volo.data import DataError, eval_dataset, scan_image_folder
from workloads.volo.report import log
from workloads.volo.runtime_env import host_blocking_on_cpu

__all__ = ["main", "resolve_checkpoint"]


def resolve_checkpoint(path: str) -> Path:
    """The model file that ``path`` designates, verified when it is a checkpoint directory."""
    if not path:
        raise ConfigError("--ckpt_path is required (a checkpoint directory or .ckpt file)")
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ConfigError(f"--ckpt_path {p} does not exist")
    if (p / MODEL_FILE).exists():
        reason = verify(p)
        if reason is not None:
            raise ConfigError(f"checkpoint {p} is not valid: {reason}")
        return p / MODEL_FILE
    if list_checkpoints(p):
        newest = latest_valid(p, warn=lambda m: log(f"warning: {m}"))
        if newest is None:
            raise ConfigError(f"no valid checkpoint under {p}")
        return newest / MODEL_FILE
    raise ConfigError(f"--ckpt_path {p} holds neither {MODEL_FILE} nor step-* checkpoints")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        env_override(args, os.environ)
        if args.num_threads:
            os.environ["OMP_NUM_THREADS"] = str(args.num_threads)
        host_blocking_on_cpu(args.device_target)
        model_file = resolve_checkpoint(args.ckpt_path)
        index = scan_image_folder(Path(args.data_dir) / args.val_split)
        num_classes = args.num_classes or len(index.classes)

        import mindspore as ms
        from mindspore.nn.utils import no_init_parameters

        from workloads.volo import create_model
        from workloads.volo.amp import apply_amp
        from workloads.volo.ema import select_weights
        from workloads.volo.train import evaluate_model

        ms.set_context(mode=ms.PYNATIVE_MODE)
        ms.set_device(args.device_target)
        weights, which = select_weights(ms.load_checkpoint(str(model_file)), args.raw_weights)
        try:
            with no_init_parameters():  # every value comes from the checkpoint
                net = create_model(args.model, num_classes=num_classes)
            missing, _ = ms.load_param_into_net(net, weights, strict_load=True)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ConfigError(f"cannot load {model_file} into {args.model!r}: {e}") from e
        if missing:
            raise ConfigError(f"cannot load {model_file} into {args.model!r}: missing "
                              f"{', '.join(missing[:3])}")
        net = apply_amp(net, args.val_amp_level)
        ds, src = eval_dataset(index, image_size=args.image_resize, crop_pct=args.crop_pct,
                               interpolation=args.interpolation, mean=args.mean, std=args.std,
                               batch_size=args.batch_size, num_workers=args.num_parallel_workers)
        log(f"validating {model_file} ({which} weights, {args.val_amp_level}) on {index.root} "
            f"({len(index)} images)")
        top1, top5, loss, n = evaluate_model(net, ds, src)
    except (ConfigError, DataError) as e:
        log(f"error: {e}")
        return C.EXIT_CONFIG
    print(json.dumps({"top1": round(top1, 4), "top5": round(top5, 4), "loss": round(loss, 6),
                      "images": n, "weights": which}), flush=True)
    return C.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
