"""Cancel in every state: the job ends CANCELLED, its open attempt ends 'cancelled', and
nothing of it stays placed or held."""

from __future__ import annotations

import threading
import time

import pytest
from decisions_harness import Fleet, S, train_doc

from launcher.backend_fake import Fail, FakeBackend, Run


def _pending(fleet):
    return fleet.submit(train_doc("big", devices=(32, 32)))  # more than the cluster has


def _running(fleet):
    jid = fleet.submit(train_doc("j"))
    fleet.tick(2)
    return jid


def _restarting(restart):
    def make(fleet):
        jid = fleet.submit(train_doc("j", restart={"backoffSeconds": 100.0,
                                                   "maxBackoffSeconds": 100.0, **restart}))
        fleet.backend.script(jid, Fail(1))
        fleet.run_until(jid, lambda j: j.state == S.RESTARTING)
        return jid
    return make


def _resizing(fleet):
    fleet.backend.lose_node("node-1")
    jid = fleet.submit(train_doc("j", devices=(8, 16)))
    fleet.backend.script(jid, Run())
    fleet.tick(2)
    fleet.backend.add_node("node-1")
    fleet.ctl._consider_growth()  # asks the ranks to save
    fleet.ctl._poll_running()     # they did: the attempt is resized, the job waits
    return jid


# name, how the job gets into the state, the state, the statuses of its attempts after
CASES = [
    ("pending", _pending, S.PENDING, []),
    ("running", _running, S.RUNNING, ["cancelled"]),
    ("restarting, held", _restarting({}), S.RESTARTING, ["failed"]),
    ("restarting, not held", _restarting({"inPlace": False}), S.RESTARTING, ["failed"]),
    ("resizing", _resizing, S.RESIZING, ["resized"]),
]


@pytest.mark.parametrize(("setup", "state", "statuses"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_cancel_in_every_state(fleet, setup, state, statuses):
    jid = setup(fleet)
    assert fleet.state(jid) == state
    out = fleet.ctl.cancel(jid)
    assert out == {"id": jid, "state": "CANCELLED"}
    fleet.tick(3)
    assert fleet.state(jid) == S.CANCELLED
    assert fleet.statuses(jid) == statuses
    assert fleet.backend.group_of(jid) is None and fleet.ctl.store.holds() == []
    assert jid not in fleet.ctl.runtimes
    assert fleet.ctl.cluster()["free"] == 16  # every device back in the pool


def test_cancel_while_scheduling(tmp_path, clock):
    """The start runs on its own thread: cancelled while it places, the placement is
    undone when it comes up and the ranks never start."""
    from launcher.controller import Controller

    backend = FakeBackend.servers(2, clock=clock)
    backend.place_gate = threading.Event()
    fleet = Fleet.__new__(Fleet)
    fleet.home, fleet.backend, fleet.clock, fleet.step = tmp_path, backend, clock, 1.0
    fleet.ctl = Controller(str(tmp_path), start_loop=False, backend=backend, clock=clock)
    jid = fleet.submit(train_doc("j"))
    fleet.ctl._schedule()
    assert fleet.state(jid) == S.SCHEDULING
    assert fleet.ctl.cancel(jid)["state"] == "CANCELLED"
    backend.place_gate.set()
    deadline = time.time() + 10
    while backend.count("teardown") < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert backend.count("start") == 0 and backend.group_of(jid) is None
    assert fleet.statuses(jid) == ["cancelled"]


def test_cancel_after_the_end_changes_nothing(fleet):
    jid = _running(fleet)
    fleet.backend.finish(jid)
    fleet.run_until(jid)
    assert fleet.ctl.cancel(jid) == {"id": jid, "state": "SUCCEEDED", "already": True}
    assert fleet.state(jid) == S.SUCCEEDED


def test_cancel_a_workflow_cancels_its_steps(fleet):
    from test_decide_workflows import workflow

    out = fleet.ctl.submit(workflow("wf"), {"base": str(fleet.home)})
    fleet.tick(2)
    assert fleet.state(out["steps"]["a"]) == S.RUNNING
    fleet.ctl.cancel(out["id"])
    assert {fleet.state(j) for j in out["steps"].values()} == {S.CANCELLED}
    assert fleet.state(out["id"]) == S.CANCELLED
    assert all(fleet.backend.group_of(j) is None for j in out["steps"].values())
