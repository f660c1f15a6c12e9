"""The rank contract (launcher/contract.py) and workload adapters (launcher/workloads.py), and
the checkpoint request between a node agent and smoke ranks (no Ray, no MindSpore)."""

import json
import re
import sys
import time
from pathlib import Path

import pytest

from launcher import contract as C
from launcher import workloads
from launcher.agent import NodeAgent
from launcher.planner import NodeSlice, Plan
from launcher.ranks import RankSpec, build_launch
from launcher.smoke import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_launcher_core_names_no_workload_module():
    """The launcher knows a workload only through its adapter: no module of one is named in
    the files that build, place and watch ranks."""
    for name in ("ranks.py", "checkpoints.py", "cli.py", "controller.py", "agent.py",
                 "spec.py", "policies.py"):
        src = (ROOT / "launcher" / name).read_text()
        assert not re.search(r"workloads\.volo|launcher\.smoke", src), name
        assert '"smoke"' not in src, name


def test_adapters_of_the_builtin_workloads():
    volo, smoke = workloads.adapter("volo"), workloads.adapter("smoke")
    assert volo.module(workloads.TRAIN) == "workloads.volo.train"
    assert smoke.module(workloads.VALIDATE) == "launcher.smoke"
    # the VOLO train loop joins ahead and holds on CPU only; smoke ranks never hold
    assert volo.prejoins_on("CPU") and not volo.prejoins_on("NPU")
    assert not smoke.prejoins_on("CPU")
    assert volo.checkpoint_on_request and smoke.checkpoint_on_request
    assert workloads.of_spec({}) is volo  # the spec's default workload
    with pytest.raises(ValueError, match="unknown workload 'nope'; known: smoke, volo"):
        workloads.adapter("nope")
    with pytest.raises(ValueError, match="cannot run a FooJob"):
        volo.module("FooJob")


def test_checkpoint_selection_is_the_workloads_own(tmp_path):
    from launcher.checkpoints import select_checkpoint
    from launcher.smoke import write_checkpoint

    write_checkpoint(tmp_path, 3, 8)
    newest = write_checkpoint(tmp_path, 4, 8)
    (newest / "model.ckpt").write_bytes(b"torn")  # no longer matches its manifest
    assert select_checkpoint(tmp_path, "best", "smoke") == tmp_path / "step-00000003"
    assert select_checkpoint(tmp_path, "best", "volo") == tmp_path / "step-00000003"
    assert select_checkpoint(tmp_path / "none", "latest", "smoke") is None


def test_train_ranks_get_a_request_file_each(tmp_path):
    plan = Plan(2, 4, 1, (NodeSlice("a", (0, 1)),))
    paths = {"config": "/c.yaml", "data_dir": "/d", "workdir": str(tmp_path)}
    nodes = build_launch(job_id="j", attempt=2, kind="TrainJob", spec={"workload": "smoke"},
                         paths=paths, plan=plan, home=tmp_path)
    workers = [r for r in nodes[0].ranks if r.rank is not None]
    got = [r.env[C.CHECKPOINT_REQUEST_ENV] for r in workers]
    assert got == [str(tmp_path / "jobs/j/attempt-2" / f"rank-{i}.checkpoint-request")
                   for i in range(2)]
    sched = next(r for r in nodes[0].ranks if r.rank is None)
    assert C.CHECKPOINT_REQUEST_ENV not in sched.env
    assert all(r.argv[2] == "launcher.smoke" for r in nodes[0].ranks)


def _smoke_ranks(tmp_path: Path, steps: int, step_s: float) -> list[dict]:
    plan = Plan(2, 4, 1, (NodeSlice("a", (0, 1)),))
    paths = {"config": "/c.yaml", "data_dir": "/d", "workdir": str(ROOT),
             "ckpt_dir": str(tmp_path / "ckpt")}
    spec = {"workload": "smoke", "resources": {"deviceType": "CPU"},
            "overrides": {"max_steps": steps, "step_seconds": step_s}}
    nodes = build_launch(job_id="j", attempt=1, kind="TrainJob", spec=spec, paths=paths,
                         plan=plan, home=tmp_path, python=sys.executable)
    return [r.to_dict() for r in nodes[0].ranks]


def _events(path: str) -> list[dict]:
    p = Path(path)
    return [json.loads(ln) for ln in p.read_text().splitlines()] if p.exists() else []


def _wait_status(agent: NodeAgent, want: str, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = agent.poll()
        if r["status"] == want:
            return r
        assert r["status"] == "running", r
        time.sleep(0.05)
    raise AssertionError(agent.poll())


def test_agent_checkpoint_request_stops_smoke_ranks_at_a_checkpoint(tmp_path):
    ranks = _smoke_ranks(tmp_path, steps=200, step_s=0.1)
    a = NodeAgent("j", 1, 0)
    assert not a.request_checkpoint()  # nothing runs yet: nobody to ask
    a.start(ranks)
    hb0 = next(r["heartbeat"] for r in ranks if r["rank"] == 0)
    deadline = time.time() + 30
    while not any(e["event"] == "step" and e["step"] >= 2 for e in _events(hb0)):
        assert time.time() < deadline, a.poll()
        time.sleep(0.05)
    assert a.request_checkpoint()
    r = _wait_status(a, "checkpointed")
    assert r["exit_code"] == C.EXIT_CHECKPOINTED and r["reason"] == ""
    assert {r["exits"][f"rank-{i}"] for i in range(2)} == {C.EXIT_CHECKPOINTED}
    evs = _events(hb0)
    last_step = max(e["step"] for e in evs if e["event"] == "step")
    marked = [e for e in evs if e["event"] == "checkpoint" and e.get("requested")]
    assert [(e["step"], e["ok"]) for e in marked] == [(last_step, True)]
    assert evs[-1]["event"] == "done" and evs[-1]["status"] == C.DoneStatus.CHECKPOINTED
    assert latest_checkpoint(tmp_path / "ckpt")[0] == last_step < 200
    assert not a.request_checkpoint()  # stopped: nothing left to ask


def test_agent_takes_an_unasked_exit_75_for_a_failure(tmp_path):
    a = NodeAgent("j", 1, 0)
    code = f"import sys; sys.exit({C.EXIT_CHECKPOINTED})"
    a.start([RankSpec(0, [sys.executable, "-c", code], {}, str(tmp_path / "r0.log"),
                      None, str(tmp_path)).to_dict()])
    r = _wait_status(a, "failed")
    assert r["exit_code"] == C.EXIT_CHECKPOINTED and "exit code 75" in r["reason"]
