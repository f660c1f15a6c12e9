"""Process-wide MindSpore runtime settings that must be in the environment before the
first op runs (train, validate)."""

from __future__ import annotations

import os

HOST_BLOCKING_ENV = "MS_DEV_HOST_BLOCKING_RUN"


def host_blocking_on_cpu(device_target: str) -> None:
    """On CPU, run MindSpore's PyNative ops on the calling thread (MS_DEV_HOST_BLOCKING_RUN=1).

    By default they go through an asynchronous host pipeline whose waits busy-spin
    (runtime_pipeline's AsyncRQueue::Wait: `while (!queue.IsEmpty()) {}`, measured with
    perf). On CPU the kernels need the very cores that spin: VOLO-tiny steps ran 1.6x
    faster blocking on one rank and 2.9x with two ranks sharing 2 cores (0.78 -> 0.27 s),
    with bit-identical losses (bench/step_pipeline.py). On an NPU the pipeline overlaps host
    dispatch with device work and stays on. Read at the first op, so setting it after
    `import mindspore` (a standby process) still counts; an explicit value wins."""
    if device_target == "CPU":
        os.environ.setdefault(HOST_BLOCKING_ENV, "1")


def host_pipeline() -> str:
    """"blocking" or "async": how this process runs PyNative ops (the heartbeat reports it)."""
    return "blocking" if os.environ.get(HOST_BLOCKING_ENV) == "1" else "async"


def synchronize() -> None:
    """Wait until every launched op has run: ms.runtime.synchronize() without its CPU check.

    MindSpore 2.10's ms.runtime.synchronize() asks once per process whether the device
    supports streams; on CPU that logs "[ERROR] ... CPU device is not supported" and returns
    without waiting (only later calls wait). Its wait, _c_expression.synchronize, works on
    every device, so calling it directly waits every time and a healthy CPU run logs no
    ERROR; on Ascend it is exactly what ms.runtime.synchronize() runs after its check."""
    from mindspore._c_expression import synchronize as wait_for_launched_ops

    wait_for_launched_ops()
