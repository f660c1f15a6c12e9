"""k8s/ carries exactly the generated dashboards/*.json (ConfigMap) and alerts.yaml (PrometheusRule).

kustomize will not read ../../dashboards/ (files outside a kustomization root are
refused by default), so k8s/sync_dashboards.py keeps copies in k8s/base/dashboards/;
this test fails when a copy drifts from its source."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml
from required_tools import missing_tool

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("k8s_sync_dashboards",
                                               ROOT / "k8s" / "sync_dashboards.py")
sync = importlib.util.module_from_spec(_spec)
sys.modules["k8s_sync_dashboards"] = sync
_spec.loader.exec_module(sync)

# k8s/validate.py renders with the project's own kubectl (see its kustomize_argv);
# test_k8s_manifests.py may have loaded it already.
validate = sys.modules.get("k8s_validate")
if validate is None:
    _vspec = importlib.util.spec_from_file_location("k8s_validate", ROOT / "k8s" / "validate.py")
    validate = importlib.util.module_from_spec(_vspec)
    sys.modules["k8s_validate"] = validate  # dataclasses look their module up there
    _vspec.loader.exec_module(validate)

MISSING = [n for n in (*sync.DASHBOARDS, sync.ALERTS) if not (sync.SOURCE_DIR / n).is_file()]


@pytest.mark.skipif(bool(MISSING), reason=f"dashboards/{', '.join(MISSING)} not generated yet "
                    "(python -m dashboards.generate); nothing to compare the k8s copies with")
def test_k8s_copies_match_generated_dashboards():
    assert sync.stale_copies() == [], "run: python k8s/sync_dashboards.py"
    assert sync.main(["--check"]) == 0


@pytest.mark.skipif(bool(MISSING), reason="needs generated dashboards/*.json")
def test_rendered_configmap_carries_the_dashboards():
    try:
        objects = validate.render(ROOT / "k8s" / "base")
    except validate.RenderError as exc:
        missing_tool(str(exc))
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"]
              == "fleet-grafana-dashboards")
    for name in sync.DASHBOARDS:
        assert json.loads(cm["data"][name]) == json.loads((sync.SOURCE_DIR / name).read_text())
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    alerts = yaml.safe_load((sync.SOURCE_DIR / sync.ALERTS).read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_check_mode_detects_drift(tmp_path, monkeypatch):
    src, base = tmp_path / "dashboards", tmp_path / "base"
    src.mkdir()
    base.mkdir()
    for name in sync.DASHBOARDS:
        (src / name).write_text(json.dumps({"title": name}) + "\n")
    (src / sync.ALERTS).write_text("groups:\n- name: g\n  rules: []\n")
    monkeypatch.setattr(sync, "SOURCE_DIR", src)
    monkeypatch.setattr(sync, "BASE_DIR", base)
    monkeypatch.setattr(sync, "COPY_DIR", base / "dashboards")
    assert sync.main(["--check"]) == 1  # no copies yet
    assert sync.main([]) == 0
    assert sync.main(["--check"]) == 0
    (src / "fleet.json").write_text('{"title": "changed"}\n')
    assert sync.stale_copies() == ["dashboards/fleet.json"]
    (src / sync.ALERTS).write_text("groups:\n- name: other\n  rules: []\n")
    assert sync.stale_copies() == ["dashboards/fleet.json", sync.RULE_FILE]
    (src / "fleet.json").unlink()
    assert sync.main(["--check"]) == 2  # a missing source is an error, not "in sync"
