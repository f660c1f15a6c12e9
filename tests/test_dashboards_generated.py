"""Dashboards and alert rules: generated from code, schema-valid, rules unit-tested by promtool."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from metrics_prometheus import PROMTOOL
from required_tools import tools_required

ROOT = Path(__file__).resolve().parents[1]
# dashboards/ is repo tooling, not part of the installed package.
sys.path.insert(0, str(ROOT))

from dashboards import alerts  # noqa: E402
from dashboards.validate import validate_dashboard  # noqa: E402

DASH = ROOT / "dashboards"
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not tools_required(), reason="promtool not installed"
)


def load(name: str) -> dict:
    return json.loads((DASH / name).read_text(encoding="utf-8"))


def targets(d: dict) -> list[tuple[str, dict]]:
    return [(p["title"], t) for p in d["panels"] for t in p.get("targets", [])]


def test_committed_files_match_the_code():
    res = subprocess.run(
        [sys.executable, "-m", "dashboards.generate", "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr


def test_drift_check_fails_on_a_hand_edit(tmp_path):
    gen = [sys.executable, "-m", "dashboards.generate", "--out", str(tmp_path)]
    subprocess.run(gen, cwd=ROOT, check=True, capture_output=True, timeout=120)
    data = json.loads((tmp_path / "fleet.json").read_text())
    data["title"] = "edited by hand"
    (tmp_path / "fleet.json").write_text(json.dumps(data))
    res = subprocess.run([*gen, "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "fleet.json" in res.stderr and "training.json" not in res.stderr


@pytest.mark.parametrize("name", ["training.json", "fleet.json"])
def test_dashboards_are_valid_against_the_grafana_schema(name):
    assert validate_dashboard(load(name)) == []


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["panels"][1]["gridPos"].update(h="8"), "grid_pos.h"),
        (lambda d: d["panels"][1].update(colour="red"), "not a field of the Grafana schema"),
        (lambda d: d["panels"][1].update(type="graph-ng"), "not a panel type"),
        (lambda d: d.update(graphTooltip=7), "graph_tooltip"),
        (lambda d: d["panels"][1]["targets"][0].update(expr=42), "expr"),
        (lambda d: d["templating"]["list"][0].update(type="dropdown"), "type_val"),
    ],
)
def test_schema_validation_rejects_broken_dashboards(mutate, message):
    broken = copy.deepcopy(load("training.json"))
    mutate(broken)
    errors = validate_dashboard(broken)
    assert errors and any(message in e for e in errors), errors


def test_training_dashboard_is_about_one_job():
    d = load("training.json")
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "job"]
    for title, t in targets(d):
        assert 'job_name="$job"' in t["expr"], title
        assert t["datasource"]["uid"] == "${datasource}"
    titles = {p["title"] for p in d["panels"]}
    for needed in ("Loss and learning rate", "Throughput", "Step time", "Validation top-1 / top-5",
                   "Devices × micro-batch × accumulation = global batch", "Checkpoint age"):
        assert needed in titles
    (restarts,) = d["annotations"]["list"]
    assert "fleet_job_attempt" in restarts["expr"]


def test_fleet_dashboard_uses_npu_exporter_metrics():
    exprs = " ".join(t["expr"] for _, t in targets(load("fleet.json")))
    for metric in ("npu_chip_info_utilization", "npu_chip_info_hbm_used_memory", "fleet_jobs",
                   "fleet_devices", "fleet_recovery_seconds", "fleet_goodput_ratio",
                   "fleet_queue_wait_seconds"):
        assert metric in exprs


def test_dashboard_queries_use_only_exported_or_npu_metrics():
    from launcher import metrics

    exported = set(re.findall(r'"(fleet_[a-z0-9_]+)"', Path(metrics.__file__).read_text()))
    counters = {"fleet_job_restarts", "fleet_checkpoint_failures", "fleet_heartbeat_bad_lines",
                "fleet_train_recomputed_micro_steps", "fleet_train_overflow_steps"}
    exported |= {c + "_total" for c in counters}
    for name in ("training.json", "fleet.json"):
        for title, t in targets(load(name)):
            for used in re.findall(r"\b(fleet_[a-z0-9_]+|npu_[a-z0-9_]+)", t["expr"]):
                assert used in exported or used.startswith("npu_chip_info_"), (name, title, used)


def test_alert_rules_cover_the_issue():
    names = {r.name for r in alerts.RULES}
    assert {"FleetJobStalled", "FleetJobRestartsClimbing", "FleetGoodputLow",
            "FleetCheckpointTooOld"} <= names
    rules = yaml.safe_load((DASH / "alerts.yaml").read_text())["groups"][0]["rules"]
    assert [r["alert"] for r in rules] == [r.name for r in alerts.RULES]


@needs_promtool
def test_promtool_checks_the_rules():
    res = subprocess.run([PROMTOOL, "check", "rules", str(DASH / "alerts.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_alerts():
    res = subprocess.run([PROMTOOL, "test", "rules", str(DASH / "alerts_test.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_training_dashboard_shows_loss_scale_and_overflows():
    exprs = {t["expr"] for _, t in targets(load("training.json"))}
    assert any("fleet_train_loss_scale" in e for e in exprs)
    assert any("fleet_train_overflow_steps_total" in e for e in exprs)
