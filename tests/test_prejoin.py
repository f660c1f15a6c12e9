"""Restarts in place onto processes that joined the next attempt's cluster ahead of time:
the rank side (workloads/volo/prejoin.py) and the agent side (launcher/prejoin.py, with a
probe rank that holds like the train loop; the real VOLO path runs in
tests/faults/test_faults_volo.py::test_sigkill_one_rank_mid_step)."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from launcher.agent import NodeAgent
from launcher.prejoin import hold_log
from launcher.ranks import RankSpec
from workloads.volo import prejoin

TESTS = Path(__file__).parent
REPO = TESTS.parent


# ------------------------------------------------------------------ rank side
def test_go_line_sets_the_env_and_ends_the_hold():
    env = {"FLEET_HOLD": "1", "FLEET_ATTEMPT": "2"}
    got = prejoin.wait_for_go(io.StringIO('{"env": {"FLEET_SPAWN_TS": "12.5"}}\n'), env)
    assert got == {"FLEET_SPAWN_TS": "12.5"}
    assert env == {"FLEET_ATTEMPT": "2", "FLEET_SPAWN_TS": "12.5"}  # no longer holding
    assert not prejoin.holding(env)


def test_end_of_input_releases_the_rank():
    with pytest.raises(prejoin.Released):
        prejoin.wait_for_go(io.StringIO(""), {"FLEET_HOLD": "1"})


@pytest.mark.parametrize("line", ['{"go": 1}\n', "go\n", '{"env": {"A": 1}}\n'])
def test_a_malformed_go_line_is_an_error_that_names_the_protocol(line):
    with pytest.raises(ValueError, match="FLEET_HOLD: the agent's go line"):
        prejoin.wait_for_go(io.StringIO(line), {"FLEET_HOLD": "1"})


def test_held_logs_live_outside_the_attempt_directory():
    assert hold_log("/h/jobs/j/attempt-3/rank-1.log") == "/h/jobs/j/prejoin-3/rank-1.log"
    assert hold_log("/h/jobs/j/attempt-3/scheduler.log") == "/h/jobs/j/prejoin-3/scheduler.log"


# ------------------------------------------------------------------ agent side
def _probe(home: Path, attempt: int, seconds: float, code: int, port: str = "1",
           import_s: float = 0) -> dict:
    adir = home / f"attempt-{attempt}"
    env = {"FLEET_ATTEMPT": str(attempt), "FLEET_HEARTBEAT": str(adir / "rank-0.hb"),
           "MS_SCHED_PORT": port, "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}",
           "PROBE_IMPORT_SECONDS": str(import_s)}
    return RankSpec(0, [sys.executable, "-m", "prejoin_probe", str(seconds), str(code)], env,
                    str(adir / "rank-0.log"), env["FLEET_HEARTBEAT"], str(home)).to_dict()


def _report(home: Path, attempt: int) -> dict:
    lines = (home / f"attempt-{attempt}" / "rank-0.log").read_text().splitlines()
    return json.loads(next(ln for ln in lines if ln.startswith("{")))


def _until(cond, timeout: float = 30, poll: NodeAgent | None = None) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        if poll is not None:
            poll.poll()
        time.sleep(0.05)


def _held_pid(agent: NodeAgent, home: Path, attempt: int) -> int:
    """After attempt `attempt - 1`'s first step: the process held for `attempt`."""
    _until(lambda: agent.standbys(), poll=agent)
    (pid,) = agent.standbys()
    log = home / f"prejoin-{attempt}" / "rank-0.log"
    _until(lambda: log.exists() and prejoin.HOLDING in log.read_text())
    return pid


def _wait_ended(agent: NodeAgent) -> dict:
    _until(lambda: agent._status != "running")
    return agent.poll()


def test_a_restart_in_place_promotes_the_held_process(tmp_path):
    a = NodeAgent("j-pj", 1, 0, standby=False)
    a.start([_probe(tmp_path, 1, 30, 0)], next_ranks=[_probe(tmp_path, 2, 0, 5)])
    held = _held_pid(a, tmp_path, 2)
    assert not (tmp_path / "attempt-2").exists()  # the attempt has not started
    a.stop(grace=1.0, keep_standbys=True)
    assert a.standbys() == [held]
    assert a.prejoined_for([_probe(tmp_path, 2, 0, 5)])

    t_go = time.time()
    res = a.start([_probe(tmp_path, 2, 0, 5)], attempt=2,
                  next_ranks=[_probe(tmp_path, 3, 0, 0)])
    assert res["prejoined"] == ["rank-0"] and res["from_standby"] == []
    assert res["pids"]["rank-0"] == held  # the same process, now the rank
    r = _wait_ended(a)
    assert "rank-0 exited with exit code 5" in r["reason"], r  # its real exit code
    assert any(e.get("event") == "step" for e in r["events"])
    rep = _report(tmp_path, 2)
    assert rep["pid"] == held and rep["attempt"] == "2" and rep["held"] is True
    assert rep["hold_env"] is None and float(rep["spawn_ts"]) >= t_go - 1
    # one log under the rank's name: what it wrote while holding, then as the rank
    text = (tmp_path / "attempt-2" / "rank-0.log").read_text()
    assert text.index(prejoin.HOLDING) < text.index('{"pid"')
    assert not (tmp_path / "prejoin-2").exists()
    a.stop(grace=0.5)
    assert a.standbys() == []


def test_a_process_promoted_before_it_holds_reads_the_go_line_once_it_does(tmp_path):
    # a fault right after a start: the next attempt's process is still importing
    a = NodeAgent("j-pj5", 1, 0, standby=False)
    nxt = _probe(tmp_path, 2, 0, 0, import_s=2)
    a.start([_probe(tmp_path, 1, 30, 0)], next_ranks=[nxt])
    _until(lambda: a.standbys(), poll=a)
    (spawned,) = a.standbys()
    a.stop(grace=1.0, keep_standbys=True)
    assert prejoin.HOLDING not in (tmp_path / "prejoin-2" / "rank-0.log").read_text()
    res = a.start([nxt], attempt=2)
    assert res["prejoined"] == ["rank-0"] and res["pids"]["rank-0"] == spawned
    assert _wait_ended(a)["status"] == "succeeded"
    rep = _report(tmp_path, 2)
    assert rep["pid"] == spawned and rep["held"] is True


def test_held_processes_for_other_specs_are_released_and_the_rank_starts_cold(tmp_path):
    a = NodeAgent("j-pj2", 1, 0, standby=False)
    a.start([_probe(tmp_path, 1, 30, 0)], next_ranks=[_probe(tmp_path, 2, 0, 0, port="1")])
    held = _held_pid(a, tmp_path, 2)
    a.stop(grace=1.0, keep_standbys=True)
    # the controller fell back to a scheduler port of its own: nothing may be promoted
    other = _probe(tmp_path, 2, 0, 0, port="2")
    assert not a.prejoined_for([other])
    res = a.start([other], attempt=2)
    assert res["prejoined"] == [] and res["pids"]["rank-0"] != held
    assert not psutil.pid_exists(held) or psutil.Process(held).status() == "zombie"
    assert not (tmp_path / "prejoin-2").exists()
    _wait_ended(a)
    assert _report(tmp_path, 2)["held"] is False


def test_a_dead_held_process_means_a_cold_start(tmp_path):
    a = NodeAgent("j-pj3", 1, 0, standby=False)
    a.start([_probe(tmp_path, 1, 30, 0)], next_ranks=[_probe(tmp_path, 2, 0, 0)])
    held = _held_pid(a, tmp_path, 2)
    a.stop(grace=1.0, keep_standbys=True)
    psutil.Process(held).kill()
    _until(lambda: a.standbys() == [])
    assert not a.prejoined_for([_probe(tmp_path, 2, 0, 0)])
    res = a.start([_probe(tmp_path, 2, 0, 0)], attempt=2)
    assert res["prejoined"] == []
    assert _wait_ended(a)["status"] == "succeeded"


def test_stopping_the_job_lets_the_held_process_go(tmp_path):
    a = NodeAgent("j-pj4", 1, 0, standby=False)
    a.start([_probe(tmp_path, 1, 30, 0)], next_ranks=[_probe(tmp_path, 2, 0, 0)])
    held = _held_pid(a, tmp_path, 2)
    a.stop(grace=1.0)
    assert a.standbys() == []
    assert not psutil.pid_exists(held) or psutil.Process(held).status() == "zombie"
    assert not (tmp_path / "prejoin-2").exists() and not (tmp_path / "attempt-2").exists()


# ------------------------------------------------------------------ controller side
class _Call:
    def __init__(self, fn):
        self.remote = fn


class _FakeAgent:
    """What Controller._launches asks of an agent; answers directly (ray.get is identity)."""

    def __init__(self, holds: bool, ports=(5001, 5002)):
        self.asked: list[list[dict]] = []
        self.port_hosts: list[str] = []
        self.free_ports = _Call(lambda n, host: self.port_hosts.append(host) or list(ports)[:n])
        self.prejoined_for = _Call(lambda ranks: self.asked.append(ranks) or holds)


def _launch_setup(monkeypatch, tmp_path, holds, workload="volo", sched_port=None,
                  device="CPU"):
    import ray

    from launcher.controller import Controller, Runtime
    from launcher.planner import NodeSlice, Plan
    from launcher.store import JobRow

    monkeypatch.setattr(ray, "get", lambda x, timeout=None: x)
    from launcher.backend_ray import RayBackend

    ctl = Controller.__new__(Controller)  # _launches needs only the fleet home and backend
    ctl.home = tmp_path
    ctl.backend = RayBackend()
    plan = Plan(2, 4, 1, (NodeSlice("a", (0,)), NodeSlice("b", (0,))))
    job = JobRow.__new__(JobRow)
    job.id, job.kind = "j-pj", "TrainJob"
    job.spec = {"workload": workload, "resources": {"deviceType": device}}
    job.paths = {"config": "/c.yaml", "data_dir": "/data", "workdir": str(tmp_path)}
    rt = Runtime("j-pj", 4, plan, "fleet-pg-j-pj-a3")
    rt.agents = [_FakeAgent(h) for h in holds]
    rt.sched_port = sched_port
    infos = [{"ip": "127.0.0.1"}] * len(holds)
    return ctl, job, rt, infos


def _port_and_attempt(nodes) -> set[tuple[str, str]]:
    """{(scheduler port, attempt)} over NodeLaunches or per-agent lists of rank dicts."""
    rows = [[r.to_dict() for r in n.ranks] if hasattr(n, "ranks") else n for n in nodes]
    return {(r["env"]["MS_SCHED_PORT"], r["env"]["FLEET_ATTEMPT"]) for row in rows for r in row}


def test_the_next_attempt_is_fixed_in_advance_on_its_own_port(monkeypatch, tmp_path):
    ctl, job, rt, infos = _launch_setup(monkeypatch, tmp_path, [True, True])
    launches, nexts = ctl._launches(job, rt, infos)
    assert _port_and_attempt(launches) == {("5001", "4")}
    assert _port_and_attempt(nexts) == {("5002", "5")} and rt.next_port == 5002
    assert [len(n) for n in nexts] == [2, 1]  # scheduler + rank 0 on a, rank 1 on b


def test_a_restart_in_place_reuses_the_port_when_every_agent_holds(monkeypatch, tmp_path):
    ctl, job, rt, infos = _launch_setup(monkeypatch, tmp_path, [True, True], sched_port=4000)
    launches, nexts = ctl._launches(job, rt, infos)
    assert _port_and_attempt(launches) == {("4000", "4")}
    # each agent was asked about exactly the ranks it is then given
    assert [a.asked for a in rt.agents] == [[[r.to_dict() for r in nl.ranks]]
                                            for nl in launches]
    assert rt.next_port in (5001, 5002) and _port_and_attempt(nexts) == {
        (str(rt.next_port), "5")}


def test_one_agent_without_its_held_processes_sends_all_to_a_cold_start(monkeypatch, tmp_path):
    ctl, job, rt, infos = _launch_setup(monkeypatch, tmp_path, [True, False], sched_port=4000)
    launches, nexts = ctl._launches(job, rt, infos)
    assert _port_and_attempt(launches) == {("5001", "4")}  # none on the held group's port
    assert _port_and_attempt(nexts) == {("5002", "5")}


def test_the_port_is_chosen_on_the_node_address_the_scheduler_binds(monkeypatch, tmp_path):
    ctl, job, rt, infos = _launch_setup(monkeypatch, tmp_path, [True, True])
    infos = [{"ip": "10.1.2.3"}, {"ip": "10.1.2.4"}]
    launches, _ = ctl._launches(job, rt, infos)
    sched = [r for nl in launches for r in nl.ranks if r.env.get("MS_ROLE") == "MS_SCHED"]
    assert [r.env["MS_SCHED_HOST"] for r in sched] == ["10.1.2.3"]
    assert rt.agents[0].port_hosts == ["10.1.2.3"]
    assert rt.agents[1].port_hosts == []


@pytest.mark.parametrize("kw", [{"workload": "smoke"}, {"device": "NPU"}])
def test_smoke_ranks_and_npu_ranks_join_nothing_ahead(monkeypatch, tmp_path, kw):
    ctl, job, rt, infos = _launch_setup(monkeypatch, tmp_path, [True, True], **kw)
    launches, nexts = ctl._launches(job, rt, infos)
    assert nexts == [[], []] and rt.next_port is None
    assert ctl._standby(job)  # they keep the standbys that import ahead


# ------------------------------------------------------------------ the trainer's warm-up
def test_warm_up_compiles_and_leaves_no_trace(tmp_path, digits):
    """A held rank runs the compiled step once on zeros before it holds (Trainer.warm_up):
    afterwards every parameter and optimizer state is as before, and training from there
    (including a checkpoint loaded into the compiled graphs' memory) is bit-identical to a
    trainer that never warmed up."""
    import mindspore as ms

    from workloads.volo.config import parse_args
    from workloads.volo.data import soft_targets
    from workloads.volo.train import Trainer, _configure_mindspore, make_plan

    args = parse_args(["-c", "workloads/volo/configs/volo_tiny_digits.yaml", "--data_dir",
                       str(digits), "--val_while_train", "False"])
    _configure_mindspore(args)
    plan = make_plan(args, 1)
    ms.set_seed(0)
    cold = Trainer(plan, 1)
    ms.set_seed(0)
    warm = Trainer(plan, 1)
    state = {p.name: p.asnumpy().copy() for p in warm.state_params()}
    warm.warm_up(4, 32, 10)
    assert warm.warmed_up
    for p in warm.state_params():
        assert np.array_equal(p.asnumpy(), state[p.name]), p.name
    for p in cold.state_params():  # the two start equal
        assert np.array_equal(p.asnumpy(), state[p.name]), p.name

    # a checkpoint that differs from the initial state: loading it must reach the graphs
    rng = np.random.default_rng(0)
    weights = {p.name for p in warm.net.trainable_params()}  # not moments, not BN variances
    ckpt = [{"name": n, "data": ms.Tensor(a + (0.01 * rng.standard_normal(a.shape)).astype(
        a.dtype) if n in weights else a)} for n, a in state.items()]
    ms.save_checkpoint(ckpt, str(tmp_path / "c.ckpt"))
    batches = [(rng.standard_normal((4, 3, 32, 32)).astype(np.float32),
                soft_targets(rng.integers(0, 10, 4), 10, 0.1)) for _ in range(2)]
    cold.load(tmp_path / "c.ckpt")  # set_data: nothing compiled yet
    warm.load(tmp_path / "c.ckpt")  # assign: into the warmed graphs' memory
    losses = [[t.step([b], lr=1e-3) for b in batches] for t in (cold, warm)]
    assert losses[0] == losses[1]
    ms.runtime.synchronize()
    for a, b in zip(cold.state_params(), warm.state_params(), strict=True):
        assert np.array_equal(a.asnumpy(), b.asnumpy()), a.name
