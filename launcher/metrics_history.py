"""The metric history a run leaves: its ranks' heartbeat JSON-lines files.

Every rank appends one JSON object per line to the file named by FLEET_HEARTBEAT
(brief contract 2). Those files ARE the history: the Prometheus exporter tails
them for live metrics and `fleet plot` reads them whole after the fact, so both
views are derived from the same bytes by the same code (:class:`JobProgress`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.contract import DoneStatus

log = logging.getLogger(__name__)

HEARTBEAT_GLOB = "*.jsonl"
# A heartbeat line is a few hundred bytes; anything far larger is a corrupt or
# foreign file, and reading it whole would stall a scrape.
MAX_LINE_BYTES = 64 * 1024


class HeartbeatError(ValueError):
    """A heartbeat line that breaks contract 2 (names the file and line)."""


@dataclass(frozen=True)
class Event:
    """Fields every heartbeat line carries."""

    kind: str
    ts: float
    rank: int
    attempt: int


@dataclass(frozen=True)
class StartEvent(Event):
    world_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    resumed_step: int


@dataclass(frozen=True)
class StepEvent(Event):
    step: int
    epoch: int
    loss: float
    lr: float
    images_per_second: float
    step_seconds: float
    samples_seen: int
    recomputed: int = 0  # micro-steps this rank computed again (workloads/volo/step_guard.py)
    loss_scale: float | None = None  # the scale the step ran with (workloads/volo/loss_scale.py)
    overflow: bool = False  # some rank's gradients overflowed at this step


@dataclass(frozen=True)
class CheckpointEvent(Event):
    step: int
    path: str
    save_seconds: float
    ok: bool
    error: str | None


@dataclass(frozen=True)
class ValEvent(Event):
    step: int
    top1: float
    top5: float
    loss: float


@dataclass(frozen=True)
class DoneEvent(Event):
    step: int
    status: str
    error: str | None


_NON_FINITE = {"nan", "inf", "-inf", "infinity", "-infinity"}


def _num(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise HeartbeatError(f"{where}: missing field {key!r}")
    value = obj[key]
    # JSON has no NaN/inf, so the train loop writes a diverged loss as a string;
    # it must still show up (as NaN) rather than vanish as a bad line.
    if kind is float and isinstance(value, str) and value.lower() in _NON_FINITE:
        return float(value)
    # bool is an int subclass in Python; a JSON true is never a valid number here.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HeartbeatError(f"{where}: field {key!r} must be a number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise HeartbeatError(f"{where}: field {key!r} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def parse_event(obj: Any, where: str = "heartbeat") -> Event | None:
    """One decoded heartbeat line -> typed event; None for event kinds we do not use.

    Unknown kinds are skipped (not rejected) so a newer train loop can add
    events without breaking an older exporter.
    """
    if not isinstance(obj, dict):
        raise HeartbeatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("event")
    if not isinstance(kind, str):
        raise HeartbeatError(f"{where}: missing string field 'event'")
    base = {
        "kind": kind,
        "ts": _num(obj, "ts", float, where),
        "rank": _num(obj, "rank", int, where),
        "attempt": _num(obj, "attempt", int, where),
    }
    if kind == "start":
        return StartEvent(
            **base,
            world_size=_num(obj, "world_size", int, where),
            micro_batch=_num(obj, "micro_batch", int, where),
            grad_accum=_num(obj, "grad_accum", int, where),
            global_batch=_num(obj, "global_batch", int, where),
            resumed_step=_num(obj, "resumed_step", int, where) if "resumed_step" in obj else 0,
        )
    if kind == "step":
        return StepEvent(
            **base,
            step=_num(obj, "step", int, where),
            epoch=_num(obj, "epoch", int, where),
            loss=_num(obj, "loss", float, where),
            lr=_num(obj, "lr", float, where),
            images_per_second=_num(obj, "images_per_second", float, where),
            step_seconds=_num(obj, "step_seconds", float, where),
            samples_seen=_num(obj, "samples_seen", int, where) if "samples_seen" in obj else 0,
            recomputed=len(obj["recomputed"]) if isinstance(obj.get("recomputed"), list) else 0,
            loss_scale=_num(obj, "loss_scale", float, where) if "loss_scale" in obj else None,
            overflow=obj.get("overflow") is True,
        )
    if kind == "checkpoint":
        ok = obj.get("ok")
        if not isinstance(ok, bool):
            raise HeartbeatError(f"{where}: field 'ok' must be true or false, got {ok!r}")
        return CheckpointEvent(
            **base,
            step=_num(obj, "step", int, where),
            path=str(obj.get("path", "")),
            save_seconds=_num(obj, "save_seconds", float, where) if ok else 0.0,
            ok=ok,
            error=None if obj.get("error") is None else str(obj["error"]),
        )
    if kind == "val":
        return ValEvent(
            **base,
            step=_num(obj, "step", int, where),
            top1=_num(obj, "top1", float, where),
            top5=_num(obj, "top5", float, where),
            loss=_num(obj, "loss", float, where),
        )
    if kind == "done":
        status = obj.get("status")
        if status not in tuple(DoneStatus):
            allowed = ", ".join(repr(str(s)) for s in DoneStatus)
            raise HeartbeatError(f"{where}: field 'status' must be one of {allowed}, "
                                 f"got {status!r}")
        return DoneEvent(
            **base,
            step=_num(obj, "step", int, where) if "step" in obj else 0,
            status=status,
            error=None if obj.get("error") is None else str(obj["error"]),
        )
    return None


class HeartbeatTail:
    """Incremental reader of one heartbeat file.

    Ranks append while we read, so the last line may be half written: keep the
    bytes after the last newline and finish the line on the next read. A line
    that is not valid JSON is logged and skipped rather than stopping the
    whole job's metrics (a rank killed mid-write leaves exactly that).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self._line_no = 0
        self.bad_lines = 0

    def read_new(self) -> list[Event]:
        try:
            with self.path.open("rb") as fh:
                size = fh.seek(0, 2)
                if size < self._offset:
                    # Truncated or replaced: start over rather than read garbage.
                    self._offset, self._partial, self._line_no = 0, b"", 0
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE_BYTES:
            log.warning(
                "%s: dropping an unterminated line over %d bytes", self.path, MAX_LINE_BYTES
            )
            self._partial = b""
            self.bad_lines += 1
        events: list[Event] = []
        for raw in lines:
            self._line_no += 1
            if not raw.strip():
                continue
            where = f"{self.path}:{self._line_no}"
            try:
                event = parse_event(json.loads(raw), where)
            except (json.JSONDecodeError, UnicodeDecodeError, HeartbeatError) as exc:
                self.bad_lines += 1
                log.warning("skipping bad heartbeat line %s: %s", where, exc)
                continue
            if event is not None:
                events.append(event)
        return events


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


@dataclass
class AttemptInfo:
    attempt: int
    first_ts: float
    last_ts: float
    start: StartEvent | None = None
    first_step_ts: float | None = None


@dataclass
class JobProgress:
    """Everything the metrics need about one job, folded from its events.

    Events may arrive out of order across rank files, so "latest" always means
    the highest (attempt, ts), never the last one applied.
    """

    attempts: dict[int, AttemptInfo] = field(default_factory=dict)
    last_step: dict[int, StepEvent] = field(default_factory=dict)
    last_heartbeat: dict[int, float] = field(default_factory=dict)
    last_val: ValEvent | None = None
    last_checkpoint_ok: CheckpointEvent | None = None
    checkpoint_failures: int = 0
    recomputed_micro_steps: int = 0
    done: DoneEvent | None = None
    # Seconds per optimizer step, one entry per step number: a step redone after
    # a restart replaces the lost one, so the sum is the work that was kept.
    step_seconds_by_step: dict[int, float] = field(default_factory=dict)
    # Step numbers whose gradients overflowed, by the same rule: a redone step counts once.
    overflow_steps: set[int] = field(default_factory=set)
    _step_attempt: dict[int, int] = field(default_factory=dict)
    first_ts: float | None = None
    last_ts: float | None = None

    @staticmethod
    def _newer(a: Event, b: Event | None) -> bool:
        return b is None or (a.attempt, a.ts) >= (b.attempt, b.ts)

    def apply(self, event: Event) -> None:
        self.first_ts = event.ts if self.first_ts is None else min(self.first_ts, event.ts)
        self.last_ts = event.ts if self.last_ts is None else max(self.last_ts, event.ts)
        info = self.attempts.get(event.attempt)
        if info is None:
            info = self.attempts[event.attempt] = AttemptInfo(event.attempt, event.ts, event.ts)
        info.first_ts = min(info.first_ts, event.ts)
        info.last_ts = max(info.last_ts, event.ts)
        prev_hb = self.last_heartbeat.get(event.rank)
        self.last_heartbeat[event.rank] = event.ts if prev_hb is None else max(prev_hb, event.ts)

        if isinstance(event, StartEvent):
            if info.start is None or event.rank < info.start.rank:
                info.start = event
        elif isinstance(event, StepEvent):
            if info.first_step_ts is None or event.ts < info.first_step_ts:
                info.first_step_ts = event.ts
            self.recomputed_micro_steps += event.recomputed
            if self._newer(event, self.last_step.get(event.rank)):
                self.last_step[event.rank] = event
            if event.rank == self.lead_rank and event.attempt >= self._step_attempt.get(
                event.step, -1
            ):
                self.step_seconds_by_step[event.step] = event.step_seconds
                self._step_attempt[event.step] = event.attempt
                if event.overflow:
                    self.overflow_steps.add(event.step)
                else:
                    self.overflow_steps.discard(event.step)
        elif isinstance(event, CheckpointEvent):
            if event.ok:
                if self._newer(event, self.last_checkpoint_ok):
                    self.last_checkpoint_ok = event
            else:
                self.checkpoint_failures += 1
        elif isinstance(event, ValEvent):
            if self._newer(event, self.last_val):
                self.last_val = event
        elif isinstance(event, DoneEvent) and self._newer(event, self.done):
            self.done = event

    @property
    def lead_rank(self) -> int:
        """Rank 0 reports job-level values; fall back to the lowest rank seen."""
        ranks = [s.rank for a in self.attempts.values() if (s := a.start) is not None]
        return min(ranks) if ranks else 0

    @property
    def current_attempt(self) -> AttemptInfo | None:
        return self.attempts[max(self.attempts)] if self.attempts else None

    @property
    def current_start(self) -> StartEvent | None:
        for attempt in sorted(self.attempts, reverse=True):
            if self.attempts[attempt].start is not None:
                return self.attempts[attempt].start
        return None

    @property
    def restarts(self) -> int:
        # Each attempt after the first one is a restart; attempt numbers only
        # grow, so this never decreases (it backs a Prometheus counter).
        return max(len(self.attempts) - 1, 0)

    @property
    def state(self) -> str:
        current = self.current_attempt
        if current is None:
            return "pending"
        if self.done is not None and self.done.attempt == current.attempt:
            if self.done.status == DoneStatus.CHECKPOINTED:
                return "recovering"  # stopped at a requested checkpoint, to resume resized
            return "succeeded" if self.done.status == DoneStatus.OK else "failed"
        if current.first_step_ts is None and len(self.attempts) > 1:
            return "recovering"
        return "running"

    def recovery_seconds(self) -> list[float]:
        """Per restart: last sign of life of the failed attempt -> first step of the next."""
        out = []
        ordered = [self.attempts[a] for a in sorted(self.attempts)]
        for prev, cur in zip(ordered, ordered[1:], strict=False):
            if cur.first_step_ts is not None:
                out.append(max(cur.first_step_ts - prev.last_ts, 0.0))
        return out

    def goodput_ratio(self) -> float | None:
        """Time spent on optimizer steps that were kept / wall time since the job began.

        Restart gaps, steps redone after resuming from an older checkpoint and
        checkpoint saves lower it. Each kept step counts with its whole measured
        time, so a compile inside an attempt's first step does not lower it
        (bench/goodput.py's goodput_committed counts that step at the median).
        """
        if self.first_ts is None or self.last_ts is None or self.last_ts <= self.first_ts:
            return None
        useful = sum(self.step_seconds_by_step.values())
        return min(max(useful / (self.last_ts - self.first_ts), 0.0), 1.0)

    def job_images_per_second(self) -> float:
        """Mean over the live attempt's ranks.

        Each rank reports the job's throughput (global batch / its step time),
        not its share: ranks step in lockstep, so summing would count the
        same images once per rank.
        """
        current = self.current_attempt
        if current is None:
            return 0.0
        live = [
            s.images_per_second for s in self.last_step.values() if s.attempt == current.attempt
        ]
        return sum(live) / len(live) if live else 0.0


def read_events(paths: Iterable[Path]) -> list[Event]:
    """All events of the given files, ordered by time (ties: attempt, rank)."""
    events: list[Event] = []
    for path in paths:
        events.extend(HeartbeatTail(path).read_new())
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
