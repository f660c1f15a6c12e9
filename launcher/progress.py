"""One reading of the heartbeat files: the tail reader, the typed events and the fold.

Every rank appends one JSON object per line to the file named by FLEET_HEARTBEAT
(events start / step / checkpoint / val / done, each with ``event``, ``ts``, ``rank`` and
``attempt``). Three views are derived from those bytes, all by this module, so they cannot
disagree:

* the controller's (`fleet status` through the store's job progress, its hang and resize
  decisions): the node agents tail the files with :class:`HeartbeatTail` and ship the
  decoded records; the controller folds them into a :class:`JobProgress` and stores its
  :meth:`JobProgress.summary`;
* the Prometheus exporter's (launcher/metrics.py): it tails the same files with the same
  reader and folds them into the same :class:`JobProgress`;
* `fleet plot`'s (launcher/metrics_history.py): the whole files, read once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.contract import DoneStatus

log = logging.getLogger(__name__)

# A heartbeat line is a few hundred bytes; anything far larger is a corrupt or foreign
# file, and decoding it would stall a poll or a scrape.
MAX_LINE_BYTES = 64 * 1024
# What one read takes from one file: a poll or a scrape costs at most this per file, and a
# reader that fell behind catches up over the next reads.
MAX_READ_BYTES = 1 << 20
# Weight of the newest step in the smoothed step time (the ETA's): single steps jitter
# with data loading and checkpoint saves.
STEP_SECONDS_SMOOTHING = 0.2


class HeartbeatError(ValueError):
    """A heartbeat line that breaks the contract (names the file and line)."""


@dataclass(frozen=True)
class Event:
    """Fields every heartbeat line carries; an event of a kind this fold does not use
    (a newer train loop's) is one of these and still counts as a sign of life."""

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
    total_steps: int | None = None
    stop_step: int | None = None  # the step this attempt stops at, when before total_steps


@dataclass(frozen=True)
class StepEvent(Event):
    step: int
    epoch: int
    loss: float
    lr: float
    images_per_second: float
    step_seconds: float
    samples_seen: int
    sample_hash: str | None = None  # the global batch's hash (workloads/volo/sampling.py)
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
    try:
        value = obj[key]
    except KeyError:
        raise HeartbeatError(f"{where}: missing field {key!r}") from None
    # The common case first: the controller folds every rank's every line.
    t = type(value)
    if t is kind:
        return value
    if t is int and kind is float:
        return float(value)
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


def _opt(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    return _num(obj, key, kind, where) if obj.get(key) is not None else None


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    return None if obj.get(key) is None else str(obj[key])


def parse_event(obj: Any, where: str = "heartbeat") -> Event:
    """One decoded heartbeat line -> typed event.

    A kind this module does not know becomes a plain :class:`Event` (not an error), so a
    newer train loop can add events without breaking an older launcher.
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
            resumed_step=_opt(obj, "resumed_step", int, where) or 0,
            total_steps=_opt(obj, "total_steps", int, where),
            stop_step=_opt(obj, "stop_step", int, where),
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
            samples_seen=_opt(obj, "samples_seen", int, where) or 0,
            sample_hash=_opt_str(obj, "sample_hash"),
            recomputed=len(obj["recomputed"]) if isinstance(obj.get("recomputed"), list) else 0,
            loss_scale=_opt(obj, "loss_scale", float, where),
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
            error=_opt_str(obj, "error"),
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
            step=_opt(obj, "step", int, where) or 0,
            status=status,
            error=_opt_str(obj, "error"),
        )
    return Event(**base)


class HeartbeatTail:
    """Incremental, bounded reader of one heartbeat file.

    Ranks append while we read, so the last line may be half written: the bytes after the
    last newline wait for the rest of their line. Each read takes at most
    ``max_read_bytes``; :attr:`caught_up` says whether it reached the end. A line that is
    not a JSON object, or longer than ``max_line_bytes``, is counted in :attr:`bad_lines`
    and skipped (a rank killed mid-write leaves exactly that). A file that shrank or was
    replaced is read again from its start.
    """

    def __init__(self, path: str | Path, max_read_bytes: int = MAX_READ_BYTES,
                 max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.path = Path(path)
        self.max_read_bytes = max_read_bytes
        self.max_line_bytes = max_line_bytes
        self.bad_lines = 0
        self.caught_up = True
        self._offset = 0
        self._inode: int | None = None
        self._partial = b""
        self._skipping = False  # inside a line already counted as too long
        self._line_no = 0

    def _restart(self) -> None:
        self._offset, self._partial, self._skipping, self._line_no = 0, b"", False, 0

    def _chunk(self) -> bytes:
        try:
            with self.path.open("rb") as fh:
                st = os.fstat(fh.fileno())
                if st.st_size < self._offset or (
                        self._inode is not None and st.st_ino != self._inode):
                    self._restart()
                self._inode = st.st_ino
                fh.seek(self._offset)
                chunk = fh.read(self.max_read_bytes)
                self.caught_up = self._offset + len(chunk) >= st.st_size
        except FileNotFoundError:
            self.caught_up = True
            return b""
        self._offset += len(chunk)
        return chunk

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        lines = (self._partial + self._chunk()).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            self._line_no += 1
            if self._skipping:  # the tail end of a line counted when it grew too long
                self._skipping = False
                continue
            if len(raw) > self.max_line_bytes:
                self.bad_lines += 1
                log.warning("%s:%d: skipping a line over %d bytes", self.path, self._line_no,
                            self.max_line_bytes)
                continue
            if raw.strip():
                yield self._line_no, raw
        if len(self._partial) > self.max_line_bytes:
            if not self._skipping:
                self.bad_lines += 1
                log.warning("%s:%d: skipping an unterminated line over %d bytes", self.path,
                            self._line_no + 1, self.max_line_bytes)
            self._partial, self._skipping = b"", True

    def read_records(self) -> list[dict[str, Any]]:
        """New lines decoded as JSON objects, unchecked: what an agent ships to the
        controller, which types them with :func:`parse_event` as it folds them."""
        out = []
        for line_no, raw in self._lines():
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                self._skip(line_no, str(exc))
                continue
            if not isinstance(obj, dict):
                self._skip(line_no, f"expected a JSON object, got {type(obj).__name__}")
                continue
            out.append(obj)
        return out

    def _skip(self, line_no: int, why: str) -> None:
        self.bad_lines += 1
        log.warning("skipping bad heartbeat line %s:%d: %s", self.path, line_no, why)

    def read_new(self) -> list[Event]:
        """New lines as typed events."""
        events: list[Event] = []
        for line_no, raw in self._lines():
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                self._skip(line_no, str(exc))
                continue
            try:
                events.append(parse_event(obj, f"{self.path}:{line_no}"))
            except HeartbeatError as exc:  # its message names the file and line
                self.bad_lines += 1
                log.warning("skipping bad heartbeat line %s", exc)
        return events

    def read_all_new(self) -> list[Event]:
        """Like :meth:`read_new`, until caught up (each read still bounded)."""
        events = self.read_new()
        while not self.caught_up:
            events += self.read_new()
        return events


@dataclass
class AttemptInfo:
    attempt: int
    first_ts: float
    last_ts: float
    start: StartEvent | None = None
    first_step_ts: float | None = None
    # The lead rank's step time, smoothed over this attempt's steps after its first one
    # (the first includes the graph compile).
    avg_step_seconds: float | None = None


@dataclass
class JobProgress:
    """Everything known about one job's training from its heartbeats, folded event by event.

    Events may arrive out of order across rank files, so "latest" always means the highest
    (attempt, ts), never the last one applied. Job-level values come from the lead rank
    (rank 0, or the lowest rank that started).
    """

    attempts: dict[int, AttemptInfo] = field(default_factory=dict)
    last_step: dict[int, StepEvent] = field(default_factory=dict)
    # Per rank: ts of its newest line of any kind (the hang watchdog's and the exporter's).
    last_heartbeat: dict[int, float] = field(default_factory=dict)
    last_val: ValEvent | None = None
    last_checkpoint: CheckpointEvent | None = None  # saved or failed
    last_checkpoint_ok: CheckpointEvent | None = None
    checkpoint_failures: int = 0
    recomputed_micro_steps: int = 0
    done: DoneEvent | None = None
    # Seconds per optimizer step, one entry per step number: a step redone after
    # a restart replaces the lost one, so the sum is the work that was kept.
    step_seconds_by_step: dict[int, float] = field(default_factory=dict)
    # Step numbers whose gradients overflowed, by the same rule: a redone step counts once.
    overflow_steps: set[int] = field(default_factory=set)
    # Records handed to apply_record that break the contract.
    bad_records: int = 0
    _step_attempt: dict[int, int] = field(default_factory=dict)
    first_ts: float | None = None
    last_ts: float | None = None
    _lead: int | None = None  # the lowest rank that sent a start line

    @staticmethod
    def _newer(a: Event, b: Event | None) -> bool:
        return b is None or (a.attempt, a.ts) >= (b.attempt, b.ts)

    def apply_record(self, obj: Any, where: str = "heartbeat") -> bool:
        """Fold one decoded line; False (and counted) when it breaks the contract."""
        try:
            event = parse_event(obj, where)
        except HeartbeatError as exc:
            self.bad_records += 1
            log.warning("skipping bad heartbeat record: %s", exc)
            return False
        self.apply(event)
        return True

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
            if self._lead is None or event.rank < self._lead:
                self._lead = event.rank
        elif isinstance(event, StepEvent):
            self._apply_step(info, event)
        elif isinstance(event, CheckpointEvent):
            if self._newer(event, self.last_checkpoint):
                self.last_checkpoint = event
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

    def _apply_step(self, info: AttemptInfo, event: StepEvent) -> None:
        if info.first_step_ts is None or event.ts < info.first_step_ts:
            info.first_step_ts = event.ts
        self.recomputed_micro_steps += event.recomputed
        if self._newer(event, self.last_step.get(event.rank)):
            self.last_step[event.rank] = event
        if event.rank != self.lead_rank:
            return
        resumed = info.start.resumed_step if info.start is not None else 0
        if event.step != resumed + 1:
            prev, dt = info.avg_step_seconds, event.step_seconds
            info.avg_step_seconds = dt if prev is None else (
                (1 - STEP_SECONDS_SMOOTHING) * prev + STEP_SECONDS_SMOOTHING * dt)
        if event.attempt >= self._step_attempt.get(event.step, -1):
            self.step_seconds_by_step[event.step] = event.step_seconds
            self._step_attempt[event.step] = event.attempt
            if event.overflow:
                self.overflow_steps.add(event.step)
            else:
                self.overflow_steps.discard(event.step)

    @property
    def lead_rank(self) -> int:
        """Rank 0 reports job-level values; fall back to the lowest rank that started."""
        return 0 if self._lead is None else self._lead

    @property
    def lead_step(self) -> StepEvent | None:
        """The lead rank's newest step: the job's step, loss, lr, epoch and samples."""
        return self.last_step.get(self.lead_rank)

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
    def avg_step_seconds(self) -> float | None:
        current = self.current_attempt
        return None if current is None else current.avg_step_seconds

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

    def summary(self) -> dict[str, Any]:
        """The store's job progress (JSON; read by `fleet status`, launcher/progress_view.py
        and the controller's restart decisions). A key is absent until its event came."""
        out: dict[str, Any] = {}
        if self.last_ts is not None:
            out["ts"] = self.last_ts
        start = self.current_start
        if start is not None:
            out.update(world_size=start.world_size, micro_batch=start.micro_batch,
                       grad_accum=start.grad_accum, global_batch=start.global_batch,
                       resumed_step=start.resumed_step)
            if start.total_steps is not None:
                out["total_steps"] = start.total_steps
            if start.stop_step is not None:
                out["stop_step"] = start.stop_step
        s = self.lead_step
        if s is not None:
            out.update(step=s.step, epoch=s.epoch, loss=s.loss, lr=s.lr,
                       images_per_second=s.images_per_second, step_seconds=s.step_seconds,
                       samples_seen=s.samples_seen, overflow=s.overflow)
            if s.sample_hash is not None:
                out["sample_hash"] = s.sample_hash
            if s.loss_scale is not None:
                out["loss_scale"] = s.loss_scale
        if self.avg_step_seconds is not None:
            out["avg_step_seconds"] = self.avg_step_seconds
        ck = self.last_checkpoint
        if ck is not None:
            out.update(checkpoint_step=ck.step, checkpoint_ok=ck.ok, checkpoint_path=ck.path)
        if self.last_val is not None:
            out.update(val_top1=self.last_val.top1, val_top5=self.last_val.top5)
        if self.done is not None:
            out["done"] = self.done.status
        return out
