"""Shrink after a node loss, grow back when the devices return: on request (the ranks save
the next step and exit 75) or, where the request cannot be passed on or is not honoured, at
the next periodic checkpoint."""

from __future__ import annotations

import pytest
from decisions_harness import S, train_doc

from launcher.contract import EXIT_CHECKPOINTED
from launcher.controller import SUSPECT_NODE_S
from launcher.reconcile import REQUEST_EXIT_GRACE_S

# name, the agents pass requests on, the behaviour of the shrunk attempt, how the grow
# happened (the resized attempt's reason), the events the grow leaves, ticks it may take
GROW = [
    ("on request", True, dict(checkpoint_every=0, on_request=True), "saved on request",
     {"grow_wanted"}, 3),
    ("request unsupported: periodic checkpoint", False,
     dict(checkpoint_every=4, on_request=True), "the periodic checkpoint",
     {"grow_wanted", "checkpoint_request_unsupported"}, 8),
    ("request ignored by the ranks: periodic checkpoint after the grace", True,
     dict(checkpoint_every=4, on_request=False), "the periodic checkpoint",
     {"grow_wanted"}, 8 + int(REQUEST_EXIT_GRACE_S)),
]


@pytest.mark.parametrize(("passes_on", "shrunk", "how", "events", "ticks"),
                         [g[1:] for g in GROW], ids=[g[0] for g in GROW])
def test_shrink_after_node_loss_then_grow(make_fleet, passes_on, shrunk, how, events,
                                          ticks):
    from launcher.backend_fake import Run

    fleet = make_fleet(servers=2)
    fleet.backend.checkpoint_requests = passes_on
    jid = fleet.submit(train_doc("elastic", devices=(8, 16)))
    fleet.backend.script(jid, Run(), Run(**shrunk), Run())
    fleet.tick(2)
    assert fleet.state(jid) == S.RUNNING
    assert fleet.attempts(jid)[-1].plan["devices"] == 16
    fleet.backend.lose_node("node-1")
    fleet.run_until(jid, lambda j: j.state == S.RUNNING and len(fleet.attempts(jid)) == 2)
    shrunk_att = fleet.attempts(jid)[-1]
    assert shrunk_att.plan["devices"] == 8  # same global batch, on what is left
    assert fleet.statuses(jid) == ["failed", "running"]
    assert "grow_wanted" not in fleet.events(jid)  # nothing better yet

    fleet.backend.add_node("node-1")
    fleet.clock.advance(SUSPECT_NODE_S)  # the lost node is avoided a while
    fleet.run_until(jid, lambda j: len(fleet.attempts(jid)) == 3 and j.state == S.RUNNING,
                    ticks=ticks + 3)
    atts = fleet.attempts(jid)
    assert [a.status for a in atts] == ["failed", "resized", "running"]
    assert how in atts[1].reason, atts[1].reason
    assert atts[2].plan["devices"] == 16
    assert events <= set(fleet.events(jid))
    assert fleet.job(jid).restarts == 1  # a grow is not a restart
    if passes_on and shrunk["on_request"]:
        assert fleet.backend.count("request_checkpoint") == 1


def test_a_rank_exiting_checkpointed_unasked_is_a_retryable_failure(fleet):
    from launcher.backend_fake import Fail, Succeed

    jid = fleet.submit(train_doc("j"))
    fleet.backend.script(jid, Fail(EXIT_CHECKPOINTED), Succeed())
    fleet.run_until(jid)
    assert fleet.state(jid) == S.SUCCEEDED
    assert fleet.statuses(jid) == ["failed", "succeeded"]


def test_no_growth_while_a_job_waits(make_fleet):
    from launcher.backend_fake import Run

    fleet = make_fleet(servers=2)
    big = fleet.submit(train_doc("big", devices=(8, 16)))
    fleet.backend.script(big, Run())
    fleet.tick(2)
    fleet.backend.lose_node("node-1")
    fleet.run_until(big, lambda j: j.state == S.RUNNING and len(fleet.attempts(big)) == 2)
    waiting = fleet.submit(train_doc("waiting", devices=(16, 16)))
    fleet.backend.add_node("node-1")
    fleet.clock.advance(SUSPECT_NODE_S)
    fleet.tick(3)
    # the queue comes first: the waiting job cannot start on 8, and big does not take them
    assert fleet.state(waiting) == S.PENDING
    assert "grow_wanted" not in fleet.events(big)
