"""The metric history a run leaves: its ranks' heartbeat JSON-lines files.

Every rank appends one JSON object per line to the file named by FLEET_HEARTBEAT
(brief contract 2). Those files ARE the history: the Prometheus exporter tails
them for live metrics and `fleet plot` reads them whole after the fact, so both
views are derived from the same bytes by the same code (launcher/progress.py, which the
controller's `fleet status` view uses too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from launcher.progress import Event, HeartbeatTail, JobProgress, StartEvent, StepEvent, ValEvent

HEARTBEAT_GLOB = "*.jsonl"


def heartbeat_files(root: Path) -> list[Path]:
    """Heartbeat files under ``root`` (a file or a directory tree), sorted.

    Symlinks are not followed out of ``root``: a run directory must not make
    the exporter read arbitrary files.
    """
    if root.is_file():
        return [root]
    if not root.is_dir():
        return []
    base = root.resolve()
    found = []
    for path in sorted(root.rglob(HEARTBEAT_GLOB)):
        if path.is_file() and path.resolve().is_relative_to(base):
            found.append(path)
    return found


def read_events(paths: Iterable[Path]) -> list[Event]:
    """All events of the given files, ordered by time (ties: attempt, rank)."""
    events: list[Event] = []
    for path in paths:
        events.extend(HeartbeatTail(path).read_all_new())
    events.sort(key=lambda e: (e.ts, e.attempt, e.rank))
    return events


@dataclass
class Series:
    """One plotted line: x = seconds since the run began."""

    t: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    attempt: list[int] = field(default_factory=list)

    def add(self, t: float, y: float, attempt: int = 0) -> None:
        if math.isfinite(y):
            self.t.append(t)
            self.y.append(y)
            self.attempt.append(attempt)

    def segments(self) -> list[tuple[list[float], list[float]]]:
        """One (t, y) run per attempt, so a plot does not bridge a restart gap."""
        out: list[tuple[list[float], list[float]]] = []
        for i, (t, y) in enumerate(zip(self.t, self.y, strict=True)):
            if i == 0 or self.attempt[i] != self.attempt[i - 1]:
                out.append(([], []))
            out[-1][0].append(t)
            out[-1][1].append(y)
        return out

    def __len__(self) -> int:
        return len(self.t)


@dataclass
class RunHistory:
    """A finished or running job's history, as series for plotting."""

    job: str
    events: list[Event]

    @classmethod
    def load(cls, job: str, root: Path) -> RunHistory:
        files = heartbeat_files(root)
        if not files:
            raise FileNotFoundError(
                f"no heartbeat files ({HEARTBEAT_GLOB}) under {root} for job {job!r}"
            )
        return cls(job=job, events=read_events(files))

    @property
    def t0(self) -> float:
        return self.events[0].ts if self.events else 0.0

    def _steps(self) -> Iterator[StepEvent]:
        return (e for e in self.events if isinstance(e, StepEvent))

    def progress(self) -> JobProgress:
        progress = JobProgress()
        for event in self.events:
            progress.apply(event)
        return progress

    def _lead_rank_series(self, value: Callable[[StepEvent], float]) -> Series:
        lead = self.progress().lead_rank
        s = Series()
        for e in self._steps():
            if e.rank == lead:
                s.add(e.ts - self.t0, value(e), e.attempt)
        return s

    def loss(self) -> Series:
        return self._lead_rank_series(lambda e: e.loss)

    def lr(self) -> Series:
        return self._lead_rank_series(lambda e: e.lr)

    def images_per_second(self) -> Series:
        """Job throughput per optimizer step: mean of the ranks' reports (see JobProgress)."""
        per_step: dict[tuple[int, int], list[float]] = {}
        for e in self._steps():
            entry = per_step.setdefault((e.attempt, e.step), [e.ts, 0.0, 0.0, e.attempt])
            entry[0] = max(entry[0], e.ts)
            entry[1] += e.images_per_second
            entry[2] += 1
        s = Series()
        for ts, total, n, attempt in sorted(per_step.values()):
            s.add(ts - self.t0, total / n, int(attempt))
        return s

    def top1(self) -> Series:
        s = Series()
        for e in self.events:
            if isinstance(e, ValEvent):
                s.add(e.ts - self.t0, e.top1, e.attempt)
        return s

    def starts(self) -> list[StartEvent]:
        """One start per attempt (the lowest rank's), in time order."""
        by_attempt: dict[int, StartEvent] = {}
        for e in self.events:
            if isinstance(e, StartEvent):
                cur = by_attempt.get(e.attempt)
                if cur is None or e.rank < cur.rank:
                    by_attempt[e.attempt] = e
        return sorted(by_attempt.values(), key=lambda e: e.ts)

    def restart_times(self) -> list[float]:
        """Seconds since t0 at which each attempt after the first began."""
        firsts: dict[int, float] = {}
        for e in self.events:
            firsts[e.attempt] = min(firsts.get(e.attempt, e.ts), e.ts)
        ordered = sorted(firsts.items())
        return [ts - self.t0 for _, ts in ordered[1:]]
