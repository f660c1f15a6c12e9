"""The scheduler simulation (bench/scheduler_sim.py) on a small fleet: its
invariants (exact plans, valid counts, no chip leaked or given twice, every job
placed) are asserted inside `simulate`."""

import importlib.util
from pathlib import Path

import pytest

from launcher.planner import FreePool, Request
from launcher.scheduler import PriorityFifo, QueuedJob, schedule

SIM = Path(__file__).resolve().parents[1] / "bench" / "scheduler_sim.py"


def load_sim():
    spec = importlib.util.spec_from_file_location("scheduler_sim", SIM)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("backfill", [False, True])
def test_small_simulation_invariants(backfill):
    res = load_sim().simulate(400, 96, seed=1, backfill=backfill)
    assert res["decisions"] == 400
    assert 0 < res["mean_utilisation_while_arriving"] <= 1


def q(id_, prio, seq, d):
    return QueuedJob(id_, prio, seq, Request(d, d, d, 1))


def test_priority_then_fifo_and_head_of_line_blocking():
    pool = FreePool.from_free({"a": range(8), "b": range(8)})
    queue = [q("low", 0, 1, 8), q("big", 5, 3, 16), q("high", 5, 2, 8)]
    placed = [j.id for j, _ in schedule(queue, pool, 0.0)]
    # high (prio 5, older) first; big then does not fit and blocks low.
    assert placed == ["high"]
    pool = FreePool.from_free({"a": range(8), "b": range(8)})
    placed = [j.id for j, _ in schedule(queue, pool, 0.0, PriorityFifo(backfill=True))]
    assert placed == ["high", "low"]


def test_backoff_does_not_block():
    pool = FreePool.from_free({"a": range(8)})
    waiting = q("backoff", 9, 1, 8)
    waiting.not_before = 100.0
    placed = [j.id for j, _ in schedule([waiting, q("now", 0, 2, 8)], pool, 50.0)]
    assert placed == ["now"]
