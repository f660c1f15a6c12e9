"""Every failure kind, as a table: what the ranks do -> the job's state, its attempts and
how each restart was placed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from decisions_harness import S, train_doc

from launcher.backend_fake import Fail, Hang, NoPlace, Run, Silent, StartFails, Succeed


def test_ray_is_not_importable_here():
    assert sys.modules["ray"] is None
    with pytest.raises(ImportError):
        import ray  # noqa: F401


def test_the_controller_and_fake_backend_import_without_ray():
    """Importing them (as collecting this folder does) never touches Ray."""
    import subprocess

    code = ("import sys; sys.modules['ray'] = None; import launcher.controller, "
            "launcher.backend_fake, launcher.policies, launcher.reconcile; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=root, timeout=120, check=True)
    assert out.stdout.strip() == "['ray']"  # only the blocked entry itself


def _lose_node_of(fleet, jid):
    fleet.backend.lose_node(fleet.backend.group_of(jid).nodes[0])


# name, script, restart policy, an act on the cluster after 2 ticks, final state,
# attempt statuses, a phrase of the job's message or of an attempt's reason, restarts,
# whether attempt 2 ran on attempt 1's placement (restart in place)
CASES = [
    ("retryable exit", [Fail(1), Succeed()], {}, None, S.SUCCEEDED,
     ["failed", "succeeded"], "rank-0 exited with exit code 1", 1, True),
    ("bad config exit 2", [Fail(2)], {}, None, S.FAILED,
     ["failed"], "not retryable: configuration or recipe error", 0, None),
    ("recipe mismatch exit 3", [Fail(3)], {}, None, S.FAILED,
     ["failed"], "not retryable", 0, None),
    ("lost node", [Run(), Succeed()], {}, _lose_node_of, S.SUCCEEDED,
     ["failed", "succeeded"], "agent 0 lost", 1, False),
    ("hang", [Hang(after=1), Succeed()], {"hangTimeoutSeconds": 5}, None, S.SUCCEEDED,
     ["failed", "succeeded"], "heartbeat stalled", 1, True),
    ("startup timeout", [Silent(), Succeed()], {"startupTimeoutSeconds": 5}, None,
     S.SUCCEEDED, ["failed", "succeeded"], "sent no heartbeat in", 1, True),
    ("start failure", [StartFails(), Succeed()], {}, None, S.SUCCEEDED,
     ["failed", "succeeded"], "start failed: RuntimeError: rank-0: cannot start", 1, False),
    ("unplaceable", [NoPlace(), Succeed()], {}, None, S.SUCCEEDED,
     ["unplaceable", "succeeded"], "placement group not placed", 0, False),
    ("restart budget spent", [Fail(1), Fail(1)], {"maxRestarts": 1}, None, S.FAILED,
     ["failed", "failed"], "failed after 1 restart(s)", 1, True),
    ("no restarts", [Fail(1)], {"maxRestarts": 0}, None, S.FAILED,
     ["failed"], "failed after 0 restart(s): rank-0 exited with exit code 1", 0, None),
]


@pytest.mark.parametrize(("script", "restart", "act", "final", "statuses", "phrase",
                          "restarts", "in_place"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_failure_kinds(make_fleet, script, restart, act, final, statuses, phrase, restarts,
                       in_place):
    fleet = make_fleet(servers=2)
    jid = fleet.submit(train_doc("j", restart=restart))
    fleet.backend.script(jid, *script)
    fleet.tick(2)
    if act is not None:
        act(fleet, jid)
    fleet.run_until(jid, ticks=30)
    job = fleet.job(jid)
    assert job.state == final, job.message
    assert fleet.statuses(jid) == statuses
    assert job.restarts == restarts
    said = [job.message] + [a.reason for a in fleet.attempts(jid)]
    assert any(phrase in s for s in said), said
    if in_place is not None:
        first, second = fleet.attempts(jid)[:2]
        assert (first.pg_name == second.pg_name) is in_place
        assert ("hold" in fleet.events(jid)) is in_place
    # nothing is left placed or held once the job is over
    assert fleet.backend.group_of(jid) is None and fleet.ctl.store.holds() == []


# failures in a row without a new checkpoint -> the placement of each restart
PLACEMENT = [
    ("in place twice then afresh", {"inPlace": True}, 3, [True, True, False]),
    ("in place off", {"inPlace": False}, 2, [False, False]),
    ("one failure", {"inPlace": True}, 1, [True]),
]


@pytest.mark.parametrize(("restart", "failures", "kept"), [c[1:] for c in PLACEMENT],
                         ids=[c[0] for c in PLACEMENT])
def test_restart_placement_follows_the_failure_streak(fleet, restart, failures, kept):
    from launcher.spec import IN_PLACE_MAX_FAILURES

    assert IN_PLACE_MAX_FAILURES == 2  # the table's first row is written for it
    jid = fleet.submit(train_doc("j", restart={"maxRestarts": 10, **restart}))
    fleet.backend.script(jid, *[Fail(1)] * failures, Succeed())
    fleet.run_until(jid, ticks=40)
    assert fleet.state(jid) == S.SUCCEEDED
    atts = fleet.attempts(jid)
    assert len(atts) == failures + 1
    assert [a.pg_name == b.pg_name for a, b in zip(atts, atts[1:], strict=False)] == kept
    placed = fleet.backend.count("place")
    assert placed == 1 + kept.count(False)
