"""`fleet` CLI: offline commands through click's runner, and one real local
cluster session (fleet up -> submit --wait -> status/list/logs -> cancel -> down)
run as subprocesses, the way a user runs them."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

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
    assert "Exit codes: 0 ok, 1 job failed/cancelled, 2 invalid spec" in r.output
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

        long = proj / "long.yaml"
        long.write_text(JOB.replace("max_steps: 6", "max_steps: 500"))
        r = fleet(home, "submit", str(long))
        assert r.returncode == 0 and "smoke-2" in r.stdout
        deadline = time.time() + 60
        while time.time() < deadline:
            st = json.loads(fleet(home, "status", "smoke-2", "-o", "json").stdout)
            if st["state"] == "RUNNING":
                break
            time.sleep(0.5)
        env = dict(os.environ, FLEET_HOME=str(home))
        follow = subprocess.Popen([sys.executable, "-m", "launcher.cli", "logs", "smoke-2",
                                   "--follow"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                  text=True)
        first = follow.stdout.readline()
        assert first.startswith("step ")
        r = fleet(home, "cancel", "smoke-2")
        assert r.returncode == 0 and "CANCELLED" in r.stdout
        # --follow ends by itself once the job is over.
        rest, _ = follow.communicate(timeout=60)
        assert follow.returncode == 0
        r = fleet(home, "status", "smoke-2")
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


def test_dry_run_shows_the_recipes_precision(tmp_path):
    """The seed's recipe: AMP O3, dynamic loss scale from 1024, EMA 0.9995 in the plan."""
    r = run(["submit", str(REPO / "examples" / "volo_d1_imagenet.yaml"), "--dry-run",
             "--set", f"spec.data.dir={tmp_path}"], tmp_path / "home")
    assert r.exit_code == 0, r.output
    assert "amp_level: O3" in r.output and "val_amp_level: O3" in r.output
    assert "loss_scale: dynamic from 1024" in r.output
    assert "ema: decay 0.9995" in r.output
