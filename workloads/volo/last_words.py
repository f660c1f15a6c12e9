"""A survivor's last words: a checkpoint of the last step all ranks completed.

When one rank of a data-parallel job dies, the others wait in the next all-reduce, which
can no longer finish. Every one of them holds the same parameters and optimizer state: those
of the last optimizer step, since the next update cannot start before its all-reduce
returns. So any survivor can save that state, and the restart redoes no step instead of
every step since the last periodic checkpoint.

The training thread cannot do it (it waits inside MindSpore), and no MindSpore call from
another thread can either: PyNative runs ops in order, so a read of a parameter waits behind
the stuck all-reduce (measured: 28 s, until MindSpore's collective timed out). Where the
parameters live in host memory (CPU), ``Tensor.asnumpy()`` is a view of their storage, so a
helper thread copies them through those views with no MindSpore call at all. Elsewhere
(Ascend, GPU: device memory) the rank does not arm and restarts from the periodic
checkpoint as before.

Protocol with the node agent (LAST WORDS in launcher/contract.py), through two files next to
the rank's heartbeat (``FLEET_LAST_WORDS`` names the first):

- ``<path>.armed``: created by the rank once it can save this way;
- ``<path>``: created by the agent after another rank failed, to ask for the checkpoint.

The rank then saves, and its process exits 0; it exits 1 when it cannot (the training
thread is not waiting in the all-reduce, or the save failed), so the agent never waits
longer than the save takes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from launcher.contract import LAST_WORDS_ARMED, LastWordsExit
from workloads.volo.ckpt_payload import Snapshot

__all__ = ["LastWords", "host_views"]


def host_views(params: list[Any]) -> list[tuple[str, str, np.ndarray]] | None:
    """Numpy views of the parameters' own storage, or None where a parameter is not in host
    memory (``asnumpy()`` then copies) or has no numpy dtype. Call after a synchronize."""
    out = []
    for p in params:
        dtype = str(p.dtype)
        if dtype == "BFloat16":
            return None
        v = p.asnumpy()
        if v.size and v.ctypes.data != p.data_ptr():
            return None
        out.append((p.name, dtype, v))
    return out


class LastWords:
    """The training thread marks the all-reduce wait with :meth:`reducing`; a helper thread
    answers the agent's request while that wait lasts."""

    def __init__(self, request: str | os.PathLike[str],
                 say: Callable[[int, Snapshot], None], log: Callable[[str], None],
                 poll_seconds: float = 0.05, wait_seconds: float = 5.0,
                 exit: Callable[[int], Any] = os._exit):  # noqa: A002 - tests pass their own
        self.request = Path(request)
        self._exit = exit
        self._say = say
        self._log = log
        self._poll = poll_seconds
        self._wait = wait_seconds
        self._lock = threading.Lock()
        self._waiting_after: int | None = None  # steps done when the all-reduce wait began
        self._views: list[tuple[str, str, np.ndarray]] | None = None
        self._thread: threading.Thread | None = None

    def arm(self, views: list[tuple[str, str, np.ndarray]]) -> None:
        """Start answering; ``views`` from :func:`host_views` (re-arm when they change)."""
        with self._lock:
            self._views = views
        if self._thread is None:
            self._thread = threading.Thread(target=self._listen, daemon=True,
                                            name="last-words")
            self._thread.start()
        Path(str(self.request) + LAST_WORDS_ARMED).touch()  # again after a disarm

    def views_current(self, params: list[Any]) -> bool:
        """Whether the armed views still cover ``params``' storage (0.09 ms for volo_tiny's
        200 tensors, against 4.5 ms to take new views)."""
        views = self._views
        return views is not None and len(views) == len(params) and all(
            not v.size or v.ctypes.data == p.data_ptr()
            for (_, _, v), p in zip(views, params, strict=True))

    def disarm(self) -> None:
        with self._lock:
            self._views = None
        Path(str(self.request) + LAST_WORDS_ARMED).unlink(missing_ok=True)

    @contextlib.contextmanager
    def reducing(self, steps_done: int) -> Iterator[None]:
        """Around the wait for an optimizer step's all-reduce; the step's update must be
        launched after this exits (it cannot change the parameters during a copy)."""
        with self._lock:
            self._waiting_after = steps_done
        try:
            yield
        finally:
            with self._lock:
                self._waiting_after = None

    def _listen(self) -> None:
        while not self.request.exists():
            time.sleep(self._poll)
        self._exit(self._answer())  # the process ends: the agent stops the job's ranks

    def _answer(self) -> int:
        deadline = time.monotonic() + self._wait
        while True:
            with self._lock:
                step, views = self._waiting_after, self._views
                if step is not None and views is not None:
                    snap = [(name, dtype, np.array(v, copy=True)) for name, dtype, v in views]
                    break
            if time.monotonic() > deadline:
                self._log("last words: the training thread is not waiting in an all-reduce; "
                          "the restart resumes from the last periodic checkpoint")
                return LastWordsExit.DECLINED
            time.sleep(self._poll)
        try:
            self._say(step, snap)
        except Exception as e:  # noqa: BLE001 - the previous checkpoint stays; say why
            self._log(f"last words: saving step {step} failed: {type(e).__name__}: {e}")
            return LastWordsExit.DECLINED
        return LastWordsExit.SAID
