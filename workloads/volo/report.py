"""Per-rank heartbeat file (cross-team contract 2) and human-readable progress lines.

Every record is one JSON object on its own line, appended and flushed at once, so the agent
that tails the file never sees half a record from a live writer. Records always carry
``event``, ``ts``, ``rank`` and ``attempt``. Writes come from the training thread and the
checkpoint thread, hence the lock.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["Heartbeat"]


def _clean(v: Any) -> Any:
    # JSON has no NaN/inf; a diverged loss must still produce a parseable line.
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Heartbeat:
    def __init__(self, path: str | None, rank: int, attempt: int, echo: TextIO | None = None,
                 echo_rank0_only: bool = True):
        self.rank, self.attempt = rank, attempt
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        if path:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(p, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run
        self._echo = echo if (echo is not None and (rank == 0 or not echo_rank0_only)) else None

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        rec = {"event": event, "ts": round(time.time(), 3), "rank": self.rank,
               "attempt": self.attempt}
        rec.update({k: _clean(v) for k, v in fields.items()})
        line = json.dumps(rec, separators=(",", ":"))
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()
            if self._echo is not None:
                self._echo.write(f"[volo] {line}\n")
                self._echo.flush()
        return rec

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def log(msg: str) -> None:
    """Operator-facing progress on stderr (stdout is kept for machine-readable results)."""
    sys.stderr.write(f"[volo] {msg}\n")
    sys.stderr.flush()
