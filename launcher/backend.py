"""What the controller asks of the machinery that runs ranks: one interface, two
implementations (launcher/backend_ray.py on a Ray cluster, launcher/backend_fake.py in
memory for the decision tests and the scale benchmark).

A *group* is one attempt's placement: a durable name (stored as the attempt's
`pg_name`, so a restarted controller can find it again), the plan it was placed for and
the backend's live handles (`pg`, `agents`: for Ray the placement group and one agent
actor per bundle). The controller's `Runtime` and `HeldPlacement` are groups.

Nothing here imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from launcher.planner import Plan


class AgentState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    # its ranks saved the step they were asked to and exited EXIT_CHECKPOINTED (grow on
    # request); an exit EXIT_CHECKPOINTED nobody asked for is FAILED
    CHECKPOINTED = "checkpointed"
    STOPPED = "stopped"
    LOST = "lost"    # the agent (its node or actor) is gone
    SLOW = "slow"    # did not answer this poll: not dead, asked again next tick


@dataclass(frozen=True)
class AgentStatus:
    state: AgentState
    exit_code: int | None = None
    reason: str = ""
    events: tuple[dict, ...] = ()  # new heartbeat records, as the ranks wrote them
    last_words: str | None = None
    result: dict | None = None

    @classmethod
    def from_poll(cls, r: dict) -> AgentStatus:
        """From a NodeAgent.poll() answer."""
        return cls(AgentState(r.get("status", "running")), r.get("exit_code"),
                   r.get("reason") or "", tuple(r.get("events") or ()), r.get("last_words"),
                   r.get("result"))

    def as_poll(self) -> dict:
        """The poll-shaped dict the progress fold reads."""
        return {"status": str(self.state), "exit_code": self.exit_code, "reason": self.reason,
                "events": list(self.events), "last_words": self.last_words, "result": self.result}


@dataclass(frozen=True)
class GroupStatus:
    """One poll of every agent of a group, in bundle order."""

    agents: tuple[AgentStatus, ...]

    def lost(self) -> tuple[int, AgentStatus] | None:
        return next(((i, a) for i, a in enumerate(self.agents)
                     if a.state == AgentState.LOST), None)

    def failed(self) -> AgentStatus | None:
        return next((a for a in self.agents if a.state == AgentState.FAILED), None)

    def all_succeeded(self) -> bool:
        return bool(self.agents) and all(a.state == AgentState.SUCCEEDED for a in self.agents)

    def checkpointed(self) -> bool:
        """Every agent's ranks ended, some at the checkpoint they were asked for."""
        ended = {AgentState.SUCCEEDED, AgentState.CHECKPOINTED}
        return bool(self.agents) and all(a.state in ended for a in self.agents) and \
            any(a.state == AgentState.CHECKPOINTED for a in self.agents)

    def checkpointing(self) -> bool:
        """Some agents' ranks stopped at the requested checkpoint, the others still run."""
        return any(a.state == AgentState.CHECKPOINTED for a in self.agents) and \
            any(a.state in (AgentState.RUNNING, AgentState.SLOW) for a in self.agents)

    def answered(self) -> list[AgentStatus]:
        return [a for a in self.agents if a.state not in (AgentState.SLOW, AgentState.LOST)]


@dataclass(frozen=True)
class ClusterNode:
    id: str
    devices: int
    alive: bool = True


class Unplaceable(Exception):
    """The backend could not place the group in time (the ledger thought it free)."""


class Group(Protocol):
    job_id: str
    attempt: int
    plan: Plan
    pg_name: str
    pg: Any
    agents: list


class Backend(Protocol):
    """Everything the controller does to a cluster."""

    def nodes(self) -> list[ClusterNode]:
        """Every node the cluster knows, alive or not, with its device count."""

    def place(self, group: Group, bundles: list[dict[str, float]], standby: bool) -> None:
        """Reserve the bundles (one per plan slice, on the slice's node) and start one agent
        per bundle; sets group.pg and group.agents. Raises Unplaceable."""

    def agent_infos(self, group: Group) -> list[dict]:
        """Each agent's {"ip": ...} (the scheduler binds the first one's address)."""

    def free_ports(self, group: Group, n: int, host: str) -> list[int]:
        """n free ports on the first agent's node."""

    def prejoined_for(self, group: Group, ranks: list[list[dict]]) -> list[bool]:
        """Per agent: whether it holds processes joined ahead for exactly these ranks."""

    def start(self, group: Group, ranks: list[list[dict]], attempt: int,
              next_ranks: list[list[dict]]) -> list[dict]:
        """Start each agent's ranks; per agent {"status", "reason", "from_standby", ...}."""

    def poll(self, group: Group) -> GroupStatus:
        """Each agent's status and new heartbeat records."""

    def request_checkpoint(self, group: Group) -> bool:
        """Ask the ranks to save the next step and exit EXIT_CHECKPOINTED; False when the
        agents cannot pass the request on (then the job resizes at a periodic checkpoint)."""

    def hold(self, group: Group) -> list[dict] | None:
        """Stop the ranks, keep placement and agents (and their standbys) for a restart in
        place; each agent's final poll, or None when an agent did not answer (nothing held)."""

    def teardown(self, group: Group, failed: bool = False) -> None:
        """Stop ranks, remove agents and placement. Best effort, bounded. failed: a surviving
        rank first saves its last words."""

    def find(self, group: Group) -> bool:
        """Reattach group.pg/agents from its name after a controller restart; True when every
        agent answers."""

    def read_log(self, group: Group, label: str, offset: int) -> dict | None:
        """A rank's log chunk from its agent (ranks on a machine without a shared volume)."""
