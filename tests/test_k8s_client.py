"""launcher/k8s/ against the fake API server on 127.0.0.1 (tests/k8s_fake)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from k8s_fake import objects as o
from k8s_fake import tls
from k8s_fake.server import Fault, forbidden, serving, status_body, write_kubeconfig
from required_tools import missing_tool

from launcher.k8s import cli as k8s_cli
from launcher.k8s.client import KubeClient, RetryPolicy
from launcher.k8s.errors import Conflict, KubeError, KubeUnavailable, RBACError
from launcher.k8s.fleet import FleetK8s
from launcher.k8s.pod_watcher import PodWatcher
from launcher.k8s.rbac import REQUIRED_RBAC
from launcher.k8s.reasons import FailureReason as R
from launcher.k8s.reasons import WorkerFailure
from launcher.k8s.scaling import release_idle_workers, request_workers, scale_worker_group
from launcher.k8s.watch import ResourceWatch

FAST_RETRY = RetryPolicy(attempts=4, base_delay_s=0.01, max_delay_s=0.05,
                         request_timeout=(1.0, 0.5))


@pytest.fixture
def fake():
    with serving() as api:
        yield api


@pytest.fixture
def kube(fake):
    return KubeClient.for_url(fake.url, o.NAMESPACE, FAST_RETRY)


@pytest.fixture
def watcher(kube):
    w = PodWatcher(kube, o.CLUSTER, watch_seconds=2)
    yield w
    w.stop()


def collect(w: PodWatcher, count: int, timeout: float = 5.0) -> list[WorkerFailure]:
    got: list[WorkerFailure] = []
    end = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < end:
        got += list(w.failures(timeout=0.05))
    assert not w.errors, w.errors
    return got


def wait_until(predicate, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


# ---------------------------------------------------------------- pod watch


def test_watcher_reports_why_each_worker_died(fake, watcher):
    fake.put("pods", o.pod("fleet-ray-npu-worker-ok"))
    watcher.start()
    wait_until(lambda: watcher.stats["pods"].watches >= 1 and watcher.stats["events"].watches)
    fake.put("pods", o.oom_killed("fleet-ray-npu-worker-oom"))
    fake.put("pods", o.evicted("fleet-ray-npu-worker-evict"))
    fake.put("pods", o.node_lost("fleet-ray-npu-worker-lost"))
    fake.put("pods", o.device_unhealthy("fleet-ray-npu-worker-chip"))
    fake.put("pods", o.image_pull("fleet-ray-npu-worker-pull"))
    fake.put("events", o.event("ev-1", "fleet-ray-npu-worker-ok", "NodeNotReady",
                               "Node is not ready"))
    # Another cluster's pod in the same namespace is none of our business.
    fake.put("events", o.event("ev-2", "other-job-worker-x", "Evicted", "low on memory"))

    got = {(f.pod, f.reason) for f in collect(watcher, 6)}
    assert got == {
        ("fleet-ray-npu-worker-oom", R.OOM_KILLED),
        ("fleet-ray-npu-worker-evict", R.EVICTED),
        ("fleet-ray-npu-worker-lost", R.NODE_NOT_READY),
        ("fleet-ray-npu-worker-chip", R.DEVICE_UNHEALTHY),
        ("fleet-ray-npu-worker-pull", R.IMAGE_PULL),
        ("fleet-ray-npu-worker-ok", R.NODE_NOT_READY),
    }
    latest = watcher.latest()
    assert latest["fleet-ray-npu-worker-chip"].message.startswith("ascend-device-unhealthy")
    # The event carried no node; the watcher knows the pod's node from the pod watch.
    assert latest["fleet-ray-npu-worker-ok"].node == "atlas-01"
    assert list(watcher.failures(timeout=0.3)) == []  # each reported once


def test_same_pod_failing_again_after_restart_is_reported_again(fake, watcher):
    watcher.start()
    wait_until(lambda: watcher.stats["pods"].watches >= 1)
    fake.put("pods", o.oom_killed("fleet-ray-npu-worker-a", restarts=1))
    fake.put("pods", o.oom_killed("fleet-ray-npu-worker-a", restarts=1))  # same status again
    fake.put("pods", o.oom_killed("fleet-ray-npu-worker-a", restarts=2))
    got = collect(watcher, 2)
    assert [(f.reason, f.restart_count) for f in got] == [(R.OOM_KILLED, 1), (R.OOM_KILLED, 2)]
    assert list(watcher.failures(timeout=0.3)) == []


def test_deleted_pod_is_a_failure_unless_the_controller_released_it(fake, watcher):
    fake.put("pods", o.pod("fleet-ray-npu-worker-a"))
    fake.put("pods", o.pod("fleet-ray-npu-worker-b"))
    watcher.start()
    wait_until(lambda: watcher.stats["pods"].watches >= 1)
    watcher.expect_deletion(["fleet-ray-npu-worker-b"])
    fake.delete("pods", "fleet-ray-npu-worker-b")
    fake.delete("pods", "fleet-ray-npu-worker-a")
    got = collect(watcher, 1)
    assert [(f.pod, f.reason, f.node) for f in got] == [
        ("fleet-ray-npu-worker-a", R.DELETED, "atlas-01")]
    assert list(watcher.failures(timeout=0.3)) == []


def test_watch_resumes_from_last_resource_version_after_dropped_connection(fake, watcher):
    # The first pod watch breaks after one event, mid-stream, without a final chunk.
    fake.add_fault(Fault("GET", r"/pods$", watch=True, drop_after_events=1))
    watcher.start()
    wait_until(lambda: watcher.stats["pods"].watches >= 1)
    first = fake.put("pods", o.oom_killed("fleet-ray-npu-worker-a"))
    fake.put("pods", o.evicted("fleet-ray-npu-worker-b"))
    fake.put("pods", o.image_pull("fleet-ray-npu-worker-c"))
    got = collect(watcher, 3)
    assert sorted(f.pod for f in got) == [f"fleet-ray-npu-worker-{x}" for x in "abc"]
    stats = watcher.stats["pods"]
    assert stats.reconnects == 1 and stats.lists == 1, stats  # resumed, not re-listed
    resumed = fake.watch_requests("pods")[1]
    assert resumed.query["resourceVersion"] == first["metadata"]["resourceVersion"]
    assert list(watcher.failures(timeout=0.3)) == []  # nothing replayed twice


def test_bookmarks_advance_the_resume_point(fake, kube):
    fake.put("pods", o.pod("fleet-ray-npu-worker-a"))
    watch = ResourceWatch(kube, "pods", kube.core.list_namespaced_pod,
                          label_selector="ray.io/cluster=fleet-ray", watch_seconds=1)
    stop = threading.Event()
    listed_rv = None
    for ev in watch.events(stop, deadline=time.monotonic() + 0.5):
        if ev.type == "SYNCED":
            listed_rv = watch.resource_version
            # Unrelated writes (events) move the store's resourceVersion on.
            for i in range(3):
                fake.put("events", o.event(f"noise-{i}", "x", "Pulled", "ok", type_="Normal"))
    assert watch.stats.bookmarks >= 1
    assert int(watch.resource_version) > int(listed_rv)
    # The next watch starts where the last bookmark left off, not at the list.
    for _ in watch.events(stop, deadline=time.monotonic() + 0.2):
        pass
    assert fake.watch_requests("pods")[-1].query["resourceVersion"] != listed_rv


def test_410_gone_relists_and_reports_pods_deleted_meanwhile(fake, kube, watcher):
    fake.put("pods", o.pod("fleet-ray-npu-worker-a"))
    fake.put("pods", o.pod("fleet-ray-npu-worker-b"))
    # The first watch breaks before it can deliver b's deletion; the reconnect
    # arrives late, after compaction made the watcher's resourceVersion too old.
    fake.add_fault(Fault("GET", r"/pods$", watch=True, drop_after_events=0))
    fake.add_fault(Fault("GET", r"/pods$", watch=True, delay_s=0.3))
    watcher.start()
    wait_until(lambda: watcher.stats["pods"].watches >= 1)
    fake.delete("pods", "fleet-ray-npu-worker-b")
    fake.compact()
    got = collect(watcher, 1)
    assert [(f.pod, f.reason) for f in got] == [("fleet-ray-npu-worker-b", R.DELETED)]
    stats = watcher.stats["pods"]
    assert (stats.reconnects, stats.expired, stats.lists) == (1, 1, 2), stats
    assert list(watcher.failures(timeout=0.3)) == []


def test_unexpected_watch_error_is_raised_not_swallowed(fake, kube):
    fake.add_fault(Fault("GET", r"/events$", watch=True, status=500, times=10))
    watch = ResourceWatch(kube, "events", kube.core.list_namespaced_event, watch_seconds=1)
    with pytest.raises(KubeUnavailable, match="watch events .* failed 4 times"):
        for _ in watch.events(threading.Event(), deadline=time.monotonic() + 5):
            pass


# ---------------------------------------------------------------- errors


def test_403_names_the_rbac_verb_and_resource(fake, kube):
    fake.put("rayclusters", o.raycluster())
    fake.add_fault(Fault("GET", r"/rayclusters/", status=403,
                         body=forbidden("get", "rayclusters", o.NAMESPACE, "ray.io")))
    with pytest.raises(RBACError) as err:
        scale_worker_group(kube, o.CLUSTER, "npu", 3)
    msg = str(err.value)
    assert "cannot get rayclusters.ray.io in namespace ascend-fleet" in msg
    assert "apiGroups [ray.io] resources [rayclusters] verbs [get]" in msg
    assert err.value.verb == "get" and err.value.resource == "rayclusters"
    assert len(fake.requests) == 1  # a permission error is not retried


def test_403_on_watch_names_watch_pods(fake, kube, watcher):
    fake.add_fault(Fault("GET", r"/pods$", watch=True, status=403,
                         body=forbidden("watch", "pods", o.NAMESPACE)))
    watcher.start()
    wait_until(lambda: watcher.errors)
    assert isinstance(watcher.errors[0], RBACError)
    assert 'apiGroups [""] resources [pods] verbs [watch]' in str(watcher.errors[0])


def test_409_retries_with_the_fresh_object(fake, kube):
    fake.put("rayclusters", o.raycluster(replicas=2))
    # Someone else (KubeRay, another controller) writes between our read and write.
    fake.add_fault(Fault("PATCH", r"/rayclusters/", status=409, body=status_body(
        409, "Conflict", "the object has been modified; please apply your changes to the "
        "latest version and try again")))
    result = request_workers(kube, o.CLUSTER, "npu", 1)
    assert result.attempts == 2 and result.replicas == 3
    methods = [r.method for r in fake.requests]
    assert methods == ["GET", "PATCH", "GET", "PATCH"]
    assert fake.objects["rayclusters"][o.CLUSTER]["spec"]["workerGroupSpecs"][0]["replicas"] == 3


def test_patch_with_stale_resource_version_conflicts_and_scale_rereads(fake, kube):
    fake.put("rayclusters", o.raycluster(replicas=2))
    stale = kube.get_raycluster(o.CLUSTER)
    # A real concurrent change: the other group is resized by someone else.
    current = fake.objects["rayclusters"][o.CLUSTER]
    current["spec"]["workerGroupSpecs"][1]["replicas"] = 0
    fake.put("rayclusters", current)
    with pytest.raises(Conflict):
        kube.patch_raycluster(o.CLUSTER, {"metadata": stale["metadata"],
                                          "spec": {"workerGroupSpecs": []}})
    scale_worker_group(kube, o.CLUSTER, "npu", 4)
    groups = fake.objects["rayclusters"][o.CLUSTER]["spec"]["workerGroupSpecs"]
    # Our change applied and the other writer's change kept.
    assert [(g["groupName"], g["replicas"]) for g in groups] == [("npu", 4), ("cpu", 0)]


def test_slow_responses_are_retried_with_backoff(fake, kube):
    fake.put("rayclusters", o.raycluster())
    fake.add_fault(Fault("GET", r"/rayclusters/", delay_s=1.0, times=2))  # read timeout 0.5 s
    sleeps: list[float] = []
    kube.sleep = sleeps.append
    assert kube.get_raycluster(o.CLUSTER)["metadata"]["name"] == o.CLUSTER
    assert len(sleeps) == 2 and all(0 <= s <= FAST_RETRY.max_delay_s for s in sleeps)
    assert len([r for r in fake.requests if r.method == "GET"]) == 3


def test_timeouts_give_up_after_the_retry_budget(fake, kube):
    fake.put("rayclusters", o.raycluster())
    fake.add_fault(Fault("GET", r"/rayclusters/", delay_s=0.8, times=10))
    start = time.monotonic()
    with pytest.raises(KubeUnavailable, match="get rayclusters .* failed 4 times"):
        kube.get_raycluster(o.CLUSTER)
    assert time.monotonic() - start < 4.0


def test_503_is_retried(fake, kube):
    fake.put("pods", o.pod("fleet-ray-npu-worker-a"))
    fake.add_fault(Fault("GET", r"/pods$", status=503, times=2))
    assert [p["metadata"]["name"] for p in kube.list_cluster_pods(o.CLUSTER)] == [
        "fleet-ray-npu-worker-a"]


# ---------------------------------------------------------------- scaling


def test_scale_outside_bounds_names_the_field_and_writes_nothing(fake, kube):
    fake.put("rayclusters", o.raycluster(replicas=2, max_replicas=4))
    with pytest.raises(ValueError, match=r"minReplicas\.\.maxReplicas = 0\.\.4"):
        scale_worker_group(kube, o.CLUSTER, "npu", 5)
    with pytest.raises(KubeError, match=r"no worker group 'gpu' \(groups: \['npu', 'cpu'\]"):
        scale_worker_group(kube, o.CLUSTER, "gpu", 1)
    assert [r.method for r in fake.requests] == ["GET", "GET"]


def test_request_workers_is_capped_by_max_replicas(fake, kube):
    fake.put("rayclusters", o.raycluster(replicas=3, max_replicas=4))
    result = request_workers(kube, o.CLUSTER, "npu", 5)
    assert (result.replicas_before, result.replicas) == (3, 4)


def test_release_idle_workers_names_the_pods_to_delete(fake, kube, watcher):
    fake.put("rayclusters", o.raycluster(replicas=3))
    for x in "abc":
        fake.put("pods", o.pod(f"fleet-ray-npu-worker-{x}"))
    result = release_idle_workers(kube, o.CLUSTER, "npu",
                                  ["fleet-ray-npu-worker-c", "fleet-ray-npu-worker-a"],
                                  watcher=watcher)
    assert (result.replicas_before, result.replicas) == (3, 1)
    group = fake.objects["rayclusters"][o.CLUSTER]["spec"]["workerGroupSpecs"][0]
    assert group["scaleStrategy"]["workersToDelete"] == [
        "fleet-ray-npu-worker-a", "fleet-ray-npu-worker-c"]
    with pytest.raises(ValueError, match="not workers of group 'npu'"):
        release_idle_workers(kube, o.CLUSTER, "npu", ["someone-else"])


def test_every_request_is_covered_by_the_role(fake, kube, watcher):
    """Drive every operation, then map each HTTP request the fake saw to an RBAC
    (verb, resource): all must be in REQUIRED_RBAC, which the Role grants."""
    fake.put("rayclusters", o.raycluster(replicas=2))
    fake.put("pods", o.pod("fleet-ray-npu-worker-a"))
    watcher.start()
    fake.put("pods", o.oom_killed("fleet-ray-npu-worker-a"))
    collect(watcher, 1)
    request_workers(kube, o.CLUSTER, "npu", 1)
    release_idle_workers(kube, o.CLUSTER, "npu", ["fleet-ray-npu-worker-a"])
    kube.get_pod("fleet-ray-npu-worker-a")
    granted = {(r.group, r.resource, v) for r in REQUIRED_RBAC for v in r.verbs}
    used = set()
    for req in fake.requests:
        group = "ray.io" if req.path.startswith("/apis/ray.io/") else ""
        parts = req.path.rstrip("/").split("/")
        collection_request = parts[-1] in {"pods", "events", "rayclusters"}
        resource = parts[-1] if collection_request else parts[-2]
        verb = {"PATCH": "patch"}.get(req.method) or (
            ("watch" if req.query.get("watch") == "true" else "list")
            if collection_request else "get")
        used.add((group, resource, verb))
    assert used <= granted, used - granted
    assert used == granted  # and the Role grants nothing this module never uses
    # The Role pins these to the fleet's RayCluster by resourceNames, which only holds
    # for requests that name it: never a list or watch of the collection.
    own = {(r.group, r.resource) for r in REQUIRED_RBAC if r.own_object}
    named = [req.path for req in fake.requests if any(
        req.path.startswith(f"/apis/{g}/") and f"/{res}" in req.path for g, res in own)]
    assert named and all(p.rstrip("/").endswith(f"/rayclusters/{o.CLUSTER}") for p in named)


# ---------------------------------------------------------------- configuration


def test_kubeconfig_outside_a_pod(fake, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cfg = write_kubeconfig(tmp_path / "config", fake.url, o.NAMESPACE)
    fake.put("pods", o.pod("fleet-ray-npu-worker-a"))
    kube = KubeClient.from_environment(kubeconfig=str(cfg), retry=FAST_RETRY)
    assert kube.namespace == o.NAMESPACE
    assert len(kube.list_cluster_pods(o.CLUSTER)) == 1


def test_kubeconfig_env_set_after_the_client_was_imported(fake, tmp_path, monkeypatch):
    import kubernetes.config  # noqa: F401 - it reads KUBECONFIG at import: before it is set

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "cfg", fake.url,
                                                           "elsewhere")))
    kube = KubeClient.from_environment(retry=FAST_RETRY)
    assert kube.namespace == "elsewhere"


def test_missing_kubeconfig_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeError, match="pass --kubeconfig or set KUBECONFIG"):
        KubeClient.from_environment(kubeconfig=str(tmp_path / "nope"))


def test_in_cluster_config_uses_the_service_account(tmp_path, monkeypatch):
    from kubernetes.config import incluster_config

    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("sa-token")
    ca.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("FLEET_K8S_NAMESPACE", "team-a")
    kube = KubeClient.from_environment()  # builds the client, sends nothing
    cfg = kube.api_client.configuration
    assert cfg.host == "https://10.96.0.1:443" and cfg.ssl_ca_cert == str(ca)
    assert cfg.get_api_key_with_prefix("BearerToken").lower() == "bearer sa-token"
    assert kube.namespace == "team-a" and cfg.retries is False


def test_every_call_carries_the_kubeconfig_token(fake, tmp_path, monkeypatch):
    fake.token = "not-a-secret"  # the token write_kubeconfig puts in the user entry
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cfg = write_kubeconfig(tmp_path / "config", fake.url, o.NAMESPACE)
    fake.put("rayclusters", o.raycluster(replicas=1))
    fake.put("pods", o.pod("fleet-ray-npu-worker-a"))
    kube = KubeClient.from_environment(kubeconfig=str(cfg), retry=FAST_RETRY)
    kube.list_cluster_pods(o.CLUSTER)
    request_workers(kube, o.CLUSTER, "npu", 1)  # get + patch
    watch = ResourceWatch(kube, "pods", kube.core.list_namespaced_pod, watch_seconds=1)
    stop = threading.Event()
    for ev in watch.events(stop, deadline=time.monotonic() + 5):
        if ev.type == "SYNCED":  # listed: what changes now comes through the watch
            fake.put("pods", o.pod("fleet-ray-npu-worker-a", phase="Failed"))
        elif ev.type == "MODIFIED":
            break
    assert {(r.method, r.query.get("watch") == "true") for r in fake.requests} == {
        ("GET", False), ("PATCH", False), ("GET", True)}
    assert all(r.authorization.lower() == "bearer not-a-secret" and r.status != 401
               for r in fake.requests), [(r.path, r.authorization, r.status) for r in fake.requests]


def test_a_rejected_token_is_an_error_not_a_retry(fake, tmp_path, monkeypatch):
    fake.token = "rotated-since"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cfg = write_kubeconfig(tmp_path / "config", fake.url, o.NAMESPACE)
    kube = KubeClient.from_environment(kubeconfig=str(cfg), retry=FAST_RETRY)
    with pytest.raises(KubeError, match="list pods: HTTP 401: Unauthorized") as err:
        kube.list_cluster_pods(o.CLUSTER)
    assert err.value.status == 401 and not isinstance(err.value, RBACError)
    assert [r.status for r in fake.requests] == [401]


@pytest.fixture
def certificates(tmp_path):
    if tls.openssl() is None:
        missing_tool("openssl is not on PATH: it makes the fake API server's TLS certificate")
    return tls.make_certificate(tmp_path / "tls"), tls.make_certificate(tmp_path / "other", "other")


def in_cluster(monkeypatch, tmp_path, url: str, ca: Path, token: str = "sa-token") -> None:
    """The environment and service-account files a pod has, pointing at the fake."""
    from kubernetes.config import incluster_config

    (tmp_path / "token").write_text(token)
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", url.rsplit(":", 1)[1])
    monkeypatch.setenv("FLEET_K8S_NAMESPACE", o.NAMESPACE)


def test_in_cluster_calls_go_over_tls_with_the_service_account_token(certificates, tmp_path,
                                                                     monkeypatch):
    cert, _ = certificates
    with serving(token="sa-token", tls=cert.server_context()) as api:
        api.put("pods", o.pod("fleet-ray-npu-worker-a"))
        in_cluster(monkeypatch, tmp_path, api.url, cert.ca)
        kube = KubeClient.from_environment(retry=FAST_RETRY)
        assert [p["metadata"]["name"] for p in kube.list_cluster_pods(o.CLUSTER)] == [
            "fleet-ray-npu-worker-a"]
        assert api.url.startswith("https://")
        assert [(r.status, r.authorization.lower()) for r in api.requests] == [
            (200, "bearer sa-token")]


def test_an_api_server_certificate_from_another_ca_is_refused_not_retried(
        certificates, tmp_path, monkeypatch):
    cert, other = certificates
    with serving(token="sa-token", tls=cert.server_context()) as api:
        in_cluster(monkeypatch, tmp_path, api.url, other.ca)
        kube = KubeClient.from_environment(retry=FAST_RETRY)
        sleeps: list[float] = []
        kube.sleep = sleeps.append
        with pytest.raises(KubeError, match="CERTIFICATE_VERIFY_FAILED"):
            kube.list_cluster_pods(o.CLUSTER)
        assert sleeps == [] and api.requests == []  # no request got past the handshake


def test_watch_command_prints_failures_as_json_lines(fake, tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cfg = tmp_path / "config"
    cfg.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{fake.url}"}}}}]
users: [{{name: me, user: {{}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: me, namespace: {o.NAMESPACE}}}}}]
current-context: fake
""")
    fake.put("pods", o.evicted("fleet-ray-npu-worker-a"))
    rc = k8s_cli.main(["watch", "--kubeconfig", str(cfg), "--raycluster", o.CLUSTER,
                       "--seconds", "0.5"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0
    assert [(x["pod"], x["reason"]) for x in lines] == [("fleet-ray-npu-worker-a", "Evicted")]


def test_a_body_that_stalls_after_the_headers_is_retried(fake, kube):
    fake.put("rayclusters", o.raycluster())
    fake.add_fault(Fault("GET", r"/rayclusters/", body_delay_s=1.0))  # read timeout 0.5 s
    assert kube.get_raycluster(o.CLUSTER)["metadata"]["name"] == o.CLUSTER
    assert len(fake.requests) == 2


def test_a_patch_that_landed_but_timed_out_is_not_applied_twice(fake, kube):
    fake.put("rayclusters", o.raycluster(replicas=2, max_replicas=8))
    # The server applies the patch, then answers too late: the client retries
    # the same guarded patch (409, stale resourceVersion), re-reads, and must
    # not add the worker a second time.
    fake.add_fault(Fault("PATCH", r"/rayclusters/", delay_after_s=1.0))
    result = request_workers(kube, o.CLUSTER, "npu", 1)
    assert (result.replicas_before, result.replicas) == (2, 3)
    assert fake.objects["rayclusters"][o.CLUSTER]["spec"]["workerGroupSpecs"][0]["replicas"] == 3
    assert [r.method for r in fake.requests] == ["GET", "PATCH", "PATCH", "GET", "PATCH"]
    assert fake.requests[2].status == 409  # the retried patch met the landed one


def test_old_events_found_at_startup_are_not_reported(fake, watcher):
    fake.put("events", o.event("old", "fleet-ray-npu-worker-a", "Evicted", "an hour ago",
                               age_s=3600))
    fake.put("events", o.event("new", "fleet-ray-npu-worker-b", "Evicted", "just now",
                               age_s=5))
    watcher.start()
    got = collect(watcher, 1)
    assert [(f.pod, f.message) for f in got] == [("fleet-ray-npu-worker-b", "just now")]
    assert list(watcher.failures(timeout=0.3)) == []


# ---------------------------------------------------------------- controller facade


def _ray_node(node_id, ip, host):
    return {"NodeID": node_id, "Alive": True, "NodeManagerAddress": ip,
            "NodeManagerHostname": host, "Resources": {"NPU": 8.0}}


def test_facade_is_off_outside_kubernetes():
    assert FleetK8s.from_env({}) is None


def test_facade_traces_a_dead_ray_node_to_its_pod_and_reason(fake, kube):
    import json

    fake.put("rayclusters", o.raycluster(replicas=2))
    fake.put("pods", o.pod("fleet-ray-npu-worker-a", ip="10.42.0.11"))
    fake.put("pods", o.pod("fleet-ray-npu-worker-b", ip="10.42.0.12"))
    fleet = FleetK8s(kube, o.CLUSTER, watcher=PodWatcher(kube, o.CLUSTER,
                                                         watch_seconds=2))
    fleet.watcher.start()
    try:
        mapping = fleet.remember_nodes([_ray_node("n-a", "10.42.0.11", "x"),
                                        _ray_node("n-b", "10.42.0.12", "y")])
        assert not mapping.unmatched_nodes
        wait_until(lambda: fleet.watcher.stats["pods"].watches >= 1)
        # The chip fails, the pod is gone before the controller asks.
        fake.put("pods", o.device_unhealthy("fleet-ray-npu-worker-b"))
        fake.delete("pods", "fleet-ray-npu-worker-b")
        failure = fleet.why_node_died("n-b", wait_s=5)
        assert failure is not None
        assert (failure.pod, failure.reason, failure.node) == (
            "fleet-ray-npu-worker-b", R.DEVICE_UNHEALTHY, "atlas-01")
        assert fleet.why_node_died("n-a") is None
        assert fleet.why_node_died("never-seen") is None
        with pytest.raises(ValueError, match="call remember_nodes"):
            fleet.release(["never-seen"])
        result = fleet.release(["n-a"])
        assert result.replicas == 1
        group = fake.objects["rayclusters"][o.CLUSTER]["spec"]["workerGroupSpecs"][0]
        assert group["scaleStrategy"]["workersToDelete"] == ["fleet-ray-npu-worker-a"]
        assert fleet.grow(2).replicas == 3
        status = json.loads(json.dumps(fleet.status()))
        assert status["worker_failures"]["fleet-ray-npu-worker-b"]["reason"] == \
            "AscendDeviceUnhealthy"
        assert status["watch_errors"] == []
    finally:
        fleet.close()
