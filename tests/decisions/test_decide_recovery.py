"""A held placement is durable: a new controller over the same store finds it and restarts
in place, or releases it and records why; never torn down without a word."""

from __future__ import annotations

import pytest
from decisions_harness import S, train_doc

from launcher.backend_fake import Fail, Succeed


def _nothing(fleet, jid):
    pass


def _lose_held_node(fleet, jid):
    fleet.backend.lose_node(fleet.backend.group_of(jid).nodes[0])


def _forget_group(fleet, jid):
    fleet.backend.groups.pop(fleet.backend.group_of(jid).name)


# while the controller is down -> the new controller's event, whether attempt 2 reuses
# attempt 1's placement
CASES = [
    ("nothing happens", _nothing, "hold_reattached", True),
    ("the held node is lost", _lose_held_node, "hold_end", False),
    ("the held group is gone", _forget_group, "hold_end", False),
]


@pytest.mark.parametrize(("meanwhile", "event", "in_place"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_hold_across_a_controller_restart(fleet, meanwhile, event, in_place):
    jid = fleet.submit(train_doc("j", restart={"backoffSeconds": 100.0,
                                               "maxBackoffSeconds": 100.0}))
    fleet.backend.script(jid, Fail(1), Succeed())
    fleet.run_until(jid, lambda j: j.state == S.RESTARTING)
    [hold] = fleet.ctl.store.holds()
    assert hold.job == jid and hold.attempt == 1
    meanwhile(fleet, jid)
    teardowns = fleet.backend.count("teardown")
    fleet.restart_controller()
    assert event in fleet.events(jid)
    assert fleet.state(jid) == S.RESTARTING
    if in_place:
        assert fleet.backend.count("teardown") == teardowns  # kept, not torn down
        assert len(fleet.ctl.store.holds()) == 1
    else:
        ends = [e for e in fleet.ctl.store.events(jid) if e["kind"] == "hold_end"]
        assert "released after a controller restart" in ends[-1]["why"]
        assert fleet.ctl.store.holds() == []
    fleet.clock.advance(100 * 1.25)
    fleet.run_until(jid)
    assert fleet.state(jid) == S.SUCCEEDED
    first, second = fleet.attempts(jid)
    assert (first.pg_name == second.pg_name) is in_place
    assert fleet.ctl.store.holds() == []


def test_held_devices_stay_out_of_the_free_pool(make_fleet):
    fleet = make_fleet(servers=1)
    jid = fleet.submit(train_doc("j", restart={"backoffSeconds": 100.0,
                                               "maxBackoffSeconds": 100.0}))
    fleet.backend.script(jid, Fail(1), Succeed())
    fleet.run_until(jid, lambda j: j.state == S.RESTARTING)
    other = fleet.submit(train_doc("other"))
    fleet.restart_controller()  # the ledger is rebuilt from the store's hold
    fleet.tick(3)
    assert fleet.state(other) == S.PENDING
    assert fleet.ctl.cluster()["free"] == 0


def test_a_running_job_is_reattached_after_a_controller_restart(fleet):
    jid = fleet.submit(train_doc("j"))
    fleet.tick(2)
    assert fleet.state(jid) == S.RUNNING
    fleet.restart_controller()
    assert "reattached" in fleet.events(jid)
    fleet.backend.finish(jid)
    fleet.run_until(jid)
    assert fleet.state(jid) == S.SUCCEEDED and fleet.statuses(jid) == ["succeeded"]
