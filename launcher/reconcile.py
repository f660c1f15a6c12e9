"""The decide step of the controller's loop for a running attempt: a pure function of one
observation (the job's row, its group's status, what the controller knows of the attempt)
returning one action. The controller acts on it (store first, then backend)."""

from __future__ import annotations

from dataclasses import dataclass

from launcher import spec as specmod
from launcher.backend import GroupStatus
from launcher.lifecycle import JobState
from launcher.policies import Failure, FailureKind, ResizeVia, Watchdog

S = JobState

# The ranks asked to checkpoint saved one but did not exit within this: they do not honour
# the request, so the resize stops them as at a periodic checkpoint.
REQUEST_EXIT_GRACE_S = 30.0


@dataclass(frozen=True)
class AttemptView:
    """What the controller knows of a running attempt, beside its group's status."""

    kind: str
    state: JobState
    policy: specmod.RestartPolicy
    devices: int
    started: float
    rank_heartbeat: dict[int, float]  # rank -> its newest heartbeat line (JobProgress)
    resize_via: ResizeVia | None        # a grow is wanted, and how it was asked for
    checkpoint_ready_at: float | None   # an ok checkpoint since the grow was wanted
    now: float


@dataclass(frozen=True)
class Wait:
    pass


@dataclass(frozen=True)
class Succeed:
    result: dict | None


@dataclass(frozen=True)
class FailAttempt:
    failure: Failure


@dataclass(frozen=True)
class Resize:
    on_request: bool  # the ranks saved and exited themselves; else they are stopped now


@dataclass(frozen=True)
class Ignore:
    """The job is no longer one whose ranks this decides (cancelled, resized...)."""


Action = Wait | Succeed | FailAttempt | Resize | Ignore


def decide_running(view: AttemptView, status: GroupStatus,
                   watchdog: Watchdog | None = None) -> Action:
    if view.state not in (S.RUNNING, S.RESIZING):
        return Ignore()
    lost = status.lost()
    if lost is not None:
        return FailAttempt(Failure(FailureKind.LOST, lost[1].reason))
    ready = view.checkpoint_ready_at is not None
    if view.resize_via == ResizeVia.REQUEST and status.checkpointed():
        return Resize(on_request=True)
    bad = status.failed()
    if bad is not None:
        return FailAttempt(Failure(FailureKind.EXIT, bad.reason, bad.exit_code))
    if view.resize_via == ResizeVia.REQUEST and status.checkpointing():
        return Wait()  # some ranks saved and exited as asked; the others follow
    if status.all_succeeded():
        return Succeed(next((a.result for a in status.agents if a.result), None))
    if ready and (view.resize_via == ResizeVia.PERIODIC or
                  view.now - view.checkpoint_ready_at > REQUEST_EXIT_GRACE_S):
        return Resize(on_request=False)
    if view.kind == "TrainJob":
        hung = (watchdog or Watchdog()).decide(view.policy, view.devices, view.started,
                                               view.rank_heartbeat, view.now)
        if hung is not None:
            return FailAttempt(hung)
    return Wait()
