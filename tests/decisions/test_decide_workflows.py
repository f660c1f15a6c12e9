"""Workflows: steps start in dependency order; a failed step cancels the rest."""

from __future__ import annotations

import pytest
from decisions_harness import S, train_doc

from launcher.backend_fake import Fail, Succeed


def workflow(name: str) -> dict:
    def step(n, needs):
        spec = train_doc(n)["spec"]
        spec["checkpoint"] = {"dir": f"ckpt-{n}"}
        return {"name": n, "kind": "TrainJob", "needs": needs, "spec": spec}
    return {"apiVersion": "fleet/v1", "kind": "Workflow", "metadata": {"name": name},
            "spec": {"steps": [step("a", []), step("b", ["a"]), step("c", ["b"])]}}


# the scripts of steps a, b, c -> the workflow's state, the steps' states, the steps that
# were placed (in order; a restart in place places nothing), the attempts of each step, a
# phrase of the workflow's message
CASES = [
    ("all succeed", {}, S.SUCCEEDED, [S.SUCCEEDED] * 3, ["a", "b", "c"], [1, 1, 1],
     "all steps"),
    ("b fails for good", {"b": [Fail(2)]}, S.FAILED,
     [S.SUCCEEDED, S.FAILED, S.CANCELLED], ["a", "b"], [1, 1, 0], "step b FAILED"),
    ("a fails once, then all succeed", {"a": [Fail(1), Succeed()]}, S.SUCCEEDED,
     [S.SUCCEEDED] * 3, ["a", "b", "c"], [2, 1, 1], "all steps"),
]


@pytest.mark.parametrize(("scripts", "final", "steps", "placed", "attempts", "phrase"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_workflow_steps(fleet, scripts, final, steps, placed, attempts, phrase):
    out = fleet.ctl.submit(workflow("wf"), {"base": str(fleet.home)})
    ids = out["steps"]
    for name, jid in ids.items():
        fleet.backend.script(jid, *scripts.get(name, [Succeed()]))
    fleet.run_until(out["id"], ticks=60)
    wf = fleet.job(out["id"])
    assert wf.state == final, wf.message
    assert [fleet.state(ids[n]) for n in "abc"] == steps
    assert phrase in wf.message
    assert [len(fleet.attempts(ids[n])) for n in "abc"] == attempts
    # each step started only once the one it needs had succeeded
    for before, after in ("ab", "bc"):
        if fleet.attempts(ids[after]):
            assert fleet.job(ids[before]).finished <= fleet.attempts(ids[after])[0].started
    by_pg = {fleet.attempts(ids[n])[0].pg_name.rsplit("-a", 1)[0]: n for n in ids
             if fleet.attempts(ids[n])}
    order = [by_pg[pg.rsplit("-a", 1)[0]] for w, pg in fleet.backend.calls if w == "place"]
    assert order == placed
