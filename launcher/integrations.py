"""The controller's optional aids, each started so that its failure never stops the queue:
the Prometheus exporter, the Kubernetes client (when running in a KubeRay cluster) and the
worker-group scaler."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.store import Store

log = logging.getLogger("fleet.controller")


def start_metrics(home: Path, jobs: Callable[[], list[dict]], cluster: Callable[[], dict],
                  store: Store) -> Any:
    """Prometheus exporter (launcher/metrics.py) over every job's heartbeats + the job
    table. Off with FLEET_METRICS=0; a busy port must not stop the controller."""
    if os.environ.get("FLEET_METRICS", "1") == "0":
        return None
    try:
        from launcher.metrics import start_fleet_exporter
        return start_fleet_exporter(home, jobs, cluster)
    except Exception as e:  # noqa: BLE001 - metrics are optional, the queue is not
        log.warning("metrics exporter not started: %s", e)
        store.add_event("controller", "metrics_unavailable", {"error": str(e)})
        return None


def start_k8s() -> tuple[Any, str]:
    """(FleetK8s (launcher/k8s/fleet.py) when running in a KubeRay cluster else None, why not)."""
    try:
        from launcher.k8s.fleet import FleetK8s
        return FleetK8s.from_env(), ""
    except Exception as e:  # noqa: BLE001 - Kubernetes is an aid, not a prerequisite
        log.warning("kubernetes integration off: %s", e)
        return None, f"integration off: {e}"


def start_scaler(k8s: Any) -> tuple[Any, str]:
    """(The RayCluster worker-group scaler (launcher/autoscale.py) or None, why not)."""
    if k8s is None:
        return None, ""
    from launcher.autoscale import ScalerSettings, WorkerGroupScaler
    try:
        return WorkerGroupScaler(k8s, ScalerSettings.from_env()), ""
    except ValueError as e:  # a bad FLEET_K8S_* value: say so, keep scheduling
        log.warning("kubernetes scaling off: %s", e)
        return None, f"scaling off: {e}"


def node_failure_reason(k8s: Any, node_id: str) -> str:
    """Why a node's pod died (OOMKilled, Evicted, NodeNotReady...), if Kubernetes says."""
    if k8s is None:
        return ""
    try:
        f = k8s.why_node_died(node_id, wait_s=3.0)
    except Exception as e:  # noqa: BLE001
        return f"; kubernetes: unavailable ({e})"
    return "" if f is None else f"; kubernetes: {f.to_json()}"
