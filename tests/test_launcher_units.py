"""Store, lifecycle, agent and rank-env units (no Ray)."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from launcher.agent import NodeAgent
from launcher.lifecycle import ALLOWED, IllegalTransition, JobState, transition
from launcher.planner import NodeSlice, Plan
from launcher.progress import HeartbeatTail
from launcher.ranks import RankSpec, build_launch
from launcher.store import Store

S = JobState


def test_lifecycle_terminal_states_are_final():
    for t in (S.SUCCEEDED, S.FAILED, S.CANCELLED):
        assert ALLOWED[t] == frozenset()
        with pytest.raises(IllegalTransition):
            transition(t, S.RUNNING)
    assert transition("PENDING", "SCHEDULING") == S.SCHEDULING
    with pytest.raises(IllegalTransition):
        transition(S.PENDING, S.RUNNING)  # must pass through SCHEDULING
    # every state is reachable from PENDING
    seen, todo = {S.PENDING}, [S.PENDING]
    while todo:
        for n in ALLOWED[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    assert seen == set(JobState)


def test_store_durable_and_checked(tmp_path):
    db = tmp_path / "fleet.db"
    st = Store(db)
    a = st.add_job("train", "TrainJob", {"x": 1}, {}, 0)
    b = st.add_job("train", "TrainJob", {"x": 2}, {}, 5)
    assert (a.id, b.id) == ("train-1", "train-2")
    st.set_state(a.id, S.SCHEDULING)
    att = st.add_attempt(a.id, {"devices": 8}, "pg-{n}")
    assert att.n == 1 and att.pg_name == "pg-1"
    with pytest.raises(IllegalTransition):
        st.set_state(b.id, S.SUCCEEDED)
    st.set_state(a.id, S.RUNNING)
    st.close()
    st2 = Store(db)  # reopened: everything is still there
    assert st2.get_job(a.id).state == S.RUNNING and st2.get_job(a.id).started
    assert st2.open_attempt(a.id).plan == {"devices": 8}
    assert [e["state"] for e in st2.events(a.id) if e["kind"] == "state"] == \
        ["PENDING", "SCHEDULING", "RUNNING"]
    st2.end_attempt(a.id, 1, "failed", "boom")
    assert st2.open_attempt(a.id) is None
    assert st2.attempts(a.id)[0].reason == "boom"
    assert [j.id for j in st2.active_jobs()] == [a.id, b.id]


def test_tail_handles_partial_and_garbage_lines(tmp_path):
    p = tmp_path / "hb.jsonl"
    t = HeartbeatTail(str(p))
    assert t.read_records() == []
    p.write_text('{"event": "start"}\n{"event": "st')
    assert t.read_records() == [{"event": "start"}]
    with open(p, "a") as f:
        f.write('ep", "step": 1}\nnot json\n[1]\n')
    assert t.read_records() == [{"event": "step", "step": 1}]
    assert t.bad_lines == 2


def _rank(tmp_path, rank, code):
    return RankSpec(rank, [sys.executable, "-c", code], {}, str(tmp_path / f"r{rank}.log"),
                    str(tmp_path / f"r{rank}.hb"), str(tmp_path)).to_dict()


def _wait(agent, status, timeout=30):
    deadline = time.time() + timeout
    events = []
    while time.time() < deadline:
        r = agent.poll()
        events += r["events"]  # each poll hands out only new events
        if r["status"] == status:
            r["events"] = events
            return r
        time.sleep(0.1)
    raise AssertionError(agent.poll())


def test_agent_first_failure_tears_down_the_group(tmp_path):
    a = NodeAgent("j-1", 1, 0)
    sleeper = "import time; time.sleep(60)"
    a.start([_rank(tmp_path, 0, sleeper), _rank(tmp_path, 1, "import sys; sys.exit(7)")])
    t0 = time.time()
    r = _wait(a, "failed")
    assert "rank-1 exited with exit code 7" in r["reason"] and r["exit_code"] == 7
    assert r["exits"]["rank-0"] != 0  # killed, not left running
    assert time.time() - t0 < 10


def test_agent_success_result_and_heartbeats(tmp_path):
    a = NodeAgent("j-2", 1, 0)
    code = ("import json, os; f = open(os.environ['FLEET_HEARTBEAT'], 'a'); "
            "f.write(json.dumps({'event': 'step', 'step': 1, 'rank': 0}) + '\\n'); f.close(); "
            "print('noise'); print(json.dumps({'top1': 97.5, 'images': 10}))")
    spec = _rank(tmp_path, 0, code)
    spec["env"] = {"FLEET_HEARTBEAT": spec["heartbeat"]}
    a.start([spec])
    r = _wait(a, "succeeded")
    assert {"event": "step", "step": 1, "rank": 0} in r["events"]
    assert a.poll()["events"] == []
    assert r["result"] == {"top1": 97.5, "images": 10}
    assert "noise" in a.read_log("rank-0")["data"]


def test_agent_stop_kills_process_tree(tmp_path):
    a = NodeAgent("j-3", 1, 0)
    # The rank starts a grandchild; stopping must take the whole session down.
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "open('child.pid', 'w').write(str(p.pid)); time.sleep(60)")
    a.start([_rank(tmp_path, 0, code)])
    pid_file = tmp_path / "child.pid"
    deadline = time.time() + 20
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    r = a.stop(grace=1.0)
    assert r["status"] == "stopped"
    import psutil
    time.sleep(0.5)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"


def test_rank_env_is_msrun_equivalent(tmp_path):
    plan = Plan(16, 4, 2, (NodeSlice("a", tuple(range(8))), NodeSlice("b", tuple(range(8)))))
    spec = {"workload": "volo", "resources": {"deviceType": "NPU", "cpusPerDevice": 2},
            "checkpoint": {"everySteps": 50, "keep": 3}, "overrides": {"epoch_size": 2,
                                                                       "scale": [0.5, 1.0]}}
    paths = {"config": "/c.yaml", "data_dir": "/data", "workdir": str(tmp_path)}
    nodes = build_launch(job_id="j-9", attempt=3, kind="TrainJob", spec=spec, paths=paths,
                         plan=plan, home=Path("/h"), sched_host="10.0.0.1", sched_port=8118)
    assert [n.node for n in nodes] == ["a", "b"]
    sched = nodes[0].ranks[0]
    assert sched.rank is None and sched.env["MS_ROLE"] == "MS_SCHED"
    assert all(r.rank is not None for r in nodes[1].ranks)  # one scheduler per job
    workers = [r for n in nodes for r in n.ranks if r.rank is not None]
    assert [r.rank for r in workers] == list(range(16))
    w9 = workers[9]
    assert w9.env["MS_NODE_ID"] == "9" and w9.env["DEVICE_ID"] == "1"
    assert w9.env["MS_SCHED_HOST"] == "10.0.0.1" and w9.env["MS_SCHED_PORT"] == "8118"
    assert w9.env["MS_WORKER_NUM"] == "16" and w9.env["ASCEND_RT_VISIBLE_DEVICES"] == \
        "0,1,2,3,4,5,6,7"
    assert w9.env["FLEET_GLOBAL_BATCH"] == "128" and w9.env["FLEET_MICRO_BATCH"] == "4"
    assert w9.env["FLEET_GRAD_ACCUM"] == "2" and w9.env["FLEET_ATTEMPT"] == "3"
    assert w9.env["FLEET_NUM_THREADS"] == "2" and w9.env["OMP_NUM_THREADS"] == "2"
    assert w9.env["FLEET_CHECKPOINT_DIR"] == "/h/jobs/j-9/checkpoints"
    assert w9.env["FLEET_COMPILE_CACHE_STORE"] == "/h/compile-cache"
    assert w9.env["FLEET_HEARTBEAT"] == "/h/jobs/j-9/attempt-3/rank-9.heartbeat.jsonl"
    argv = w9.argv
    assert argv[1:4] == ["-m", "workloads.volo.train", "-c"]
    i = argv.index
    assert argv[i("--device_target") + 1] == "Ascend" and argv[i("--distribute") + 1] == "True"
    assert argv[i("--ckpt_save_steps") + 1] == "50"
    assert "--scale=0.5,1.0" in argv and "--epoch_size=2" in argv  # one argv item each
    single = build_launch(job_id="j", attempt=1, kind="TrainJob", spec=spec, paths=paths,
                          plan=Plan(1, 8, 16, (NodeSlice("a", (5,)),)), home=Path("/h"))
    [r] = single[0].ranks
    assert "MS_ROLE" not in r.env and r.argv[r.argv.index("--distribute") + 1] == "False"
    assert r.env["ASCEND_RT_VISIBLE_DEVICES"] == "5" and r.env["DEVICE_ID"] == "0"
    assert json.dumps([n.to_dict() for n in nodes])  # serialisable for Ray and --dry-run


def test_checkpoints_default_to_the_volume_every_pod_mounts(tmp_path, monkeypatch):
    """On Kubernetes the fleet home is the head pod's alone; checkpoints and the shared
    compile cache must go where worker pods write too (FLEET_CHECKPOINT_ROOT, k8s/base)."""
    monkeypatch.setenv("FLEET_CHECKPOINT_ROOT", "/mnt/checkpoints")
    paths = {"config": "/c.yaml", "data_dir": "/data", "workdir": str(tmp_path)}

    def rank_of(**extra_paths: str) -> RankSpec:
        [node] = build_launch(job_id="j-1", attempt=1, kind="TrainJob", spec={"workload": "volo"},
                              paths=dict(paths, **extra_paths), home=Path("/var/lib/fleet"),
                              plan=Plan(1, 8, 1, (NodeSlice("a", (0,)),)))
        [r] = node.ranks
        return r

    r = rank_of()
    assert r.env["FLEET_CHECKPOINT_DIR"] == "/mnt/checkpoints/j-1"
    assert r.argv[r.argv.index("--ckpt_save_dir") + 1] == "/mnt/checkpoints/j-1"
    assert r.env["FLEET_COMPILE_CACHE_STORE"] == "/mnt/checkpoints/.compile-cache"
    monkeypatch.setenv("FLEET_COMPILE_CACHE_STORE", "/fast/graphs")  # the operator's choice
    assert rank_of().env["FLEET_COMPILE_CACHE_STORE"] == "/fast/graphs"
    # a checkpoint.dir in the spec still wins
    assert rank_of(ckpt_dir="/mine").env["FLEET_CHECKPOINT_DIR"] == "/mine"


def test_backoff_grows_only_while_attempts_fail_without_a_new_checkpoint(monkeypatch):
    from launcher import policies as ctl

    monkeypatch.setattr(ctl.random, "random", lambda: 0.0)  # no jitter
    policy = {"backoffSeconds": 2.0, "maxBackoffSeconds": 10.0}
    crashed = {"resumed_step": 40, "checkpoint_step": 40, "checkpoint_ok": True}
    streak, delays = 0, []
    for _ in range(4):  # dies before saving anything new: crash loop, 2, 4, 8, 10 (cap)
        streak = ctl.failure_streak(streak, crashed)
        delays.append(ctl.backoff_seconds(policy, streak))
    assert delays == [2.0, 4.0, 8.0, 10.0]
    # an attempt that saved step 50 after resuming from 40 was healthy: back to the base
    healthy = {"resumed_step": 40, "checkpoint_step": 50, "checkpoint_ok": True}
    assert ctl.failure_streak(streak, healthy) == 1
    # a failed save is no progress; nor is an attempt that died before its start heartbeat
    assert ctl.failure_streak(1, dict(healthy, checkpoint_ok=False)) == 2
    assert ctl.failure_streak(2, {}) == 3


def _probe(tmp_path, attempt, seconds, code, **env):
    adir = tmp_path / f"attempt-{attempt}"
    env = {"FLEET_ATTEMPT": str(attempt), "FLEET_HEARTBEAT": str(adir / "rank-0.hb"),
           "PYTHONPATH": str(Path(__file__).parent), **env}
    return RankSpec(0, [sys.executable, "-m", "standby_probe", str(seconds), str(code)], env,
                    str(adir / "rank-0.log"), env["FLEET_HEARTBEAT"], str(tmp_path)).to_dict()


def _probe_report(tmp_path, attempt):
    lines = (tmp_path / f"attempt-{attempt}" / "rank-0.log").read_text().splitlines()
    return json.loads(next(ln for ln in lines if ln.startswith("{")))


def test_agent_restarts_in_place_from_a_standby_process(tmp_path):
    import psutil

    a = NodeAgent("j-sb", 1, 0, standby=True)
    a.start([_probe(tmp_path, 1, 30, 0)])
    assert a.standbys() == []  # none before the attempt's first step
    deadline = time.time() + 20
    while not a.standbys() and time.time() < deadline:
        a.poll()  # the step event makes the agent spawn the standby
        time.sleep(0.1)
    (standby,) = a.standbys()
    a.stop(grace=1.0, keep_standbys=True)
    assert a.standbys() == [standby]

    # attempt 2: the standby becomes the rank (same pid), with the new attempt's env
    res = a.start([_probe(tmp_path, 2, 0, 5)], attempt=2)
    assert res["from_standby"] == ["rank-0"] and res["pids"]["rank-0"] == standby
    deadline = time.time() + 20
    while a._status == "running" and time.time() < deadline:  # no poll until it has failed
        time.sleep(0.05)
    r = a.poll()
    assert r["status"] == "failed" and any(e["event"] == "step" for e in r["events"])
    assert "rank-0 exited with exit code 5" in r["reason"] and a.attempt == 2
    rep = _probe_report(tmp_path, 2)
    # it imported on an idle-priority thread; the rank itself runs at the normal policy
    assert rep == {"pid": standby, "attempt": "2", "standby": "1", "cwd": str(tmp_path),
                   "argv": ["0", "5"], "import_policy": os.SCHED_IDLE,
                   "run_policy": os.SCHED_OTHER}

    # attempt 2 failed right after its step, before any poll saw it running: the poll
    # that reports the failure still spawns its standby. A signal death is reported as
    # one, as for a rank started cold.
    a.stop(grace=1.0, keep_standbys=True)
    (standby,) = a.standbys()
    res = a.start([_probe(tmp_path, 4, 30, 0)], attempt=4)
    assert res["pids"]["rank-0"] == standby
    psutil.Process(standby).kill()
    assert "rank-0 exited with signal 9" in _wait(a, "failed")["reason"]

    # a rank whose import-time environment differs starts cold; the stale standby goes
    a.stop(grace=1.0, keep_standbys=True)
    stale = a.standbys()
    res = a.start([_probe(tmp_path, 5, 0, 0, OMP_NUM_THREADS="3")], attempt=5)
    assert res["from_standby"] == [] and res["pids"]["rank-0"] not in stale
    _wait(a, "succeeded")
    assert _probe_report(tmp_path, 5)["standby"] is None
    assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
               for p in stale)
    a.stop()
    assert a.standbys() == []


def test_standby_key_ignores_only_what_is_read_at_launch():
    from launcher.standby import standby_key

    argv = [sys.executable, "-m", "workloads.volo.train", "-c", "x.yaml"]
    env = {"MS_ROLE": "MS_WORKER", "RANK_ID": "0", "FLEET_ATTEMPT": "1", "OMP_NUM_THREADS": "2"}
    same = dict(env, RANK_ID="1", FLEET_ATTEMPT="7", MS_SCHED_PORT="4242")
    assert standby_key(argv, env, "/w") == standby_key(argv, same, "/w")
    # roles stand by apart; thread counts and the interpreter are fixed at import
    assert standby_key(argv, env, "/w") != standby_key(argv, dict(env, MS_ROLE="MS_SCHED"), "/w")
    assert standby_key(argv, env, "/w") != standby_key(argv, dict(env, OMP_NUM_THREADS="4"), "/w")
    assert standby_key(argv, env, "/w") != standby_key(["/other/python", *argv[1:]], env, "/w")
    assert standby_key(argv, env, "/w") != standby_key(argv, env, "/elsewhere")


def test_restart_in_place_until_the_failures_in_a_row_suggest_a_bad_device():
    from launcher.policies import RestartPlacementPolicy

    policy = RestartPlacementPolicy(max_streak=2)
    assert policy.keep({}, 1) and policy.keep({}, 2)
    assert not policy.keep({}, 3)
    assert not policy.keep({"inPlace": False}, 1)


def test_watchdog_gives_a_rank_its_startup_time_before_the_hang_timeout(monkeypatch):
    from types import SimpleNamespace

    from launcher import controller as ctl

    plan = Plan(devices=2, micro_batch=4, grad_accum=1, slices=(NodeSlice("n", (0, 1)),))
    job = SimpleNamespace(spec={"restart": {"hangTimeoutSeconds": 3,
                                            "startupTimeoutSeconds": 60}})
    rt = ctl.Runtime("j", 1, plan, "pg")
    now = [rt.started + 10]
    monkeypatch.setattr(ctl.time, "time", lambda: now[0])
    # 10 s after launch, no heartbeat yet: a slow cold start, not a hang
    assert ctl.Controller._hung(job, rt) is None
    rt.fold.last_heartbeat[0] = now[0]
    assert ctl.Controller._hung(job, rt) is None
    # rank 0 goes silent past the hang timeout while rank 1 still starts up
    now[0] += 4
    assert "heartbeat stalled for 4s on rank-0 (hangTimeoutSeconds=3)" in \
        ctl.Controller._hung(job, rt)
    # rank 1 never says a word: held to the startup timeout
    now[0] = rt.started + 61
    rt.fold.last_heartbeat[0] = now[0]
    assert "rank-1 sent no heartbeat in 61s since launch (startupTimeoutSeconds=60)" in \
        ctl.Controller._hung(job, rt)


def test_smoke_ranks_do_not_import_mindspore():
    """A smoke rank (and anything that needs only the sampler) starts in a fraction of a
    second: with MindSpore imported through the package, a 16-rank smoke job spent 19 s of
    a 2-core machine before its first heartbeat."""
    import subprocess

    code = ("import sys, launcher.smoke, workloads.volo.sampling; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mindspore'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:300]
    # the package still offers the model by name, importing it on first use
    import workloads.volo

    assert callable(workloads.volo.create_model)
    with pytest.raises(AttributeError):
        _ = workloads.volo.no_such_thing
