"""The controller survives its own failures: no overflow in a long crash loop, and a
decision that raises leaves its job FAILED with the reason, never stuck RUNNING.

The controller runs here as a plain object without a Ray cluster: its agents are fakes
whose `poll.remote()` returns the poll result and `ray.get` hands it back."""

from __future__ import annotations

import pytest

from launcher import controller as ctl
from launcher.lifecycle import JobState
from launcher.planner import NodeSlice, Plan

S = JobState

SPEC = {"workload": "smoke", "config": "/c", "data": {"dir": "/d"},
        "resources": {"deviceType": "CPU", "devicesPerNode": 8, "devices": {"min": 1, "max": 1}},
        "batch": {"global": 8, "microBatchMax": 8},
        "restart": {"maxRestarts": 1000, "backoffSeconds": 0.0, "maxBackoffSeconds": 0.0,
                    "inPlace": True}}


class _Call:
    def __init__(self, value):
        self.value = value

    def remote(self, *a, **k):
        return self.value


class FakeAgent:
    def __init__(self, poll: dict):
        self.poll = _Call(poll)


@pytest.fixture()
def controller(tmp_path, monkeypatch):
    import ray
    monkeypatch.setenv("FLEET_METRICS", "0")
    monkeypatch.delenv("FLEET_K8S_RAYCLUSTER", raising=False)
    monkeypatch.setattr(ray, "get", lambda x, timeout=None: x)
    c = ctl.Controller(str(tmp_path), start_loop=False)
    monkeypatch.setattr(c, "_teardown", lambda rt, failed=False: None)
    return c


def running_job(c: ctl.Controller, poll: dict) -> tuple[str, ctl.Runtime]:
    row = c.store.add_job("j", "TrainJob", SPEC, {"config": "/c", "data_dir": "/d"}, 0)
    plan = Plan(1, 8, 1, (NodeSlice("n0", (0,)),))
    att = c.store.add_attempt(row.id, plan.to_dict(), "fleet-pg-j-a{n}")
    c.store.set_state(row.id, S.SCHEDULING)
    c.store.set_state(row.id, S.RUNNING)
    rt = ctl.Runtime(row.id, att.n, plan, att.pg_name, agents=[FakeAgent(poll)], launched=True)
    c.runtimes[row.id] = rt
    return row.id, rt


FAILED_POLL = {"status": "failed", "reason": "rank-0 exited 1", "exit_code": 1, "events": []}


def test_backoff_never_overflows():
    for streak in (1, 1024, 1025, 10**6):
        assert ctl.backoff_seconds({"backoffSeconds": 0.0}, streak) == 0.0
        d = ctl.backoff_seconds({"backoffSeconds": 2.0, "maxBackoffSeconds": 60.0}, streak)
        assert 2.0 <= d <= 60.0 * 1.25


def test_a_long_crash_loop_still_restarts(controller):
    job_id, _rt = running_job(controller, FAILED_POLL)
    controller._failure_streaks[job_id] = 1100  # 2**1100 overflowed a float
    controller._poll_running()
    job = controller.store.get_job(job_id)
    assert job.state == S.RESTARTING and job.restarts == 1, job.message
    assert controller.store.attempts(job_id)[-1].status == "failed"


def test_a_decision_that_raises_fails_the_job_with_the_reason(controller, monkeypatch):
    job_id, _rt = running_job(controller, FAILED_POLL)
    other, _ = running_job(controller, {"status": "running", "events": []})

    def broken(*a, **k):
        raise RuntimeError("bug in a decision")

    monkeypatch.setattr(controller, "_note_last_words", broken)
    controller._poll_running()  # does not raise: the other job's decision still runs
    job = controller.store.get_job(job_id)
    assert job.state == S.FAILED
    assert "controller error while acting on its ranks' state: RuntimeError: bug in a " \
           "decision" in job.message
    assert job_id not in controller.runtimes
    [att] = controller.store.attempts(job_id)
    assert att.ended is not None and att.status == "error"
    assert any(e["kind"] == "controller_error" for e in controller.store.events(job_id))
    assert controller.store.get_job(other).state == S.RUNNING and other in controller.runtimes


def test_a_stored_spec_the_code_cannot_read_fails_that_job_only(controller):
    bad = controller.store.add_job("bad", "TrainJob", {"resources": {"devices": "x"}}, {}, 0)
    good = controller.store.add_job("good", "TrainJob", SPEC, {}, 0)
    queued = controller._queued()
    assert [q.id for q in queued] == [good.id]
    job = controller.store.get_job(bad.id)
    assert job.state == S.FAILED and "reading the stored spec" in job.message
