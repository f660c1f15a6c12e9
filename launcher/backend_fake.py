"""An in-memory backend: nodes with N devices and groups whose ranks follow a script.

For the decision tests and the scale benchmark; imports nothing of Ray. Every poll of a
running group is one training step (a heartbeat per rank); a script says, per attempt of a
job, how its ranks behave:

    fake.script("j-1", Fail(1), Succeed())   # attempt 1 exits 1, attempt 2 succeeds

A job without a script runs until the fake is told otherwise (`finish`, `fail`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from launcher.backend import (
    AgentState,
    AgentStatus,
    ClusterNode,
    Group,
    GroupStatus,
    Unplaceable,
)
from launcher.contract import EXIT_CHECKPOINTED


@dataclass(frozen=True)
class Run:
    """Steps on every poll. checkpoint_every: a periodic checkpoint event every N steps;
    on_request: the ranks honour request_checkpoint (save the next step, exit 75)."""

    checkpoint_every: int = 0
    on_request: bool = True


@dataclass(frozen=True)
class Succeed:
    after: int = 1  # polls of running before the ranks exit 0
    result: dict | None = None


@dataclass(frozen=True)
class Fail:
    exit_code: int = 1
    after: int = 1


@dataclass(frozen=True)
class Hang:
    """Heartbeats for `after` polls, then none while the processes live on."""

    after: int = 1


@dataclass(frozen=True)
class Silent:
    """Never sends a first heartbeat (a start that never finishes its imports)."""


@dataclass(frozen=True)
class StartFails:
    reason: str = "rank-0: cannot start: [Errno 2] No such file"


@dataclass(frozen=True)
class NoPlace:
    """The placement does not come up (a node going away under the ledger)."""


Behaviour = Run | Succeed | Fail | Hang | Silent | StartFails | NoPlace


@dataclass
class FakeGroup:
    job_id: str
    attempt: int
    name: str
    nodes: tuple[str, ...]
    ranks: int
    behaviour: Behaviour = field(default_factory=Run)
    state: str = "placed"  # placed -> running -> ended / held
    polls: int = 0
    step: int = 0
    exit_code: int | None = None
    requested: bool = False


@dataclass(frozen=True)
class _Records:
    """Heartbeat records of one poll, shaped as the rank contract (launcher/contract.py)."""

    group: FakeGroup
    ts: float

    def _base(self, kind: str, rank: int) -> dict:
        return {"event": kind, "ts": self.ts, "rank": rank, "attempt": self.group.attempt}

    def every_rank(self, kind: str, **fields: object) -> list[dict]:
        return [{**self._base(kind, r), **fields} for r in range(self.group.ranks)]

    def checkpoint(self, requested: bool = False) -> dict:
        g = self.group
        return {**self._base("checkpoint", 0), "step": g.step, "ok": True,
                "path": f"ckpt-{g.step}", "save_seconds": 0.0, "requested": requested}


class FakeBackend:
    def __init__(self, nodes: dict[str, int] | None = None,
                 clock: Callable[[], float] = time.time):
        self.clock = clock
        self.cluster: dict[str, ClusterNode] = {
            n: ClusterNode(n, d) for n, d in (nodes or {}).items()}
        self.groups: dict[str, FakeGroup] = {}
        self.scripts: dict[str, list[Behaviour]] = {}
        self.calls: list[tuple[str, str]] = []  # (what, group name): what the tests assert
        self.checkpoint_requests = True  # the agents pass request_checkpoint on
        self.place_gate: threading.Event | None = None  # place() waits for it when set

    # -- what the tests do --------------------------------------------------
    @classmethod
    def servers(cls, n: int, devices: int = 8, **kw) -> FakeBackend:
        return cls({f"node-{i}": devices for i in range(n)}, **kw)

    def script(self, job_id: str, *behaviours: Behaviour) -> None:
        self.scripts[job_id] = list(behaviours)

    def lose_node(self, node: str) -> None:
        self.cluster[node] = ClusterNode(node, self.cluster[node].devices, alive=False)

    def add_node(self, node: str, devices: int = 8) -> None:
        self.cluster[node] = ClusterNode(node, devices)

    def group_of(self, job_id: str) -> FakeGroup | None:
        live = [g for g in self.groups.values() if g.job_id == job_id]
        return live[-1] if live else None

    def finish(self, job_id: str) -> None:
        g = self.group_of(job_id)
        if g is not None:
            g.behaviour = Succeed(after=0)

    def count(self, what: str) -> int:
        return sum(1 for w, _ in self.calls if w == what)

    # -- the Backend interface ----------------------------------------------
    def nodes(self) -> list[ClusterNode]:
        return list(self.cluster.values())

    def _next_behaviour(self, job_id: str) -> Behaviour:
        todo = self.scripts.get(job_id)
        return todo.pop(0) if todo else Run()

    def place(self, group: Group, bundles: list[dict[str, float]], standby: bool) -> None:
        self.calls.append(("place", group.pg_name))
        if self.place_gate is not None:
            self.place_gate.wait(10)
        behaviour = self._next_behaviour(group.job_id)
        nodes = tuple(s.node for s in group.plan.slices)
        if isinstance(behaviour, NoPlace) or any(
                not self.cluster.get(n, ClusterNode(n, 0, False)).alive for n in nodes):
            raise Unplaceable("placement group not placed within 0s")
        self.groups[group.pg_name] = FakeGroup(group.job_id, group.attempt, group.pg_name,
                                               nodes, max(group.plan.devices, 1), behaviour)
        group.pg = group.pg_name
        group.agents = [f"{group.pg_name}/{i}" for i in range(len(nodes))]

    def _group(self, group: Group) -> FakeGroup:
        return self.groups[group.pg_name]

    def agent_infos(self, group: Group) -> list[dict]:
        return [{"ip": "127.0.0.1", "node": n} for n in self._group(group).nodes]

    def free_ports(self, group: Group, n: int, host: str) -> list[int]:
        return list(range(20000, 20000 + n))

    def prejoined_for(self, group: Group, ranks: list[list[dict]]) -> list[bool]:
        return [False for _ in ranks]

    def start(self, group: Group, ranks: list[list[dict]], attempt: int,
              next_ranks: list[list[dict]]) -> list[dict]:
        self.calls.append(("start", group.pg_name))
        g = self._group(group)
        if g.state == "held":  # a restart in place: the next scripted behaviour
            g.behaviour = self._next_behaviour(group.job_id)
            g.polls = g.step = 0
            g.exit_code, g.requested = None, False
        g.attempt = attempt
        if isinstance(g.behaviour, StartFails):
            g.state = "ended"
            return [{"status": "failed", "reason": g.behaviour.reason}]
        g.state = "running"
        return [{"status": "running", "from_standby": [], "prejoined": []}
                for _ in g.nodes]

    def poll(self, group: Group) -> GroupStatus:
        g = self._group(group)
        lost = next((i for i, n in enumerate(g.nodes) if not self.cluster[n].alive), None)
        if lost is not None:
            return GroupStatus(tuple(
                AgentStatus(AgentState.LOST, reason=f"agent {i} lost (fake: node died)")
                if i == lost else AgentStatus(AgentState.RUNNING)
                for i in range(lost + 1)))
        now = self.clock()
        events: list[dict] = []
        state, code, reason, result = AgentState.RUNNING, None, "", None
        b = g.behaviour
        if g.state == "running":
            g.polls += 1
            rec = _Records(g, now)
            if g.polls == 1:
                events += rec.every_rank("start", world_size=g.ranks, micro_batch=1,
                                         grad_accum=1, global_batch=g.ranks, resumed_step=0)
            if not (isinstance(b, Silent) or (isinstance(b, Hang) and g.polls > b.after)):
                g.step += 1
                events += rec.every_rank("step", step=g.step, epoch=0, loss=1.0 / g.step,
                                         lr=0.0, images_per_second=0.0, step_seconds=0.0)
                if isinstance(b, Run) and b.checkpoint_every and \
                        g.step % b.checkpoint_every == 0:
                    events.append(rec.checkpoint())
            else:
                events = []
            if g.requested and isinstance(b, Run) and b.on_request:
                events.append(rec.checkpoint(requested=True))
                g.state, g.exit_code = "ended", EXIT_CHECKPOINTED
            elif isinstance(b, Succeed) and g.polls > b.after:
                g.state, g.exit_code = "ended", 0
            elif isinstance(b, Fail) and g.polls > b.after:
                g.state, g.exit_code = "ended", b.exit_code
        if g.state == "ended":
            if g.exit_code == 0:
                state = AgentState.SUCCEEDED
                result = b.result if isinstance(b, Succeed) else None
            elif g.exit_code == EXIT_CHECKPOINTED and g.requested:
                state, code = AgentState.CHECKPOINTED, g.exit_code
            else:
                state, code = AgentState.FAILED, g.exit_code
                reason = f"rank-0 exited with exit code {code}"
        elif g.state == "held":
            state = AgentState.STOPPED
        # the first agent carries every rank's records (one poll's worth, as the real ones do)
        return GroupStatus(tuple(
            AgentStatus(state, code, reason, tuple(events) if i == 0 else (), None, result)
            for i in range(len(g.nodes))))

    def request_checkpoint(self, group: Group) -> bool:
        self.calls.append(("request_checkpoint", group.pg_name))
        if not self.checkpoint_requests:
            return False
        g = self.groups.get(group.pg_name)
        if g is None:
            return False
        g.requested = True
        return True

    def hold(self, group: Group) -> list[dict] | None:
        self.calls.append(("hold", group.pg_name))
        g = self.groups.get(group.pg_name)
        if g is None or any(not self.cluster[n].alive for n in g.nodes):
            return None
        g.state = "held"
        return [{"status": "stopped"} for _ in g.nodes]

    def teardown(self, group: Group, failed: bool = False) -> None:
        self.calls.append(("teardown", group.pg_name))
        self.groups.pop(group.pg_name, None)

    def find(self, group: Group) -> bool:
        self.calls.append(("find", group.pg_name))
        g = self.groups.get(group.pg_name)
        if g is None:
            group.agents = []
            return False
        group.pg = group.pg_name
        group.agents = [f"{group.pg_name}/{i}" for i in range(len(g.nodes))]
        return all(self.cluster[n].alive for n in g.nodes)

    def read_log(self, group: Group, label: str, offset: int) -> dict | None:
        return None
