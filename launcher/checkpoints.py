"""Which checkpoint a validate/export step gets (launcher side, no MindSpore)."""

from __future__ import annotations

from pathlib import Path

from launcher.workloads import adapter


def select_checkpoint(ckpt_dir: str | Path, select: str, workload: str) -> Path | None:
    """The checkpoint of `ckpt_dir` that `select` names ("best" or "latest"), as the
    workload that wrote it picks one; None when there is none."""
    return adapter(workload).select_checkpoint(Path(ckpt_dir), select)
