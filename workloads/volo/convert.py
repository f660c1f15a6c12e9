"""Convert a timm / sail-sg VOLO state dict into a MindSpore checkpoint for create_model.

    python -m workloads.volo.convert --from-timm volo_d1_224.safetensors --model volo_d1_224 \
        --to volo_d1_224.ckpt

IN is a ``.safetensors`` file or a ``torch.save`` file (a plain state dict, or a training
checkpoint holding one under ``state_dict``/``model``/``state_dict_ema``; a ``module.``
prefix from DataParallel is dropped). Reading ``torch.save`` files needs torch; safetensors
files need only the ``safetensors`` package.

The mapping is by name: timm's keys are ours except for norm layers, whose
weight/bias/running_mean/running_var MindSpore calls gamma/beta/moving_mean/moving_variance.
Every target parameter must be filled exactly once with the right shape; anything else is
reported key by key and nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

# torch keys with no MindSpore counterpart
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_RENAMES = (
    (".running_mean", ".moving_mean"),
    (".running_var", ".moving_variance"),
    (".weight", ".gamma"),
    (".bias", ".beta"),
)


class ConversionError(ValueError):
    """The state dict does not fit the model; the message names every offending key."""


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as exc:
            raise ConversionError("reading .safetensors needs: pip install safetensors") from exc
        return {k: np.asarray(v) for k, v in load_file(str(path)).items()}
    try:
        import torch
    except ImportError as exc:
        raise ConversionError(
            f"{path}: reading a torch.save file needs torch (pip install 'ascend-fleet[test]'), "
            "or convert it to .safetensors first"
        ) from exc
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
            for k, v in obj.items() if hasattr(v, "detach")}


def map_state_dict(state: dict[str, np.ndarray], target: dict[str, tuple[int, ...]]
                   ) -> dict[str, np.ndarray]:
    """Map torch keys onto ``target`` (MindSpore name -> shape) or raise ConversionError."""
    out: dict[str, np.ndarray] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        name = key if key in target else None
        if name is None:
            for old, new in _RENAMES:
                if key.endswith(old) and key[: -len(old)] + new in target:
                    name = key[: -len(old)] + new
                    break
        if name is None:
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(target[name]):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[name])}")
            continue
        out[name] = value
    missing = sorted(set(target) - set(out) - {m.split(":")[0] for m in mismatched})
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    if problems:
        raise ConversionError("state dict does not fit the model -- " + " | ".join(problems))
    return out


def convert(src: str | os.PathLike, model_name: str, dst: str | os.PathLike,
            num_classes: int | None = None) -> Path:
    import mindspore as ms

    from workloads.volo.model import create_model

    state = load_state_dict(src)
    if num_classes is None:
        head = state.get("head.weight", state.get("module.head.weight"))
        num_classes = int(head.shape[0]) if head is not None else 1000
    model = create_model(model_name, num_classes=num_classes)
    target = {name: tuple(p.shape) for name, p in model.parameters_and_names()}
    mapped = map_state_dict(state, target)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # write next to the destination and rename, so a failure never leaves half a checkpoint
    fd, tmp = tempfile.mkstemp(prefix=".convert-", suffix=".ckpt", dir=dst.parent)
    os.close(fd)
    try:
        ms.save_checkpoint(
            [{"name": name, "data": ms.Tensor(mapped[name])} for name in target], tmp
        )
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workloads.volo.convert",
        description="Convert timm's or sail-sg's VOLO weights into a MindSpore checkpoint.",
        epilog="example: python -m workloads.volo.convert --from-timm d1.safetensors "
               "--model volo_d1_224 --to volo_d1_224.ckpt",
    )
    parser.add_argument("--from-timm", required=True, metavar="IN",
                        help="timm/sail-sg state dict: .safetensors or a torch.save file")
    parser.add_argument("--model", required=True, help="target model name (see list_models())")
    parser.add_argument("--to", required=True, metavar="OUT.ckpt", help="MindSpore checkpoint to write")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes of the head (default: read from head.weight)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.from_timm, args.model, args.to, args.num_classes)
    except (ConversionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
