"""When to grow or shrink the RayCluster's NPU worker group.

The controller (launcher/controller.py) calls `WorkerGroupScaler.step` once per
tick, after scheduling, with what it knows: the live NPU nodes, which of them
hold chips, how many devices waiting and growing jobs want and how many are
free. The scaler decides; `FleetK8s` (launcher/k8s/fleet.py) makes the API calls.

* Grow: devices wanted beyond the free ones, rounded up to whole servers, minus
  servers already on their way (the group's replicas as asked of KubeRay, less
  its pods live as Ray nodes: KubeRay also replaces a dead pod by itself, and
  asking for that one again would end as an idle server). An ask that is not
  live after `request_timeout_s` (a pod stuck Pending, an image that does not
  pull) is reported, not repeated: more replicas would not schedule either.
* Release: a node that has held no chip for `idle_release_s` while nothing is
  wanted goes back, named in workersToDelete so that no busy server is picked,
  never below the group's minReplicas. Until its pod is gone it is "draining":
  the controller does not place work on it.
* An API error (403, the server away) is recorded and retried after
  `retry_after_s`, never raised into the control loop: Kubernetes is an aid,
  scheduling on the nodes already there goes on.

Demand is counted in devices, not in placeable slices: a job that fits in the
free devices only in theory (fragmented across servers) does not ask for more.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("fleet.autoscale")


class WorkerGroup(Protocol):
    """What the scaler needs of launcher.k8s.fleet.FleetK8s."""

    cluster: str
    group: str

    def worker_group(self) -> dict[str, int]: ...
    def in_group(self, node_id: str) -> bool: ...
    def grow(self, servers: int) -> Any: ...
    def release(self, node_ids: Iterable[str], down_to_min: bool = False) -> Any: ...
    def pod_of(self, node_id: str) -> Any: ...


def _seconds(env: Mapping[str, str], name: str, default: float, hint: str = "") -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds (unset it for the "
                         f"default {default:g}{hint})") from None


@dataclass(frozen=True)
class ScalerSettings:
    devices_per_server: int = 8
    idle_release_s: float = 600.0  # <= 0: never release idle servers
    request_timeout_s: float = 600.0
    retry_after_s: float = 30.0
    recheck_s: float = 5.0  # how often to re-read the group while servers are on their way

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ScalerSettings:
        env = os.environ if env is None else env
        return cls(idle_release_s=_seconds(env, "FLEET_K8S_IDLE_RELEASE_S", cls.idle_release_s,
                                           "; 0 turns idle release off"),
                   request_timeout_s=_seconds(env, "FLEET_K8S_SCALE_TIMEOUT_S",
                                              cls.request_timeout_s))


@dataclass
class _Ask:
    servers: int
    expect_nodes: int  # live NPU nodes at which the ask is served
    at: float


@dataclass
class WorkerGroupScaler:
    fleet: WorkerGroup
    settings: ScalerSettings = field(default_factory=ScalerSettings)
    clock: Callable[[], float] = time.time
    asks: list[_Ask] = field(default_factory=list)
    idle_since: dict[str, float] = field(default_factory=dict)
    draining: dict[str, float] = field(default_factory=dict)  # node id -> released at
    retry_at: float = 0.0
    last_error: str = ""
    capped: str = ""

    # ------------------------------------------------------------------ decide
    def step(self, nodes: Mapping[str, int], busy: Iterable[str], wanted_devices: int,
             free_devices: int) -> list[tuple[str, dict[str, Any]]]:
        """One decision. `nodes`: live NPU nodes (id -> devices), draining ones
        excluded; `busy`: those holding chips. Returns (event kind, data) pairs."""
        now = self.clock()
        events: list[tuple[str, dict[str, Any]]] = []
        for n, at in list(self.draining.items()):
            # Still alive long after its release: schedulable again, not lost forever.
            if now - at >= self.settings.request_timeout_s:
                del self.draining[n]
        live = sum(1 for n in nodes if self.fleet.in_group(n))
        events += self._settle_asks(live, now)
        shortfall = max(0, wanted_devices - free_devices)
        if shortfall == 0:
            self.capped = ""
        needed = math.ceil(shortfall / self.settings.devices_per_server)
        if needed > 0 and now >= self.retry_at:
            events += self._grow(needed, live, now)
        busy = set(busy)
        for node in nodes:
            if node in busy:
                self.idle_since.pop(node, None)
            else:
                self.idle_since.setdefault(node, now)
        for node in list(self.idle_since):
            if node not in nodes:
                del self.idle_since[node]
        if (self.settings.idle_release_s > 0 and shortfall == 0 and not self.asks
                and now >= self.retry_at):
            due = sorted(n for n, t in self.idle_since.items()
                         if now - t >= self.settings.idle_release_s
                         and self.fleet.pod_of(n) is not None)
            if due:
                events += self._release(due, now)
        return events

    def _settle_asks(self, live: int, now: float) -> list[tuple[str, dict[str, Any]]]:
        events = []
        keep = []
        for a in self.asks:
            if live >= a.expect_nodes:
                events.append(("k8s_servers_joined", {"servers": a.servers,
                                                      "after_s": round(now - a.at, 1)}))
            elif now - a.at >= self.settings.request_timeout_s:
                events.append(("k8s_request_expired", {
                    "servers": a.servers, "after_s": round(now - a.at, 1),
                    "note": "pods not live as Ray nodes in time (Pending? image pull? "
                            "see `kubectl get pods`)"}))
            else:
                keep.append(a)
        self.asks = keep
        return events

    def _grow(self, needed: int, live: int, now: float) -> list[tuple[str, dict[str, Any]]]:
        try:
            group = self.fleet.worker_group()
            on_the_way = max(0, group["replicas"] - live)
            add = needed - on_the_way
            if add <= 0:
                self.retry_at = now + self.settings.recheck_s
                return []
            res = self.fleet.grow(add)
        except Exception as e:  # noqa: BLE001 - recorded, retried; the loop goes on
            return [self._failed("grow", e, now)]
        self.last_error = ""
        added = res.replicas - res.replicas_before
        events: list[tuple[str, dict[str, Any]]] = []
        if added > 0:
            self.asks.append(_Ask(added, live + on_the_way + added, now))
            events.append(("k8s_scale_up", {"group": res.group, "servers": added,
                                            "replicas": res.replicas}))
            self.retry_at = now + self.settings.recheck_s
        if added < add:
            self.capped = (f"worker group {self.fleet.group!r} of RayCluster "
                           f"{self.fleet.cluster} is at maxReplicas ({res.replicas})")
            self.retry_at = now + self.settings.retry_after_s
            events.append(("k8s_scale_capped", {"wanted": add, "added": added,
                                                 "replicas": res.replicas}))
        return events

    def _release(self, node_ids: list[str], now: float) -> list[tuple[str, dict[str, Any]]]:
        try:
            res = self.fleet.release(node_ids, down_to_min=True)
        except Exception as e:  # noqa: BLE001
            return [self._failed("release", e, now)]
        self.last_error = ""
        gone = {self.fleet.pod_of(n).name: n for n in node_ids}
        released = [gone[p] for p in res.released if p in gone]
        for n in released:
            self.draining[n] = now
            self.idle_since.pop(n, None)
        # Nodes kept at minReplicas stay idle: do not ask again every tick.
        for n in node_ids:
            if n not in released:
                self.idle_since[n] = now
        if not released:
            return []
        return [("k8s_release", {"group": res.group, "pods": list(res.released),
                                 "replicas": res.replicas,
                                 "idle_s": self.settings.idle_release_s})]

    def _failed(self, what: str, e: Exception, now: float) -> tuple[str, dict[str, Any]]:
        self.last_error = f"{what}: {type(e).__name__}: {e}"
        self.retry_at = now + self.settings.retry_after_s
        log.warning("kubernetes %s failed (retrying in %.0fs): %s", what,
                    self.settings.retry_after_s, e)
        return ("k8s_scale_failed", {"action": what, "error": str(e),
                                     "retry_in_s": self.settings.retry_after_s})

    def forget_node(self, node_id: str) -> None:
        """The node is dead (Ray says so): nothing to drain any more."""
        self.draining.pop(node_id, None)
        self.idle_since.pop(node_id, None)

    # ------------------------------------------------------------------ report
    def note(self) -> str:
        """Appended to a waiting job's message."""
        if self.last_error:
            return f"; kubernetes: {self.last_error}"
        if self.capped:
            return f"; {self.capped}"
        if self.asks:
            n = sum(a.servers for a in self.asks)
            return (f"; asked Kubernetes for {n} more server{'s' if n > 1 else ''} "
                    f"(RayCluster {self.fleet.cluster}, group {self.fleet.group})")
        return ""

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "asked_servers": sum(a.servers for a in self.asks),
            "asked_for_s": round(now - min(a.at for a in self.asks), 1) if self.asks else None,
            "draining_nodes": sorted(self.draining),
            "idle_nodes": {n: round(now - t, 1) for n, t in sorted(self.idle_since.items())},
            "idle_release_s": self.settings.idle_release_s,
            "capped": self.capped or None,
            "last_error": self.last_error or None,
        }
