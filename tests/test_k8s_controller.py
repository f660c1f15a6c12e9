"""The controller scales a KubeRay worker group, end to end.

Real Ray (ray.cluster_utils, each worker node on its own loopback address), the
real controller configured the way the head pod configures it (KUBECONFIG,
FLEET_K8S_RAYCLUSTER), the fake API server on 127.0.0.1, and tests/k8s_fake's
FakeKubeRay turning the RayCluster's replicas into pods and Ray nodes:

an elastic job starts on the one server there is, the controller asks
Kubernetes for a second, the job grows onto it at a checkpoint with its global
batch fixed, finishes, and the idle server is given back by name."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import time
from pathlib import Path

import pytest
from k8s_fake import objects as o
from k8s_fake.operator import FakeKubeRay
from k8s_fake.server import FakeKubeAPI, write_kubeconfig
from ray_token import share_token

REPO = Path(__file__).resolve().parents[1]


def wait_until(pred, timeout: float, what: str, operator: FakeKubeRay):
    deadline = time.time() + timeout
    while time.time() < deadline:
        operator.reconcile()
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def kube_fleet(tmp_path, monkeypatch):
    from launcher import local
    home = tmp_path / "home"
    home.mkdir()
    local.quiet_ray()
    share_token(home)
    local.use_local_token(home, create=True)
    api = FakeKubeAPI(bookmark_interval_s=0.5)
    url = api.start()
    api.put("rayclusters", o.raycluster(replicas=1, min_replicas=1, max_replicas=2))
    cfg = write_kubeconfig(tmp_path / "kubeconfig", url, o.NAMESPACE)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(cfg))
    monkeypatch.setenv("FLEET_K8S_RAYCLUSTER", o.CLUSTER)
    monkeypatch.setenv("FLEET_K8S_IDLE_RELEASE_S", "2")
    monkeypatch.setenv("FLEET_METRICS", "0")

    import ray
    from ray.cluster_utils import Cluster

    from launcher import controller as ctl

    cluster = Cluster()
    # The head pod: no NPUs, it runs the controller.
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", include_dashboard=False)
    ray.init(address=cluster.address, namespace=ctl.NAMESPACE, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    operator = FakeKubeRay(api, cluster)
    operator.reconcile()  # the one replica: a pod and a Ray node
    c = ctl.Controller(str(home), poll_interval=0.2)
    try:
        yield {"c": c, "api": api, "operator": operator, "home": home, "ray": ray}
    finally:
        c.shutdown()
        for j in c.list_jobs(False):
            c.cancel(j["id"])
        if c.k8s is not None:
            c.k8s.close()
        ray.shutdown()
        cluster.shutdown()
        api.stop()


def elastic_doc(steps: int) -> dict:
    return {
        "apiVersion": "fleet/v1", "kind": "TrainJob", "metadata": {"name": "grows"},
        "spec": {
            "workload": "smoke", "config": "recipe.yaml",
            "overrides": {"max_steps": steps, "step_seconds": 0.25},
            "data": {"dir": "data"},
            "resources": {"deviceType": "CPU", "devices": {"min": 8, "max": 16},
                          "cpusPerDevice": 0.05},
            "batch": {"global": 64, "microBatchMax": 4},
            "restart": {"maxRestarts": 1, "backoffSeconds": 0.2},
        },
    }


def test_controller_asks_kubernetes_for_a_server_grows_onto_it_and_releases_it(kube_fleet):
    f = kube_fleet
    c, api, operator = f["c"], f["api"], f["operator"]
    assert c.k8s is not None and c.scaler is not None, c.k8s_error
    (f["home"] / "data").mkdir()
    cfg = f["home"] / "recipe.yaml"
    cfg.write_text("model: smoke\n")
    paths = {"workdir": str(REPO), "steps": {"grows": {"config": str(cfg),
                                                        "data_dir": str(f["home"] / "data")}}}
    job = c.submit(elastic_doc(80), paths)["id"]

    def group():
        return api.objects["rayclusters"][o.CLUSTER]["spec"]["workerGroupSpecs"][0]

    # Running on the one server, the job could use a second: the controller asks.
    wait_until(lambda: group()["replicas"] == 2, 90, "replicas patched to 2", operator)
    wait_until(lambda: len(operator.nodes) == 2, 60, "second pod up", operator)
    st = wait_until(lambda: (s := c.status(job))["state"] in ("SUCCEEDED", "FAILED") and s,
                    180, "job done", operator)
    assert st["state"] == "SUCCEEDED", st["message"]
    plans = [(a["status"], a["plan"]["devices"], a["plan"]["grad_accum"])
             for a in st["attempts"]]
    # 8 devices x accumulation 2, then 16 x 1: the same global batch of 64.
    assert plans == [("resized", 8, 2), ("succeeded", 16, 1)], plans
    assert st["progress"]["step"] == 80

    # Both servers idle now: one goes back by name, the other stays (minReplicas 1).
    wait_until(lambda: group()["replicas"] == 1 and len(operator.nodes) == 1, 60,
               "idle server released", operator)
    deleted = [name for what, name in operator.history if what == "delete"]
    assert len(deleted) == 1
    kinds = [e["kind"] for e in c.store.events("controller")]
    for k in ("k8s_scale_up", "k8s_servers_joined", "k8s_release"):
        assert k in kinds, kinds
    assert "k8s_scale_failed" not in kinds
    release = next(e for e in c.store.events("controller") if e["kind"] == "k8s_release")
    assert release["pods"] == deleted
    # Our own release is no worker failure; the released node is not scheduled on.
    k = c.cluster()["kubernetes"]
    assert k["worker_failures"] == {} and k["watch_errors"] == []
    assert k["scaling"]["last_error"] is None
    wait_until(lambda: c.cluster()["nodes"] == 1, 30, "released node gone from Ray",
               operator)
    assert c.scaler.draining == {}
