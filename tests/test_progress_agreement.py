"""`fleet status` and `/metrics` tell the same story for the same heartbeat files.

A job shrank from 2 ranks to 1 after a failure: attempt 1's files are what its ranks left,
attempt 2's rank is a real process under a real NodeAgent that writes its heartbeats in two
phases (running, then done). The controller's monitor loop polls the agent, folds what it
hands over into the store and decides the job succeeded; `fleet status` reads the store
with no cluster up; the exporter the controller runs (start_fleet_exporter) reads the files;
a second exporter reads the files alone. All must give the same step, loss, devices and
state, and the same rank heartbeat the hang watchdog uses. No Ray cluster is started: the
agent is called in-process where the controller would go through Ray.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from launcher import progress_view
from launcher.agent import NodeAgent
from launcher.cli import cli
from launcher.lifecycle import JobState as S
from launcher.metrics import CONTROLLER_STATES, MetricsExporter, start_fleet_exporter
from launcher.planner import NodeSlice, Plan
from launcher.ranks import RankSpec, attempt_dir

pytest.importorskip("ray")  # the Controller class imports it; no cluster is started

NAME = "agree"
TOTAL = 8
# The rank: writes phase 1, waits for the go file, writes phase 2, exits 0.
RANK = """
import json, os, sys, time
src, go = json.load(open(sys.argv[1])), sys.argv[2]
with open(os.environ["FLEET_HEARTBEAT"], "a") as f:
    f.write(src["phase1"]); f.flush()
    deadline = time.time() + 60
    while not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.05)
    f.write(src["phase2"]); f.flush()
"""


def ev(kind: str, ts: float, rank: int, attempt: int, **fields) -> str:
    return json.dumps({"event": kind, "ts": ts, "rank": rank, "attempt": attempt, **fields}) + "\n"


def start(ts: float, rank: int, attempt: int, world: int, resumed: int) -> str:
    return ev("start", ts, rank, attempt, world_size=world, micro_batch=8 // world,
              grad_accum=1, global_batch=8, resumed_step=resumed, total_steps=TOTAL)


def step(ts: float, rank: int, attempt: int, n: int, loss: float) -> str:
    return ev("step", ts, rank, attempt, step=n, epoch=0, loss=loss, lr=0.01,
              images_per_second=80.0 + rank, step_seconds=0.1, samples_seen=8 * n,
              sample_hash=f"h{n}")


def write_attempt_1(home: Path, job: str, t0: float) -> None:
    """What attempt 1's two ranks left: steps 1-4, a checkpoint at 3, then rank 1 died."""
    adir = attempt_dir(home, job, 1)
    adir.mkdir(parents=True)
    for rank in (0, 1):
        lines = [start(t0, rank, 1, 2, 0)]
        lines += [step(t0 + n, rank, 1, n, 3.0 - n / 10 + rank) for n in range(1, 5)]
        if rank == 0:
            lines.append(ev("checkpoint", t0 + 3.5, 0, 1, step=3, path="ckpt/3",
                            save_seconds=0.2, ok=True))
        (adir / f"rank-{rank}.heartbeat.jsonl").write_text("".join(lines))


def attempt_2_lines(t0: float) -> dict[str, str]:
    """Attempt 2 on 1 rank resumes from step 3; phase 1 ends in a half-written line."""
    half = step(t0 + 7, 0, 2, 7, 1.7)
    phase1 = (start(t0, 0, 2, 1, 3)
              + "".join(step(t0 + n - 3, 0, 2, n, 2.0 - (n - 4) / 10) for n in (4, 5, 6))
              + ev("checkpoint", t0 + 3.5, 0, 2, step=6, path="ckpt/6", save_seconds=0.2,
                   ok=True)
              + ev("val", t0 + 3.6, 0, 2, step=6, top1=61.5, top5=93.0, loss=1.9)
              + "{garbage\n" + half[:25])
    phase2 = (half[25:] + step(t0 + 8, 0, 2, 8, 1.6)
              + ev("done", t0 + 8.5, 0, 2, step=8, status="ok"))
    return {"phase1": phase1, "phase2": phase2}


def scrape(text: str, job: str) -> dict[str, object]:
    got: dict[str, object] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("job_name") != job:
                continue
            if s.name == "fleet_job_state" and s.value == 1:
                got["state"] = s.labels["state"]
            elif s.name in ("fleet_train_step", "fleet_job_devices"):
                got[s.name] = s.value
            elif s.name in ("fleet_train_loss", "fleet_rank_last_heartbeat_timestamp_seconds"):
                got[(s.name, s.labels["rank"])] = s.value
    return got


def fleet_status(home: Path, job: str) -> tuple[dict, str]:
    runner = CliRunner()
    as_json = runner.invoke(cli, ["--home", str(home), "status", job, "--output", "json"])
    text = runner.invoke(cli, ["--home", str(home), "status", job])
    assert as_json.exit_code == 0 and text.exit_code == 0, as_json.output + text.output
    return json.loads(as_json.output), text.output


def check_agreement(home: Path, job: str, served: str, want_step: int, want_state: str,
                    rank_heartbeat: dict[int, float]) -> None:
    st, line = fleet_status(home, job)
    p = st["progress"]
    devices = progress_view.layout(st)[0]
    by_controller = scrape(served, job)
    alone = MetricsExporter()
    alone.watch_home(home)
    by_files = scrape(generate_latest(alone.registry).decode(), job)
    for got in (by_controller, by_files):
        assert got["fleet_train_step"] == p["step"] == want_step
        assert got[("fleet_train_loss", "0")] == p["loss"]
        assert ("fleet_train_loss", "1") not in got  # attempt 1's rank is not live
        assert got["fleet_job_devices"] == p["world_size"] == devices == 1
        assert got["state"] == CONTROLLER_STATES[st["state"]] == want_state
        # the hang watchdog's view of rank 0 is the exporter's
        assert got[("fleet_rank_last_heartbeat_timestamp_seconds", "0")] == \
            rank_heartbeat[0]
    assert f"step {want_step}/{TOTAL}" in line and f"loss {p['loss']:.4f}" in line
    assert "[1 dev," in line


class _Remote:
    def __init__(self, fn) -> None:
        self.remote = fn


class LocalAgent:
    """A NodeAgent as the controller calls it through Ray (`agent.poll.remote()`)."""

    def __init__(self, agent: NodeAgent) -> None:
        self.poll = _Remote(agent.poll)


def test_fleet_status_and_metrics_agree(tmp_path, monkeypatch):
    import ray

    from launcher.controller import Controller, Runtime

    home = (tmp_path / "home").resolve()
    monkeypatch.setenv("FLEET_HOME", str(home))
    monkeypatch.setenv("FLEET_METRICS", "0")  # its own exporter would bind the fixed port
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("FLEET_K8S_RAYCLUSTER", raising=False)
    monkeypatch.setattr(ray, "get", lambda x, timeout=None: x)  # LocalAgent answers at once
    ctl = Controller(str(home), start_loop=False)
    exporter = start_fleet_exporter(home, ctl._metric_jobs, port=0, host="127.0.0.1")
    url = f"http://127.0.0.1:{exporter._server.server_address[1]}/metrics"
    store = ctl.store
    job = store.add_job(NAME, "TrainJob", {}, {}, 0).id
    agent = NodeAgent(job, 2, 0)
    monkeypatch.setattr(ctl, "_teardown", lambda rt, failed=False: agent.stop(grace=1.0))
    try:
        t0 = time.time() - 100
        store.set_state(job, S.SCHEDULING)
        store.add_attempt(job, Plan(2, 4, 1, (NodeSlice("n1", (0, 1)),)).to_dict(), "pg-{n}")
        store.set_state(job, S.RUNNING)
        write_attempt_1(home, job, t0)
        store.end_attempt(job, 1, "failed", "rank-1 exited with exit code 1")
        store.set_state(job, S.RESTARTING, "restarting", restarts=1)
        store.set_state(job, S.SCHEDULING)
        plan = Plan(1, 8, 1, (NodeSlice("n1", (0,)),))
        att = store.add_attempt(job, plan.to_dict(), "pg-{n}")
        store.set_state(job, S.RUNNING)

        src = tmp_path / "attempt-2.json"
        src.write_text(json.dumps(attempt_2_lines(t0 + 50)))
        go = tmp_path / "go"
        adir = attempt_dir(home, job, att.n)
        hb = str(adir / "rank-0.heartbeat.jsonl")
        rank = RankSpec(0, [sys.executable, "-c", RANK, str(src), str(go)],
                        {"FLEET_HEARTBEAT": hb}, str(adir / "rank-0.log"), hb, str(tmp_path))
        rt = Runtime(job, att.n, plan, att.pg_name, agents=[LocalAgent(agent)], launched=True)
        ctl.runtimes[job] = rt
        agent.start([rank.to_dict()])

        def follow(until) -> None:
            """The controller's monitor loop, one tick at a time."""
            deadline = time.time() + 60
            while time.time() < deadline:
                ctl._poll_running()
                if until():
                    return
                assert store.get_job(job).state == S.RUNNING, store.get_job(job).message
                time.sleep(0.1)
            raise AssertionError(f"agent: {agent.poll()}, progress: {rt.summary()}")

        follow(lambda: rt.summary().get("val_top1") is not None)
        served = urllib.request.urlopen(url, timeout=10).read().decode()  # noqa: S310
        check_agreement(home, job, served, 6, "running", rt.fold.last_heartbeat)
        assert rt.progress["checkpoint_step"] == 6 and rt.progress["resumed_step"] == 3

        go.touch()
        follow(lambda: store.get_job(job).state == S.SUCCEEDED)  # the controller's decision
        assert store.get_job(job).progress["done"] == "ok"
        served = urllib.request.urlopen(url, timeout=10).read().decode()  # noqa: S310
        check_agreement(home, job, served, 8, "succeeded", rt.fold.last_heartbeat)
    finally:
        agent.stop(grace=1.0)
        exporter.close()
        ctl.store.close()
