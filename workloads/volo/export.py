"""Export a trained VOLO checkpoint for deployment.

    python -m workloads.volo.export --ckpt_path P --model NAME --format MINDIR --out F

The number of classes is read from the checkpoint's head and the input size from the
recipe saved beside it (``state.json``), unless given. Prints one JSON line with the file
written. Exit status 2 for bad arguments or checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launcher import contract as C
from workloads.volo.checkpoint import STATE_FILE, read_state
from workloads.volo.config import ConfigError, str2bool
from workloads.volo.report import log
from workloads.volo.validate import resolve_checkpoint

__all__ = ["main"]

_SUFFIX = {"MINDIR": ".mindir", "AIR": ".air", "ONNX": ".onnx"}
# MindSpore writes the file 0400 (owner read-only): a serving process running as another
# user, or a later export over it, could not use it. A model file is not a secret.
EXPORT_MODE = 0o644


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Export a VOLO checkpoint")
    ap.add_argument("--ckpt_path", required=True, help="checkpoint dir, root or .ckpt file")
    ap.add_argument("--model", required=True, help="model name, e.g. volo_d1 or volo_tiny")
    ap.add_argument("--format", default="MINDIR", choices=sorted(_SUFFIX), type=str.upper)
    ap.add_argument("--out", required=True, help="output file (suffix added if missing)")
    ap.add_argument("--num_classes", type=int, default=None)
    ap.add_argument("--image_size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1, help="batch dimension of the exported input")
    ap.add_argument("--device_target", default="CPU")
    ap.add_argument("--raw_weights", type=str2bool, nargs="?", const=True, default=False,
                    help="export the trained weights, not the EMA a checkpoint trained with ema "
                         "holds (exported by default, as MindCV validates it)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        model_file = resolve_checkpoint(a.ckpt_path)
        image_size = a.image_size
        state_file = model_file.parent / STATE_FILE
        if image_size is None and state_file.is_file():
            image_size = read_state(model_file.parent).recipe.get("image_resize")

        import mindspore as ms
        import numpy as np
        from mindspore.nn.utils import no_init_parameters

        from workloads.volo import create_model, model_config

        ms.set_context(mode=ms.GRAPH_MODE)
        ms.set_device(a.device_target)
        from workloads.volo.ema import select_weights

        params, which = select_weights(ms.load_checkpoint(str(model_file)), a.raw_weights)
        num_classes = a.num_classes
        if num_classes is None:
            if "head.weight" not in params:
                raise ConfigError(f"{model_file} has no head.weight; pass --num_classes")
            num_classes = int(params["head.weight"].shape[0])
        try:
            if image_size is None:
                image_size = model_config(a.model).img_size
            # every value comes from the checkpoint (strict load below): skip the random init
            with no_init_parameters():
                net = create_model(a.model, num_classes=num_classes, img_size=int(image_size))
        except (ValueError, KeyError) as e:
            raise ConfigError(f"model {a.model!r}: {e}") from e
        missing, _ = ms.load_param_into_net(net, params, strict_load=True)
        if missing:
            raise ConfigError(f"{model_file} does not fit {a.model}: missing {missing[:3]}")
        net.set_train(False)
        out = Path(a.out)
        suffix = _SUFFIX[a.format]
        stem = out.with_suffix("") if out.suffix.lower() == suffix else out
        stem.parent.mkdir(parents=True, exist_ok=True)
        dummy = ms.Tensor(np.zeros((a.batch, 3, image_size, image_size), np.float32))
        ms.export(net, dummy, file_name=str(stem), file_format=a.format)
        written = Path(str(stem) + suffix)
        if not written.is_file():
            raise ConfigError(f"MindSpore did not write {written}")
        written.chmod(EXPORT_MODE)
    except ConfigError as e:
        log(f"error: {e}")
        return C.EXIT_CONFIG
    print(json.dumps({"out": str(written), "format": a.format, "model": a.model,
                      "num_classes": num_classes, "image_size": image_size, "weights": which,
                      "bytes": written.stat().st_size}), flush=True)
    return C.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
