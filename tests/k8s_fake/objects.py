"""Kubernetes objects in the shapes the API server returns, for the fake and the tests.

The status blocks follow what the kubelet and controllers write for each
failure (field names and reasons as in the core/v1 API)."""

from __future__ import annotations

import copy
import datetime
import time
from typing import Any

CLUSTER = "fleet-ray"
NAMESPACE = "ascend-fleet"


def pod(name: str, *, group: str | None = "npu", node: str | None = "atlas-01",
        ip: str | None = "10.42.0.11", phase: str = "Running", ready: bool = True,
        container: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    labels = {"ray.io/cluster": CLUSTER, "ray.io/node-type": "worker" if group else "head"}
    if group:
        labels["ray.io/group"] = group
    cs = {"name": "ray-worker", "image": "ascend-fleet:0.1.0-cann", "ready": ready,
          "restartCount": 0, "state": {"running": {"startedAt": "2026-11-25T10:00:00Z"}},
          "lastState": {}}
    cs.update(container or {})
    body: dict[str, Any] = {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels,
                     "uid": f"uid-{name}"},
        "spec": {"nodeName": node, "containers": [{"name": "ray-worker"}]},
        "status": {"phase": phase, "podIP": ip, "containerStatuses": [cs],
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }
    body["status"].update(status)
    return body


def oom_killed(name: str, restarts: int = 1) -> dict[str, Any]:
    return pod(name, ready=False, container={
        "restartCount": restarts,
        "state": {"waiting": {"reason": "CrashLoopBackOff",
                              "message": "back-off 10s restarting failed container"}},
        "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled",
                                     "startedAt": "2026-11-25T10:00:00Z",
                                     "finishedAt": "2026-11-25T10:05:00Z"}}})


def evicted(name: str) -> dict[str, Any]:
    p = pod(name, phase="Failed", ready=False, reason="Evicted",
            message="The node was low on resource: memory. Threshold quantity: 100Mi, "
                    "available: 51200Ki. Container ray-worker was using 900Gi, request is "
                    "1024Gi, has larger consumption of memory.")
    p["status"]["containerStatuses"][0]["state"] = {"terminated": {
        "exitCode": 137, "reason": "ContainerStatusUnknown"}}
    return p


def node_lost(name: str) -> dict[str, Any]:
    p = pod(name, ready=False)
    p["metadata"]["deletionTimestamp"] = "2026-11-25T10:10:00Z"
    p["status"]["conditions"] = [
        {"type": "Ready", "status": "False", "lastTransitionTime": "2026-11-25T10:04:40Z"},
        {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
         "message": "Taint manager: deleting due to NoExecute taint "
                    "node.kubernetes.io/not-ready"},
    ]
    return p


def device_unhealthy(name: str) -> dict[str, Any]:
    return pod(name, phase="Failed", ready=False, container={"state": {"terminated": {
        "exitCode": 86, "reason": "Error",
        "message": "ascend-device-unhealthy: chip 3 (davinci3) health=Alarm, "
                   "HCCS link down\n"}}})


def admission_device_error(name: str) -> dict[str, Any]:
    return pod(name, phase="Failed", ready=False, container={"state": {}},
               reason="UnexpectedAdmissionError",
               message="Pod was rejected: Allocate failed due to requested number of devices "
                       "unavailable for huawei.com/Ascend910. Requested: 8, Available: 7, "
                       "which is unexpected")


def image_pull(name: str) -> dict[str, Any]:
    return pod(name, phase="Pending", ready=False, container={"state": {"waiting": {
        "reason": "ImagePullBackOff",
        "message": 'Back-off pulling image "ascend-fleet:0.1.0-typo"'}}})


def crash_loop(name: str) -> dict[str, Any]:
    return pod(name, ready=False, container={
        "restartCount": 4,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                     "message": "ray start: invalid resources"}}})


def event(name: str, pod_name: str, reason: str, message: str, *, type_: str = "Warning",
          host: str | None = None, kind: str = "Pod", age_s: float = 0.0) -> dict[str, Any]:
    when = datetime.datetime.fromtimestamp(time.time() - age_s, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    return {"kind": "Event", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "involvedObject": {"kind": kind, "name": pod_name, "namespace": NAMESPACE,
                               "apiVersion": "v1"},
            "reason": reason, "message": message, "type": type_,
            "source": {"component": "kubelet", "host": host} if host else
            {"component": "node-controller"},
            "count": 1, "firstTimestamp": when, "lastTimestamp": when}


def raycluster(replicas: int = 2, min_replicas: int = 0, max_replicas: int = 4
               ) -> dict[str, Any]:
    worker = {"groupName": "npu", "replicas": replicas, "minReplicas": min_replicas,
              "maxReplicas": max_replicas,
              "rayStartParams": {"resources": '"{\\"NPU\\": 8}"'},
              "template": {"spec": {"containers": [{"name": "ray-worker",
                                                    "image": "ascend-fleet:0.1.0"}]}}}
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": CLUSTER, "namespace": NAMESPACE, "generation": 1},
            "spec": {"rayVersion": "2.60.0",
                     "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {
                         "containers": [{"name": "ray-head", "image": "ascend-fleet:0.1.0"}]}}},
                     "workerGroupSpecs": [worker, copy.deepcopy(worker) | {
                         "groupName": "cpu", "replicas": 1}]},
            "status": {"state": "ready", "availableWorkerReplicas": replicas}}
