"""The controller on a real Ray cluster: 3 nodes x {"NPU": 8} on 127.0.0.1.

Rank processes are real (`workload: smoke`: they write heartbeats and
checkpoints and sleep), so scheduling, cancellation, restarts and controller
recovery are exercised end to end in seconds.
"""

import contextlib
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import threading
import time
from pathlib import Path

import psutil
import pytest
from ray_token import share_token

REPO = Path(__file__).resolve().parents[1]
NODES = 3


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    home = tmp_path_factory.mktemp("fleet-home")
    from launcher import local

    local.quiet_ray()
    share_token(home)
    # The controller's Prometheus exporter on, on a free port; Ray nodes inherit this env.
    # Set here, not at import, so other modules in the same session keep their own setting.
    saved = {k: os.environ.get(k) for k in ("FLEET_METRICS", "FLEET_METRICS_PORT")}
    os.environ.update(FLEET_METRICS="1", FLEET_METRICS_PORT="0")
    local.use_local_token(home, create=True)
    import ray
    from ray.cluster_utils import Cluster

    from launcher import controller as ctl

    cluster = Cluster()
    for i in range(NODES):
        cluster.add_node(num_cpus=2, resources={"NPU": 8}, node_ip_address="127.0.0.1",
                         include_dashboard=False if i == 0 else None)
    ray.init(address=cluster.address, namespace=ctl.NAMESPACE, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    c = ctl.get_or_create(str(home), 0.2)
    ray.get(c.ping.remote(), timeout=120)
    data = home / "data"
    data.mkdir()
    cfg = home / "recipe.yaml"
    cfg.write_text("model: smoke\n")
    yield {"ray": ray, "home": home, "cluster": cluster, "data": data, "cfg": cfg}
    try:
        c = ray.get_actor(ctl.CONTROLLER_NAME, namespace=ctl.NAMESPACE)
        for j in ray.get(c.list_jobs.remote(False), timeout=30):
            ray.get(c.cancel.remote(j["id"]), timeout=60)
        ray.kill(c, no_restart=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(autouse=True)
def _cancel_leftovers(request):
    """A failed test's jobs are cancelled, so they do not hold devices the next test needs."""
    yield
    f = request.node.funcargs.get("fleet")
    if f is None:
        return
    for j in call(f, "list_jobs", False):  # the jobs not yet done
        call(f, "cancel", j["id"])


def controller(f):
    from launcher import controller as ctl
    return f["ray"].get_actor(ctl.CONTROLLER_NAME, namespace=ctl.NAMESPACE)


def call(f, method, *args, timeout=60):
    return f["ray"].get(getattr(controller(f), method).remote(*args), timeout=timeout)


def train_doc(name, devices, steps, step_s=0.2, prio=0, fail_at=0, max_restarts=3,
              standby=False):
    # Standby processes only where a test is about them: for a 24-device job they are 25
    # more interpreters importing at once on a 2-core CI machine.
    return {
        "apiVersion": "fleet/v1", "kind": "TrainJob", "metadata": {"name": name},
        "spec": {
            "workload": "smoke", "config": "recipe.yaml",
            "overrides": {"max_steps": steps, "step_seconds": step_s, "fail_at_step": fail_at},
            "data": {"dir": "data"},
            "resources": {"deviceType": "CPU", "devices": {"min": devices, "max": devices},
                          "cpusPerDevice": 0.05},
            "batch": {"global": 48, "microBatchMax": 48},
            "restart": {"maxRestarts": max_restarts, "backoffSeconds": 0.2,
                        "standby": standby},
            "priority": prio,
        },
    }


def paths(f, names):
    return {"workdir": str(REPO), "steps": {n: {"config": str(f["cfg"]),
                                                "data_dir": str(f["data"])} for n in names}}


def submit(f, doc):
    names = [s["name"] for s in doc["spec"]["steps"]] if doc["kind"] == "Workflow" \
        else [doc["metadata"]["name"]]
    return call(f, "submit", doc, paths(f, names))


def wait_for(f, job_id, pred, timeout=90, what=""):
    deadline = time.time() + timeout
    st = None
    while time.time() < deadline:
        try:
            st = call(f, "status", job_id, timeout=30)
        except Exception:  # controller restarting
            time.sleep(0.5)
            continue
        if pred(st):
            return st
        time.sleep(0.3)
    raise AssertionError(f"{job_id}: timed out waiting for {what}; last status {st}")


def restart_controller(f):
    """Kill the controller actor; Ray restarts it and its __init__ recovers."""
    old_pid = call(f, "ping")["pid"]
    f["ray"].kill(controller(f), no_restart=False)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if call(f, "ping", timeout=10)["pid"] != old_pid:
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError("the controller did not come back within 90 s")


def state_is(*states):
    return lambda st: st["state"] in states


def rank_pids(job_id):
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("FLEET_JOB_ID") == job_id:
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def test_gang_queue_priority_cancel(fleet):
    f = fleet
    x = submit(f, train_doc("blocker", 24, 400))["id"]
    st = wait_for(f, x, state_is("RUNNING"), what="blocker running")
    plan = st["attempts"][-1]["plan"]
    assert plan["devices"] == 24 and len({s["node"] for s in plan["slices"]}) == 3

    low = submit(f, train_doc("low", 16, 6, prio=0))["id"]
    high = submit(f, train_doc("high", 16, 6, prio=5))["id"]
    # Gang scheduling: nothing fits while the blocker holds all 24 devices.
    st_h = wait_for(f, high, lambda s: s["message"].startswith("waiting"), what="wait message")
    assert st_h["state"] == "PENDING", (st_h, call(f, "cluster"), call(f, "status", x))
    assert st_h["message"] == "waiting for devices: needs 16, 0 of 24 free"
    assert call(f, "status", low)["state"] == "PENDING"
    assert call(f, "cluster")["free"] == 0
    # 24 workers + the scheduler process.
    wait_for(f, x, lambda s: len(rank_pids(x)) == 25, what="25 rank processes alive")

    assert call(f, "cancel", x)["state"] == "CANCELLED"
    assert rank_pids(x) == []  # the whole process group is gone
    # Cancel frees devices; priority 5 runs first although submitted second.
    st = wait_for(f, high, state_is("RUNNING", "SUCCEEDED"), what="high running")
    assert call(f, "status", low)["state"] == "PENDING"  # 16 + 16 > 24: it waits
    plan = st["attempts"][-1]["plan"]
    nodes = [s["node"] for s in plan["slices"]]
    assert plan["devices"] == 16 and len(nodes) == 2 and len(set(nodes)) == 2
    assert all(s["chips"] == list(range(8)) for s in plan["slices"])
    launched = next(e for e in call(f, "status", high)["events"] if e["kind"] == "launched")
    assert sorted(a["node_id"] for a in launched["agents"]) == sorted(nodes)

    st = wait_for(f, high, state_is("SUCCEEDED"), what="high done")
    assert st["progress"]["step"] == 6
    st = wait_for(f, low, state_is("SUCCEEDED"), what="low done")
    h_att = call(f, "status", high)["attempts"][0]
    assert st["attempts"][0]["started"] >= h_att["ended"] - 1.0


def test_controller_serves_metrics(fleet):
    import urllib.request

    url = call(fleet, "ping")["metrics"]
    assert url and url.startswith("http://127.0.0.1:")
    body = urllib.request.urlopen(url, timeout=10).read().decode()  # noqa: S310 - loopback
    assert "fleet_jobs{" in body and "fleet_devices{" in body


def test_impossible_job_says_why_it_waits(fleet):
    doc = train_doc("huge", 32, 1)
    doc["spec"]["batch"]["global"] = 64
    j = submit(fleet, doc)["id"]
    st = wait_for(fleet, j, lambda s: s["message"].startswith("waiting"), what="message")
    assert st["state"] == "PENDING"
    assert "needs at least 32 devices, the cluster has 24" in st["message"]
    call(fleet, "cancel", j)


def test_restart_resumes_from_checkpoint(fleet):
    f = fleet
    j = submit(f, train_doc("flaky", 2, 6, fail_at=3))["id"]
    st = wait_for(f, j, state_is("SUCCEEDED", "FAILED"), what="flaky done")
    assert st["state"] == "SUCCEEDED", st["message"]
    assert st["restarts"] == 1
    assert [a["status"] for a in st["attempts"]] == ["failed", "succeeded"]
    assert "exit code 17" in st["attempts"][0]["reason"]
    hb = f["home"] / "jobs" / j / "attempt-2" / "rank-0.heartbeat.jsonl"
    import json
    start = json.loads(hb.read_text().splitlines()[0])
    assert start["event"] == "start" and start["resumed_step"] == 2


def _launched(st, attempt):
    return next(e for e in st["events"] if e["kind"] == "launched" and e["attempt"] == attempt)


def test_rank_exit_restarts_in_place_from_standby_processes(fleet):
    """A rank exit on a healthy node: attempt 2 reuses attempt 1's placement group and agents,
    and every process (scheduler and both workers) starts from a standby that had imported
    the workload, writes the new attempt's heartbeats and log, and resumes as before."""
    import json

    f = fleet
    j = submit(f, train_doc("inplace", 2, 8, fail_at=4, standby=True))["id"]
    st = wait_for(f, j, state_is("SUCCEEDED", "FAILED"), what="in-place restart done")
    assert st["state"] == "SUCCEEDED", st["message"]
    a1, a2 = st["attempts"]
    assert a1["pg_name"] == a2["pg_name"]
    second = _launched(st, 2)
    assert second["in_place"] is True
    assert second["from_standby"] == ["rank-0", "rank-1", "scheduler"]
    assert [a["pid"] for a in second["agents"]] == [a["pid"] for a in _launched(st, 1)["agents"]]
    restarting = [e["message"] for e in st["events"]
                  if e["kind"] == "state" and e.get("state") == "RESTARTING"]
    assert "restart 1/3 in place" in restarting[0], restarting
    hb = f["home"] / "jobs" / j / "attempt-2" / "rank-1.heartbeat.jsonl"
    start = json.loads(hb.read_text().splitlines()[0])
    assert start["event"] == "start" and start["resumed_step"] == 3 and start["attempt"] == 2
    # the standby really became the rank: its log holds the rank's output
    log2 = (f["home"] / "jobs" / j / "attempt-2" / "rank-1.log").read_text()
    assert "step 8 loss" in log2
    # nothing outlives the job: no standby of it is left
    time.sleep(1.0)
    assert rank_pids(j) == []


def _pg_state(name):
    from ray.util import placement_group_table
    return [pg["state"] for pg in placement_group_table().values() if pg["name"] == name]


def _held_job(f, name, backoff):
    """A job that failed at step 3 and waits `backoff` s to restart in place."""
    doc = train_doc(name, 2, 8, fail_at=3, standby=True)
    doc["spec"]["restart"]["backoffSeconds"] = backoff
    j = submit(f, doc)["id"]
    st = wait_for(f, j, state_is("RESTARTING"), what="restarting")
    assert "in place" in st["message"], st["message"]
    pg = st["attempts"][0]["pg_name"]
    assert _pg_state(pg) == ["CREATED"]  # the devices stay held
    deadline = time.time() + 20
    while len(rank_pids(j)) < 3 and time.time() < deadline:  # the three standbys
        time.sleep(0.2)
    assert len(rank_pids(j)) == 3
    return j, pg


def test_cancel_while_restarting_in_place_frees_everything(fleet):
    f = fleet
    j, pg = _held_job(f, "heldcancel", 30)
    call(f, "cancel", j)
    wait_for(f, j, state_is("CANCELLED"), what="cancelled")
    assert _pg_state(pg) == ["REMOVED"]
    deadline = time.time() + 10
    while rank_pids(j) and time.time() < deadline:
        time.sleep(0.2)
    assert rank_pids(j) == []


def test_controller_restart_while_restarting_in_place_keeps_the_hold(fleet):
    """The held placement is in the store: the new controller finds its agents and
    restarts the job in place on them."""
    f = fleet
    j, pg = _held_job(f, "heldover", 10)
    restart_controller(f)
    assert _pg_state(pg) == ["CREATED"]  # kept, not torn down
    st = wait_for(f, j, state_is("SUCCEEDED", "FAILED"), timeout=120, what="heldover done")
    assert st["state"] == "SUCCEEDED", st["message"]
    assert "hold_reattached" in [e["kind"] for e in st["events"]]
    assert st["attempts"][1]["pg_name"] == pg
    assert _launched(st, 2)["in_place"] is True


def test_in_place_off_plans_the_restart_afresh(fleet):
    f = fleet
    doc = train_doc("afresh", 1, 5, fail_at=2)
    doc["spec"]["restart"]["inPlace"] = False
    j = submit(f, doc)["id"]
    st = wait_for(f, j, state_is("SUCCEEDED", "FAILED"), what="afresh done")
    assert st["state"] == "SUCCEEDED", st["message"]
    a1, a2 = st["attempts"]
    assert a1["pg_name"] != a2["pg_name"]
    assert _launched(st, 2)["in_place"] is False and _launched(st, 2)["from_standby"] == []


def test_backoff_restarts_from_its_base_after_an_attempt_that_checkpointed(fleet):
    """Attempt 1 dies at step 1 (nothing saved), attempt 2 checkpoints steps 1-2 and dies at
    3, attempt 3 dies at once: the delays are base, base (not 2x: attempt 2 was healthy),
    then 2x base with the crash loop named; attempt 4 finishes."""
    import re

    f = fleet
    doc = train_doc("backoff", 1, 4, step_s=0.1, max_restarts=3)
    doc["spec"]["overrides"]["fail_at_steps"] = "1,3,3"
    j = submit(f, doc)["id"]
    st = wait_for(f, j, state_is("SUCCEEDED", "FAILED"), what="backoff done")
    assert st["state"] == "SUCCEEDED", st["message"]
    assert [a["status"] for a in st["attempts"]] == ["failed"] * 3 + ["succeeded"]
    restarts = [e["message"] for e in st["events"]
                if e["kind"] == "state" and e.get("state") == "RESTARTING"]
    delays = [float(re.search(r"restart \d/3(?: in place)? in ([\d.]+)s", m).group(1))
              for m in restarts]
    assert len(delays) == 3, restarts
    # backoffSeconds 0.2 with up to 25 % jitter; printed to 0.1 s
    assert delays[0] <= 0.3 and delays[1] <= 0.3 and 0.4 <= delays[2] <= 0.5, restarts
    assert "in a row" not in restarts[1]
    assert "2 failures in a row without a new checkpoint" in restarts[2]


def test_hung_rank_is_restarted_by_the_watchdog(fleet):
    import signal

    f = fleet
    doc = train_doc("hung", 2, 30, step_s=0.2)
    doc["spec"]["restart"]["hangTimeoutSeconds"] = 3
    j = submit(f, doc)["id"]
    wait_for(f, j, lambda s: (s.get("progress") or {}).get("step", 0) >= 3, what="step 3")
    rank1 = None
    for p in psutil.process_iter(["pid"]):
        try:
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        # stdout names the rank: /proc environ of a rank from a standby is the standby's
        with contextlib.suppress(OSError):
            if env.get("FLEET_JOB_ID") == j and \
                    os.readlink(f"/proc/{p.pid}/fd/1").endswith("/rank-1.log"):
                rank1 = p
    assert rank1 is not None
    rank1.send_signal(signal.SIGSTOP)  # hung, not dead: only the watchdog can tell
    st = wait_for(f, j, state_is("SUCCEEDED", "FAILED"), what="hung done", timeout=120)
    assert st["state"] == "SUCCEEDED", st["message"]
    assert "heartbeat stalled" in st["attempts"][0]["reason"]
    assert not psutil.pid_exists(rank1.pid) or rank1.status() == psutil.STATUS_ZOMBIE


def test_max_restarts_exhausted_fails_with_history(fleet):
    f = fleet
    doc = train_doc("doomed", 1, 5, fail_at=2, max_restarts=0)
    j = submit(f, doc)["id"]
    st = wait_for(f, j, state_is("FAILED", "SUCCEEDED"), what="doomed done")
    assert st["state"] == "FAILED"
    assert "failed after 0 restart(s)" in st["message"] and "#1 failed" in st["message"]


def test_workflow_train_validate_export(fleet):
    f = fleet
    out = f["home"] / "exported" / "model.mindir"
    doc = {
        "apiVersion": "fleet/v1", "kind": "Workflow", "metadata": {"name": "wf"},
        "spec": {"steps": [
            {"name": "train", "kind": "TrainJob", "spec": train_doc("x", 2, 4)["spec"]},
            {"name": "validate", "kind": "ValidateJob", "needs": ["train"], "spec": {
                "workload": "smoke", "config": "recipe.yaml", "data": {"dir": "data"},
                "checkpoint": {"fromStep": "train", "select": "latest"},
                "resources": {"deviceType": "CPU", "cpusPerDevice": 0.05}}},
            {"name": "export", "kind": "ExportJob", "needs": ["validate"], "spec": {
                "workload": "smoke", "model": "smoke", "out": str(out),
                "checkpoint": {"fromStep": "train", "select": "latest"}}},
        ]},
    }
    p = paths(f, ["train", "validate"])
    p["steps"]["export"] = {"out": str(out)}
    res = call(f, "submit", doc, p)
    st = wait_for(f, res["id"], state_is("SUCCEEDED", "FAILED"), what="workflow done")
    assert st["state"] == "SUCCEEDED", st
    steps = {s["step"]: s for s in st["steps"]}
    assert [steps[n]["state"] for n in ("train", "validate", "export")] == ["SUCCEEDED"] * 3
    assert steps["validate"]["result"]["top1"] == 100.0
    assert steps["validate"]["result"]["step"] == 4  # validated the train step's checkpoint
    # Steps ran in dependency order.
    assert steps["train"]["finished"] <= steps["validate"]["started"]
    assert steps["validate"]["finished"] <= steps["export"]["started"]
    assert out.read_text().startswith("smoke export")


def test_cancel_workflow_cancels_its_steps(fleet):
    f = fleet
    doc = {
        "apiVersion": "fleet/v1", "kind": "Workflow", "metadata": {"name": "wfc"},
        "spec": {"steps": [
            {"name": "train", "kind": "TrainJob", "spec": train_doc("x", 1, 500)["spec"]},
            {"name": "validate", "kind": "ValidateJob", "needs": ["train"], "spec": {
                "workload": "smoke", "config": "recipe.yaml", "data": {"dir": "data"},
                "checkpoint": {"fromStep": "train"}}},
        ]},
    }
    res = call(f, "submit", doc, paths(f, ["train", "validate"]))
    train_id = res["steps"]["train"]
    wait_for(f, train_id, state_is("RUNNING"), what="train step running")
    assert call(f, "status", res["id"])["state"] == "RUNNING"
    assert call(f, "cancel", res["id"])["state"] == "CANCELLED"
    st = call(f, "status", res["id"])
    assert [s["state"] for s in st["steps"]] == ["CANCELLED", "CANCELLED"]
    assert rank_pids(train_id) == []


def test_controller_killed_mid_run_loses_nothing(fleet):
    f = fleet
    j = submit(f, train_doc("survivor", 8, 25, step_s=0.25))["id"]
    wait_for(f, j, lambda s: (s.get("progress") or {}).get("step", 0) >= 3, what="step 3")
    before = {r["id"] for r in call(f, "list_jobs", True)}
    restart_controller(f)
    assert {r["id"] for r in call(f, "list_jobs", True)} == before
    st = wait_for(f, j, state_is("SUCCEEDED", "FAILED"), what="survivor done")
    assert st["state"] == "SUCCEEDED"
    assert len(st["attempts"]) == 1  # reattached to the running ranks, not restarted
    assert any(e["kind"] == "reattached" for e in st["events"])
    assert st["progress"]["step"] == 25


def test_50_concurrent_submits(fleet):
    f = fleet
    blocker = submit(f, train_doc("hold", 24, 400, prio=100))["id"]
    wait_for(f, blocker, state_is("RUNNING"), what="hold running")
    ids, errors = [], []
    lock = threading.Lock()

    def one(i):
        try:
            r = submit(f, train_doc("burst", 8, 1))
            with lock:
                ids.append(r["id"])
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert len(ids) == 50 and len(set(ids)) == 50
    listed = {r["id"] for r in call(f, "list_jobs", True)}
    assert set(ids) <= listed
    assert all(call(f, "status", i)["state"] == "PENDING" for i in ids[:5])
    for i in ids:
        call(f, "cancel", i)
    call(f, "cancel", blocker)
    assert call(f, "status", blocker)["state"] == "CANCELLED"


def test_node_loss_shrinks_then_grows_back_with_fixed_global_batch(fleet):
    """Runs last: it removes a node (and adds one back)."""
    import json

    f = fleet
    hold = submit(f, train_doc("hold8", 8, 1000, prio=1))["id"]
    wait_for(f, hold, state_is("RUNNING"), what="hold8 running")
    doc = train_doc("elastic", 16, 60, step_s=0.25)
    doc["spec"]["resources"]["devices"] = {"min": 8, "max": 16}
    doc["spec"]["batch"] = {"global": 64, "microBatchMax": 4}
    j = submit(f, doc)["id"]
    st = wait_for(f, j, lambda s: (s.get("progress") or {}).get("step", 0) >= 4, what="step 4")
    plan = st["attempts"][-1]["plan"]
    assert (plan["devices"], plan["micro_batch"], plan["grad_accum"]) == (16, 4, 1)

    head = f["cluster"].head_node.node_id
    victim_id = next(s["node"] for s in plan["slices"] if s["node"] != head)
    victim = next(n for n in f["cluster"].list_all_nodes() if n.node_id == victim_id)
    f["cluster"].remove_node(victim, allow_graceful=False)
    # Shrink: restarted on the one whole node left, same G with accumulation 2.
    st = wait_for(f, j, lambda s: len(s["attempts"]) >= 2 and s["state"] == "RUNNING",
                  what="restart on fewer devices", timeout=120)
    a1, a2 = st["attempts"][0], st["attempts"][1]
    assert a1["status"] == "failed" and "lost" in a1["reason"]
    assert (a2["plan"]["devices"], a2["plan"]["micro_batch"], a2["plan"]["grad_accum"]) == \
        (8, 4, 2)
    # Grow: devices come back (the blocker ends) -> resize at the next checkpoint.
    call(f, "cancel", hold)
    st = wait_for(f, j, state_is("SUCCEEDED", "FAILED"), what="elastic done", timeout=180)
    assert st["state"] == "SUCCEEDED", st["message"]
    statuses = [a["status"] for a in st["attempts"]]
    assert statuses[:2] == ["failed", "resized"] and statuses[-1] == "succeeded"
    last = st["attempts"][-1]["plan"]
    assert (last["devices"], last["micro_batch"], last["grad_accum"]) == (16, 4, 1)
    assert st["progress"]["step"] == 60
    assert not any(e["kind"] == "reattached" for e in st["events"])  # controller stayed up
    # Every attempt resumed where a checkpoint left off and ran with G fixed.
    prev_end = None
    for a in st["attempts"]:
        hb = f["home"] / "jobs" / j / f"attempt-{a['n']}" / "rank-0.heartbeat.jsonl"
        evs = [json.loads(x) for x in hb.read_text().splitlines()]
        start = evs[0]
        assert start["global_batch"] == 64
        assert start["grad_accum"] == a["plan"]["grad_accum"]
        steps = [e["step"] for e in evs if e["event"] == "step"]
        if prev_end is not None:
            assert start["resumed_step"] <= prev_end
            assert steps[0] == start["resumed_step"] + 1
        prev_end = steps[-1] if steps else start["resumed_step"]
    f["cluster"].add_node(num_cpus=2, resources={"NPU": 8}, node_ip_address="127.0.0.1")
