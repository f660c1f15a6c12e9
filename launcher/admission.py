"""Admission: what `submit` checks and decides before a job is stored (its paths, inside
the configured roots; its checkpoint directory, used by no other live job; room in the
queue). Functions of the store and the parsed spec, no cluster."""

from __future__ import annotations

import os
from pathlib import Path

from launcher import spec as specmod
from launcher.lifecycle import TERMINAL, JobState
from launcher.ranks import default_ckpt_dir
from launcher.store import Store

S = JobState

MAX_PENDING_ENV = "FLEET_MAX_PENDING"
MAX_PENDING_DEFAULT = 10_000


def max_pending(environ: dict[str, str] | None = None) -> int:
    """Most jobs (workflow steps count) that may wait at once; FLEET_MAX_PENDING sets it."""
    raw = (os.environ if environ is None else environ).get(MAX_PENDING_ENV, "")
    try:
        return max(1, int(raw)) if raw else MAX_PENDING_DEFAULT
    except ValueError:
        return MAX_PENDING_DEFAULT


def resolve_paths(job: specmod.AnyJob, client: dict) -> dict[str, dict[str, str]]:
    """The steps' paths, decided here. With `base` (the spec file's directory, as
    `fleet submit` sends) every path is resolved again from the spec; a caller that
    sends resolved paths instead gets them checked: known keys only, absolute and
    normalised, inside the configured roots - no more than an absolute path in the
    spec could ask for."""
    if not isinstance(client, dict):
        client = {}
    base, root = client.get("base"), client.get("workdir")
    if isinstance(base, str) and Path(base).is_absolute():
        if not (isinstance(root, str) and Path(root).is_absolute()):
            root = base
        return specmod.job_paths(job, Path(base), Path(root), "<submitted>")
    sent = client.get("steps") if isinstance(client.get("steps"), dict) else {}
    out: dict[str, dict[str, str]] = {}
    problems: list[tuple[str, str]] = []
    for name, _kind, _sp in specmod.steps_of(job):
        step = sent.get(name) if isinstance(sent.get(name), dict) else {}
        res: dict[str, str] = {}
        for key in specmod.STEP_PATH_KEYS:
            v = step.get(key)
            if v is None:
                continue
            env = specmod.ROOT_OF.get(key, "")
            try:
                if not isinstance(v, str) or not Path(v).is_absolute():
                    raise specmod.SpecError("<submitted>", [(f"{name}.{key}", (
                        f"{str(v)[:80]!r} is not an absolute path"))])
                res[key] = str(specmod.resolve_path(v, Path("/"), Path("/"),
                                                    f"{name}.{key}", "<submitted>",
                                                    os.environ.get(env) or None, env))
            except specmod.SpecError as e:
                problems += e.problems
        out[name] = res
    if problems:
        raise specmod.SpecError("<submitted>", problems)
    return out


def check_checkpoint_dirs(store: Store, home: Path, job: specmod.AnyJob,
                          resolved: dict[str, dict[str, str]]) -> None:
    """Two live jobs may not share a checkpoint directory (or one inside the other):
    each prunes its directory to its newest checkpoints, deleting the other's."""
    mine = [(name, Path(resolved[name]["ckpt_dir"])) for name, kind, _sp in
            specmod.steps_of(job) if kind == "TrainJob" and "ckpt_dir" in resolved[name]]
    if not mine:
        return
    taken = [(jid, Path(d) if d else default_ckpt_dir(home, jid))
             for jid, d in store.checkpoint_dirs(set(S) - set(TERMINAL))]
    taken += mine
    problems = []
    for i, (name, d) in enumerate(mine):
        for other, od in taken[:len(taken) - len(mine) + i]:
            if d == od or d.is_relative_to(od) or od.is_relative_to(d):
                problems.append((name, f"checkpoint.dir {d} is in use by {other} "
                                       f"({od}); give each job its own directory"))
    if problems:
        raise specmod.SpecError("<submitted>", problems)


def check_queue_room(store: Store, job: specmod.AnyJob) -> None:
    """A queue limit: every waiting job costs the scheduler a little on every tick."""
    limit = max_pending()
    waiting = store.count({S.PENDING, S.RESTARTING})
    adding = len(job.spec.steps) + 1 if isinstance(job, specmod.Workflow) else 1
    if waiting + adding > limit:
        raise specmod.SpecError("<submitted>", [("(queue)", (
            f"the queue is full: {waiting} jobs wait and at most {limit} may "
            f"({MAX_PENDING_ENV}); wait for some to start or cancel some"))])
