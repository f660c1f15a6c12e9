"""FleetK8s: what the controller holds when it runs on Kubernetes."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from launcher.k8s.client import KubeClient
from launcher.k8s.pod_watcher import PodWatcher
from launcher.k8s.pods import NodeMapping, PodRef, map_ray_nodes_to_pods
from launcher.k8s.reasons import WorkerFailure
from launcher.k8s.scaling import (
    ScaleResult,
    group_index,
    release_idle_workers,
    replica_bounds,
    request_workers,
)


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
        g = obj["spec"]["workerGroupSpecs"][group_index(obj, self.group)]
        low, high = replica_bounds(g)
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
