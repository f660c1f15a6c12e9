"""Exporter unit tests: heartbeat parsing, folding into job progress, the served /metrics."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from metrics_prometheus import PROMTOOL
from metrics_tiny_trainer import run_ranks
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from required_tools import tools_required

from launcher.metrics import MetricsExporter, serve_command
from launcher.progress import Event, HeartbeatError, HeartbeatTail, JobProgress, parse_event


def ev(kind: str, ts: float, rank: int = 0, attempt: int = 0, **fields):
    return {"event": kind, "ts": ts, "rank": rank, "attempt": attempt, **fields}


def start(ts, attempt=0, rank=0, world=2, micro=4, accum=2, gb=16, resumed=0):
    return ev(
        "start", ts, rank, attempt, world_size=world, micro_batch=micro, grad_accum=accum,
        global_batch=gb, resumed_step=resumed,
    )


def step(ts, n, attempt=0, rank=0, loss=2.0, ips=10.0, secs=0.5):
    return ev(
        "step", ts, rank, attempt, step=n, epoch=0, loss=loss, lr=0.1, images_per_second=ips,
        step_seconds=secs, samples_seen=16 * n,
    )


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def write_lines(path: Path, events: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for e in events:
            fh.write(json.dumps(e) + "\n")


def test_parse_event_names_the_bad_field_and_place():
    with pytest.raises(HeartbeatError, match=r"f\.jsonl:3: field 'loss' must be a number"):
        parse_event({**step(1.0, 1), "loss": "high"}, "f.jsonl:3")
    with pytest.raises(HeartbeatError, match="missing field 'world_size'"):
        bad = start(1.0)
        del bad["world_size"]
        parse_event(bad)
    with pytest.raises(HeartbeatError, match="'rank' must be an integer"):
        parse_event({**step(1.0, 1), "rank": 0.5})
    with pytest.raises(HeartbeatError, match="'status' must be one of 'ok', 'error', 'checkpointed'"):
        parse_event(ev("done", 1.0, status="maybe"))
    # A diverged loss arrives as the string "nan" (JSON has no NaN) and is kept.
    assert math.isnan(parse_event({**step(1.0, 1), "loss": "nan"}).loss)
    # A kind added by a newer train loop is a plain event (a sign of life), not an error.
    assert type(parse_event(ev("profile", 1.0))) is Event


def test_tail_waits_for_half_written_lines_and_skips_garbage(tmp_path):
    path = tmp_path / "rank-0.jsonl"
    tail = HeartbeatTail(path)
    assert tail.read_new() == []  # file not there yet
    line = json.dumps(start(1.0))
    path.write_text(line[:20], encoding="utf-8")
    assert tail.read_new() == []
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line[20:] + "\n{not json\n" + json.dumps(step(2.0, 1)) + "\n")
    got = tail.read_new()
    assert [e.kind for e in got] == ["start", "step"]
    assert tail.bad_lines == 1
    assert tail.read_new() == []


def test_progress_restart_shrink_recovery_and_goodput():
    p = JobProgress()
    # Attempt 0 on 2 ranks: steps 1..3 of 1 s each, checkpoint at 2, dies after 3.
    events = [start(100.0), start(100.0, rank=1)]
    for n in (1, 2, 3):
        events += [step(100.0 + n, n, ips=8.0), step(100.0 + n, n, rank=1, ips=8.0, loss=2.5)]
    events.append(ev("checkpoint", 102.5, step=2, path="c2", save_seconds=0.3, ok=True))
    # Attempt 1 on 1 rank with accumulation 4 resumes from step 2 and redoes step 3.
    events.append(start(110.0, attempt=1, world=1, accum=4, resumed=2))
    events += [step(112.0, 3, attempt=1, ips=9.0), step(113.0, 4, attempt=1, ips=9.0)]
    for e in events:
        p.apply(parse_event(e))
    assert p.restarts == 1
    assert p.state == "running"
    assert p.current_start.world_size == 1 and p.current_start.grad_accum == 4
    # Failed attempt's last sign of life was at 103 s, training resumed at 112 s.
    assert p.recovery_seconds() == [pytest.approx(9.0)]
    # Kept steps 1..4 at 0.5 s each over 13 s of wall time; step 3 counts once.
    assert p.goodput_ratio() == pytest.approx(2.0 / 13.0)
    # Only the live attempt's rank counts towards job throughput.
    assert p.job_images_per_second() == pytest.approx(9.0)
    p.apply(parse_event(ev("done", 114.0, attempt=1, step=4, status="ok")))
    assert p.state == "succeeded"


def test_recovering_state_between_attempts():
    p = JobProgress()
    for e in (start(1.0), step(2.0, 1), start(5.0, attempt=1)):
        p.apply(parse_event(e))
    assert p.state == "recovering"


def test_exporter_metrics_reflect_the_heartbeats(tmp_path):
    hb = tmp_path / "hb"
    hb.mkdir()
    write_lines(hb / "a0-r0.jsonl", [start(100.0), step(101.0, 1, loss=2.3, ips=30.0)])
    write_lines(hb / "a0-r1.jsonl", [start(100.0, rank=1), step(101.0, 1, rank=1, ips=20.0)])
    exp = MetricsExporter()
    exp.watch("demo-job", hb, submitted_ts=95.0)
    got = samples(generate_latest(exp.registry).decode())
    j = (("job_name", "demo-job"),)
    assert got[("fleet_train_loss", (("job_name", "demo-job"), ("rank", "0")))] == 2.3
    assert got[("fleet_job_devices", j)] == 2
    assert got[("fleet_job_global_batch", j)] == 16
    assert got[("fleet_queue_wait_seconds", j)] == 5.0
    assert got[("fleet_jobs", (("state", "running"),))] == 1
    assert got[("fleet_devices", (("state", "used"),))] == 2
    assert got[("fleet_job_restarts_total", j)] == 0
    assert got[("fleet_train_recomputed_micro_steps_total", j)] == 0
    # A step with a micro-step the step guard computed again, on each rank: counted per job.
    redo = {"recomputed": [{"wrong_loss": 0.09, "floor": 0.5, "loss": 2.2}]}
    write_lines(hb / "a0-r0.jsonl", [{**step(102.0, 2), **redo}])
    write_lines(hb / "a0-r1.jsonl", [{**step(102.0, 2, rank=1), **redo}])
    got = samples(generate_latest(exp.registry).decode())
    assert got[("fleet_train_recomputed_micro_steps_total", j)] == 2
    # Lines appended later show up at the next scrape without re-reading old ones.
    write_lines(hb / "a1-r0.jsonl", [start(110.0, attempt=1, world=1, accum=4)])
    write_lines(hb / "a1-r0.jsonl", [step(111.0, 2, attempt=1, ips=25.0)])
    got = samples(generate_latest(exp.registry).decode())
    assert got[("fleet_job_restarts_total", j)] == 1
    assert got[("fleet_job_devices", j)] == 1
    assert got[("fleet_job_grad_accum", j)] == 4
    # Rank 1 belonged to the old attempt and no longer reports throughput.
    ips = {k: v for k, v in got.items() if k[0] == "fleet_train_images_per_second"}
    assert ips == {("fleet_train_images_per_second", (*j, ("rank", "0"))): 25.0}


def test_exporter_serves_on_loopback_only(tmp_path):
    write_lines(tmp_path / "r0.jsonl", [start(1.0), step(2.0, 1)])
    exp = MetricsExporter()
    exp.watch("loop", tmp_path)
    port = exp.serve(port=0)
    try:
        assert exp._server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'fleet_train_step{job_name="loop"} 1.0' in text
    finally:
        exp.close()


def test_serve_command_rejects_bad_watch_before_serving(tmp_path):
    runner = CliRunner()
    res = runner.invoke(serve_command, ["--watch", f"Bad_Name={tmp_path}", "--port", "0"])
    assert res.exit_code != 0 and "DNS-1123" in res.output
    res = runner.invoke(serve_command, ["--watch", f"ok={tmp_path / 'missing'}", "--port", "0"])
    assert res.exit_code != 0 and "does not exist" in res.output
    res = runner.invoke(serve_command, ["--watch", "no-equals-sign", "--port", "0"])
    assert res.exit_code != 0 and "JOB=DIR" in res.output


def run_tiny(tmp: Path, attempt: int, steps: int, world: int = 1, accum: int = 2) -> None:
    run_ranks(attempt=attempt, world=world, accum=accum, steps=steps, ckpt_dir=tmp / "ckpt",
              heartbeat=lambda r: tmp / "hb" / f"attempt-{attempt}-rank-{r}.jsonl", every=3)


@pytest.mark.skipif(PROMTOOL is None and not tools_required(), reason="promtool not installed")
def test_promtool_check_metrics_passes_on_a_real_run(tmp_path):
    (tmp_path / "hb").mkdir()
    run_tiny(tmp_path, attempt=0, steps=6, world=2, accum=1)
    run_tiny(tmp_path, attempt=1, steps=9)
    exp = MetricsExporter()
    exp.watch("tiny", tmp_path / "hb")
    text = generate_latest(exp.registry).decode()
    got = samples(text)
    assert got[("fleet_job_restarts_total", (("job_name", "tiny"),))] == 1
    assert got[("fleet_train_step", (("job_name", "tiny"),))] == 9
    res = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "" and res.stderr.strip() == "", "promtool lint findings"


def test_watch_home_follows_new_jobs_and_controller_states(tmp_path):
    from launcher.metrics import snapshot_from_controller

    jobs = tmp_path / "jobs"
    write_lines(jobs / "a-1" / "attempt-0" / "rank-0.heartbeat.jsonl", [start(10.0), step(11.0, 1)])
    jobs.joinpath("Not_A_Job").mkdir()
    controller_jobs = [
        {"id": "a-1", "state": "RESTARTING", "created": 5.0},
        {"id": "queued-2", "state": "PENDING", "created": 9.0},
        {"id": "odd-3", "state": "SOMETHING_NEW"},
    ]
    # a-1 is RESTARTING: it gave its 2 devices back, so the controller's ledger has all 8
    # free although its last heartbeat says 2 ranks
    exp = MetricsExporter(
        fleet=lambda: snapshot_from_controller(controller_jobs, {"devices": 8, "free": 8})
    )
    exp.watch_home(tmp_path)
    got = samples(generate_latest(exp.registry).decode())
    assert got[("fleet_train_step", (("job_name", "a-1"),))] == 1
    assert got[("fleet_queue_wait_seconds", (("job_name", "a-1"),))] == 5.0
    assert got[("fleet_jobs", (("state", "recovering"),))] == 1
    assert got[("fleet_jobs", (("state", "pending"),))] == 1
    assert got[("fleet_devices", (("state", "free"),))] == 8
    assert got[("fleet_devices", (("state", "used"),))] == 0
    assert not any(lab and ("job_name", "Not_A_Job") in lab for _, lab in got)
    # A job that appears after the exporter started is picked up at the next scrape.
    write_lines(jobs / "b-2" / "attempt-0" / "rank-0.heartbeat.jsonl", [start(20.0)])
    got = samples(generate_latest(exp.registry).decode())
    assert got[("fleet_job_devices", (("job_name", "b-2"),))] == 2


def test_controller_exporter_survives_a_failing_controller(tmp_path):
    from launcher.metrics import start_fleet_exporter

    write_lines(tmp_path / "jobs" / "c-1" / "attempt-0" / "rank-0.heartbeat.jsonl",
                [start(10.0), step(11.0, 1)])
    calls = {"n": 0}

    def list_jobs():
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("controller busy")
        # The controller counted 2 restarts whose ranks never got to heartbeat.
        return [{"id": "c-1", "state": "RUNNING", "created": 1.0, "restarts": 2}]

    exp = start_fleet_exporter(tmp_path, list_jobs, port=0)
    assert exp._server.server_address[0] == "127.0.0.1"  # no FLEET_METRICS_HOST: loopback
    try:
        port = exp._server.server_address[1]
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            first = samples(r.read().decode())
        assert first[("fleet_train_step", (("job_name", "c-1"),))] == 1
        assert first[("fleet_job_restarts_total", (("job_name", "c-1"),))] == 0
        with urllib.request.urlopen(url, timeout=5) as r:
            second = samples(r.read().decode())
        assert second[("fleet_job_restarts_total", (("job_name", "c-1"),))] == 2
        assert second[("fleet_queue_wait_seconds", (("job_name", "c-1"),))] == 9.0
    finally:
        exp.close()


def test_metrics_serve_cli_serves_a_watched_job(tmp_path):
    """`fleet metrics serve` in a real subprocess, bounded by --max-seconds."""
    write_lines(tmp_path / "r0.jsonl", [start(1.0), step(2.0, 3)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.metrics", "--watch", f"cli-job={tmp_path}",
         "--port", "0", "--max-seconds", "20"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving fleet metrics on http://127.0.0.1:"), line
        url = line.split(" on ")[1].strip()
        with urllib.request.urlopen(url, timeout=5) as r:
            got = samples(r.read().decode())
        assert got[("fleet_train_step", (("job_name", "cli-job"),))] == 3
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_loss_scale_and_overflow_steps(tmp_path):
    """fleet_train_loss_scale follows the lead rank's last step; fleet_train_overflow_steps
    counts overflowed step numbers once, also when a restart redoes one."""
    hb = tmp_path / "hb"
    hb.mkdir()
    amp = lambda scale, over: {"loss_scale": scale, "overflow": over}  # noqa: E731
    write_lines(hb / "a0-r0.jsonl", [start(100.0), {**step(101.0, 1), **amp(1024.0, True)},
                                     {**step(102.0, 2), **amp(512.0, False)},
                                     {**step(103.0, 3), **amp(512.0, True)}])
    exp = MetricsExporter()
    exp.watch("demo-job", hb)
    j = (("job_name", "demo-job"),)
    got = samples(generate_latest(exp.registry).decode())
    assert got[("fleet_train_loss_scale", j)] == 512.0
    assert got[("fleet_train_overflow_steps_total", j)] == 2
    # attempt 1 resumes from step 1's checkpoint and redoes steps 2 and 3
    write_lines(hb / "a1-r0.jsonl", [start(110.0, attempt=1),
                                     {**step(111.0, 2, attempt=1), **amp(512.0, False)},
                                     {**step(112.0, 3, attempt=1), **amp(512.0, True)}])
    got = samples(generate_latest(exp.registry).decode())
    assert got[("fleet_train_overflow_steps_total", j)] == 2
    assert got[("fleet_train_loss_scale", j)] == 512.0
