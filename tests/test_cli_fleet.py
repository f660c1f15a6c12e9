"""`fleet` CLI: offline commands through click's runner, and one real local
cluster session (fleet up -> submit --wait -> status/list/logs -> cancel -> down)
run as subprocesses, the way a user runs them."""

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from launcher import cli as C
from launcher import spec as S

REPO = Path(__file__).resolve().parents[1]

JOB = """\
apiVersion: fleet/v1
kind: TrainJob
metadata: {name: smoke}
spec:
  workload: smoke
  config: recipe.yaml
  overrides: {max_steps: 6, step_seconds: 0.2}
  data: {dir: data}
  resources: {deviceType: CPU, devices: {min: 1, max: 2}, cpusPerDevice: 0.1}
  batch: {global: 64, microBatchMax: 16}
"""


@pytest.fixture()
def proj(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "recipe.yaml").write_text("model: smoke\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "job.yaml").write_text(JOB)
    return tmp_path


def run(args, home):
    return CliRunner().invoke(C.cli, ["--home", str(home), *args], catch_exceptions=False)


def test_help_lists_exit_codes_and_examples(tmp_path):
    r = run(["--help"], tmp_path)
    assert r.exit_code == 0
    assert "Exit codes:" in r.output and "4    no such job, step, attempt or rank" in r.output
    assert "fleet submit examples/quickstart.yaml --wait" in r.output
    for cmd in ("up", "down", "submit", "status", "list", "logs", "cancel", "validate",
                "schema"):
        assert cmd in r.output


def test_schema_command_matches_shipped_file(tmp_path):
    r = run(["schema"], tmp_path)
    assert r.exit_code == 0 and r.output == S.SCHEMA_FILE.read_text()
    assert json.loads(r.output)["title"].startswith("ascend-fleet job spec")


def test_validate_ok_and_bad(proj):
    r = run(["validate", str(proj / "job.yaml")], proj / "home")
    assert r.exit_code == 0 and "feasible device counts [1, 2]" in r.output
    bad = proj / "bad.yaml"
    bad.write_text(JOB.replace("global: 64", "global: 63").replace("{min: 1, max: 2}",
                                                                   "{min: 2, max: 16}"))
    r = CliRunner().invoke(C.cli, ["--home", str(proj / "home"), "validate", str(bad)])
    assert r.exit_code == 2
    assert "not divisible by any allowed device count" in r.output


def test_submit_invalid_submits_nothing_and_needs_no_cluster(proj):
    bad = proj / "bad.yaml"
    bad.write_text(JOB.replace("dir: data", "dir: missing"))
    r = CliRunner().invoke(C.cli, ["--home", str(proj / "home"), "submit", str(bad)])
    assert r.exit_code == 2 and "spec.data.dir" in r.output
    assert not (proj / "home" / "fleet.db").exists()


def test_dry_run_prints_plan_commands_env(proj):
    r = run(["submit", str(proj / "job.yaml"), "--dry-run", "--set",
             "spec.resources.devices.max=2", "--output", "json"], proj / "home")
    assert r.exit_code == 0
    d = json.loads(r.output)
    st = d["steps"][0]
    assert st["plan"]["devices"] == 2 and st["plan"]["micro_batch"] == 16
    assert st["plan"]["grad_accum"] == 2
    ranks = st["processes"][0]["ranks"]
    sched = [x for x in ranks if x["rank"] is None]
    workers = [x for x in ranks if x["rank"] is not None]
    assert len(sched) == 1 and sched[0]["env"]["MS_ROLE"] == "MS_SCHED"
    assert [w["env"]["DEVICE_ID"] for w in workers] == ["0", "1"]
    assert all(w["env"]["MS_WORKER_NUM"] == "2" and w["env"]["FLEET_GRAD_ACCUM"] == "2"
               for w in workers)
    assert all(w["env"]["ASCEND_RT_VISIBLE_DEVICES"] == "0,1" for w in workers)
    assert workers[1]["argv"][1:3] == ["-m", "launcher.smoke"]
    assert not (proj / "home" / "fleet.db").exists()  # nothing submitted
    r = run(["submit", str(proj / "job.yaml"), "--dry-run"], proj / "home")
    assert "micro-batch" in r.output and "MS_ROLE=MS_WORKER" in r.output


def test_no_cluster_exit_code(proj):
    r = CliRunner().invoke(C.cli, ["--home", str(proj / "home"), "cancel", "x-1"])
    assert r.exit_code == 3 and "no fleet cluster running" in r.output


def fleet(home, *args, timeout=240):
    env = dict(os.environ, FLEET_HOME=str(home))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def controller_pid(home: Path) -> int:
    """The pid of this home's controller actor: a Ray worker titled ray::Controller whose
    environment carries this FLEET_HOME (other local clusters may run on the machine)."""
    mine = f"FLEET_HOME={home}".encode()
    found = []
    for d in Path("/proc").iterdir():
        try:
            if (d / "cmdline").read_bytes().startswith(b"ray::Controller") and \
                    mine in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except (OSError, ValueError):
            continue
    assert len(found) == 1, found
    return found[0]


def test_local_cluster_session(proj):
    home = proj / "home"
    try:
        r = fleet(home, "up", "--npus", "8")
        assert r.returncode == 0, r.stderr
        assert "local fleet cluster up at 127.0.0.1:" in r.stdout
        assert "Traceback" not in r.stdout + r.stderr  # no NPU-detection traceback

        t0 = time.time()
        r = fleet(home, "submit", str(proj / "job.yaml"), "--wait")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "submitted TrainJob smoke-1" in r.stdout
        assert "step 6/6" in r.stdout and "img/s" in r.stdout
        assert "smoke-1: SUCCEEDED" in r.stdout
        assert time.time() - t0 < 120

        r = fleet(home, "status", "smoke-1", "--output", "json")
        st = json.loads(r.stdout)
        assert st["state"] == "SUCCEEDED" and st["attempts"][0]["plan"]["devices"] == 2
        r = fleet(home, "list", "--all")
        assert "smoke-1" in r.stdout and "SUCCEEDED" in r.stdout
        r = fleet(home, "logs", "smoke-1", "--rank", "1")
        assert r.returncode == 0 and "step 6 loss" in r.stdout

        # The controller killed (-9) during `submit --wait`: Ray restarts it, it reattaches
        # to the running ranks, and the waiting CLI rides that out to the job's success.
        slow = proj / "slow.yaml"
        slow.write_text(JOB.replace("max_steps: 6", "max_steps: 60"))
        env = dict(os.environ, FLEET_HOME=str(home), PYTHONUNBUFFERED="1")
        env.pop("RAY_ADDRESS", None)
        waiting = subprocess.Popen([sys.executable, "-m", "launcher.cli", "submit", str(slow),
                                    "--wait"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        guard = threading.Timer(120, waiting.kill)  # bounds the read loop below
        guard.start()
        seen = []
        for line in waiting.stdout:
            seen.append(line)
            if "smoke-2 RUNNING  step" in line:
                break
        os.kill(controller_pid(home), signal.SIGKILL)
        out, err = waiting.communicate(timeout=180)
        guard.cancel()
        out = "".join(seen) + out
        assert waiting.returncode == 0, out + err
        assert "Traceback" not in err, err
        # A status call in flight when the controller died says so (a call sent while Ray
        # restarts it is held until it is back): test_a_call_waits_out_a_controller_restart
        assert ("controller restarting" in err) == ("controller back" in err), err
        assert "smoke-2: SUCCEEDED" in out and "step 60/60" in out
        r = fleet(home, "status", "smoke-2")
        assert "reattached to the running ranks of attempt 1" in r.stdout, r.stdout

        long = proj / "long.yaml"
        long.write_text(JOB.replace("max_steps: 6", "max_steps: 500"))
        r = fleet(home, "submit", str(long))
        assert r.returncode == 0 and "smoke-3" in r.stdout
        deadline = time.time() + 60
        while time.time() < deadline:
            r = fleet(home, "status", "smoke-3", "-o", "json")
            assert r.returncode == 0, r.stdout + r.stderr
            st = json.loads(r.stdout)
            if st["state"] == "RUNNING":
                break
            time.sleep(0.5)
        env = dict(os.environ, FLEET_HOME=str(home))
        follow = subprocess.Popen([sys.executable, "-m", "launcher.cli", "logs", "smoke-3",
                                   "--follow"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                  text=True)
        first = follow.stdout.readline()
        assert first.startswith("step ")
        r = fleet(home, "cancel", "smoke-3")
        assert r.returncode == 0 and "CANCELLED" in r.stdout
        # --follow ends by itself once the job is over.
        rest, _ = follow.communicate(timeout=60)
        assert follow.returncode == 0
        r = fleet(home, "status", "smoke-3")
        assert r.returncode == 1  # a cancelled job's status exits 1
        r = fleet(home, "status", "nope-9")
        assert r.returncode == 4
    finally:
        r = fleet(home, "down")
    assert "stopped" in r.stdout
    # Offline: the store still answers after the cluster is gone.
    r = fleet(home, "status", "smoke-1")
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout


def test_status_names_the_rank_that_saved_the_last_step(tmp_path):
    """Offline `fleet status` (no cluster: read from the store) marks the attempt whose
    failure a surviving rank's last words covered."""
    from launcher.store import Store

    home = tmp_path / "home"
    home.mkdir()
    store = Store(home / "fleet.db")
    job = store.add_job("lw", "TrainJob", {}, {}, 0)
    plan = {"devices": 2, "micro_batch": 4, "grad_accum": 1, "slices": []}
    store.add_attempt(job.id, plan, "pg")
    store.end_attempt(job.id, 1, "failed", "rank-1 exited with signal 9")
    store.add_event(job.id, "last_words", {"attempt": 1, "rank": "rank-0"})
    store.add_attempt(job.id, plan, "pg")
    out = run(["status", job.id], home).output
    first, second = [ln for ln in out.splitlines() if ln.strip().startswith("attempt")]
    assert "signal 9 (last step saved by rank-0)" in first, out
    assert "saved" not in second


def cli_proc(home: Path, *args: str, **env: str) -> subprocess.Popen:
    e = dict(os.environ, FLEET_HOME=str(home), **env)
    e.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], env=e, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_unreachable_address_fails_fast_with_exit_3(tmp_path):
    t0 = time.monotonic()
    p = cli_proc(tmp_path, "--address", "127.0.0.1:1", "list")
    out, err = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 10
    assert p.returncode == C.EXIT_NO_CLUSTER, out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0] and "--address" in lines[0], err


@pytest.fixture()
def silent_port():
    """A port that accepts TCP connections (the kernel's backlog) but speaks no Ray."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


def test_a_listener_that_is_not_ray_fails_within_the_connect_bound(tmp_path, silent_port):
    t0 = time.monotonic()
    p = cli_proc(tmp_path, "--address", f"127.0.0.1:{silent_port}", "list",
                 FLEET_CONNECT_TIMEOUT_S="2")
    out, err = p.communicate(timeout=60)
    assert time.monotonic() - t0 < 12
    assert p.returncode == C.EXIT_NO_CLUSTER, out + err
    assert "within 2s (FLEET_CONNECT_TIMEOUT_S)" in err and "Traceback" not in err


def _thread_kill(pid: int, sig: int) -> None:
    """Send `sig` to one of the process's threads other than its main thread, as the kernel
    may do with a signal sent to the process."""
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert tids, "the command runs no thread besides its main one"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.tgkill(pid, tids[-1], sig) == 0, os.strerror(ctypes.get_errno())


@pytest.mark.parametrize("to_thread", [False, True], ids=["to-process", "to-a-thread"])
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_end_a_command_stuck_connecting(tmp_path, silent_port, sig, code, to_thread):
    p = cli_proc(tmp_path, "--address", f"127.0.0.1:{silent_port}", "list")
    time.sleep(3)  # past the TCP probe, inside ray.init's connection retries
    assert p.poll() is None, p.communicate()
    t0 = time.monotonic()
    if to_thread:
        _thread_kill(p.pid, sig)
    else:
        p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 3, err
    assert p.returncode == code, out + err
    assert "jobs keep running" in err and "Traceback" not in err


# ------------------------------------------------------------------ job addressing (offline)

PLAN2 = {"devices": 2, "micro_batch": 4, "grad_accum": 1, "slices": []}
PLAN1 = {"devices": 1, "micro_batch": 4, "grad_accum": 1, "slices": []}


@pytest.fixture()
def store_home(tmp_path):
    """A fleet home whose store holds a TrainJob with two attempts of 2 ranks each and a
    Workflow with a train step (1 attempt, 2 ranks) and a validate step (1 rank); no
    cluster: the CLI answers status/list/logs from the store."""
    from launcher.ranks import attempt_dir
    from launcher.store import Store

    home = tmp_path / "home"
    home.mkdir()
    store = Store(home / "fleet.db")

    def log(job_id, n, label, text):
        d = attempt_dir(home, job_id, n)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{label}.log").write_text(text)

    job = store.add_job("tj", "TrainJob", {}, {}, 0)
    for n in (1, 2):
        store.add_attempt(job.id, PLAN2, "pg")
        log(job.id, n, "rank-0", f"attempt {n} rank 0\n")
        log(job.id, n, "rank-1", f"attempt {n} rank 1\n")
    wf = store.add_job("wf", "Workflow", {}, {}, 0)
    train = store.add_job("wf-train", "TrainJob", {}, {}, 0, parent=wf.id, step="train")
    val = store.add_job("wf-validate", "ValidateJob", {}, {}, 0, parent=wf.id,
                        step="validate")
    store.add_attempt(train.id, PLAN2, "pg")
    log(train.id, 1, "rank-0", "train line 1\ntrain line 2\n")
    store.add_attempt(val.id, PLAN1, "pg")
    log(val.id, 1, "rank-0", "top1 91.0\n")
    return {"home": home, "job": job.id, "wf": wf.id, "train": train.id, "val": val.id}


def run_err(args, home):
    """CliRunner with stderr kept apart (click >= 8.2 always separates it)."""
    return CliRunner().invoke(C.cli, ["--home", str(home), *args])


def test_logs_picks_the_attempt_and_rank_asked_for(store_home):
    h, j = store_home["home"], store_home["job"]
    assert run_err(["logs", j], h).stdout == "attempt 2 rank 0\n"
    assert run_err(["logs", j, "--attempt", "1", "--rank", "1"], h).stdout == \
        "attempt 1 rank 1\n"


@pytest.mark.parametrize(("args", "says"), [
    (["--rank", "5"], "has no rank 5; it ran ranks 0-1"),
    (["--rank", "-1"], "has no rank -1; it ran ranks 0-1"),
    (["--attempt", "99"], "has no attempt 99; its attempts: 1, 2"),
])
def test_logs_of_what_does_not_exist_is_an_error_naming_what_does(store_home, args, says):
    r = run_err(["logs", store_home["job"], *args], store_home["home"])
    assert r.exit_code == C.EXIT_NOT_FOUND and r.stdout == ""
    assert says in r.stderr, r.stderr


def test_logs_of_a_workflow_shows_each_steps_log_prefixed(store_home):
    r = run_err(["logs", store_home["wf"]], store_home["home"])
    assert r.exit_code == 0, r.output
    assert r.stdout == "[train] train line 1\n[train] train line 2\n[validate] top1 91.0\n"
    # rank 1 exists in the train step only: the validate step says it has none.
    r = run_err(["logs", store_home["wf"], "--rank", "1"], store_home["home"])
    assert r.exit_code == 0 and "[validate]" in r.stderr and "no rank 1" in r.stderr


def test_workflow_slash_step_addresses_the_step_job(store_home):
    h, wf = store_home["home"], store_home["wf"]
    r = run_err(["logs", f"{wf}/validate"], h)
    assert r.exit_code == 0 and r.stdout == "top1 91.0\n"
    r = run_err(["status", f"{wf}/train", "-o", "json"], h)
    assert json.loads(r.stdout)["id"] == store_home["train"]
    r = run_err(["status", f"{wf}/export"], h)
    assert r.exit_code == C.EXIT_NOT_FOUND
    assert "has no step 'export'; its steps: train, validate" in r.stderr


def test_list_all_shows_workflow_steps_indented_with_their_ids(store_home):
    r = run_err(["list", "--all"], store_home["home"])
    lines = r.stdout.splitlines()
    wf_row = next(i for i, ln in enumerate(lines) if ln.startswith(store_home["wf"] + " "))
    assert lines[wf_row + 1].startswith(f"  {store_home['wf']}/train = {store_home['train']}")
    assert lines[wf_row + 2].startswith(
        f"  {store_home['wf']}/validate = {store_home['val']}")


def test_no_such_job_is_one_wording_and_exit_4_everywhere(store_home, monkeypatch):
    h = store_home["home"]
    want = "error: no job 'nope-9' (`fleet list --all` shows jobs and their steps)\n"
    for cmd in (["status", "nope-9"], ["logs", "nope-9"], ["cancel", "nope-9"],
                ["plot", "nope-9"]):
        r = run_err(cmd, h)
        assert r.exit_code == C.EXIT_NOT_FOUND, (cmd, r.output)
        assert r.stderr.startswith(want.rstrip("\n")), (cmd, r.stderr)


def test_plot_of_a_workflow_names_its_steps(store_home):
    r = run_err(["plot", store_home["wf"]], store_home["home"])
    assert r.exit_code == C.EXIT_INVALID
    assert f"{store_home['wf']}/train ({store_home['train']})" in r.output


def test_help_summaries_are_whole_phrases(tmp_path):
    """click cuts a docstring's first sentence at ~45 characters with '...'; every
    command and subcommand's listing must be a whole phrase."""
    groups = [([], C.cli)]
    while groups:
        path, group = groups.pop()
        r = run([*path, "--help"], tmp_path)
        listing = r.output.split("Commands:", 1)[1].split("\n\n")[0]
        for name, cmd in group.commands.items():
            line = next(ln for ln in listing.splitlines() if ln.split()[:1] == [name])
            assert not line.rstrip().endswith("..."), line
            if isinstance(cmd, click.Group):
                groups.append(([*path, name], cmd))


def rank_glog_v(proj, **env: str) -> tuple[int, set[str], str]:
    r = CliRunner().invoke(C.cli, ["--home", str(proj / "home"), "submit",
                                   str(proj / "job.yaml"), "--dry-run", "--output", "json"],
                           env=env)
    if r.exit_code:
        return r.exit_code, set(), r.stderr
    ranks = json.loads(r.stdout)["steps"][0]["processes"][0]["ranks"]
    return r.exit_code, {x["env"]["GLOG_v"] for x in ranks}, r.stderr


def test_mindspore_log_level_is_errors_unless_raised(proj):
    assert rank_glog_v(proj, FLEET_MINDSPORE_LOG_LEVEL=None)[:2] == (0, {"3"})
    assert rank_glog_v(proj, FLEET_MINDSPORE_LOG_LEVEL="info")[:2] == (0, {"1"})
    assert rank_glog_v(proj, FLEET_MINDSPORE_LOG_LEVEL="2")[:2] == (0, {"2"})
    code, _, err = rank_glog_v(proj, FLEET_MINDSPORE_LOG_LEVEL="LOUD")
    assert code == C.EXIT_INVALID
    assert "FLEET_MINDSPORE_LOG_LEVEL='LOUD': use one of DEBUG, INFO, WARNING, ERROR" in err


def test_completion_offers_ids_and_workflow_steps(store_home, monkeypatch):
    monkeypatch.setenv("FLEET_HOME", str(store_home["home"]))
    got = C._complete_job(None, None, store_home["wf"])
    assert got == [store_home["wf"], f"{store_home['wf']}/train", f"{store_home['wf']}/validate"]


class _Restarting:
    """A controller handle whose calls fail as a restarting Ray actor's do, `fails` times."""

    def __init__(self, fails: int):
        self.fails = fails
        self.calls = 0

    def __getattr__(self, method):
        handle = self

        class _Method:
            def remote(self, *args):
                handle.calls += 1
                return (method, args)

        return _Method()


def test_a_call_waits_out_a_controller_restart(monkeypatch, capsys, tmp_path):
    """Ctx.call retries a query while the controller actor restarts and says so; a submit,
    which Ray cannot say ran or not, is not sent twice."""
    import ray

    fake = _Restarting(fails=2)

    def get(ref, timeout=None):
        if fake.fails:
            fake.fails -= 1
            raise ray.exceptions.RayActorError()
        return {"answered": ref}

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(C, "RESTART_POLL_S", 0.01)
    c = C.Ctx(None, tmp_path)
    c._ctl = fake
    assert c.call("status", "smoke-1") == {"answered": ("status", ("smoke-1",))}
    err = capsys.readouterr().err
    assert fake.calls == 3
    assert err.splitlines() == ["controller restarting… (waiting up to 120s)", "controller back"]

    fake.fails, fake.calls = 1, 0
    with pytest.raises(SystemExit) as e:
        c.call("submit", {}, {})
    assert e.value.code == C.EXIT_NO_CLUSTER and fake.calls == 1
    assert "may or may not have been applied" in capsys.readouterr().err

    fake.fails = 10**6
    monkeypatch.setattr(C, "RESTART_WAIT_S", 0.05)
    with pytest.raises(SystemExit) as e:
        c.call("status", "smoke-1")
    assert e.value.code == C.EXIT_NO_CLUSTER
    assert "did not come back within" in capsys.readouterr().err


def test_dry_run_shows_the_recipes_precision(tmp_path):
    """The seed's recipe: AMP O3, dynamic loss scale from 1024, EMA 0.9995 in the plan."""
    r = run(["submit", str(REPO / "examples" / "volo_d1_imagenet.yaml"), "--dry-run",
             "--set", f"spec.data.dir={tmp_path}"], tmp_path / "home")
    assert r.exit_code == 0, r.output
    assert "amp_level: O3" in r.output and "val_amp_level: O3" in r.output
    assert "loss_scale: dynamic from 1024" in r.output
    assert "ema: decay 0.9995" in r.output


def test_a_controller_that_cannot_start_is_not_waited_for(monkeypatch, capsys, tmp_path):
    """A controller whose constructor raised (a corrupt store) is dead, not restarting:
    the call ends at once with the store's exit code and its one-line reason."""
    import ray

    died = ray.exceptions.ActorDiedError()
    died._actor_init_failed = True
    died.error_msg = ("The actor died because of an error raised in its creation task\n"
                      "  File \"launcher/controller.py\", line 250, in __init__\n"
                      "launcher.store.StoreCorrupt: the job store /h/fleet.db is corrupt or "
                      "not a fleet database (file is not a database). It was not changed\n")

    def get(ref, timeout=None):
        raise died

    monkeypatch.setattr(ray, "get", get)
    c = C.Ctx(None, tmp_path)
    c._ctl = _Restarting(fails=0)
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        c.call("status", "smoke-1")
    assert time.monotonic() - t0 < 1.0
    assert e.value.code == 5
    err = capsys.readouterr().err
    assert err.startswith("error: the job store /h/fleet.db is corrupt") and "restarting" not in err
    died.error_msg = "creation task\nZeroDivisionError: division by zero\n"
    with pytest.raises(SystemExit) as e:
        c.call("status", "smoke-1")
    assert e.value.code == C.EXIT_NO_CLUSTER
    assert "the controller failed to start: ZeroDivisionError" in capsys.readouterr().err


def test_a_request_the_controller_refuses_is_a_spec_error_not_a_traceback(monkeypatch, capsys,
                                                                          tmp_path):
    import ray

    refused = S.SpecError("<submitted>", [("(queue)", "the queue is full: 10000 jobs wait "
                                                      "and at most 10000 may")])

    def get(ref, timeout=None):
        raise ray.exceptions.RayTaskError("submit", "Traceback ...", refused)

    monkeypatch.setattr(ray, "get", get)
    c = C.Ctx(None, tmp_path)
    c._ctl = _Restarting(fails=0)
    with pytest.raises(SystemExit) as e:
        c.call("submit", {}, {})
    assert e.value.code == C.EXIT_INVALID
    err = capsys.readouterr().err
    assert "the queue is full" in err and "Traceback" not in err
