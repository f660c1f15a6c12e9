"""Kubernetes side of the fleet controller (KubeRay RayCluster on Ascend nodes).

The controller's one-stop entry (None when not running on Kubernetes):

    k8s = FleetK8s.from_env()             # FLEET_K8S_RAYCLUSTER / _NAMESPACE, set on the head pod
    k8s.remember_nodes(ray.nodes())       # each scheduling pass, while nodes are alive
    k8s.why_node_died(node_id, wait_s=5)  # WorkerFailure: OOMKilled, Evicted, NodeNotReady, ...
    k8s.grow(1); k8s.release([node_id])   # patch the worker group's replicas
    k8s.status()                          # JSON for `fleet status`

The pieces under it, usable alone:

    kube = KubeClient.from_environment(namespace=None)     # in-cluster, else kubeconfig
    pods = map_ray_nodes_to_pods(ray.nodes(), kube.list_cluster_pods("fleet-ray"))
    watcher = PodWatcher(kube, "fleet-ray"); watcher.start()
    for failure in watcher.failures(timeout=1.0): ...      # WorkerFailure, typed reason
    watcher.latest()                                  # pod -> last failure (`fleet status`)
    scale_worker_group(kube, "fleet-ray", "npu", replicas=3)
    request_workers(kube, "fleet-ray", "npu", count=1)      # grow, capped by maxReplicas
    release_idle_workers(kube, "fleet-ray", "npu", ["fleet-ray-npu-worker-abcde"])

Every API call goes through KubeClient.call, which owns the error policy:
403 -> RBACError naming the verb and resource to grant; timeouts, dropped
connections, 429 and 5xx -> retried with capped exponential backoff, then
KubeUnavailable; 409 on a patch -> re-read and re-apply (scale_worker_group).
Watches resume from the last resourceVersion they saw (bookmarks advance it);
410 Gone -> list again.

The command line (`python -m launcher.k8s ...`) runs the controller keeper of
the fleet-controller Deployment, its probe, and a diagnostic `watch`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import enum
import json
import logging
import os
import queue
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.store import EXIT_STORE_CORRUPT

log = logging.getLogger(__name__)

RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAY_PLURAL = "rayclusters"
# Labels KubeRay puts on every pod it creates.
LABEL_CLUSTER = "ray.io/cluster"
LABEL_GROUP = "ray.io/group"
LABEL_NODE_TYPE = "ray.io/node-type"
# What a rank writes to the pod's termination log when a chip fails health checks.
DEVICE_UNHEALTHY_MARK = "ascend-device-unhealthy"
ASCEND_RESOURCE_PREFIX = "huawei.com/ascend"


@dataclass(frozen=True)
class RbacRule:
    group: str
    resource: str
    verbs: tuple[str, ...]
    # Only the one object the controller manages (its RayCluster, FLEET_K8S_RAYCLUSTER),
    # always addressed by name: the Role pins it with resourceNames. Patching any other
    # RayCluster's pod templates would be as good as creating pods.
    own_object: bool = False


# Exactly what this module calls; k8s/base/rbac.yaml grants these and nothing
# more (tests/test_k8s_manifests.py keeps the two equal).
REQUIRED_RBAC: tuple[RbacRule, ...] = (
    RbacRule("", "pods", ("get", "list", "watch")),
    RbacRule("", "events", ("list", "watch")),
    RbacRule(RAY_GROUP, RAY_PLURAL, ("get", "patch"), own_object=True),
)


# ---------------------------------------------------------------- errors


class KubeError(RuntimeError):
    """An API call failed in a way retrying will not fix."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RBACError(KubeError):
    """403: the service account lacks a permission; says which one to grant."""

    def __init__(self, verb: str, resource: str, group: str, namespace: str, detail: str):
        api_group = group or '""'
        super().__init__(
            f"forbidden: cannot {verb} {resource}"
            + (f".{group}" if group else "")
            + f" in namespace {namespace}: the Role bound to this service account needs "
            f"apiGroups [{api_group}] resources [{resource}] verbs [{verb}] "
            f"(k8s/base/rbac.yaml). API server said: {detail}",
            status=403,
        )
        self.verb, self.resource, self.group, self.namespace = verb, resource, group, namespace


class KubeUnavailable(KubeError):
    """The API server did not answer usefully within the retry budget."""


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    """409 that survived every re-read (someone else keeps writing the object)."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    # (connect, read) seconds for one request; a watch adds its own duration.
    request_timeout: tuple[float, float] = (5.0, 30.0)

    def delay(self, attempt: int) -> float:
        # Full jitter: many controllers restarting together must not retry in step.
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**attempt))  # noqa: S311


_RETRY_STATUSES = {429, 500, 502, 503, 504}


def _status_message(body: str | bytes | None) -> str:
    """The message of a metav1.Status body, else the body itself (shortened)."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        status = json.loads(body or "")
        if isinstance(status, dict) and status.get("message"):
            return str(status["message"])
    except ValueError:
        pass
    return (body or "").strip()[:300]


def _transient_errors() -> tuple[type[BaseException], ...]:
    import urllib3.exceptions

    return (
        urllib3.exceptions.TimeoutError,
        urllib3.exceptions.ProtocolError,
        urllib3.exceptions.NewConnectionError,
        urllib3.exceptions.MaxRetryError,
        ConnectionError,
        TimeoutError,
    )


# ---------------------------------------------------------------- client


class KubeClient:
    """The kubernetes client's APIs plus this project's error and retry policy."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        from kubernetes import client

        self.api_client = api_client
        self.namespace = namespace
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    @classmethod
    def from_environment(
        cls,
        namespace: str | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> KubeClient:
        """In-cluster config when running in a pod, else ~/.kube/config (or KUBECONFIG)."""
        from kubernetes import client, config

        configuration = client.Configuration()
        in_cluster = kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ
        if in_cluster:
            config.load_incluster_config(client_configuration=configuration)
            ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            namespace = namespace or os.environ.get("FLEET_K8S_NAMESPACE") or (
                ns_file.read_text().strip() if ns_file.is_file() else None)
        else:
            # The client reads KUBECONFIG once, when it is imported: read it now.
            kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or None
            try:
                config.load_kube_config(config_file=kubeconfig, context=context,
                                        client_configuration=configuration)
            except (config.ConfigException, OSError) as exc:
                raise KubeError(
                    f"no Kubernetes configuration: not in a pod and kubeconfig "
                    f"{kubeconfig or os.environ.get('KUBECONFIG', '~/.kube/config')} "
                    f"could not be loaded ({exc}); pass --kubeconfig or set KUBECONFIG"
                ) from exc
            if namespace is None:
                _, active = config.list_kube_config_contexts(config_file=kubeconfig)
                namespace = (active or {}).get("context", {}).get("namespace")
        return cls.for_configuration(configuration, namespace or "ascend-fleet", retry)

    @classmethod
    def for_configuration(cls, configuration: Any, namespace: str,
                          retry: RetryPolicy | None = None) -> KubeClient:
        from kubernetes import client

        # This module retries by its own policy; urllib3's silent retries would
        # multiply the delays and hide which call was slow.
        configuration.retries = False
        return cls(client.ApiClient(configuration), namespace, retry)

    @classmethod
    def for_url(cls, url: str, namespace: str, retry: RetryPolicy | None = None) -> KubeClient:
        """A client for a plain-HTTP API endpoint (tests' fake server, kubectl proxy)."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = url
        return cls.for_configuration(configuration, namespace, retry)

    def call(self, verb: str, resource: str, fn: Callable[..., Any], *args: Any,
             group: str = "", stream: bool = False, **kwargs: Any) -> Any:
        """Run one API call under the retry policy.

        Returns the decoded JSON body, or with stream=True the open urllib3
        response (a watch); the caller then releases it."""
        from kubernetes.client.exceptions import ApiException

        if not any(r.group == group and r.resource == resource and verb in r.verbs
                   for r in REQUIRED_RBAC):
            # A call outside REQUIRED_RBAC would fail on a real cluster with 403.
            raise AssertionError(f"{verb} {resource} is not in launcher.k8s.REQUIRED_RBAC")
        kwargs.setdefault("_request_timeout", self.retry.request_timeout)
        transient = _transient_errors()
        last: str = ""
        for attempt in range(self.retry.attempts):
            try:
                resp = fn(*args, _preload_content=False, **kwargs)
                if stream:
                    return resp
                try:
                    # Read inside the loop: a body that stalls is a timeout like any other.
                    return json.loads(resp.data)
                finally:
                    resp.release_conn()
            except ApiException as exc:
                detail = _status_message(exc.body) or str(exc.reason)
                if exc.status == 403:
                    raise RBACError(verb, resource, group, self.namespace, detail) from exc
                if exc.status == 404:
                    raise NotFound(f"{resource} not found: {detail}", 404) from exc
                if exc.status == 409:
                    raise Conflict(detail, 409) from exc
                if exc.status not in _RETRY_STATUSES:
                    raise KubeError(f"{verb} {resource}: HTTP {exc.status}: {detail}",
                                    exc.status) from exc
                last = f"HTTP {exc.status}: {detail}"
            except transient as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < self.retry.attempts:
                delay = self.retry.delay(attempt)
                log.warning("%s %s failed (%s); retry %d/%d in %.1fs", verb, resource, last,
                            attempt + 1, self.retry.attempts - 1, delay)
                self.sleep(delay)
        raise KubeUnavailable(
            f"{verb} {resource} in namespace {self.namespace} failed "
            f"{self.retry.attempts} times; last error: {last}")

    # -- the calls REQUIRED_RBAC lists

    def list_cluster_pods(self, cluster: str, group: str | None = None) -> list[dict[str, Any]]:
        return self.list_pods(_selector(cluster, group))["items"]

    def list_pods(self, label_selector: str | None = None) -> dict[str, Any]:
        return self.call("list", "pods", self.core.list_namespaced_pod, self.namespace,
                              label_selector=label_selector)

    def get_pod(self, name: str) -> dict[str, Any]:
        return self.call("get", "pods", self.core.read_namespaced_pod, name, self.namespace)

    def get_raycluster(self, name: str) -> dict[str, Any]:
        return self.call("get", RAY_PLURAL, self.custom.get_namespaced_custom_object,
                              RAY_GROUP, RAY_VERSION, self.namespace, RAY_PLURAL, name,
                              group=RAY_GROUP)

    def patch_raycluster(self, name: str, merge_patch: dict[str, Any]) -> dict[str, Any]:
        return self.call("patch", RAY_PLURAL, self.custom.patch_namespaced_custom_object,
                              RAY_GROUP, RAY_VERSION, self.namespace, RAY_PLURAL, name,
                              merge_patch, group=RAY_GROUP)


def _selector(cluster: str, group: str | None = None) -> str:
    selector = f"{LABEL_CLUSTER}={cluster}"
    return selector + (f",{LABEL_GROUP}={group}" if group else "")


# ---------------------------------------------------------------- ray node -> pod


@dataclass(frozen=True)
class PodRef:
    name: str
    uid: str
    node_name: str | None
    pod_ip: str | None
    group: str | None
    phase: str | None


def pod_ref(pod: Mapping[str, Any]) -> PodRef:
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    labels = meta.get("labels") or {}
    return PodRef(name=meta.get("name", ""), uid=meta.get("uid", ""),
                  node_name=spec.get("nodeName"), pod_ip=status.get("podIP"),
                  group=labels.get(LABEL_GROUP), phase=status.get("phase"))


@dataclass
class NodeMapping:
    by_node_id: dict[str, PodRef] = field(default_factory=dict)
    unmatched_nodes: list[str] = field(default_factory=list)
    pods_without_node: list[str] = field(default_factory=list)


def map_ray_nodes_to_pods(ray_nodes: Iterable[Mapping[str, Any]],
                          pods: Iterable[Mapping[str, Any]]) -> NodeMapping:
    """Match `ray.nodes()` entries to KubeRay pods.

    A Ray node inside a pod reports the pod IP as NodeManagerAddress, and the pod
    name as its hostname; the IP is tried first because a hostname can be
    truncated, the name second because a dead node's IP may be reused."""
    refs = [pod_ref(p) for p in pods]
    by_ip = {r.pod_ip: r for r in refs if r.pod_ip}
    by_name = {r.name: r for r in refs}
    out = NodeMapping()
    for node in ray_nodes:
        node_id = str(node.get("NodeID", ""))
        alive = bool(node.get("Alive", True))
        # A dead node's IP may already belong to its replacement pod.
        ref = by_ip.get(node.get("NodeManagerAddress")) if alive else None
        ref = ref or by_name.get(node.get("NodeManagerHostname"))
        if ref is None:
            out.unmatched_nodes.append(node_id)
        else:
            out.by_node_id[node_id] = ref
    matched = {r.name for r in out.by_node_id.values()}
    out.pods_without_node = sorted(r.name for r in refs if r.name not in matched)
    return out


# ---------------------------------------------------------------- failure reasons


class FailureReason(enum.StrEnum):
    OOM_KILLED = "OOMKilled"
    EVICTED = "Evicted"
    NODE_NOT_READY = "NodeNotReady"
    DEVICE_UNHEALTHY = "AscendDeviceUnhealthy"
    IMAGE_PULL = "ImagePullFailed"
    CRASH_LOOP = "CrashLoopBackOff"
    CONTAINER_ERROR = "ContainerError"
    PREEMPTED = "Preempted"
    UNSCHEDULABLE = "Unschedulable"
    DELETED = "Deleted"


@dataclass(frozen=True)
class WorkerFailure:
    pod: str
    reason: FailureReason
    message: str
    node: str | None = None
    container: str | None = None
    exit_code: int | None = None
    restart_count: int = 0
    source: str = "pod"  # "pod" status or "event"

    def to_json(self) -> dict[str, Any]:
        return {"pod": self.pod, "reason": str(self.reason), "message": self.message,
                "node": self.node, "container": self.container, "exit_code": self.exit_code,
                "restart_count": self.restart_count, "source": self.source}


_IMAGE_PULL_WAITING = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                       "ErrImageNeverPull"}
_DEVICE_TEXT = re.compile(r"(ascend|davinci|\bnpu\b)[^\n]*(unhealthy|fault|error)|"
                          r"(unhealthy|fault)[^\n]*(ascend|davinci|\bnpu\b)", re.IGNORECASE)
_DISRUPTION = {
    "DeletionByTaintManager": FailureReason.NODE_NOT_READY,
    "TerminationByKubelet": FailureReason.EVICTED,
    "EvictionByEvictionAPI": FailureReason.EVICTED,
    "PreemptionByScheduler": FailureReason.PREEMPTED,
}


def _container_states(status: Mapping[str, Any]) -> Iterator[tuple[dict, dict, dict]]:
    for cs in [*(status.get("initContainerStatuses") or []),
               *(status.get("containerStatuses") or [])]:
        yield cs, cs.get("state") or {}, cs.get("lastState") or {}


def classify_pod(pod: Mapping[str, Any]) -> WorkerFailure | None:
    """Why this pod's worker is dead or dying, or None while it is healthy."""
    meta, status = pod.get("metadata", {}), pod.get("status", {}) or {}
    name, node = meta.get("name", ""), (pod.get("spec") or {}).get("nodeName")

    def failure(reason: FailureReason, message: str, cs: Mapping[str, Any] | None = None,
                exit_code: int | None = None) -> WorkerFailure:
        return WorkerFailure(pod=name, reason=reason, message=message, node=node,
                             container=(cs or {}).get("name"), exit_code=exit_code,
                             restart_count=int((cs or {}).get("restartCount") or 0))

    pod_reason, pod_message = status.get("reason") or "", status.get("message") or ""
    states = list(_container_states(status))
    # The rank's own verdict on its chips beats whatever exit it caused.
    for cs, state, last in states:
        for term in (state.get("terminated"), last.get("terminated")):
            if term and (term.get("message") or "").lstrip().startswith(DEVICE_UNHEALTHY_MARK):
                return failure(FailureReason.DEVICE_UNHEALTHY, term["message"].strip(), cs,
                               term.get("exitCode"))
    if pod_reason == "UnexpectedAdmissionError" and ASCEND_RESOURCE_PREFIX in pod_message.lower():
        # The kubelet could not hand over the chips the device plugin promised.
        return failure(FailureReason.DEVICE_UNHEALTHY, pod_message)
    if pod_reason == "Evicted":
        return failure(FailureReason.EVICTED, pod_message or "evicted by the kubelet")
    if pod_reason == "NodeLost":
        return failure(FailureReason.NODE_NOT_READY, pod_message or "node lost")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            reason = _DISRUPTION.get(cond.get("reason", ""))
            if reason is not None:
                return failure(reason, cond.get("message") or cond.get("reason", ""))
    for cs, state, last in states:
        for term in (state.get("terminated"), last.get("terminated")):
            if term and term.get("reason") == "OOMKilled":
                return failure(FailureReason.OOM_KILLED,
                               f"container {cs.get('name')} exceeded its memory limit",
                               cs, term.get("exitCode"))
    for cs, state, last in states:
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in _IMAGE_PULL_WAITING:
            return failure(FailureReason.IMAGE_PULL,
                           f"{waiting['reason']}: {waiting.get('message') or cs.get('image')}", cs)
        if waiting.get("reason") == "CrashLoopBackOff":
            term = last.get("terminated") or {}
            return failure(FailureReason.CRASH_LOOP,
                           f"restarting after exit code {term.get('exitCode')}"
                           + (f": {term['message'].strip()[:500]}" if term.get("message") else ""),
                           cs, term.get("exitCode"))
    for cs, state, _last in states:
        term = state.get("terminated") or {}
        if term and term.get("exitCode", 0) != 0:
            return failure(FailureReason.CONTAINER_ERROR,
                           f"exit code {term.get('exitCode')} ({term.get('reason') or 'Error'})"
                           + (f": {term['message'].strip()[:500]}" if term.get("message") else ""),
                           cs, term.get("exitCode"))
    return None


def classify_event(event: Mapping[str, Any]) -> WorkerFailure | None:
    """A core/v1 Event about a pod, read as a failure reason (None if it is not one)."""
    obj = event.get("involvedObject") or event.get("regarding") or {}
    if obj.get("kind") != "Pod":
        return None
    reason = event.get("reason") or ""
    message = (event.get("message") or event.get("note") or "").strip()
    node = (event.get("source") or {}).get("host")
    kind: FailureReason | None = None
    if reason == "Evicted":
        kind = FailureReason.EVICTED
    elif reason in {"NodeNotReady", "TaintManagerEviction"}:
        kind = FailureReason.NODE_NOT_READY
    elif reason in {"Failed", "BackOff", "ErrImagePull"} and "pull" in message.lower():
        kind = FailureReason.IMAGE_PULL
    elif reason in {"Preempted", "Preempting"}:
        kind = FailureReason.PREEMPTED
    elif reason == "FailedScheduling":
        kind = FailureReason.UNSCHEDULABLE
    elif event.get("type") == "Warning" and _DEVICE_TEXT.search(f"{reason} {message}"):
        kind = FailureReason.DEVICE_UNHEALTHY
    if kind is None:
        return None
    return WorkerFailure(pod=obj.get("name", ""), reason=kind, message=message or reason,
                         node=node, source="event")


# ---------------------------------------------------------------- watch


@dataclass
class WatchStats:
    lists: int = 0
    watches: int = 0
    bookmarks: int = 0
    expired: int = 0  # 410 Gone -> re-list
    reconnects: int = 0  # dropped connections / transient errors


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED; LISTED and SYNCED come from a (re-)list
    object: dict[str, Any]


class ResourceWatch:
    """List, then watch, one namespaced collection; resume from the last
    resourceVersion seen (events or bookmarks), re-list after 410 Gone."""

    def __init__(self, kube: KubeClient, resource: str, list_fn: Callable[..., Any], *,
                 label_selector: str | None = None, field_selector: str | None = None,
                 watch_seconds: int = 60, max_failures: int = 8):
        self.kube, self.resource, self.list_fn = kube, resource, list_fn
        self.label_selector, self.field_selector = label_selector, field_selector
        self.watch_seconds, self.max_failures = watch_seconds, max_failures
        self.resource_version: str | None = None
        self.stats = WatchStats()

    def _list(self) -> Iterator[WatchEvent]:
        body = self.kube.call("list", self.resource, self.list_fn, self.kube.namespace,
                                   label_selector=self.label_selector,
                                   field_selector=self.field_selector)
        self.stats.lists += 1
        self.resource_version = body.get("metadata", {}).get("resourceVersion")
        items = body.get("items", [])
        for item in items:
            yield WatchEvent("LISTED", item)
        # Tells the consumer the list is complete: whatever it knew and the list
        # lacks was deleted while no watch was open (after a 410, say).
        yield WatchEvent("SYNCED", {"names": [i["metadata"]["name"] for i in items]})

    def _open(self) -> Any:
        connect, read = self.kube.retry.request_timeout
        return self.kube.call(
            "watch", self.resource, self.list_fn, self.kube.namespace, stream=True,
            label_selector=self.label_selector, field_selector=self.field_selector,
            watch=True, allow_watch_bookmarks=True, resource_version=self.resource_version,
            timeout_seconds=self.watch_seconds,
            # The server ends the watch after watch_seconds; a read stalled well
            # past that means the connection is dead, not quiet.
            _request_timeout=(connect, self.watch_seconds + read))

    def events(self, stop: threading.Event, deadline: float | None = None
               ) -> Iterator[WatchEvent]:
        """Events until stop is set or the deadline (time.monotonic) passes."""
        transient = _transient_errors()
        failures = 0
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            if self.resource_version is None:
                yield from self._list()
            try:
                resp = self._open()
                self.stats.watches += 1
                try:
                    for line in _lines(resp):
                        if stop.is_set():
                            return
                        event = json.loads(line)
                        etype, obj = event.get("type"), event.get("object") or {}
                        if etype == "ERROR":
                            if obj.get("code") == 410:
                                self.stats.expired += 1
                                log.info("watch %s: %s; listing again", self.resource,
                                         obj.get("message"))
                                self.resource_version = None
                                break
                            raise KubeError(f"watch {self.resource}: {obj.get('message')}",
                                            obj.get("code"))
                        rv = (obj.get("metadata") or {}).get("resourceVersion")
                        if rv:
                            self.resource_version = rv
                        if etype == "BOOKMARK":
                            self.stats.bookmarks += 1
                            continue
                        failures = 0
                        yield WatchEvent(etype, obj)
                finally:
                    resp.release_conn()
            except KubeError as exc:
                if exc.status != 410:
                    raise
                self.stats.expired += 1
                self.resource_version = None
            except transient as exc:
                failures += 1
                self.stats.reconnects += 1
                if failures >= self.max_failures:
                    raise KubeUnavailable(
                        f"watch {self.resource} dropped {failures} times in a row: {exc}"
                    ) from exc
                delay = self.kube.retry.delay(failures)
                log.warning("watch %s dropped (%s); resuming from resourceVersion %s in %.1fs",
                            self.resource, exc, self.resource_version, delay)
                stop.wait(delay)


def _lines(resp: Any) -> Iterator[bytes]:
    buf = b""
    for chunk in resp.stream(4096, decode_content=True):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


class PodWatcher:
    """Watches a RayCluster's pods and the namespace's pod events; turns them
    into WorkerFailure records (each once per pod, reason and restart)."""

    def __init__(self, kube: KubeClient, cluster: str, *, watch_seconds: int = 60):
        self.kube, self.cluster = kube, cluster
        self._pods = ResourceWatch(kube, "pods", kube.core.list_namespaced_pod,
                                   label_selector=_selector(cluster), watch_seconds=watch_seconds)
        self._events = ResourceWatch(kube, "events", kube.core.list_namespaced_event,
                                     field_selector="involvedObject.kind=Pod",
                                     watch_seconds=watch_seconds)
        self._queue: queue.Queue[WorkerFailure] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._seen: set[tuple[str, str, int]] = set()
        self._latest: dict[str, WorkerFailure] = {}
        self._known_pods: dict[str, str | None] = {}  # name -> node
        self._expected_deletions: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._started_at = time.time()
        self.errors: list[BaseException] = []

    @property
    def stats(self) -> dict[str, WatchStats]:
        return {"pods": self._pods.stats, "events": self._events.stats}

    def expect_deletion(self, pod_names: Iterable[str]) -> None:
        """Pods the controller released on purpose: their deletion is no failure."""
        with self._lock:
            self._expected_deletions.update(pod_names)

    def start(self) -> PodWatcher:
        self._started_at = time.time()
        for name, target in (("pods", self._run_pods), ("events", self._run_events)):
            t = threading.Thread(target=self._guard, args=(target,), name=f"k8s-watch-{name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    def failures(self, timeout: float) -> Iterator[WorkerFailure]:
        """Failures seen so far and those arriving within timeout seconds."""
        end = time.monotonic() + timeout
        while True:
            try:
                yield self._queue.get(timeout=max(end - time.monotonic(), 0.001))
            except queue.Empty:
                return

    def latest(self) -> dict[str, WorkerFailure]:
        """The last failure per pod, for `fleet status`."""
        with self._lock:
            return dict(self._latest)

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception as exc:  # surfaced through .errors; the thread must not die silently
            log.error("pod watcher stopped: %s", exc)
            self.errors.append(exc)

    def _report(self, failure: WorkerFailure) -> None:
        key = (failure.pod, str(failure.reason), failure.restart_count)
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            if failure.node is None and self._known_pods.get(failure.pod):
                failure = dataclasses.replace(failure, node=self._known_pods[failure.pod])
            self._latest[failure.pod] = failure
        self._queue.put(failure)

    def _run_pods(self) -> None:
        for ev in self._pods.events(self._stop):
            if ev.type == "SYNCED":
                listed = set(ev.object["names"])
                with self._lock:
                    gone = [n for n in self._known_pods if n not in listed]
                for name in gone:
                    self._pod_gone(name)
                continue
            pod = ev.object
            name = pod.get("metadata", {}).get("name", "")
            with self._lock:
                self._known_pods[name] = (pod.get("spec") or {}).get("nodeName")
            failure = classify_pod(pod)
            if failure is not None:
                self._report(failure)
            if ev.type == "DELETED":
                self._pod_gone(name)

    def _pod_gone(self, name: str) -> None:
        with self._lock:
            node = self._known_pods.pop(name, None)
            unexplained = name not in self._expected_deletions and name not in self._latest
            self._expected_deletions.discard(name)
        if unexplained:
            self._report(WorkerFailure(pod=name, reason=FailureReason.DELETED,
                                       message="pod deleted", node=node))

    def _run_events(self) -> None:
        prefix = f"{self.cluster}-"
        for ev in self._events.events(self._stop):
            if ev.type == "SYNCED":
                continue
            # Events outlive their pods by about an hour: a (re-)list must not
            # report a death that happened long before this watcher started.
            if ev.type == "LISTED" and _event_time(ev.object) < self._started_at - EVENT_SLACK_S:
                continue
            failure = classify_event(ev.object)
            if failure is None or not failure.pod.startswith(prefix):
                continue
            self._report(failure)


# Clock skew between the API server and this pod that an event's time may show.
EVENT_SLACK_S = 60.0


def _event_time(event: Mapping[str, Any]) -> float:
    """Unix time an event last happened (0.0 when it carries none)."""
    import datetime as dt

    series = event.get("series") or {}
    for stamp in (series.get("lastObservedTime"), event.get("lastTimestamp"),
                  event.get("eventTime"), (event.get("metadata") or {}).get("creationTimestamp")):
        if stamp:
            try:
                return dt.datetime.fromisoformat(stamp).timestamp()
            except ValueError:
                continue
    return 0.0


# ---------------------------------------------------------------- scaling


@dataclass(frozen=True)
class ScaleResult:
    group: str
    replicas_before: int
    replicas: int
    attempts: int
    released: tuple[str, ...] = ()


def _group_index(cluster: Mapping[str, Any], group: str) -> int:
    groups = cluster.get("spec", {}).get("workerGroupSpecs") or []
    for i, g in enumerate(groups):
        if g.get("groupName") == group:
            return i
    names = [g.get("groupName") for g in groups]
    raise KubeError(f"RayCluster {cluster.get('metadata', {}).get('name')} has no worker "
                    f"group {group!r} (groups: {names})")


def _patch_group(kube: KubeClient, cluster: str, group: str,
                 plan: Callable[[dict[str, Any]], dict[str, Any]],
                 max_conflicts: int = 5) -> ScaleResult:
    """Set fields of one worker group, guarded by resourceVersion.

    `plan` sees the group as first read and returns the fields to set, once:
    the values are absolute, so re-applying them after a 409 (KubeRay bumps the
    resourceVersion with every status update) or after a PATCH that timed out
    but had landed cannot grow or shrink the group twice. The merge patch
    carries metadata.resourceVersion, so a concurrent writer yields 409 instead
    of a lost update; the fields are then applied to the fresh object."""
    desired: dict[str, Any] | None = None
    before = 0
    for attempt in range(1, max_conflicts + 1):
        obj = kube.get_raycluster(cluster)
        groups = copy.deepcopy(obj["spec"]["workerGroupSpecs"])
        index = _group_index(obj, group)
        if desired is None:
            before = int(groups[index].get("replicas", 0))
            desired = plan(groups[index])
            if not desired:
                return ScaleResult(group, before, before, attempt)
        for key, value in desired.items():
            if isinstance(value, dict):
                groups[index].setdefault(key, {}).update(value)
            else:
                groups[index][key] = value
        patch = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                 # A merge patch replaces lists whole: send every group.
                 "spec": {"workerGroupSpecs": groups}}
        try:
            kube.patch_raycluster(cluster, patch)
        except Conflict as exc:
            log.info("RayCluster %s changed under us (%s); re-reading", cluster, exc)
            continue
        return ScaleResult(group, before, int(groups[index]["replicas"]), attempt)
    raise Conflict(f"RayCluster {cluster} kept changing: gave up after {max_conflicts} "
                   "conflicting writes", 409)


def _bounds(g: Mapping[str, Any]) -> tuple[int, int]:
    return int(g.get("minReplicas", 0)), int(g.get("maxReplicas", 2**31 - 1))


def scale_worker_group(kube: KubeClient, cluster: str, group: str, replicas: int) -> ScaleResult:
    """Set a worker group's replicas; out of [minReplicas, maxReplicas] is an error."""
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, got {replicas}")

    def plan(g: dict[str, Any]) -> dict[str, Any]:
        low, high = _bounds(g)
        if not low <= replicas <= high:
            raise ValueError(f"replicas {replicas} for worker group {group!r} is outside "
                             f"minReplicas..maxReplicas = {low}..{high} of RayCluster {cluster}")
        return {"replicas": replicas}

    return _patch_group(kube, cluster, group, plan)


def request_workers(kube: KubeClient, cluster: str, group: str, count: int) -> ScaleResult:
    """Grow by up to count pods (capped by maxReplicas): a job wants more servers."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")

    def plan(g: dict[str, Any]) -> dict[str, Any]:
        return {"replicas": min(int(g.get("replicas", 0)) + count, _bounds(g)[1])}

    return _patch_group(kube, cluster, group, plan)


def release_idle_workers(kube: KubeClient, cluster: str, group: str,
                         pod_names: Iterable[str], watcher: PodWatcher | None = None,
                         down_to_min: bool = False) -> ScaleResult:
    """Shrink the group by exactly these pods (KubeRay's scaleStrategy.workersToDelete),
    so an idle server goes, not a random busy one.

    Releasing below minReplicas is an error, or with down_to_min only the first pods
    (sorted by name) that fit above minReplicas go; `released` names them."""
    wanted = sorted(set(pod_names))
    if not wanted:
        raise ValueError("no pods to release")
    members = {p["metadata"]["name"] for p in kube.list_cluster_pods(cluster, group)}
    strangers = [n for n in wanted if n not in members]
    if strangers:
        raise ValueError(f"pods {strangers} are not workers of group {group!r} of RayCluster "
                         f"{cluster}")
    chosen: list[str] = []

    def plan(g: dict[str, Any]) -> dict[str, Any]:
        low, _ = _bounds(g)
        replicas = int(g.get("replicas", 0))
        take = wanted
        if replicas - len(wanted) < low:
            if not down_to_min:
                raise ValueError(f"releasing {len(wanted)} pods would leave "
                                 f"{replicas - len(wanted)} replicas in group {group!r}, "
                                 f"below minReplicas {low}")
            take = wanted[:max(replicas - low, 0)]
        chosen.extend(take)
        if watcher is not None:  # before the patch: the deletions are ours, not failures
            watcher.expect_deletion(take)
        if not take:
            return {}
        return {"replicas": replicas - len(take), "scaleStrategy": {"workersToDelete": take}}

    result = _patch_group(kube, cluster, group, plan)
    return dataclasses.replace(result, released=tuple(chosen))


# ---------------------------------------------------------------- controller facade


class FleetK8s:
    """What the controller holds when it runs on Kubernetes: Ray node IDs in,
    pod failure reasons and worker-group changes out.

        k8s = FleetK8s.from_env()            # None outside Kubernetes
        k8s.remember_nodes(ray.nodes())      # while nodes are alive (each scheduling pass)
        k8s.why_node_died(node_id)           # WorkerFailure | None, for the attempt's error
        k8s.grow(1); k8s.release([node_id])  # elastic resize
        k8s.status()                         # JSON for `fleet status`
    """

    def __init__(self, kube: KubeClient, cluster: str, group: str = "npu",
                 watcher: PodWatcher | None = None):
        self.kube, self.cluster, self.group = kube, cluster, group
        self.watcher = watcher or PodWatcher(kube, cluster)
        self._node_pods: dict[str, PodRef] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FleetK8s | None:
        """Started from FLEET_K8S_RAYCLUSTER (set on the head pod), or None when unset."""
        env = os.environ if environ is None else environ
        cluster = env.get("FLEET_K8S_RAYCLUSTER")
        if not cluster:
            return None
        kube = KubeClient.from_environment(namespace=env.get("FLEET_K8S_NAMESPACE"))
        fleet = cls(kube, cluster, env.get("FLEET_K8S_WORKER_GROUP", "npu"))
        fleet.watcher.start()
        return fleet

    def close(self) -> None:
        self.watcher.stop()

    def remember_nodes(self, ray_nodes: Iterable[Mapping[str, Any]]) -> NodeMapping:
        """Map live Ray nodes to their pods now, so a node that dies later can
        still be traced to its pod after the pod itself is gone."""
        mapping = map_ray_nodes_to_pods(ray_nodes, self.kube.list_cluster_pods(self.cluster))
        with self._lock:
            self._node_pods.update(mapping.by_node_id)
        return mapping

    def pod_of(self, node_id: str) -> PodRef | None:
        with self._lock:
            return self._node_pods.get(node_id)

    def why_node_died(self, node_id: str, wait_s: float = 0.0) -> WorkerFailure | None:
        """The failure reported for the node's pod, waiting up to wait_s for it
        (the kubelet and the node controller report a few seconds after Ray notices)."""
        ref = self.pod_of(node_id)
        if ref is None:
            return None
        deadline = time.monotonic() + wait_s
        while True:
            failure = self.watcher.latest().get(ref.name)
            if failure is not None or time.monotonic() >= deadline:
                return failure
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))

    def worker_group(self) -> dict[str, int]:
        """The group's replicas as asked of KubeRay (not as running) and its bounds."""
        obj = self.kube.get_raycluster(self.cluster)
        g = obj["spec"]["workerGroupSpecs"][_group_index(obj, self.group)]
        low, high = _bounds(g)
        return {"replicas": int(g.get("replicas", 0)), "minReplicas": low, "maxReplicas": high}

    def in_group(self, node_id: str) -> bool:
        """Whether a Ray node is (or, not mapped yet, may be) a pod of our worker group."""
        ref = self.pod_of(node_id)
        return ref is None or ref.group == self.group

    def grow(self, servers: int) -> ScaleResult:
        return request_workers(self.kube, self.cluster, self.group, servers)

    def release(self, node_ids: Iterable[str], down_to_min: bool = False) -> ScaleResult:
        """Give these (idle) Ray nodes' pods back to the cluster."""
        names: list[str] = []
        unknown: list[str] = []
        for node_id in node_ids:
            ref = self.pod_of(node_id)
            if ref is None:
                unknown.append(node_id)
            else:
                names.append(ref.name)
        if unknown:
            raise ValueError(f"Ray nodes {unknown} map to no pod of RayCluster {self.cluster}: "
                             "call remember_nodes(ray.nodes()) first")
        return release_idle_workers(self.kube, self.cluster, self.group, names, self.watcher,
                                    down_to_min)

    def status(self) -> dict[str, Any]:
        return {
            "namespace": self.kube.namespace,
            "raycluster": self.cluster,
            "worker_group": self.group,
            "worker_failures": {pod: f.to_json() for pod, f in self.watcher.latest().items()},
            "watch": {name: dataclasses.asdict(st) for name, st in self.watcher.stats.items()},
            "watch_errors": [str(e) for e in self.watcher.errors],
        }


# ---------------------------------------------------------------- command line


def keep_controller(ray_address: str, interval_s: float, alive_file: Path,
                    max_loops: int | None = None, stop: threading.Event | None = None,
                    ensure_argv: list[str] | None = None, home: str = "/var/lib/fleet") -> int:
    """Run `fleet --address ADDR --home HOME up` every interval: it pings the
    controller actor and creates it only if it is missing (after a head restart);
    the new actor resumes every job from the store under HOME (the head's volume)."""
    argv = ensure_argv or ["fleet", "--address", ray_address, "--home", home, "up"]
    stop = stop or threading.Event()
    loops = failures = 0
    while not stop.is_set() and (max_loops is None or loops < max_loops):
        loops += 1
        try:
            proc = subprocess.run(argv, capture_output=True, text=True,  # noqa: S603
                                  timeout=max(interval_s * 8, 120), check=False)
            proc_code = proc.returncode
            ok = proc_code == 0
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        except (OSError, subprocess.TimeoutExpired) as exc:
            ok, detail, proc_code = False, [str(exc)], None
        failures = 0 if ok else failures + 1
        if not ok:
            log.warning("%s failed (%d in a row): %s", " ".join(argv), failures, detail[0])
        alive_file.parent.mkdir(parents=True, exist_ok=True)
        alive_file.write_text(json.dumps({"ts": time.time(), "ok": ok, "failures": failures}))
        if not ok and proc_code == EXIT_STORE_CORRUPT:
            # no retry can read a corrupt store: stop, so that the pod's restarts and this
            # exit code show it, with the file kept for inspection
            log.error("the job store under %s is corrupt; the keeper stops: %s", home, detail[0])
            return EXIT_STORE_CORRUPT
        if max_loops is None or loops < max_loops:
            stop.wait(interval_s)
    return 0 if failures == 0 else 1


def probe(alive_file: Path, max_age_s: float) -> int:
    try:
        age = time.time() - alive_file.stat().st_mtime
    except OSError:
        print(f"{alive_file} missing: keeper loop has not run yet", file=sys.stderr)
        return 1
    if age > max_age_s:
        print(f"{alive_file} is {age:.0f}s old (> {max_age_s:.0f}s): keeper loop stuck",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.k8s",
                                     description="Kubernetes helpers of ascend-fleet.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    keep = sub.add_parser("keep-controller", help="keep the controller actor running")
    keep.add_argument("--ray-address", required=True)
    keep.add_argument("--interval", type=float, default=15.0)
    keep.add_argument("--home", default="/var/lib/fleet",
                      help="the controller's state directory, on the head pod's volume")
    keep.add_argument("--alive-file", type=Path, default=Path("/tmp/keeper-alive"))  # noqa: S108
    keep.add_argument("--max-loops", type=int, default=None)
    prb = sub.add_parser("probe", help="exit 1 if the keeper loop is stuck")
    prb.add_argument("--alive-file", type=Path, default=Path("/tmp/keeper-alive"))  # noqa: S108
    prb.add_argument("--max-age", type=float, default=120.0)
    watch = sub.add_parser("watch", help="print worker failures as JSON lines")
    watch.add_argument("--raycluster", default=os.environ.get("FLEET_K8S_RAYCLUSTER", "fleet-ray"))
    watch.add_argument("--namespace", default=None)
    watch.add_argument("--kubeconfig", default=None)
    watch.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.cmd == "keep-controller":
        return keep_controller(args.ray_address, args.interval, args.alive_file, args.max_loops,
                               home=args.home)
    if args.cmd == "probe":
        return probe(args.alive_file, args.max_age)
    try:
        kube = KubeClient.from_environment(args.namespace, args.kubeconfig)
        watcher = PodWatcher(kube, args.raycluster).start()
        for failure in watcher.failures(args.seconds):
            print(json.dumps(failure.to_json()), flush=True)
        watcher.stop()
        if watcher.errors:
            raise watcher.errors[0]
    except KubeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
