"""Job lifecycle: an explicit state machine.

Every state change goes through `transition`, so an impossible change (a
cancelled job starting to run, say) is a bug caught where it happens instead of
a corrupt row found later.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    PENDING = "PENDING"          # queued, waiting for devices
    SCHEDULING = "SCHEDULING"    # devices chosen, placement group + agents starting
    RUNNING = "RUNNING"          # ranks started
    RESTARTING = "RESTARTING"    # an attempt failed; waiting for backoff / devices
    RESIZING = "RESIZING"        # stopping at a checkpoint to run on a new device count
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


S = JobState
TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
# States in which a job holds devices (a placement group exists).
HOLDS_DEVICES = frozenset({S.SCHEDULING, S.RUNNING, S.RESIZING})

ALLOWED: dict[JobState, frozenset[JobState]] = {
    S.PENDING: frozenset({S.SCHEDULING, S.CANCELLED, S.FAILED}),
    S.SCHEDULING: frozenset({S.RUNNING, S.RESTARTING, S.PENDING, S.FAILED, S.CANCELLED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.RESTARTING, S.RESIZING, S.CANCELLED}),
    S.RESTARTING: frozenset({S.SCHEDULING, S.FAILED, S.CANCELLED}),
    S.RESIZING: frozenset({S.SCHEDULING, S.RESTARTING, S.FAILED, S.CANCELLED, S.SUCCEEDED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


def can_transition(src: JobState, dst: JobState) -> bool:
    return dst in ALLOWED[JobState(src)]


def transition(src: JobState | str, dst: JobState | str) -> JobState:
    src, dst = JobState(src), JobState(dst)
    if dst not in ALLOWED[src]:
        raise IllegalTransition(f"job cannot go from {src} to {dst}")
    return dst


def is_terminal(state: JobState | str) -> bool:
    return JobState(state) in TERMINAL
