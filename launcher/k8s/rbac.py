"""The API objects the controller calls, and the RBAC rules that grant exactly those calls."""

from __future__ import annotations

from dataclasses import dataclass

RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAY_PLURAL = "rayclusters"


@dataclass(frozen=True)
class RbacRule:
    group: str
    resource: str
    verbs: tuple[str, ...]
    # Only the one object the controller manages (its RayCluster, FLEET_K8S_RAYCLUSTER),
    # always addressed by name: the Role pins it with resourceNames. Patching any other
    # RayCluster's pod templates would be as good as creating pods.
    own_object: bool = False


# Exactly what launcher.k8s.client.KubeClient calls; k8s/base/rbac.yaml grants
# these and nothing more (tests/test_k8s_manifests.py keeps the two equal).
REQUIRED_RBAC: tuple[RbacRule, ...] = (
    RbacRule("", "pods", ("get", "list", "watch")),
    RbacRule("", "events", ("list", "watch")),
    RbacRule(RAY_GROUP, RAY_PLURAL, ("get", "patch"), own_object=True),
)


def is_granted(verb: str, resource: str, group: str = "") -> bool:
    return any(r.group == group and r.resource == resource and verb in r.verbs
               for r in REQUIRED_RBAC)
