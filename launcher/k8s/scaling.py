"""The RayCluster worker group's size: scale to a count, grow, release named idle pods.

Each change is one merge patch guarded by resourceVersion, re-applied to the
fresh object after a 409. When to change the size is decided elsewhere
(launcher/autoscale.py).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from launcher.k8s.client import KubeClient
from launcher.k8s.errors import Conflict, KubeError

if TYPE_CHECKING:
    from launcher.k8s.pod_watcher import PodWatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaleResult:
    group: str
    replicas_before: int
    replicas: int
    attempts: int
    released: tuple[str, ...] = ()


def group_index(cluster: Mapping[str, Any], group: str) -> int:
    """Where the worker group named `group` sits in a RayCluster's workerGroupSpecs."""
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
        index = group_index(obj, group)
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


def replica_bounds(g: Mapping[str, Any]) -> tuple[int, int]:
    """A worker group's (minReplicas, maxReplicas); an unset maximum is int32's."""
    return int(g.get("minReplicas", 0)), int(g.get("maxReplicas", 2**31 - 1))


def scale_worker_group(kube: KubeClient, cluster: str, group: str, replicas: int) -> ScaleResult:
    """Set a worker group's replicas; out of [minReplicas, maxReplicas] is an error."""
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, got {replicas}")

    def plan(g: dict[str, Any]) -> dict[str, Any]:
        low, high = replica_bounds(g)
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
        return {"replicas": min(int(g.get("replicas", 0)) + count, replica_bounds(g)[1])}

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
        low, _ = replica_bounds(g)
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
