"""End to end: a real tiny training run -> exporter -> a real Prometheus -> every panel and rule.

A training job runs as real rank processes appending heartbeats; attempt 0 is
SIGKILLed mid-run and attempt 1 resumes from its last checkpoint with another
accumulation (same global batch). Two drivers: `python -m workloads.volo.train`
(the product's VOLO loop, 1 rank, accumulation 2 -> 1, on a 100-image digits
ImageFolder) and a NumPy softmax-regression rank process (2 ranks -> 1 rank,
which the single-process VOLO run cannot show without a MindSpore cluster). Prometheus (Debian's binary,
127.0.0.1, temp storage) scrapes the exporter every second and loads
alerts.yaml. Then every query of both dashboards (targets, annotations, the
$job variable) and every alert rule's signal is evaluated through
Prometheus's HTTP API and must return non-empty, plausible series.

The NPU panels query Huawei npu-exporter's metrics; no NPU exists here, so a
stand-in serves those two metric names with npu-exporter's label set. That
proves the queries and legends against the documented shape, not real chips.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from metrics_prometheus import PROMETHEUS, Prometheus
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from required_tools import tools_required

from launcher.metrics import FleetSnapshot, MetricsExporter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dashboards import alerts  # noqa: E402

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None and not tools_required(), reason="prometheus not installed"
)

TRAINER = ROOT / "tests" / "metrics_tiny_trainer.py"
JOB = "tiny-digits"
GLOBAL_BATCH = 32
FINAL_STEP = 14
DEVICES_TOTAL = 4
VOLO_RECIPE = ROOT / "workloads" / "volo" / "configs" / "volo_tiny_digits.yaml"
VOLO_EPOCHS = 3
VOLO_STEPS = 9  # 100 training images // 32 = 3 steps per epoch, 3 epochs


class NpuStandIn:
    """Serves npu_chip_info_* with npu-exporter's labels (see module docstring)."""

    def collect(self):
        labels = ["id", "model_name", "vdie_id", "pcie_bus_info"]
        util = GaugeMetricFamily("npu_chip_info_utilization", "AI core utilization", labels=labels)
        hbm = GaugeMetricFamily("npu_chip_info_hbm_used_memory", "HBM used (MB)", labels=labels)
        for chip, (u, mb) in enumerate([(37.0, 21000.0), (41.0, 20500.0)]):
            lab = [str(chip), "Ascend910B", f"vdie-{chip}", f"0000:{chip:02x}:00.0"]
            util.add_metric(lab, u)
            hbm.add_metric(lab, mb)
        yield util
        yield hbm


@dataclass(frozen=True)
class Attempt:
    world: int
    accum: int
    steps: int  # optimizer step to stop at


@dataclass(frozen=True)
class Driver:
    """How one kind of real training process is started as a job's ranks."""

    name: str
    first: Attempt  # SIGKILLed once it has checkpointed at least once and moved on
    second: Attempt  # resumes from that checkpoint and runs to the end
    kill_after_step: int
    startup_timeout: float

    def command(self, tmp: Path, rank: int, attempt: Attempt) -> list[str]:
        if self.name == "numpy":
            return [sys.executable, str(TRAINER), "--rank", str(rank), "--world-size",
                    str(attempt.world), "--steps", str(attempt.steps), "--ckpt-every", "3",
                    "--val-every", "3", "--min-step-seconds", "0.3"]
        return [sys.executable, "-m", "workloads.volo.train", "-c", str(VOLO_RECIPE),
                "--data_dir", str(tmp / "data"), "--epochs", str(VOLO_EPOCHS),
                "--max_steps", str(attempt.steps), "--ckpt_save_steps", "2",
                "--num_parallel_workers", "1"]


NUMPY = Driver("numpy", Attempt(2, 1, FINAL_STEP + 20), Attempt(1, 2, FINAL_STEP), 5, 60)
# The real VOLO loop on one CPU rank: accumulation 2 -> 1 across the restart, global batch
# fixed. A 3-step epoch (see tiny_digits) so validation runs several times in the test.
VOLO = Driver("volo", Attempt(1, 2, VOLO_STEPS), Attempt(1, 1, VOLO_STEPS), 3, 180)


def tiny_digits(out: Path, full: Path, per_class: tuple[int, int] = (10, 5)) -> None:
    """A 100/50-image ImageFolder cut from the project's digits quickstart data at ``full``."""
    for split, n in zip(("train", "val"), per_class, strict=True):
        for cls in sorted((full / split).iterdir()):
            dest = out / split / cls.name
            dest.mkdir(parents=True)
            for img in sorted(cls.iterdir())[:n]:
                shutil.copy(img, dest / img.name)


def start_ranks(driver: Driver, tmp: Path, n: int, attempt: Attempt) -> list:
    procs = []
    for rank in range(attempt.world):
        env = {
            **os.environ,
            "FLEET_JOB_ID": JOB,
            "FLEET_ATTEMPT": str(n),
            "FLEET_GLOBAL_BATCH": str(GLOBAL_BATCH),
            "FLEET_MICRO_BATCH": str(GLOBAL_BATCH // (attempt.world * attempt.accum)),
            "FLEET_GRAD_ACCUM": str(attempt.accum),
            "FLEET_NUM_THREADS": "2",
            "FLEET_CHECKPOINT_DIR": str(tmp / "ckpt"),
            "FLEET_HEARTBEAT": str(tmp / "hb" / f"attempt-{n}" / f"rank-{rank}.heartbeat.jsonl"),
        }
        procs.append(subprocess.Popen(driver.command(tmp, rank, attempt), env=env, cwd=ROOT))
    return procs


def run_job(driver: Driver, tmp: Path, prom: Prometheus) -> None:
    """Attempt 0 is killed mid-run (a node loss), attempt 1 resumes on fewer resources."""
    procs = start_ranks(driver, tmp, 0, driver.first)
    try:
        # Kill attempt 0 once Prometheus has seen it checkpoint and go on past it.
        prom.wait_for(f'fleet_checkpoint_step{{job_name="{JOB}"}} >= 1', driver.startup_timeout)
        prom.wait_for(f'fleet_train_step{{job_name="{JOB}"}} >= {driver.kill_after_step}',
                      driver.startup_timeout)
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(timeout=30)
        time.sleep(2.0)  # the controller's restart backoff
        procs = start_ranks(driver, tmp, 1, driver.second)
        for p in procs:
            assert p.wait(timeout=driver.startup_timeout * 3) == 0, f"{driver.name} rank failed"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


# NUMPY: 2 -> 1 ranks in ~20 s; VOLO: the real MindSpore train loop in ~60 s.
DRIVERS = [NUMPY, VOLO]


@pytest.fixture(scope="module", params=DRIVERS, ids=lambda d: d.name)
def live(request, tmp_path_factory):
    driver = request.param
    tmp = tmp_path_factory.mktemp(f"e2e-{driver.name}")
    (tmp / "hb").mkdir()
    if driver is VOLO:
        tiny_digits(tmp / "data", request.getfixturevalue("digits"))
    t_start = time.time()
    exporter = MetricsExporter(fleet=lambda: FleetSnapshot(devices_total=DEVICES_TOTAL))
    exporter.watch(JOB, tmp / "hb", submitted_ts=t_start)
    port = exporter.serve(port=0)
    npu_registry = CollectorRegistry()
    npu_registry.register(NpuStandIn())
    npu_server, _ = start_http_server(0, addr="127.0.0.1", registry=npu_registry)
    npu_port = npu_server.server_address[1]
    prom = Prometheus(
        tmp / "prom",
        [f"127.0.0.1:{port}", f"127.0.0.1:{npu_port}"],
        [ROOT / "dashboards" / "alerts.yaml"],
    )
    try:
        prom.start()
        # The "submitted" job waits briefly before its ranks start (queue wait > 0).
        time.sleep(1.0)
        run_job(driver, tmp, prom)
        prom.wait_for(f'fleet_job_state{{job_name="{JOB}",state="succeeded"}} == 1', timeout=30)
        time.sleep(3.0)  # a few more scrapes and rule evaluations
        yield prom, t_start, time.time(), driver, tmp
    finally:
        prom.stop()
        exporter.close()
        npu_server.shutdown()
        npu_server.server_close()


def values(result: list[dict]) -> list[float]:
    return [float(v) for series in result for _, v in series["values"]]


def last_values(result: list[dict]) -> list[float]:
    return [float(series["values"][-1][1]) for series in result]


Check = Callable[[list[dict]], None]


def between(lo: float, hi: float) -> Check:
    def check(result: list[dict]) -> None:
        bad = [v for v in values(result) if not lo <= v <= hi]
        assert not bad, f"values outside [{lo}, {hi}]: {bad[:5]}"

    return check


def all_of(*checks: Check) -> Check:
    def check(result: list[dict]) -> None:
        for c in checks:
            c(result)

    return check


def seen(*expected: float) -> Check:
    def check(result: list[dict]) -> None:
        got = set(values(result))
        assert set(expected) <= got, f"expected to see {expected}, saw {sorted(got)}"

    return check


def last(expected: float) -> Check:
    def check(result: list[dict]) -> None:
        assert last_values(result) and all(v == expected for v in last_values(result)), (
            f"last values {last_values(result)} != {expected}"
        )

    return check


CHANCE_LOSS = math.log(10)  # cross-entropy of a uniform guess over the 10 digit classes


def falls(result: list[dict]) -> None:
    """Training works: some later loss is below the first one scraped (any rank), or a
    scraped loss is clearly below chance. The second matters when the first scrape lands
    after the numpy driver's steep early fall, on a low value that minibatch noise and the
    restart's redone steps need not beat again in the few seconds left (seen once in CI)."""
    points = sorted((float(t), float(v)) for s in result for t, v in s["values"])
    first, low = points[0][1], min(v for _, v in points)
    assert low < first or low < 0.9 * CHANCE_LOSS, (
        f"loss never fell below its first value {first} nor below 0.9 x ln(10)")


def ranks(n: int) -> Check:
    def check(result: list[dict]) -> None:
        assert len({s["metric"].get("rank") for s in result}) == n

    return check


def labelled(*labels: str) -> Check:
    def check(result: list[dict]) -> None:
        for s in result:
            assert all(s["metric"].get(label) for label in labels), s["metric"]

    return check


def last_gt(threshold: float) -> Check:
    def check(result: list[dict]) -> None:
        assert all(v > threshold for v in last_values(result)), last_values(result)

    return check


def max_at_least(threshold: float) -> Check:
    def check(result: list[dict]) -> None:
        assert max(values(result)) >= threshold

    return check


# A ratio, 0 until the first kept step (a scrape may land between the ranks' start and their
# first step on a loaded machine), then above 0 once a step was kept.
GOODPUT = all_of(between(0.0, 1.0), last_gt(0.0))

# One plausibility check per (dashboard, panel title, refId). A new panel without
# an entry here fails test_every_query_has_a_check.
SANE_SECONDS = 600.0
CHECKS: dict[tuple[str, str, str], Check] = {
    # Attempt 0 may get past FINAL_STEP before it is killed; attempt 1 stops there.
    ("training", "Optimizer step", "A"): all_of(between(1, FINAL_STEP + 20), last(FINAL_STEP)),
    ("training", "Restarts", "A"): all_of(seen(0, 1), last(1)),
    ("training", "Checkpoint age", "A"): between(-0.5, SANE_SECONDS),
    ("training", "Goodput", "A"): GOODPUT,
    ("training", "Loss and learning rate", "A"): all_of(between(1e-6, 10.0), falls),
    ("training", "Loss and learning rate", "B"): between(0.0, 0.5),
    ("training", "Validation top-1 / top-5", "A"): all_of(between(0, 100), last_gt(10.0)),
    ("training", "Validation top-1 / top-5", "B"): between(0, 100),
    ("training", "Throughput", "A"): between(1e-3, 1e7),
    ("training", "Throughput", "B"): all_of(between(1e-3, 1e7), ranks(2)),
    ("training", "Step time", "A"): between(0.25, 30.0),  # paced at >= 0.3 s
    # Elastic shrink 2 -> 1 devices, accumulation 1 -> 2, global batch fixed.
    ("training", "Devices × micro-batch × accumulation = global batch", "A"): all_of(
        between(1, 2), seen(1, 2), last(1)
    ),
    ("training", "Devices × micro-batch × accumulation = global batch", "B"): all_of(
        seen(1, 2), last(2)
    ),
    ("training", "Devices × micro-batch × accumulation = global batch", "C"): between(16, 16),
    ("training", "Devices × micro-batch × accumulation = global batch", "D"): between(
        GLOBAL_BATCH, GLOBAL_BATCH
    ),
    ("training", "Devices × micro-batch × accumulation = global batch", "E"): between(
        GLOBAL_BATCH, GLOBAL_BATCH
    ),
    ("training", "Checkpoint age and save time", "A"): between(-0.5, SANE_SECONDS),
    ("training", "Checkpoint age and save time", "B"): between(0.0, 5.0),
    ("training", "Heartbeat age", "A"): between(-0.5, SANE_SECONDS),
    # Both drivers train in float32 with a fixed scale of 1: no step overflows.
    ("training", "Loss scale and overflowed steps", "A"): all_of(between(1.0, 1.0), last(1.0)),
    ("training", "Loss scale and overflowed steps", "B"): between(0, 0),
    ("fleet", "Jobs by state", "A"): all_of(between(0, 1), labelled("state")),
    ("fleet", "Devices used / free", "A"): all_of(between(0, DEVICES_TOTAL), labelled("state")),
    ("fleet", "NPU utilisation", "A"): all_of(between(0, 100), labelled("instance", "id")),
    ("fleet", "NPU utilisation", "B"): between(0, 100),
    ("fleet", "NPU HBM used", "A"): between(1, 1e6),
    # Pending from submission until its first rank heartbeats, then never again.
    ("fleet", "Queue", "A"): all_of(between(0, 1), last(0)),
    ("fleet", "Queue", "B"): between(0.5, 60.0),
    ("fleet", "Recovery time", "A"): between(2.0, 60.0),
    ("fleet", "Goodput", "A"): GOODPUT,
    ("fleet", "Restarts in the last hour", "A"): all_of(between(0, 10), max_at_least(0.5)),
}


# The real VOLO run: one rank whose accumulation goes 2 -> 1 with micro-batch 16 -> 32,
# MindSpore start-up (seconds) inside the recovery gap, and too few steps at warm-up
# learning rates to demand that loss falls or top-1 beats chance.
VOLO_CHECKS: dict[tuple[str, str, str], Check] = {
    ("training", "Optimizer step", "A"): all_of(between(1, VOLO_STEPS), last(VOLO_STEPS)),
    ("training", "Loss and learning rate", "A"): between(1e-6, 20.0),
    ("training", "Loss and learning rate", "B"): between(0.0, 0.01),
    ("training", "Validation top-1 / top-5", "A"): between(0, 100),
    ("training", "Throughput", "A"): between(1e-3, 1e5),
    ("training", "Throughput", "B"): all_of(between(1e-3, 1e5), ranks(1)),
    ("training", "Step time", "A"): between(1e-3, 120.0),
    ("training", "Devices × micro-batch × accumulation = global batch", "A"): all_of(
        between(1, 1), last(1)
    ),
    ("training", "Devices × micro-batch × accumulation = global batch", "B"): all_of(
        seen(1, 2), last(1)
    ),
    ("training", "Devices × micro-batch × accumulation = global batch", "C"): all_of(
        seen(16, 32), last(32)
    ),
    ("training", "Checkpoint age and save time", "B"): between(0.0, 30.0),
    ("fleet", "Devices used / free", "A"): all_of(between(0, DEVICES_TOTAL), labelled("state")),
    ("fleet", "Recovery time", "A"): between(2.0, 300.0),
}


@dataclass(frozen=True)
class Truth:
    """What the ranks' heartbeat files say. A panel that shows a heartbeat field must show
    exactly its values: every scraped value is one a rank reported, and each series ends on
    its rank's last report (the ranges above only say the values are plausible)."""

    events: list[dict]

    @classmethod
    def load(cls, hb_dir: Path) -> Truth:
        return cls([json.loads(line) for f in sorted(hb_dir.rglob("*.jsonl"))
                    for line in f.read_text().splitlines() if line.strip()])

    def reported(self, kind: str, field: str, rank: str | None) -> list[tuple[tuple, float]]:
        """((attempt, ts), value) of every `kind` event of `rank` (any rank: None)."""
        return sorted(((e["attempt"], e["ts"]), float(e[field])) for e in self.events
                      if e["event"] == kind and field in e
                      and (rank is None or str(e["rank"]) == rank))


TruthCheck = Callable[[list[dict], Path], None]  # (query result, the heartbeat directory)


def equals_heartbeats(kind: str, field: str) -> TruthCheck:
    def check(result: list[dict], hb_dir: Path) -> None:
        truth = Truth.load(hb_dir)
        for series in result:
            reported = truth.reported(kind, field, series["metric"].get("rank"))
            assert reported, f"no {kind} event with {field} for {series['metric']}"
            allowed = {v for _, v in reported}
            scraped = [float(v) for _, v in series["values"]]
            assert set(scraped) <= allowed, (
                f"{field}: scraped {sorted(set(scraped) - allowed)[:5]} that no rank reported")
            assert scraped[-1] == reported[-1][1], (field, scraped[-1], reported[-1])

    return check


def equals_job_progress(value: Callable[[object], float]) -> TruthCheck:
    """The series ends on what the controller's fold of the same heartbeats gives."""
    def check(result: list[dict], hb_dir: Path) -> None:
        from launcher.metrics_history import RunHistory

        want = value(RunHistory.load(JOB, hb_dir).progress())
        assert [float(s["values"][-1][1]) for s in result] == [want], want

    return check


# Panels whose values come straight from the heartbeats (or their fold) are checked for
# equality on top of the plausibility checks.
TRUTH_CHECKS: dict[tuple[str, str, str], TruthCheck] = {
    ("training", "Optimizer step", "A"): equals_heartbeats("step", "step"),
    ("training", "Loss and learning rate", "A"): equals_heartbeats("step", "loss"),
    ("training", "Loss and learning rate", "B"): equals_heartbeats("step", "lr"),
    ("training", "Validation top-1 / top-5", "A"): equals_heartbeats("val", "top1"),
    ("training", "Validation top-1 / top-5", "B"): equals_heartbeats("val", "top5"),
    ("training", "Throughput", "B"): equals_heartbeats("step", "images_per_second"),
    ("training", "Step time", "A"): equals_heartbeats("step", "step_seconds"),
    ("training", "Loss scale and overflowed steps", "A"): equals_heartbeats("step", "loss_scale"),

    ("training", "Throughput", "A"): equals_job_progress(lambda p: p.job_images_per_second()),
    ("training", "Goodput", "A"): equals_job_progress(lambda p: p.goodput_ratio()),
    ("fleet", "Goodput", "A"): equals_job_progress(lambda p: p.goodput_ratio()),
}


def checks_for(driver: Driver) -> dict[tuple[str, str, str], Check]:
    return {**CHECKS, **VOLO_CHECKS} if driver is VOLO else CHECKS


SIGNAL_CHECKS: dict[str, Check] = {
    "FleetJobStalled": between(-0.5, SANE_SECONDS),
    "FleetJobRestartsClimbing": all_of(between(0, 10), max_at_least(0.5)),
    "FleetGoodputLow": GOODPUT,
    "FleetCheckpointTooOld": between(-0.5, SANE_SECONDS),
    "FleetCheckpointFailing": between(0, 0),
}


def dashboard_queries() -> list[tuple[tuple[str, str, str], str]]:
    out = []
    for name in ("training", "fleet"):
        d = json.loads((ROOT / "dashboards" / f"{name}.json").read_text())
        for panel in d["panels"]:
            for target in panel.get("targets", []):
                out.append(((name, panel["title"], target["refId"]), target["expr"]))
    return out


def grafana_vars(expr: str) -> str:
    # The only Grafana variables the dashboards use in queries.
    return expr.replace("$job", JOB)


def test_every_query_has_a_check():
    assert {key for key, _ in dashboard_queries()} == set(CHECKS)
    assert set(VOLO_CHECKS) <= set(CHECKS)
    assert {r.name for r in alerts.RULES} == set(SIGNAL_CHECKS)


@pytest.mark.parametrize("key", sorted(CHECKS), ids=lambda k: f"{k[0]}:{k[1]}:{k[2]}")
def test_panel_query_returns_plausible_series(live, key):
    prom, t0, t1, driver, _ = live
    expr = dict(dashboard_queries())[key]
    result = prom.query_range(grafana_vars(expr), t0, t1, step=1.0)
    assert result, f"{key}: {expr!r} returned no series"
    checks_for(driver)[key](result)
    if key in TRUTH_CHECKS:
        TRUTH_CHECKS[key](result, live[4] / "hb")


def test_restart_annotation_and_job_variable(live):
    prom, t0, t1, *_ = live
    d = json.loads((ROOT / "dashboards" / "training.json").read_text())
    (annotation,) = d["annotations"]["list"]
    marks = prom.query_range(grafana_vars(annotation["expr"]), t0, t1, step=1.0)
    assert marks, "restart annotation query found no restart"
    job_var = next(v for v in d["templating"]["list"] if v["name"] == "job")
    metric = job_var["query"].split("(")[1].split(",")[0]  # label_values(METRIC, LABEL)
    jobs = prom.api("label/job_name/values", **{"match[]": metric})
    assert JOB in jobs


@pytest.mark.parametrize("rule", alerts.RULES, ids=lambda r: r.name)
def test_alert_signal_and_rule_evaluate(live, rule):
    prom, t0, t1, *_ = live
    result = prom.query_range(rule.signal, t0, t1, step=1.0)
    assert result, f"{rule.name}: signal {rule.signal!r} returned no series"
    SIGNAL_CHECKS[rule.name](result)
    # The run was healthy and has finished: no rule may fire on it.
    assert prom.query(rule.expr) == []


def test_prometheus_loaded_and_evaluated_every_rule(live):
    prom, *_ = live
    groups = prom.api("rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {r.name for r in alerts.RULES}
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert rule["state"] == "inactive", name


def test_fleet_plot_draws_the_same_history(live, tmp_path):
    """`fleet plot` and Prometheus read the same heartbeats: their last values agree."""
    from launcher.metrics_history import RunHistory
    from launcher.plot import render

    prom, *_, tmp = live
    history = RunHistory.load(JOB, tmp / "hb")
    result = render(history, tmp_path / "run.png")
    assert (result.width, result.height) == (1200, 900)
    assert all(n > 0 for n in result.panels.values()), result.panels
    (step,) = prom.query(f'fleet_train_step{{job_name="{JOB}"}}')
    assert float(step["value"][1]) == max(e.step for e in history.events if e.kind == "step")
    (lr,) = prom.query(f'fleet_train_lr{{job_name="{JOB}"}}')
    assert float(lr["value"][1]) == pytest.approx(history.lr().y[-1])
    assert len(history.restart_times()) == 1
