"""The worker-group scaling policy (launcher/autoscale.py) against the fake API server.

FleetK8s makes real HTTP calls to tests/k8s_fake on 127.0.0.1; time is a fake
clock so that idle release and ask expiry are tested without waiting."""

from __future__ import annotations

import pytest
from k8s_fake import objects as o
from k8s_fake.server import Fault, forbidden, serving

from launcher.autoscale import ScalerSettings, WorkerGroupScaler
from launcher.cli import kubernetes_lines
from launcher.k8s.client import KubeClient, RetryPolicy
from launcher.k8s.fleet import FleetK8s
from launcher.k8s.pod_watcher import PodWatcher

FAST_RETRY = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.05,
                         request_timeout=(1.0, 0.5))
SETTINGS = ScalerSettings(idle_release_s=60, request_timeout_s=300, retry_after_s=30,
                          recheck_s=5)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def fake():
    with serving() as api:
        yield api


@pytest.fixture
def fleet(fake):
    kube = KubeClient.for_url(fake.url, o.NAMESPACE, FAST_RETRY)
    # The watcher is not started: only the deletions it is told to expect matter here.
    return FleetK8s(kube, o.CLUSTER, watcher=PodWatcher(kube, o.CLUSTER))


def worker_pods(fake, n: int, *, replicas: int | None = None, min_replicas: int = 0,
                max_replicas: int = 4) -> dict[str, int]:
    """n live worker pods, each a Ray node (id n-<i>) with 8 NPUs."""
    fake.put("rayclusters", o.raycluster(replicas=n if replicas is None else replicas,
                                         min_replicas=min_replicas, max_replicas=max_replicas))
    for i in range(n):
        fake.put("pods", o.pod(f"fleet-ray-npu-worker-{i}", ip=f"10.42.0.{10 + i}"))
    return {f"n-{i}": 8 for i in range(n)}


def remember(fleet, nodes: dict[str, int]) -> None:
    mapping = fleet.remember_nodes(
        [{"NodeID": n, "Alive": True, "NodeManagerAddress": f"10.42.0.{10 + int(n[2:])}",
          "NodeManagerHostname": n, "Resources": {"NPU": 8.0}} for n in nodes])
    assert not mapping.unmatched_nodes


def replicas(fake) -> int:
    return fake.objects["rayclusters"][o.CLUSTER]["spec"]["workerGroupSpecs"][0]["replicas"]


def kinds(events) -> list[str]:
    return [k for k, _ in events]


def patches(fake) -> int:
    return sum(r.method == "PATCH" for r in fake.requests)


def test_a_waiting_job_asks_for_whole_servers_once(fake, fleet):
    nodes = worker_pods(fake, 1)
    remember(fleet, nodes)
    clock = Clock()
    sc = WorkerGroupScaler(fleet, SETTINGS, clock)
    # A 24-device job waits with 0 of 8 free: 24 devices = 3 more servers.
    ev = sc.step(nodes, busy=nodes, wanted_devices=24, free_devices=0)
    assert kinds(ev) == ["k8s_scale_up"] and ev[0][1]["servers"] == 3
    assert replicas(fake) == 4
    assert "asked Kubernetes for 3 more servers" in sc.note()
    # Pods pending: neither a second ask nor a re-read before recheck_s...
    for dt in (0.5, 1.0, 2.0):
        clock.t += dt
        assert sc.step(nodes, busy=nodes, wanted_devices=24, free_devices=0) == []
    assert patches(fake) == 1
    # ...and after it, the group shows them on their way: still no second ask.
    clock.t += 10
    assert sc.step(nodes, busy=nodes, wanted_devices=24, free_devices=0) == []
    assert patches(fake) == 1 and replicas(fake) == 4
    # They join: the ask is served and reported with how long it took.
    clock.t += 30
    joined = {**nodes, "n-1": 8, "n-2": 8, "n-3": 8}
    ev = sc.step(joined, busy=joined, wanted_devices=0, free_devices=0)
    assert kinds(ev) == ["k8s_servers_joined"] and ev[0][1]["after_s"] == 43.5
    assert sc.note() == ""


def test_a_pod_kuberay_is_already_replacing_is_not_asked_for_again(fake, fleet):
    # replicas 2 but only one pod live as a Ray node: the other is being replaced
    # after a node loss. A shrunk job wanting 8 more devices must not add a third.
    nodes = worker_pods(fake, 1, replicas=2)
    clock = Clock()
    sc = WorkerGroupScaler(fleet, SETTINGS, clock)
    assert sc.step(nodes, busy=nodes, wanted_devices=8, free_devices=0) == []
    assert replicas(fake) == 2 and patches(fake) == 0
    # Wanting 16 more: one is on its way, one more is asked for.
    clock.t += 10
    ev = sc.step(nodes, busy=nodes, wanted_devices=16, free_devices=0)
    assert kinds(ev) == ["k8s_scale_up"] and ev[0][1]["servers"] == 1
    assert replicas(fake) == 3


def test_free_devices_are_used_before_asking(fake, fleet):
    nodes = worker_pods(fake, 2)
    sc = WorkerGroupScaler(fleet, SETTINGS, Clock())
    assert sc.step(nodes, busy=["n-0"], wanted_devices=8, free_devices=8) == []
    assert patches(fake) == 0
    ev = sc.step(nodes, busy=["n-0"], wanted_devices=12, free_devices=8)
    assert ev[0][1]["servers"] == 1  # 4 devices short is one whole server


def test_at_max_replicas_the_wait_says_so_and_retries_later(fake, fleet):
    nodes = worker_pods(fake, 3, max_replicas=4)
    clock = Clock()
    sc = WorkerGroupScaler(fleet, SETTINGS, clock)
    ev = sc.step(nodes, busy=nodes, wanted_devices=24, free_devices=0)
    assert kinds(ev) == ["k8s_scale_up", "k8s_scale_capped"]
    assert ev[1][1] == {"wanted": 3, "added": 1, "replicas": 4}
    assert "is at maxReplicas (4)" in sc.note()
    # What `fleet status` (no job) prints from the controller's cluster summary.
    lines = kubernetes_lines({**fleet.status(), "scaling": sc.status()})
    assert lines[0] == f"kubernetes: RayCluster {o.NAMESPACE}/{o.CLUSTER}, worker group npu"
    assert "  asked for 1 more server(s) 0.0s ago" in lines
    assert any("is at maxReplicas (4)" in x for x in lines)
    clock.t += 10  # before retry_after_s: no API call at all
    n = len(fake.requests)
    assert sc.step(nodes, busy=nodes, wanted_devices=24, free_devices=0) == []
    assert len(fake.requests) == n


def test_an_ask_never_served_is_reported(fake, fleet):
    nodes = worker_pods(fake, 1)
    clock = Clock()
    sc = WorkerGroupScaler(fleet, SETTINGS, clock)
    sc.step(nodes, busy=nodes, wanted_devices=8, free_devices=0)
    clock.t += SETTINGS.request_timeout_s
    ev = sc.step(nodes, busy=nodes, wanted_devices=8, free_devices=0)
    assert kinds(ev) == ["k8s_request_expired"]
    assert "kubectl get pods" in ev[0][1]["note"]
    # The pod is still Pending in the group: asking again would not schedule it either.
    assert replicas(fake) == 2 and patches(fake) == 1


def test_idle_servers_are_released_by_name_down_to_min_replicas(fake, fleet):
    nodes = worker_pods(fake, 3, min_replicas=2)
    remember(fleet, nodes)
    clock = Clock()
    sc = WorkerGroupScaler(fleet, SETTINGS, clock)
    assert sc.step(nodes, busy=["n-1"], wanted_devices=0, free_devices=16) == []
    clock.t += SETTINGS.idle_release_s - 1
    assert sc.step(nodes, busy=["n-1"], wanted_devices=0, free_devices=16) == []
    clock.t += 1
    ev = sc.step(nodes, busy=["n-1"], wanted_devices=0, free_devices=16)
    assert kinds(ev) == ["k8s_release"]
    # The busy server stays; of the two idle ones only one may go (minReplicas 2).
    assert ev[0][1]["pods"] == ["fleet-ray-npu-worker-0"] and replicas(fake) == 2
    group = fake.objects["rayclusters"][o.CLUSTER]["spec"]["workerGroupSpecs"][0]
    assert group["scaleStrategy"]["workersToDelete"] == ["fleet-ray-npu-worker-0"]
    assert set(sc.draining) == {"n-0"}
    # Our own release is not a worker failure when the pod goes.
    assert "fleet-ray-npu-worker-0" in fleet.watcher._expected_deletions
    # The one kept at minReplicas is not asked about again every tick.
    n = patches(fake)
    clock.t += 1
    assert sc.step({"n-1": 8, "n-2": 8}, busy=["n-1"], wanted_devices=0, free_devices=8) == []
    assert patches(fake) == n
    sc.forget_node("n-0")  # its Ray node died with the pod
    assert sc.draining == {}


def test_nothing_is_released_while_jobs_want_devices(fake, fleet):
    nodes = worker_pods(fake, 2, max_replicas=2)
    remember(fleet, nodes)
    clock = Clock()
    sc = WorkerGroupScaler(fleet, SETTINGS, clock)
    sc.step(nodes, busy=[], wanted_devices=0, free_devices=16)
    clock.t += SETTINGS.idle_release_s * 2
    # A job wants 24 devices but only 16 are free (it cannot start): keep all.
    ev = sc.step(nodes, busy=[], wanted_devices=24, free_devices=16)
    assert "k8s_release" not in kinds(ev) and replicas(fake) == 2


def test_idle_release_off(fake, fleet):
    nodes = worker_pods(fake, 2)
    remember(fleet, nodes)
    clock = Clock()
    sc = WorkerGroupScaler(fleet, ScalerSettings(idle_release_s=0), clock)
    sc.step(nodes, busy=[], wanted_devices=0, free_devices=16)
    clock.t += 10**6
    assert sc.step(nodes, busy=[], wanted_devices=0, free_devices=16) == []
    assert patches(fake) == 0


def test_a_forbidden_patch_is_reported_and_retried_not_raised(fake, fleet):
    nodes = worker_pods(fake, 1)
    clock = Clock()
    sc = WorkerGroupScaler(fleet, SETTINGS, clock)
    fake.add_fault(Fault("PATCH", r"/rayclusters/", status=403,
                         body=forbidden("patch", "rayclusters", o.NAMESPACE, "ray.io")))
    ev = sc.step(nodes, busy=nodes, wanted_devices=8, free_devices=0)
    assert kinds(ev) == ["k8s_scale_failed"]
    assert "verbs [patch]" in ev[0][1]["error"]
    assert "kubernetes: grow: RBACError" in sc.note()
    clock.t += SETTINGS.retry_after_s - 1
    assert sc.step(nodes, busy=nodes, wanted_devices=8, free_devices=0) == []
    clock.t += 1
    ev = sc.step(nodes, busy=nodes, wanted_devices=8, free_devices=0)
    assert kinds(ev) == ["k8s_scale_up"] and sc.note().startswith("; asked Kubernetes")


def test_settings_from_env_name_the_bad_variable():
    s = ScalerSettings.from_env({"FLEET_K8S_IDLE_RELEASE_S": "120"})
    assert (s.idle_release_s, s.request_timeout_s) == (120.0, 600.0)
    with pytest.raises(ValueError, match="FLEET_K8S_SCALE_TIMEOUT_S='10m' is not a number") as e:
        ScalerSettings.from_env({"FLEET_K8S_SCALE_TIMEOUT_S": "10m"})
    assert "idle release" not in str(e.value)
    with pytest.raises(ValueError, match=r"default 600; 0 turns idle release off"):
        ScalerSettings.from_env({"FLEET_K8S_IDLE_RELEASE_S": "ten minutes"})
