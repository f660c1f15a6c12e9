"""Which checkpoint a validate/export step gets (launcher side, no MindSpore)."""

from __future__ import annotations

from pathlib import Path


def select_checkpoint(ckpt_dir: str | Path, select: str = "best") -> Path | None:
    """`best` (the train loop's best-by-top-1 link) falling back to the newest valid one."""
    d = Path(ckpt_dir)
    try:
        from workloads.volo.checkpoint import BEST_LINK, latest_valid, verify
    except ImportError:  # pragma: no cover - workload package absent
        return None
    if select == "best":
        best = d / BEST_LINK
        if best.exists() and verify(best) is None:
            return best.resolve()
    return latest_valid(d)
