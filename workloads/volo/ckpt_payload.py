"""model.ckpt in MindSpore's checkpoint format, written off the training thread.

``ms.save_checkpoint`` serialises on the calling thread, and the train loop must call it
there: MindSpore's runtime is not safe to use beside a running step (a save on another
thread corrupted the next step's loss). It cost 24 ms per save of volo_tiny with its AdamW
state (16 MB, one process, idle machine); copying the parameters to host memory costs
3.7 ms. So the training thread only takes the copy (:func:`snapshot`) and the checkpoint
writer thread serialises it (:func:`write`) with MindSpore's protobuf message alone, in
the layout ``ms.save_checkpoint`` writes for host arrays: one ``Checkpoint`` message per
parameter (per 512 MB slice of a larger one), appended one after another.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

SLICE_BYTES = 512 * 1024 * 1024  # MindSpore's SLICE_SIZE (in KiB there)

Snapshot = list[tuple[str, str, np.ndarray]]  # name, MindSpore dtype name, host copy


def snapshot(params: Iterable[Any]) -> Snapshot | None:
    """Host copies of ``params`` (MindSpore Parameters), on the training thread after
    ``ms.runtime.synchronize()``; None if a dtype has no numpy counterpart (bfloat16), for
    which the caller saves with MindSpore itself."""
    out: Snapshot = []
    for p in params:
        dtype = str(p.dtype)
        if dtype == "BFloat16":
            return None
        # asnumpy() may share the parameter's memory on CPU: the next step would change it
        out.append((p.name, dtype, np.array(p.asnumpy(), copy=True)))
    return out


def write(path: str | Path, snap: Snapshot) -> None:
    """Write ``snap`` as a MindSpore checkpoint that ``ms.load_checkpoint`` reads."""
    from mindspore.train.checkpoint_pb2 import Checkpoint  # protobuf only, no runtime

    with open(path, "wb") as f:
        for name, dtype, arr in snap:
            n = max(1, math.ceil(arr.nbytes / SLICE_BYTES))
            for part in (np.array_split(arr, n) if n > 1 else [arr]):
                msg = Checkpoint()
                value = msg.value.add()
                value.tag = name
                value.tensor.dims.extend(arr.shape)
                value.tensor.tensor_type = dtype
                value.tensor.tensor_content = part.tobytes()
                f.write(msg.SerializeToString())
