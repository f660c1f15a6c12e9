"""Queue policy + gang placement decisions: pure code shared by the controller
and the simulation benchmark (bench/scheduler_sim.py)."""

from __future__ import annotations

from dataclasses import dataclass

from launcher.planner import ASCEND_910, FreePool, NodeSlice, Plan, Request, Topology


@dataclass
class QueuedJob:
    id: str
    priority: int
    seq: int
    request: Request | None       # None: needs no devices (e.g. export), only a CPU slot
    topology: Topology = ASCEND_910
    not_before: float = 0.0        # restart backoff
    _candidates: list[int] | None = None

    def candidates(self) -> list[int]:
        if self._candidates is None and self.request is not None:
            self._candidates = self.request.candidates(self.topology)
        return self._candidates or []


class QueuePolicy:
    """Order of the queue and whether a blocked job blocks those behind it."""

    backfill: bool = False

    def key(self, job: QueuedJob) -> tuple:
        raise NotImplementedError


class PriorityFifo(QueuePolicy):
    """Higher priority first, FIFO within a priority.

    Without backfill a job that does not fit stops the pass: smaller jobs behind
    it would otherwise keep taking the devices it waits for, and a big gang job
    would starve forever.
    """

    def __init__(self, backfill: bool = False):
        self.backfill = backfill

    def key(self, job: QueuedJob) -> tuple:
        return (-job.priority, job.seq)


def schedule(queue: list[QueuedJob], pool: FreePool, now: float,
             policy: QueuePolicy | None = None,
             presorted: bool = False) -> list[tuple[QueuedJob, Plan]]:
    """Pick the jobs to start now and their plans; takes the chips from `pool`.

    `presorted`: the caller keeps `queue` in policy order (the simulation does,
    so a long queue is not re-sorted on every event).
    """
    policy = policy or PriorityFifo()
    out: list[tuple[QueuedJob, Plan]] = []
    for job in (queue if presorted else sorted(queue, key=policy.key)):
        if job.not_before > now:
            continue  # backing off: not eligible, so it does not block others either
        if job.request is None:
            nodes = pool.nodes()
            if not nodes:
                if not policy.backfill:
                    break
                continue
            out.append((job, Plan(0, 0, 0, (NodeSlice(nodes[0], ()),))))
            continue
        p = pool.plan(job.request, job.candidates())
        if p is None:
            if not policy.backfill:
                break
            continue
        pool.take(p.slices)
        out.append((job, p))
    return out
