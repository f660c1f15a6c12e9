"""KubeRay's pods: their labels, and which pod each Ray node runs in."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Labels KubeRay puts on every pod it creates.
LABEL_CLUSTER = "ray.io/cluster"
LABEL_GROUP = "ray.io/group"
LABEL_NODE_TYPE = "ray.io/node-type"


def pod_selector(cluster: str, group: str | None = None) -> str:
    """The label selector of a RayCluster's pods, or of one of its worker groups."""
    selector = f"{LABEL_CLUSTER}={cluster}"
    return selector + (f",{LABEL_GROUP}={group}" if group else "")


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
