"""The backend on a Ray cluster: a placement group per attempt (one bundle per plan slice,
pinned to the slice's node) and one detached NodeAgent actor per bundle, both named after
the attempt so that a restarted controller finds them again."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from launcher.backend import (
    AgentState,
    AgentStatus,
    ClusterNode,
    Group,
    GroupStatus,
    Unplaceable,
)

log = logging.getLogger("fleet.backend.ray")

NAMESPACE = "fleet"
PG_READY_TIMEOUT_S = 30.0
# An agent call that takes longer is answered "slow" (poll) or counts as a failed start.
POLL_TIMEOUT_S = 10.0
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
# Grace the ranks get from SIGTERM to SIGKILL when an attempt ends.
STOP_GRACE_S = 3.0


def agent_name(placement: str, index: int) -> str:
    """Agents are named after their placement group: a restart in place keeps both."""
    return f"{placement.replace('fleet-pg-', 'fleet-agent-', 1)}-{index}"


class RayBackend:
    def nodes(self) -> list[ClusterNode]:
        import ray
        return [ClusterNode(n["NodeID"], int(n.get("Resources", {}).get("NPU", 0)),
                            bool(n.get("Alive"))) for n in ray.nodes()]

    @staticmethod
    def raw_nodes() -> list[dict]:
        """Ray's own node records (Kubernetes maps them to pods)."""
        import ray
        return ray.nodes()

    def place(self, group: Group, bundles: list[dict[str, float]], standby: bool) -> None:
        import ray
        from ray.util import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from launcher.agent import NodeAgent

        selectors = [{"ray.io/node-id": s.node} for s in group.plan.slices]
        strategy = "STRICT_SPREAD" if len(bundles) > 1 else "PACK"
        pg = placement_group(bundles, strategy=strategy, name=group.pg_name,
                             lifetime="detached", bundle_label_selector=selectors)
        group.pg = pg
        ready, _ = ray.wait([pg.ready()], timeout=PG_READY_TIMEOUT_S)
        if not ready:
            raise Unplaceable(f"placement group not placed within {PG_READY_TIMEOUT_S:.0f}s")
        agent_cls = ray.remote(NodeAgent)
        for i, b in enumerate(bundles):
            opts: dict[str, Any] = dict(
                name=agent_name(group.pg_name, i), namespace=NAMESPACE,
                lifetime="detached", num_cpus=b["CPU"], max_restarts=0,
                max_concurrency=4,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i))
            if "NPU" in b:
                opts["resources"] = {"NPU": b["NPU"]}
            group.agents.append(agent_cls.options(**opts).remote(
                group.job_id, group.attempt, i, standby))

    def agent_infos(self, group: Group) -> list[dict]:
        import ray
        return ray.get([a.info.remote() for a in group.agents], timeout=START_TIMEOUT_S)

    def free_ports(self, group: Group, n: int, host: str) -> list[int]:
        import ray
        return ray.get(group.agents[0].free_ports.remote(n, host), timeout=30)

    def prejoined_for(self, group: Group, ranks: list[list[dict]]) -> list[bool]:
        import ray
        return list(ray.get([a.prejoined_for.remote(r)
                             for a, r in zip(group.agents, ranks, strict=True)], timeout=30))

    def start(self, group: Group, ranks: list[list[dict]], attempt: int,
              next_ranks: list[list[dict]]) -> list[dict]:
        import ray
        return ray.get([a.start.remote(r, attempt, nx)
                        for a, r, nx in zip(group.agents, ranks, next_ranks, strict=True)],
                       timeout=START_TIMEOUT_S)

    def poll(self, group: Group) -> GroupStatus:
        import ray

        futs = [a.poll.remote() for a in group.agents]
        out: list[AgentStatus] = []
        for i, f in enumerate(futs):
            try:
                out.append(AgentStatus.from_poll(ray.get(f, timeout=POLL_TIMEOUT_S)))
            except ray.exceptions.GetTimeoutError:
                out.append(AgentStatus(AgentState.SLOW))
            except Exception as e:  # noqa: BLE001 - any other error: the actor is gone
                out.append(AgentStatus(AgentState.LOST, reason=(
                    f"agent {i} lost ({type(e).__name__}: node or actor died)")))
                break
        return GroupStatus(tuple(out))

    def request_checkpoint(self, group: Group) -> bool:
        import ray

        try:
            calls = [a.request_checkpoint.remote() for a in group.agents]
        except AttributeError:  # agents of a version without the request
            return False
        try:
            answers = ray.get(calls, timeout=POLL_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - the periodic checkpoint still resizes it
            log.warning("job %s: checkpoint request failed: %s", group.job_id, e)
            return False
        # an agent answers False when its ranks' workload cannot save on request
        return all(a is not False for a in answers)

    def hold(self, group: Group) -> list[dict] | None:
        import ray

        if group.pg is None or not group.agents:
            return None
        try:
            return ray.get([a.stop.remote(STOP_GRACE_S, "restarting in place", True, True)
                            for a in group.agents], timeout=STOP_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any agent error means: start afresh
            log.warning("job %s: no restart in place (%s)", group.job_id, e)
            return None

    def teardown(self, group: Group, failed: bool = False) -> None:
        import ray
        from ray.util import get_placement_group, remove_placement_group

        stops = []
        for a in group.agents:
            with contextlib.suppress(Exception):
                stops.append(a.stop.remote(STOP_GRACE_S, "stopped", False, failed))
        if stops:
            with contextlib.suppress(Exception):
                ray.wait(stops, num_returns=len(stops), timeout=STOP_TIMEOUT_S)
        for a in group.agents:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        with contextlib.suppress(Exception):
            remove_placement_group(group.pg if group.pg is not None
                                   else get_placement_group(group.pg_name))

    def find(self, group: Group) -> bool:
        import ray

        agents = []
        for i in range(len(group.plan.slices)):
            try:
                agents.append(ray.get_actor(agent_name(group.pg_name, i), namespace=NAMESPACE))
            except ValueError:
                break
        group.agents = agents
        ok = len(agents) == len(group.plan.slices)
        if ok:
            try:
                ray.get([a.info.remote() for a in agents], timeout=30)
            except Exception:  # noqa: BLE001 - an agent that does not answer is lost
                ok = False
        if ok:
            with contextlib.suppress(Exception):
                from ray.util import get_placement_group
                group.pg = get_placement_group(group.pg_name)
        return ok

    def read_log(self, group: Group, label: str, offset: int) -> dict | None:
        import ray

        for a in group.agents:
            with contextlib.suppress(Exception):
                r = ray.get(a.read_log.remote(label, offset), timeout=10)
                if "error" not in r:
                    return r
        return None
