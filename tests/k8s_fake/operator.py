"""KubeRay's part for one worker group, played against the fake API server.

It reconciles the RayCluster's `replicas` and `scaleStrategy.workersToDelete`
into pods in the fake API and real Ray nodes of a `ray.cluster_utils.Cluster`:
each pod's podIP is its Ray node's address (127.0.0.2, 127.0.0.3, ...: all
loopback), so the controller maps nodes to pods the way it does in a cluster.

Ray's cluster_utils starts nodes with signal handlers, which work only on the
main thread: the test calls `reconcile()` from its wait loop instead of a thread."""

from __future__ import annotations

import copy
from typing import Any

from k8s_fake import objects as o
from k8s_fake.server import FakeKubeAPI


class FakeKubeRay:
    def __init__(self, api: FakeKubeAPI, cluster: Any, group: str = "npu",
                 node_args: dict[str, Any] | None = None):
        self.api, self.cluster, self.group = api, cluster, group
        self.node_args = node_args or {"num_cpus": 2, "resources": {"NPU": 8}}
        self.nodes: dict[str, Any] = {}  # pod name -> Ray node
        self.history: list[tuple[str, str]] = []  # ("create" | "delete", pod name)
        self._next = 0

    def _group(self) -> dict[str, Any]:
        rc = self.api.objects["rayclusters"][o.CLUSTER]
        return next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == self.group)

    def create_pod(self) -> str:
        name = f"{o.CLUSTER}-{self.group}-worker-{self._next}"
        ip = f"127.0.0.{2 + self._next}"
        self._next += 1
        self.nodes[name] = self.cluster.add_node(node_ip_address=ip, **self.node_args)
        self.api.put("pods", o.pod(name, group=self.group, ip=ip, node=f"host-{ip}"))
        self.history.append(("create", name))
        return name

    def delete_pod(self, name: str) -> None:
        node = self.nodes.pop(name, None)
        if node is not None:
            self.cluster.remove_node(node, allow_graceful=True)
        if name in self.api.objects["pods"]:
            self.api.delete("pods", name)
        self.history.append(("delete", name))

    def reconcile(self) -> None:
        group = self._group()
        doomed = list((group.get("scaleStrategy") or {}).get("workersToDelete") or [])
        for name in doomed:
            if name in self.nodes:
                self.delete_pod(name)
        if doomed:  # KubeRay clears the list once the pods are deleted
            rc = copy.deepcopy(self.api.objects["rayclusters"][o.CLUSTER])
            for g in rc["spec"]["workerGroupSpecs"]:
                if g["groupName"] == self.group:
                    g["scaleStrategy"]["workersToDelete"] = []
            self.api.put("rayclusters", rc)
        want = int(self._group().get("replicas", 0))
        while len(self.nodes) < want:
            self.create_pod()
        while len(self.nodes) > want:  # plain scale-down: KubeRay picks a pod itself
            self.delete_pod(sorted(self.nodes)[-1])
