"""Why a worker pod died, read from its status or from an event about it."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# What a rank writes to the pod's termination log when a chip fails health checks.
DEVICE_UNHEALTHY_MARK = "ascend-device-unhealthy"
ASCEND_RESOURCE_PREFIX = "huawei.com/ascend"


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
