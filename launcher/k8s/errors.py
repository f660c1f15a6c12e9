"""How a Kubernetes API call failed, in the kinds callers tell apart."""

from __future__ import annotations


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
