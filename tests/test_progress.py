"""launcher/progress.py: the bounded heartbeat tail reader and the fold (no Ray)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launcher.progress import (
    MAX_LINE_BYTES,
    STEP_SECONDS_SMOOTHING,
    Event,
    HeartbeatTail,
    JobProgress,
    StepEvent,
)


def ev(kind: str, ts: float, rank: int = 0, attempt: int = 1, **fields) -> dict:
    return {"event": kind, "ts": ts, "rank": rank, "attempt": attempt, **fields}


def start(ts: float, attempt: int = 1, rank: int = 0, world: int = 2, resumed: int = 0,
          total: int = 10) -> dict:
    return ev("start", ts, rank, attempt, world_size=world, micro_batch=4, grad_accum=2,
              global_batch=8 * world, resumed_step=resumed, total_steps=total, stop_step=None)


def step(ts: float, n: int, attempt: int = 1, rank: int = 0, secs: float = 0.5,
         loss: float = 2.0) -> dict:
    return ev("step", ts, rank, attempt, step=n, epoch=0, loss=loss, lr=0.1,
              images_per_second=16 / secs, step_seconds=secs, samples_seen=16 * n,
              sample_hash=f"h{n}")


def line(obj: dict) -> str:
    return json.dumps(obj) + "\n"


def append(path: Path, text: str | bytes) -> None:
    with path.open("ab") as fh:
        fh.write(text.encode() if isinstance(text, str) else text)


def test_reads_are_bounded_and_catch_up(tmp_path):
    path = tmp_path / "rank-0.heartbeat.jsonl"
    append(path, "".join(line(step(float(n), n)) for n in range(1, 201)))
    size = path.stat().st_size
    tail = HeartbeatTail(path, max_read_bytes=size // 10)
    first = tail.read_new()
    assert 0 < len(first) < 25 and not tail.caught_up
    rest = tail.read_all_new()
    assert tail.caught_up and tail.bad_lines == 0
    assert [e.step for e in first + rest] == list(range(1, 201))


def test_truncated_or_replaced_file_is_read_again(tmp_path):
    path = tmp_path / "hb.jsonl"
    append(path, line(step(1.0, 1)) + line(step(2.0, 2)))
    tail = HeartbeatTail(path)
    assert [e.step for e in tail.read_new()] == [1, 2]
    path.write_text(line(step(3.0, 3)))  # shorter than what was read: truncated
    assert [e.step for e in tail.read_new()] == [3]
    other = tmp_path / "other.jsonl"
    other.write_text(line(step(4.0, 4)) + line(step(5.0, 5)) + line(step(6.0, 6)))
    os.replace(other, path)  # a new file under the old name, longer than the old one
    assert [e.step for e in tail.read_new()] == [4, 5, 6]


def test_huge_lines_are_counted_once_and_never_decoded(tmp_path):
    path = tmp_path / "hb.jsonl"
    tail = HeartbeatTail(path, max_read_bytes=MAX_LINE_BYTES)
    # An unterminated line that grows past the bound over several reads.
    append(path, b"x" * (MAX_LINE_BYTES - 10))
    assert tail.read_new() == []
    append(path, b"y" * (MAX_LINE_BYTES + 5))
    assert tail.read_new() == [] and tail.bad_lines == 1
    append(path, b"z" * 100 + b"\n" + line(step(1.0, 1)).encode())
    assert [e.step for e in tail.read_all_new()] == [1]
    assert tail.bad_lines == 1
    # A complete line over the bound in one read.
    big = HeartbeatTail(path, max_read_bytes=4 * MAX_LINE_BYTES)
    path.write_bytes(b'{"pad": "' + b"p" * MAX_LINE_BYTES + b'"}\n' + line(step(2.0, 2)).encode())
    assert [e.step for e in big.read_all_new()] == [2] and big.bad_lines == 1


def test_garbage_is_counted_not_raised(tmp_path):
    path = tmp_path / "hb.jsonl"
    append(path, "{not json\n[1, 2]\n\n" + line({**step(1.0, 1), "loss": "high"})
           + "\xff\xfe\n" + line(step(2.0, 2)) + line(ev("profile", 3.0)) + '{"event": "st')
    tail = HeartbeatTail(path)
    got = tail.read_new()
    assert [type(e) for e in got] == [StepEvent, Event] and got[0].step == 2
    assert tail.bad_lines == 4  # not JSON, not an object, a bad field, not UTF-8
    append(path, 'ep"}\n')  # the half-written line, finished: still no valid event
    assert tail.read_new() == [] and tail.bad_lines == 5
    records = HeartbeatTail(path)
    assert len(records.read_records()) == 4 and records.bad_lines == 3  # unchecked fields


def test_fold_summary_is_the_store_progress():
    p = JobProgress()
    for e in (start(100.0, resumed=4), start(100.0, rank=1, resumed=4),
              step(101.0, 5, secs=9.0), step(101.0, 5, rank=1, secs=9.0),
              step(102.0, 6, secs=1.0), step(102.0, 6, rank=1, secs=1.2, loss=3.0),
              step(103.0, 7, secs=2.0),
              ev("checkpoint", 103.5, step=7, path="c7", save_seconds=0.2, ok=True),
              ev("val", 104.0, step=7, top1=50.0, top5=90.0, loss=1.5),
              ev("checkpoint", 105.0, step=8, path="c8", ok=False, error="disk full")):
        assert p.apply_record(e)
    assert not p.apply_record({"event": "step", "rank": 0})  # no ts: counted, not folded
    assert p.bad_records == 1
    s = p.summary()
    # The resumed attempt's first step (the compile) stays out of the smoothed step time.
    avg = (1 - STEP_SECONDS_SMOOTHING) * 1.0 + STEP_SECONDS_SMOOTHING * 2.0
    assert s == {
        "ts": 105.0, "world_size": 2, "micro_batch": 4, "grad_accum": 2, "global_batch": 16,
        "resumed_step": 4, "total_steps": 10, "step": 7, "epoch": 0, "loss": 2.0, "lr": 0.1,
        "images_per_second": 8.0, "step_seconds": 2.0, "samples_seen": 112,
        "overflow": False, "sample_hash": "h7", "avg_step_seconds": pytest.approx(avg),
        "checkpoint_step": 8, "checkpoint_ok": False, "checkpoint_path": "c8",
        "val_top1": 50.0, "val_top5": 90.0,
    }
    assert p.last_checkpoint_ok.step == 7 and p.checkpoint_failures == 1
    assert p.last_heartbeat == {0: 105.0, 1: 102.0}


def test_fold_takes_the_newest_attempt_whatever_the_order():
    p = JobProgress()
    # The new attempt's file is read before the old one's (a scrape, a slow agent).
    for e in (start(200.0, attempt=2, world=1, resumed=3), step(201.0, 4, attempt=2, loss=1.0),
              start(100.0), step(101.0, 1), step(102.0, 2), step(103.0, 3, loss=5.0),
              ev("done", 202.0, attempt=2, step=4, status="ok")):
        p.apply_record(e)
    s = p.summary()
    assert (s["step"], s["loss"], s["world_size"], s["done"]) == (4, 1.0, 1, "ok")
    assert "avg_step_seconds" not in s  # attempt 2 has only its first step so far
    assert p.state == "succeeded" and p.restarts == 1
