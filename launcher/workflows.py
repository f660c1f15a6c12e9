"""A workflow's decision from its steps' rows: succeed when every step did, fail (and
cancel the steps still live) when one failed or was cancelled, else nothing. Pure: the
controller acts on the answer."""

from __future__ import annotations

from dataclasses import dataclass

from launcher.lifecycle import TERMINAL, JobState
from launcher.store import JobRow

S = JobState

# A workflow holds no devices itself: it goes PENDING -> SCHEDULING -> RUNNING as its first
# step starts; these are the moves that bring it to RUNNING from each state.
TO_RUNNING: dict[JobState, tuple[JobState, ...]] = {
    S.PENDING: (S.SCHEDULING, S.RUNNING), S.SCHEDULING: (S.RUNNING,), S.RUNNING: ()}


@dataclass(frozen=True)
class WorkflowSucceeded:
    result: dict


@dataclass(frozen=True)
class WorkflowFailed:
    message: str
    cancel: tuple[str, ...]  # the steps still live
    why: str                 # what their cancellation says


def decide_workflow(steps: list[JobRow]) -> WorkflowSucceeded | WorkflowFailed | None:
    if steps and all(k.state == S.SUCCEEDED for k in steps):
        return WorkflowSucceeded({k.step: k.result for k in steps if k.result})
    bad = next((k for k in steps if k.state in (S.FAILED, S.CANCELLED)), None)
    if bad is None:
        return None
    return WorkflowFailed(f"step {bad.step} {bad.state}: {bad.message}",
                          tuple(k.id for k in steps if k.state not in TERMINAL),
                          f"step {bad.step} {bad.state}")
