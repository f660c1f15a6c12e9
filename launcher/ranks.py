"""Rank command lines and environment for one attempt: pure code, no Ray.

Kept separate from the agent so `fleet submit --dry-run` prints exactly what
the agents would run, and tests can check the msrun-equivalent environment
without starting processes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import contract as C
from launcher.planner import Plan
from launcher.workloads import EXPORT, TRAIN, VALIDATE, of_spec

SCHED_HOST_PLACEHOLDER = "<scheduler-host>"
SCHED_PORT_PLACEHOLDER = "<scheduler-port>"


@dataclass
class RankSpec:
    """One process an agent starts. rank is None for the MindSpore scheduler."""

    rank: int | None
    argv: list[str]
    env: dict[str, str]
    log: str
    heartbeat: str | None = None
    cwd: str | None = None

    @property
    def label(self) -> str:
        return "scheduler" if self.rank is None else f"rank-{self.rank}"

    def to_dict(self) -> dict[str, Any]:
        # by hand, not dataclasses.asdict: that deep-copies every string of every env, and a
        # 32k-rank launch spent 14 s there
        return {"rank": self.rank, "argv": list(self.argv), "env": dict(self.env),
                "log": self.log, "heartbeat": self.heartbeat, "cwd": self.cwd}

    @classmethod
    def from_dict(cls, d: dict) -> RankSpec:
        return cls(**d)


@dataclass
class NodeLaunch:
    node: str
    chips: list[int]
    ranks: list[RankSpec] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "chips": self.chips,
                "ranks": [r.to_dict() for r in self.ranks]}


def _flag_value(v: Any) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, list | tuple):
        return ",".join(str(x) for x in v)
    return str(v)


def override_flags(overrides: dict[str, Any]) -> list[str]:
    """`--key=value`, one argv item per override: a value can never be read as a flag of
    its own. The spec refuses keys the launcher sets itself (spec.TRAIN_OWNED...)."""
    return [f"--{k}={_flag_value(v)}" for k, v in overrides.items() if v is not None]


def attempt_dir(home: Path, job_id: str, attempt: int) -> Path:
    return home / "jobs" / job_id / f"attempt-{attempt}"


CHECKPOINT_ROOT_ENV = "FLEET_CHECKPOINT_ROOT"


def default_ckpt_dir(home: Path, job_id: str, environ: Mapping[str, str] | None = None) -> Path:
    """Where a job without checkpoint.dir keeps its checkpoints. On Kubernetes the head sets
    FLEET_CHECKPOINT_ROOT to the volume every pod mounts (the fleet home is the head's alone:
    a worker pod's rank would write its checkpoints into its own container)."""
    environ = os.environ if environ is None else environ
    root = environ.get(CHECKPOINT_ROOT_ENV)
    if root:
        return Path(root) / job_id
    return home / "jobs" / job_id / "checkpoints"


def compile_cache_store(home: Path, environ: Mapping[str, str] | None = None) -> Path:
    """The compile cache that jobs share (the ranks' FLEET_COMPILE_CACHE_STORE), next to the
    checkpoints so that every pod sees it; a dot name cannot clash with a DNS-1123 job name."""
    environ = os.environ if environ is None else environ
    if environ.get(C.COMPILE_CACHE_STORE_ENV):
        return Path(environ[C.COMPILE_CACHE_STORE_ENV])
    root = environ.get(CHECKPOINT_ROOT_ENV)
    return Path(root) / ".compile-cache" if root else home / "compile-cache"


# MindSpore's own log level in every rank (its GLOG_v). ERROR by default: at WARNING a
# healthy run's log is mostly compile-cache notices. The submitting shell's
# FLEET_MINDSPORE_LOG_LEVEL raises it for that submission (the CLI stores it with the job's
# launch context under MINDSPORE_LOG_LEVEL_KEY); a controller-wide value is the fallback.
MINDSPORE_LOG_LEVEL_ENV = "FLEET_MINDSPORE_LOG_LEVEL"
MINDSPORE_LOG_LEVEL_KEY = "mindspore_log_level"
MINDSPORE_GLOG_V = {"DEBUG": "0", "INFO": "1", "WARNING": "2", "ERROR": "3"}
DEFAULT_MINDSPORE_LOG_LEVEL = "ERROR"


def mindspore_log_level(value: str | None) -> str:
    """The level name for `value` (a name in any case, or a GLOG_v digit); ValueError
    naming the setting and the allowed values otherwise. None: the default."""
    if value is None or not value.strip():
        return DEFAULT_MINDSPORE_LOG_LEVEL
    v = value.strip().upper()
    by_digit = {d: n for n, d in MINDSPORE_GLOG_V.items()}
    if v in MINDSPORE_GLOG_V or v in by_digit:
        return by_digit.get(v, v)
    raise ValueError(f"{MINDSPORE_LOG_LEVEL_ENV}={value!r}: use one of "
                     f"{', '.join(MINDSPORE_GLOG_V)} (or GLOG_v 0-3)")


def threads_per_rank(cpus_per_device: float) -> int:
    # Ray sets OMP_NUM_THREADS=1 in its workers and ranks inherit it; give each
    # rank the CPUs reserved for its device instead (at least one thread).
    return max(1, int(cpus_per_device))


def build_launch(*, job_id: str, attempt: int, kind: str, spec: dict, paths: dict,
                 plan: Plan, home: Path, sched_host: str = SCHED_HOST_PLACEHOLDER,
                 sched_port: int | str = SCHED_PORT_PLACEHOLDER,
                 python: str | None = None) -> list[NodeLaunch]:
    """The processes of every node of one attempt, with argv lists and full env."""
    python = python or sys.executable
    adir = str(attempt_dir(home, job_id, attempt))  # joined per rank below: a str is cheaper
    workdir = paths.get("workdir") or os.getcwd()
    device_type = spec.get("resources", {}).get("deviceType", "NPU")
    target = "CPU" if device_type == "CPU" else "Ascend"
    cpus_per_device = float(spec.get("resources", {}).get("cpusPerDevice", 1.0))
    threads = threads_per_rank(cpus_per_device)
    overrides = dict(spec.get("overrides") or {})
    world = max(plan.devices, 1)
    base_env = {
        C.JOB_ID_ENV: job_id,
        C.ATTEMPT_ENV: str(attempt),
        C.NUM_THREADS_ENV: str(threads),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": workdir,
        "GLOG_v": MINDSPORE_GLOG_V[mindspore_log_level(
            paths.get(MINDSPORE_LOG_LEVEL_KEY) or os.environ.get(MINDSPORE_LOG_LEVEL_ENV))],
    }
    if world > 1:
        # MindSpore's dynamic cluster polls the scheduler at a random 3-5 s interval while
        # the topology forms: a worker that registered first idled up to 5 s after the last
        # one joined, on every restart (measured 5.0 s of a 7.1 s join, 2 workers). 1 s polls
        # cost the scheduler one small message per worker per second.
        base_env.update(MS_RETRY_INTERVAL_LOWER="1", MS_RETRY_INTERVAL_UPPER="1")

    workload = of_spec(spec)
    module = workload.module(kind)
    last_words = kind == TRAIN and world > 1 and bool(
        (spec.get("restart") or {}).get("saveOnFailure", True))
    checkpoint_request = kind == TRAIN and workload.checkpoint_on_request
    if kind == TRAIN:
        ckpt_dir = paths.get("ckpt_dir") or str(default_ckpt_dir(home, job_id))
        g = plan.global_batch
        argv = [python, "-m", module, "-c", paths["config"],
                "--data_dir", paths["data_dir"], "--ckpt_save_dir", ckpt_dir,
                "--device_target", target, "--distribute", _flag_value(world > 1),
                "--batch_size", str(plan.micro_batch),
                "--gradient_accumulation_steps", str(plan.grad_accum),
                "--global_batch", str(g)]
        ck = spec.get("checkpoint") or {}
        if ck.get("everySteps"):
            argv += ["--ckpt_save_steps", str(ck["everySteps"])]
        if ck.get("keep"):
            argv += ["--keep_checkpoint_max", str(ck["keep"])]
        argv += override_flags(overrides)
        base_env.update({C.CHECKPOINT_DIR_ENV: ckpt_dir, C.GLOBAL_BATCH_ENV: str(g),
                         C.COMPILE_CACHE_STORE_ENV: str(compile_cache_store(home)),
                         C.MICRO_BATCH_ENV: str(plan.micro_batch),
                         C.GRAD_ACCUM_ENV: str(plan.grad_accum)})
    elif kind == VALIDATE:
        argv = [python, "-m", module, "-c", paths["config"],
                "--data_dir", paths["data_dir"], "--ckpt_path", paths["ckpt_path"],
                "--device_target", target] + override_flags(overrides)
    elif kind == EXPORT:
        argv = [python, "-m", module, "--ckpt_path", paths["ckpt_path"],
                "--model", spec["model"], "--format", spec.get("format", "MINDIR"),
                "--out", paths["out"]] + override_flags(overrides)
    else:
        raise ValueError(f"cannot launch kind {kind}")

    nodes: list[NodeLaunch] = []
    rank = 0
    for i, s in enumerate(plan.slices):
        nl = NodeLaunch(node=s.node, chips=list(s.chips))
        visible = ",".join(str(c) for c in s.chips)
        if world > 1 and i == 0:
            env = dict(base_env, MS_ROLE="MS_SCHED", MS_SCHED_HOST=str(sched_host),
                       MS_SCHED_PORT=str(sched_port), MS_WORKER_NUM=str(world))
            nl.ranks.append(RankSpec(None, list(argv), env, f"{adir}/scheduler.log",
                                     None, workdir))
        n_local = max(len(s.chips), 1)
        for local in range(n_local):
            env = dict(base_env)
            hb = f"{adir}/rank-{rank}.heartbeat.jsonl"
            env[C.HEARTBEAT_ENV] = hb
            if last_words:
                env[C.LAST_WORDS_ENV] = f"{adir}/rank-{rank}.last-words"
            if checkpoint_request:
                env[C.CHECKPOINT_REQUEST_ENV] = f"{adir}/rank-{rank}.checkpoint-request"
            if s.chips:
                # CANN renumbers the visible chips from 0: the device id is the index.
                env["ASCEND_RT_VISIBLE_DEVICES"] = visible
                env["DEVICE_ID"] = str(local)
            if world > 1:
                env.update(MS_ROLE="MS_WORKER", MS_SCHED_HOST=str(sched_host),
                           MS_SCHED_PORT=str(sched_port), MS_WORKER_NUM=str(world),
                           MS_NODE_ID=str(rank), RANK_ID=str(rank), RANK_SIZE=str(world),
                           LOCAL_RANK=str(local))
            nl.ranks.append(RankSpec(rank, list(argv), env, f"{adir}/rank-{rank}.log",
                                     hb, workdir))
            rank += 1
        nodes.append(nl)
    return nodes
