"""What a JOB argument names, and the one "not found" error every command gives.

A JOB is a job id (`smoke-3`, `quickstart-1`) or `WORKFLOW/STEP` (`quickstart-1/train`):
a Workflow id plus one of its step names, which stands for that step's job. The
resolution works on the status dicts the controller (or the offline store view) returns,
so `status`, `logs`, `cancel` and `plot` all answer the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

STEP_SEP = "/"
EXIT_NOT_FOUND = 4

Status = dict[str, Any]


class NotFound(click.ClickException):
    """No such job, step, attempt or rank: exit 4, one `error:` line."""

    exit_code = EXIT_NOT_FOUND

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


def no_such_job(ref: str) -> NotFound:
    return NotFound(f"no job {ref!r} (`fleet list --all` shows jobs and their steps)")


def step_ref(workflow_id: str, step: str) -> str:
    return f"{workflow_id}{STEP_SEP}{step}"


def step_names(wf: Status) -> list[str]:
    return [s["step"] for s in wf.get("steps") or []]


def resolve(ref: str, status: Callable[[str], Status | None]) -> Status:
    """The status of the job `ref` names; raises NotFound naming what exists."""
    head, sep, step = ref.partition(STEP_SEP)
    st = status(head)
    if st is None:
        raise no_such_job(head if sep else ref)
    if not sep:
        return st
    if st["kind"] != "Workflow":
        raise NotFound(f"{head!r} is a {st['kind']}, not a Workflow: it has no step {step!r}")
    for s in st.get("steps") or []:
        if s["step"] == step:
            return s
    raise NotFound(f"workflow {head!r} has no step {step!r}; its steps: "
                   + ", ".join(step_names(st)))


def ranks_of(attempt: Status) -> int:
    """How many rank processes an attempt ran (a no-device step still runs one)."""
    return max(int(attempt["plan"].get("devices") or 0), 1)


def pick_attempt(st: Status, attempt: int | None) -> Status:
    """The attempt asked for (default: the latest); NotFound naming the ones that exist."""
    atts = st.get("attempts") or []
    if not atts:
        raise NotFound(f"job {st['id']!r} has no attempts yet ({st['state']}): no logs")
    if attempt is None:
        return atts[-1]
    for a in atts:
        if a["n"] == attempt:
            return a
    raise NotFound(f"job {st['id']!r} has no attempt {attempt}; its attempts: "
                   + ", ".join(str(a["n"]) for a in atts))


def check_rank(st: Status, att: Status, rank: int | None) -> None:
    """NotFound unless `rank` (None: the scheduler) ran in this attempt."""
    n = ranks_of(att)
    if rank is None:
        if n < 2:
            raise NotFound(f"job {st['id']!r} attempt {att['n']} ran one process and no "
                           "MindSpore scheduler; drop --scheduler")
        return
    if not 0 <= rank < n:
        have = "rank 0" if n == 1 else f"ranks 0-{n - 1}"
        raise NotFound(f"job {st['id']!r} attempt {att['n']} has no rank {rank}; it ran "
                       f"{have}")
