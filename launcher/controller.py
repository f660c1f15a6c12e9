"""The fleet controller: a named, detached Ray actor.

Owns the job queue and the device ledger. All durable state lives in the store
(SQLite), holds for restarts in place included; in memory there are only the backend's
handles (launcher/backend.py: placement groups and agents on Ray, launcher/backend_ray.py),
which a restarted controller finds again by name. A tick is

    observe (group statuses, job states, free pool) -> decide (launcher/reconcile.py,
    launcher/policies.py, the scheduler) -> act (store first, then backend)

so a crash between a decision and its action is repaired on restart rather than lost.

Elasticity: a failed attempt re-plans on the devices free *now* (shrink, same global
batch). Growing back: when the planner finds a better plan for a running job and nothing
waits, the ranks are asked to save the next step and exit (grow on request), or the
switch waits for the next periodic checkpoint; RUNNING -> RESIZING -> SCHEDULING.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import admission, integrations, ranks, workloads
from launcher import spec as specmod
from launcher.backend import Backend, GroupStatus, Unplaceable
from launcher.backend_ray import NAMESPACE
from launcher.checkpoints import select_checkpoint
from launcher.lifecycle import HOLDS_DEVICES, TERMINAL, JobState
from launcher.planner import ASCEND_910, FreePool, Plan, Request, Topology
from launcher.policies import (
    Failure,
    FailureKind,
    FailurePolicy,
    ResizeVia,
    RestartPlacementPolicy,
    ScalingPolicy,
    WarmStart,
    Watchdog,
    restart_policy,
)
from launcher.progress import JobProgress
from launcher.ranks import NodeLaunch, attempt_dir, build_launch, default_ckpt_dir
from launcher.reconcile import AttemptView, FailAttempt, Resize, Succeed, decide_running
from launcher.scheduler import PriorityFifo, QueuedJob, schedule
from launcher.store import STATUS_EVENTS, HoldRow, JobRow, QueueRow, Store
from launcher.workflows import TO_RUNNING, WorkflowFailed, WorkflowSucceeded, decide_workflow

log = logging.getLogger("fleet.controller")

CONTROLLER_NAME = "fleet-controller"
# After an agent is lost, Ray may still list its node as alive for a while
# (until heartbeats time out); planning onto it would stall the restart.
SUSPECT_NODE_S = 60.0
PROGRESS_FLUSH_S = 1.0
# Scaling decisions list every Ray node: once a second is quick next to pods that take
# tens of seconds to start, and spares the GCS a query on every 0.25 s tick.
AUTOSCALE_INTERVAL_S = 1.0
# A placement the backend could not bring up is tried again after this (no restart spent).
UNPLACEABLE_RETRY_S = 2.0

S = JobState

LOG_LABEL = re.compile(r"(scheduler|rank-\d{1,6})")
# Where `launcher` and `workloads` are: the ranks' working directory and PYTHONPATH.
CODE_ROOT = Path(__file__).resolve().parents[1]

def pg_name(job_id: str, attempt: int | str) -> str:
    return f"fleet-pg-{job_id}-a{attempt}"


@dataclass
class HeldPlacement:
    """A failed attempt's placement and agents, kept for a restart in place. Durable: the
    store's `holds` row names it, so a restarted controller finds it again (or releases it
    and says so)."""

    job_id: str
    attempt: int  # the attempt that failed
    plan: Plan
    pg_name: str
    pg: Any = None
    agents: list = field(default_factory=list)
    next_port: int | None = None  # the scheduler port its agents' prejoined processes use

    @classmethod
    def from_row(cls, row: HoldRow) -> HeldPlacement:
        return cls(row.job, row.attempt, Plan.from_dict(row.plan), row.pg_name,
                   next_port=row.next_port)


@dataclass
class Runtime:
    """In-memory handles of a job's current attempt."""

    job_id: str
    attempt: int
    plan: Plan
    pg_name: str  # agents are named after it (backend_ray.agent_name)
    pg: Any = None  # the backend's handles: placement and agents
    agents: list = field(default_factory=list)
    launched: bool = False
    # read from the job's spec once per attempt (a spec does not change after submit)
    kind: str = "TrainJob"
    policy: specmod.RestartPolicy = field(default_factory=specmod.RestartPolicy)
    request: Request | None = None
    started: float = field(default_factory=time.time)
    progress: dict = field(default_factory=dict)  # read through summary()
    fold: JobProgress = field(default_factory=JobProgress)
    progress_stale: bool = False  # the fold has records `progress` does not show yet
    progress_dirty: bool = False
    progress_flushed: float = 0.0
    # Grow: set when more devices are free; acted on at the next checkpoint.
    resize_to: int | None = None
    resize_after: float = 0.0
    resize_via: ResizeVia | None = None
    checkpoint_ready_at: float | None = None  # an ok checkpoint after resize_after
    last_words: set[str] = field(default_factory=set)  # ranks that saved as it failed
    # MindSpore scheduler ports: this attempt's when fixed in advance (a restart in place
    # onto prejoined processes), and the one fixed for the attempt after it
    sched_port: int | None = None
    next_port: int | None = None

    def summary(self) -> dict:
        """The attempt's progress as `fleet status` and the store show it. Summarised on
        demand: the fold takes every rank's every line, a summary is only read per flush."""
        if self.progress_stale:
            self.progress.update(self.fold.summary())
            self.progress_stale = False
        return self.progress


class JobQueries:
    """Read-only queries over the store; shared by the controller and the offline
    CLI view (`fleet status` works from the store when no cluster is up)."""

    store: Store
    home: Path
    runtimes: dict[str, Runtime]

    def status(self, job_id: str) -> dict[str, Any] | None:
        job = self.store.get_job(job_id)
        if job is None:
            return None
        d = job.to_dict()
        d.pop("spec", None)
        d["attempts"] = [a.to_dict() for a in self.store.attempts(job_id)]
        d["events"] = self.store.events(job_id, limit=STATUS_EVENTS)
        if job.kind == "Workflow":
            d["steps"] = [self.status(c.id) for c in self.store.jobs(parent=job_id)]
        rt = self.runtimes.get(job_id)
        if rt is not None and rt.summary():
            d["progress"] = dict(rt.summary())
        return d

    def list_jobs(self, include_done: bool = True) -> list[dict[str, Any]]:
        """Top-level jobs; a Workflow's row carries its step jobs' rows under "steps"."""
        out = []
        for j in self.store.jobs(top_level=True):
            if not include_done and j.state in TERMINAL:
                continue
            d = self._list_row(j)
            if j.kind == "Workflow":
                d["steps"] = [self._list_row(c) for c in self.store.jobs(parent=j.id)]
            out.append(d)
        return out

    def _list_row(self, j: JobRow) -> dict[str, Any]:
        d = j.to_dict()
        d.pop("spec", None)
        rt = self.runtimes.get(j.id)
        if rt is not None and rt.summary():
            d["progress"] = dict(rt.summary())
        att = self.store.open_attempt(j.id) or next(
            iter(reversed(self.store.attempts(j.id))), None)
        d["devices"] = att.plan.get("devices") if att else None
        return d

    def read_log(self, job_id: str, label: str = "rank-0", offset: int = 0,
                 attempt: int | None = None) -> dict[str, Any]:
        from launcher.agent import read_file_chunk

        # the label becomes a file name: only the names ranks' logs have
        if not isinstance(label, str) or not LOG_LABEL.fullmatch(label):
            return {"data": "", "offset": 0, "attempt": None,
                    "error": f"no log {str(label)[:40]!r}: use 'scheduler' or 'rank-N'"}
        if not isinstance(offset, int) or offset < 0:
            return {"data": "", "offset": 0, "attempt": None,
                    "error": f"offset must be a whole number >= 0, got {offset!r}"}
        atts = self.store.attempts(job_id)
        if not atts:
            return {"data": "", "offset": offset, "missing": True, "attempt": None}
        att = next((a for a in atts if a.n == attempt), atts[-1]) if attempt else atts[-1]
        path = attempt_dir(self.home, job_id, att.n) / f"{label}.log"
        if path.exists():
            out = read_file_chunk(str(path), offset)
        else:
            # Ranks on another machine without a shared volume: ask their agent.
            out = {"data": "", "offset": offset, "missing": True}
            rt = self.runtimes.get(job_id)
            backend = getattr(self, "backend", None)
            if rt is not None and rt.attempt == att.n and backend is not None:
                out = backend.read_log(rt, label, offset) or out
        out["attempt"] = att.n
        return out


class OfflineView(JobQueries):
    def __init__(self, home: str | Path):
        self.home = Path(home)
        self.store = Store(self.home / "fleet.db")
        self.runtimes = {}


class Controller(JobQueries):
    """Plain class; `actor_class()` wraps it as a Ray actor."""

    def __init__(self, home: str, poll_interval: float = 0.25, backfill: bool = False,
                 start_loop: bool = True, backend: Backend | None = None,
                 clock: Callable[[], float] = time.time, inline_starts: bool = False):
        """backend: where ranks run (default: the Ray cluster this process is in).
        inline_starts: start attempts on the loop's thread instead of one thread each
        (a backend whose calls return at once, as the in-memory fake's)."""
        if backend is None:
            import ray  # noqa: F401 - fail early if Ray is missing

            from launcher.backend_ray import RayBackend
            backend = RayBackend()
        self.backend = backend
        self.clock = clock
        self.inline_starts = inline_starts
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.home / "fleet.db")
        self.poll_interval = poll_interval
        self.policy = PriorityFifo(backfill=backfill)
        self.runtimes: dict[str, Runtime] = {}
        self.suspect_nodes: dict[str, float] = {}  # node id -> until when to avoid it
        self._wait_msgs: dict[str, str] = {}
        # job -> failure_streak(); in memory: a restarted controller starts from the base delay
        self._failure_streaks: dict[str, int] = {}
        self.restart_placement = RestartPlacementPolicy()
        self.failure_policy = FailurePolicy(self.restart_placement)
        self.watchdog = Watchdog()
        self.scaling = ScalingPolicy()
        # RESTARTING jobs that keep their devices: the handles of the store's `holds` rows
        self._held: dict[str, HeldPlacement] = {}
        self._plan_inputs: dict[str, tuple[Request | None, Topology]] = {}  # _planning_inputs
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ticks = 0
        self._last_error = ""
        self.started = self.clock()
        self.k8s, k8s_error = integrations.start_k8s()
        self.scaler, scaler_error = integrations.start_scaler(self.k8s)
        self.k8s_error = k8s_error or scaler_error
        self._known_nodes: frozenset[str] = frozenset()
        self._autoscaled_at = 0.0
        self._recover()
        self.exporter = integrations.start_metrics(self.home, self._metric_jobs, self.cluster,
                                                   self.store)
        self._thread = None
        if start_loop:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="fleet-loop")
            self._thread.start()

    def _metric_jobs(self) -> list[dict[str, Any]]:
        # Workflow steps included: their ranks are the ones writing heartbeats.
        return [{"id": j.id, "state": str(j.state), "created": j.created,
                 "restarts": j.restarts} for j in self.store.jobs() if j.kind != "Workflow"]

    # ================================================================ API
    def ping(self) -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid(), "home": str(self.home),
                "started": self.started, "ticks": self._ticks, "error": self._last_error,
                "metrics": self._metrics_url()}

    def _metrics_url(self) -> str | None:
        server = getattr(self.exporter, "_server", None)
        if server is None:
            return None
        host, port = server.server_address[:2]
        return f"http://{host}:{port}/metrics"

    def submit(self, doc: dict, paths: dict) -> dict[str, Any]:
        """Store a validated spec; returns its id (and step ids for a workflow).

        `paths` gives only where the spec file was (`base`, its directory, and `workdir`,
        its project): the controller resolves the spec's paths itself, inside the
        configured roots, and the ranks run from the launcher's own code directory."""
        job = specmod.parse_doc(doc, "<submitted>")  # never trust the client's validation
        name = job.metadata.name
        resolved = admission.resolve_paths(job, paths)
        level = paths.get(ranks.MINDSPORE_LOG_LEVEL_KEY) if isinstance(paths, dict) else None
        if level is not None:
            # stored with each step, so restarts keep the level the submitting shell asked for
            level = ranks.mindspore_log_level(str(level))
            for step_paths in resolved.values():
                step_paths[ranks.MINDSPORE_LOG_LEVEL_KEY] = level
        paths = {"workdir": str(CODE_ROOT), "steps": resolved}
        with self.lock:
            admission.check_queue_room(self.store, job)
            admission.check_checkpoint_dirs(self.store, self.home, job, resolved)
            if isinstance(job, specmod.Workflow):
                parent = self.store.add_job(name, "Workflow", doc, {"workdir":
                                            paths.get("workdir")}, job.spec.priority)
                steps = {}
                for i, step in enumerate(job.spec.steps):
                    sp = step.spec.model_dump(by_alias=True, mode="json")
                    ctx = dict(paths.get("steps", {}).get(step.name, {}))
                    ctx.update(workdir=paths.get("workdir"), needs=list(step.needs),
                               order=i)
                    prio = job.spec.priority
                    row = self.store.add_job(f"{name}-{step.name}", step.kind, sp, ctx, prio,
                                             parent=parent.id, step=step.name)
                    steps[step.name] = row.id
                out = {"id": parent.id, "kind": "Workflow", "steps": steps}
            else:
                sp = job.spec.model_dump(by_alias=True, mode="json")
                ctx = dict(paths.get("steps", {}).get(name, {}))
                ctx["workdir"] = paths.get("workdir")
                row = self.store.add_job(name, job.kind, sp, ctx, job.spec.priority)
                out = {"id": row.id, "kind": job.kind}
        self._wake.set()
        return out

    def cluster(self) -> dict[str, Any]:
        nodes = self._cluster_nodes()
        pool = self._pool(nodes)
        total = sum(len(c) for c in nodes.values())
        out = {"nodes": len(nodes), "devices": total, "free": pool.total_free(),
               "whole_free_nodes": pool.whole_nodes(),
               "queued": self.store.count({S.PENDING, S.RESTARTING})}
        if self.k8s is not None:
            try:
                out["kubernetes"] = self.k8s.status()
            except Exception as e:  # noqa: BLE001
                out["kubernetes"] = {"error": str(e)}
            if self.scaler is not None:
                out["kubernetes"]["scaling"] = self.scaler.status()
        if self.k8s_error:
            out.setdefault("kubernetes", {})["setup_error"] = self.k8s_error
        return out

    def cancel(self, job_id: str, reason: str = "cancelled by user") -> dict[str, Any]:
        job = self.store.get_job(job_id)
        if job is None:
            return {"error": f"no job {job_id}"}
        if job.state in TERMINAL:
            return {"id": job_id, "state": str(job.state), "already": True}
        with self.lock:
            if job.kind == "Workflow":
                for c in self.store.jobs(parent=job_id):
                    if c.state not in TERMINAL:
                        self._cancel_one(c.id, reason)
            self._cancel_one(job_id, reason)
        self._wake.set()
        return {"id": job_id, "state": str(self.store.get_job(job_id).state)}

    def shutdown(self) -> None:
        self._stop.set()

    # ================================================================ decisions
    @contextlib.contextmanager
    def _deciding(self, job_id: str, what: str):
        """Run one job's decision; if it raises, the job ends FAILED with the reason
        recorded rather than being left half-changed (a RUNNING job with no runtime was
        never looked at again). Other jobs' decisions go on."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - any bug in a decision must not strand a job
            log.exception("job %s: controller error while %s", job_id, what)
            self._fail_after_error(job_id, f"controller error while {what}: "
                                           f"{type(e).__name__}: {e}")

    def _fail_after_error(self, job_id: str, reason: str) -> None:
        with self.lock:
            try:
                rt = self.runtimes.pop(job_id, None)
                self._failure_streaks.pop(job_id, None)
                with contextlib.suppress(Exception):
                    self._release_held(job_id)
                if rt is not None:
                    with contextlib.suppress(Exception):
                        self._teardown(rt, failed=True)
                att = self.store.open_attempt(job_id)
                if att is not None:
                    self.store.end_attempt(job_id, att.n, "error", reason)
                job = self.store.get_job(job_id)
                if job is not None and job.kind == "Workflow":
                    for c in self.store.jobs(parent=job_id):
                        if c.state not in TERMINAL:
                            self._cancel_one(c.id, f"workflow failed: {reason}")
                if job is not None and job.state not in TERMINAL:
                    self.store.set_state(job_id, S.FAILED, reason)
                self.store.add_event(job_id, "controller_error", {"error": reason})
            except Exception:  # noqa: BLE001 - the store itself failing: the tick reports it
                log.exception("job %s: could not record the controller error", job_id)
                raise

    # ================================================================ loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
                self._last_error = ""
            except Exception as e:  # keep the control loop alive; surface in ping()
                self._last_error = f"{type(e).__name__}: {e}"
                log.exception("controller tick failed")
            self._ticks += 1
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    def _tick(self) -> None:
        self._poll_running()
        self._advance_workflows()
        self._schedule()
        self._consider_growth()
        self._autoscale()

    # ---------------------------------------------------------------- cluster
    def _cluster_nodes(self) -> dict[str, list[int]]:
        out = {}
        now = self.clock()
        draining = self.scaler.draining if self.scaler is not None else {}
        for n in self.backend.nodes():
            if not n.alive:
                if n.id in draining:
                    self.scaler.forget_node(n.id)
                continue
            if self.suspect_nodes.get(n.id, 0) > now or n.id in draining:
                continue
            if n.devices > 0:
                out[n.id] = list(range(n.devices))
        if self.k8s is not None and frozenset(out) != self._known_nodes:
            # Map nodes to pods while they are alive: after a loss the pod may be gone.
            try:
                self.k8s.remember_nodes(self.backend.raw_nodes())
                self._known_nodes = frozenset(out)
            except Exception as e:  # noqa: BLE001
                log.warning("kubernetes node mapping failed: %s", e)
        return out

    def _topology(self, nodes: dict[str, list[int]]) -> Topology:
        sizes = {len(c) for c in nodes.values()}
        if not sizes or sizes == {8}:
            return ASCEND_910
        n = max(sizes)
        return Topology(n, 4 if n % 4 == 0 else n)

    def _pool(self, nodes: dict[str, list[int]]) -> FreePool:
        """The free devices: every node's, less the open attempts' and the held ones."""
        pool = FreePool.from_free(nodes, self._topology(nodes))
        holding = [Plan.from_dict(p) for p in self.store.open_plans(set(HOLDS_DEVICES))]
        holding += [Plan.from_dict(h.plan) for h in self.store.holds()]
        for plan in holding:
            for s in plan.slices:
                if s.chips and s.node in nodes:
                    with contextlib.suppress(ValueError):
                        pool.take([s])
        return pool

    # ---------------------------------------------------------------- schedule
    def _queued(self) -> list[QueuedJob]:
        out = []
        done_steps: dict[str, dict[str, JobState]] = {}
        rows = self.store.queue_rows({S.PENDING, S.RESTARTING, S.RESIZING})
        waiting = {j.id for j in rows}
        for gone in [k for k in self._plan_inputs if k not in waiting]:
            del self._plan_inputs[gone]
        for j in rows:
            if j.id in self.runtimes or j.id in self._held:
                continue
            if j.parent:
                sib = done_steps.get(j.parent)
                if sib is None:
                    sib = {c.step: c.state for c in self.store.jobs(parent=j.parent)}
                    done_steps[j.parent] = sib
                if any(sib.get(n) != S.SUCCEEDED for n in j.needs):
                    continue  # waits for the steps it needs
            try:
                request, topology = self._planning_inputs(j)
            except Exception as e:  # noqa: BLE001 - a stored spec this code cannot read
                self._fail_after_error(j.id, f"controller error while reading the stored "
                                             f"spec: {type(e).__name__}: {e}")
                continue
            out.append(QueuedJob(j.id, j.priority, j.seq, request, topology, j.not_before))
        return out

    def _planning_inputs(self, j: QueueRow) -> tuple[Request | None, Topology]:
        """A job's request and topology, read from its spec once: a spec does not change
        after submit, and validating it again on every tick cost more than the tick."""
        got = self._plan_inputs.get(j.id)
        if got is None:
            row = self.store.get_job(j.id)
            got = (self._request(row), self._job_topology(row))
            self._plan_inputs[j.id] = got
        return got

    @staticmethod
    def _request(j: JobRow) -> Request | None:
        if j.kind == "ExportJob":
            return None
        if j.kind == "ValidateJob":
            return Request(1, 1, 1, 1)
        res = specmod.Resources.model_validate(j.spec.get("resources") or {})
        lo, hi = res.device_range()
        b = j.spec["batch"]
        return Request(lo, hi, int(b["global"]), int(b["microBatchMax"]))

    @staticmethod
    def _standby(job: JobRow) -> bool:
        """Whether a restart in place may start from processes that imported ahead."""
        return RestartPlacementPolicy.warm_start(job.kind, job.spec) != WarmStart.COLD

    @classmethod
    def _prejoin(cls, job: JobRow) -> bool:
        """...and that also joined the cluster and compiled ahead (workloads/volo/prejoin.py)."""
        return RestartPlacementPolicy.warm_start(job.kind, job.spec) == WarmStart.PREJOIN

    @staticmethod
    def _job_topology(j: JobRow) -> Topology:
        res = specmod.Resources.model_validate(j.spec.get("resources") or {})
        return res.topology()

    def _restart_held(self) -> None:
        """Restart in place the jobs whose backoff is over; a placement on a node that is
        gone (or suspect) is released and the job planned like any other."""
        if not self._held:
            return
        now = self.clock()
        with self.lock:
            nodes = self._cluster_nodes()
            for job_id, held in list(self._held.items()):
                job = self.store.get_job(job_id)
                if job is None or job.state != S.RESTARTING:
                    self._release_held(job_id, "the job is no longer restarting")
                    continue
                if job.not_before > now:
                    continue
                if any(s.node not in nodes for s in held.plan.slices if s.chips):
                    self._release_held(job_id, "a node of the held placement is gone")
                    continue
                del self._held[job_id]
                self.store.drop_hold(job_id, "restarting in place")
                with self._deciding(job_id, "restarting in place"):
                    self._begin_attempt(job_id, held.plan, held)

    def _release_held(self, job_id: str, why: str) -> None:
        held = self._held.pop(job_id, None)
        if held is not None:
            self.store.drop_hold(job_id, f"released: {why}")
            self._teardown(held)

    def _schedule(self) -> None:
        self._restart_held()
        with self.lock:
            queue = self._queued()
            if not queue:
                return
            nodes = self._cluster_nodes()
            pool = self._pool(nodes)
            now = self.clock()
            free, total = pool.total_free(), sum(len(c) for c in nodes.values())
            decisions = schedule(queue, pool, now, self.policy)
            for qj, plan in decisions:
                with self._deciding(qj.id, "starting an attempt"):
                    self._begin_attempt(qj.id, plan)
            placed = {qj.id for qj, _ in decisions}
            for qj in queue:
                if qj.id not in placed and qj.not_before <= now:
                    self._explain_wait(qj, free, total)

    def _explain_wait(self, qj: QueuedJob, free: int, total: int) -> None:
        """Say why a job waits (shown by `fleet status`/`list`); written only on change."""
        need = qj.request.min_devices if qj.request else 0
        if need > total:
            msg = (f"waiting: needs at least {need} devices, the cluster has {total} "
                   "(add nodes or lower resources.devices.min)")
        else:
            msg = f"waiting for devices: needs {need}, {free} of {total} free"
        if self.scaler is not None:
            msg += self.scaler.note()
        if self._wait_msgs.get(qj.id) != msg:
            self._wait_msgs[qj.id] = msg
            self.store.update_job(qj.id, message=msg)

    def _begin_attempt(self, job_id: str, plan: Plan,
                       held: HeldPlacement | None = None) -> None:
        job = self.store.get_job(job_id)
        if job.kind in ("ValidateJob", "ExportJob") and job.parent:
            err = self._resolve_step_checkpoint(job)
            if err:
                self.store.set_state(job_id, S.FAILED, err)
                return
            job = self.store.get_job(job_id)
        where = "in place, on the same devices" if held else f"on {len(plan.slices)} node(s)"
        placement = held.pg_name if held else pg_name(job_id, "{n}")
        # the placement is recorded with the attempt, before the backend is asked for it
        placing = () if held else (("placement_group", {
            "name": placement, "bundles": self._bundles(job, plan)}),)
        att = self.store.begin_attempt(job_id, plan.to_dict(), placement, S.SCHEDULING,
                                       f"attempt {{n}}: {plan.devices} devices {where}",
                                       placing)
        rt = self._runtime(job, att.n, plan, att.pg_name)
        if held is not None:
            rt.pg, rt.agents, rt.sched_port = held.pg, held.agents, held.next_port
        self.runtimes[job_id] = rt
        if job.parent:
            self._parent_running(job.parent)
        if self.inline_starts:
            self._start_attempt(job, rt, held is not None)
        else:
            threading.Thread(target=self._start_attempt, args=(job, rt, held is not None),
                             daemon=True, name=f"start-{job_id}").start()

    def _runtime(self, job: JobRow, attempt: int, plan: Plan, placement: str) -> Runtime:
        return Runtime(job.id, attempt, plan, placement, started=self.clock(), kind=job.kind,
                       policy=restart_policy(job.spec.get("restart")),
                       request=self._request(job))

    def _resolve_step_checkpoint(self, job: JobRow) -> str | None:
        ref = job.spec.get("checkpoint") or {}
        if not ref.get("fromStep"):
            return None
        src = next((c for c in self.store.jobs(parent=job.parent)
                    if c.step == ref["fromStep"]), None)
        if src is None:
            return f"step {ref['fromStep']!r} not found"
        ckpt_dir = src.paths.get("ckpt_dir") or str(default_ckpt_dir(self.home, src.id))
        chosen = select_checkpoint(ckpt_dir, ref.get("select", "best"),
                                   workloads.of_spec(src.spec).name)
        if chosen is None:
            return f"no valid checkpoint in {ckpt_dir} (from step {ref['fromStep']!r})"
        paths = dict(job.paths, ckpt_path=str(chosen))
        self.store.update_job(job.id, paths=paths)
        return None

    def _bundles(self, job: JobRow, plan: Plan) -> list[dict[str, float]]:
        cpd = specmod.Resources.model_validate(job.spec.get("resources") or {}).cpusPerDevice
        out = []
        for s in plan.slices:
            b: dict[str, float] = {"CPU": max(0.1, cpd * len(s.chips)) if s.chips else 0.5}
            if s.chips:
                b["NPU"] = float(len(s.chips))
            out.append(b)
        return out

    def _place(self, job: JobRow, rt: Runtime) -> None:
        """The attempt's placement (one bundle per plan slice) and one agent per bundle.
        Standbys serve restarts in place of a training job only; where the ranks can hold
        after joining, prejoined processes replace them."""
        bundles = self._bundles(job, rt.plan)
        warm = RestartPlacementPolicy.warm_start(job.kind, job.spec)
        self.backend.place(rt, bundles, standby=warm == WarmStart.STANDBY)

    def _launches(self, job: JobRow, rt: Runtime,
                  infos: list[dict]) -> tuple[list[NodeLaunch], list[list[dict]]]:
        """Each agent's ranks for this attempt, and (VOLO training) for the attempt that
        would restart it in place, which the agents start and join ahead of time
        (launcher/prejoin.py). A restart in place onto such processes reuses the scheduler
        port fixed for them, if every agent still holds them."""
        # The scheduler runs on the first agent's node and binds its Ray node address.
        sched_host = infos[0]["ip"]
        ports = self.backend.free_ports(rt, 2, sched_host)

        def launch(attempt: int, port: int) -> list[NodeLaunch]:
            return build_launch(job_id=job.id, attempt=attempt, kind=job.kind, spec=job.spec,
                                paths=job.paths, plan=rt.plan, home=self.home,
                                sched_host=sched_host, sched_port=port)

        port = rt.sched_port or ports[0]
        launches = launch(rt.attempt, port)
        if rt.sched_port and not all(self.backend.prejoined_for(
                rt, [[r.to_dict() for r in nl.ranks] for nl in launches])):
            # a held process is gone or differs: all start cold, with a scheduler of their own
            port = next(p for p in ports if p != rt.sched_port)
            launches = launch(rt.attempt, port)
        if not self._prejoin(job):
            return launches, [[] for _ in rt.agents]
        rt.next_port = next(p for p in ports if p != port)
        nexts = [[r.to_dict() for r in nl.ranks] for nl in launch(rt.attempt + 1, rt.next_port)]
        return launches, nexts

    def _start_attempt(self, job: JobRow, rt: Runtime, in_place: bool = False) -> None:
        """Placement -> agents -> ranks (in place: the placement and agents of the last
        attempt -> ranks). Runs on its own thread unless `inline_starts`."""
        try:
            if not in_place:
                self._place(job, rt)
            infos = self.backend.agent_infos(rt)
            launches, nexts = self._launches(job, rt, infos)
            with self.lock:
                if self.store.state(job.id) != S.SCHEDULING or \
                        self.runtimes.get(job.id) is not rt:
                    raise _Aborted()
            res = self.backend.start(rt, [[r.to_dict() for r in nl.ranks] for nl in launches],
                                     rt.attempt, nexts)
            bad = [r for r in res if r.get("status") == "failed"]
            if bad:
                raise RuntimeError(bad[0].get("reason", "rank start failed"))
            from_standby = sorted(lb for r in res for lb in r.get("from_standby", []))
            prejoined = sorted(lb for r in res for lb in r.get("prejoined", []))
            with self.lock:
                if self.store.state(job.id) != S.SCHEDULING or \
                        self.runtimes.get(job.id) is not rt:
                    raise _Aborted()
                rt.launched = True
                rt.started = self.clock()
                self.store.set_state(job.id, S.RUNNING, f"attempt {rt.attempt} running",
                                     events=(("launched", {
                                         "attempt": rt.attempt, "agents": infos,
                                         "in_place": in_place, "from_standby": from_standby,
                                         "prejoined": prejoined,
                                         "ranks": sum(len(nl.ranks) for nl in launches)}),))
        except _Aborted:
            self._teardown(rt)
        except Unplaceable as e:
            self._requeue_unplaceable(job.id, rt, str(e))
        except Exception as e:
            log.warning("job %s attempt %s failed to start: %s", job.id, rt.attempt, e)
            with self.lock, self._deciding(job.id, "handling a failed start"):
                if self.runtimes.get(job.id) is rt:
                    self._attempt_failed(job.id, rt, Failure(
                        FailureKind.START, f"start failed: {type(e).__name__}: {e}"))
                else:
                    self._teardown(rt)
        self._wake.set()

    def _requeue_unplaceable(self, job_id: str, rt: Runtime, why: str) -> None:
        """The backend could not place what the ledger thought free (a node going away):
        requeue without spending a restart."""
        with self.lock:
            if self.runtimes.get(job_id) is not rt:
                self._teardown(rt)
                return
            self.runtimes.pop(job_id, None)
            self._teardown(rt)
            self.store.end_attempt(job_id, rt.attempt, "unplaceable", why)
            cur = self.store.get_job(job_id)
            if cur.state == S.SCHEDULING:
                back = S.RESTARTING if cur.restarts else S.PENDING
                self.store.set_state(job_id, back, f"requeued: {why}",
                                     not_before=self.clock() + UNPLACEABLE_RETRY_S)

    # ---------------------------------------------------------------- monitor
    def _poll_running(self) -> None:
        """Observe every launched attempt's group, then decide and act job by job."""
        observed = [(job_id, rt, self.backend.poll(rt))
                    for job_id, rt in list(self.runtimes.items()) if rt.launched]
        if not observed:
            return
        states = self.store.states(set(HOLDS_DEVICES))
        with self.lock:
            for job_id, rt, status in observed:
                if status.lost() is None:
                    with self._deciding(job_id, "folding its heartbeats"):
                        for a in status.answered():
                            self._absorb(rt, a.as_poll())
            self._flush_progress_all([rt for _, rt, _ in observed])
        for job_id, rt, status in observed:
            with self.lock, self._deciding(job_id, "acting on its ranks' state"):
                self._decide_running(job_id, rt, status, states.get(job_id))

    def _decide_running(self, job_id: str, rt: Runtime, status: GroupStatus,
                        state: JobState | None) -> None:
        """One running job: fold its progress, decide, act (under the lock)."""
        if self.runtimes.get(job_id) is not rt or state is None:
            return
        lost = status.lost()
        action = decide_running(self._attempt_view(rt, state), status, self.watchdog)
        if isinstance(action, FailAttempt):
            failure = action.failure
            if failure.kind == FailureKind.LOST:
                failure = self._lost_failure(rt, lost[0], failure)
            elif failure.kind == FailureKind.EXIT:
                self._note_last_words(job_id, rt, [a.as_poll() for a in status.answered()])
            self._attempt_failed(job_id, rt, failure)
        elif isinstance(action, Succeed):
            self._attempt_succeeded(job_id, rt, action.result)
        elif isinstance(action, Resize):
            self._resize(job_id, rt, action.on_request)

    def _attempt_view(self, rt: Runtime, state: JobState) -> AttemptView:
        return AttemptView(rt.kind, state, rt.policy, rt.plan.devices, rt.started,
                           rt.fold.last_heartbeat,
                           rt.resize_via, rt.checkpoint_ready_at, self.clock())

    def _lost_failure(self, rt: Runtime, index: int, failure: Failure) -> Failure:
        """Name the lost agent's node, avoid it a while, and say why Kubernetes lost it."""
        if index >= len(rt.plan.slices):
            return failure
        node = rt.plan.slices[index].node
        self.suspect_nodes[node] = self.clock() + SUSPECT_NODE_S
        return Failure(failure.kind, f"{failure.reason} on node {node[:12]}"
                                     f"{integrations.node_failure_reason(self.k8s, node)}")

    @staticmethod
    def _hung(job: Any, rt: Runtime, now: float | None = None) -> str | None:
        """Why the attempt counts as hung, or None (policies.Watchdog)."""
        hung = Watchdog().decide(restart_policy(job.spec.get("restart")), rt.plan.devices,
                                 rt.started, rt.fold.last_heartbeat,
                                 time.time() if now is None else now)
        return None if hung is None else hung.reason

    def _absorb(self, rt: Runtime, r: dict) -> None:
        """Fold an agent's new heartbeat records into the attempt's progress (launcher/progress.py,
        the fold /metrics uses too) and take what the decisions need from it."""
        records = r.get("events") or []
        if not records:
            return
        fold = rt.fold
        for ev in records:
            fold.apply_record(ev)
        rt.progress_stale = rt.progress_dirty = True
        ck = fold.last_checkpoint_ok
        if ck is not None and rt.resize_to and ck.ts >= rt.resize_after \
                and rt.checkpoint_ready_at is None:
            rt.checkpoint_ready_at = self.clock()

    def _flush_progress_all(self, rts: list[Runtime]) -> None:
        """The progress of every attempt due a flush, in one store write."""
        now = self.clock()
        due = [rt for rt in rts if rt.progress_dirty and
               now - rt.progress_flushed > PROGRESS_FLUSH_S]
        self.store.update_progress({rt.job_id: rt.summary() for rt in due})
        for rt in due:
            rt.progress_dirty, rt.progress_flushed = False, now

    def _flush_progress(self, rt: Runtime, force: bool = False) -> None:
        now = self.clock()
        if rt.progress_dirty and (force or now - rt.progress_flushed > PROGRESS_FLUSH_S):
            self.store.update_job(rt.job_id, progress=rt.summary())
            rt.progress_dirty = False
            rt.progress_flushed = now

    # ---------------------------------------------------------------- outcomes
    def _attempt_succeeded(self, job_id: str, rt: Runtime, result: dict | None) -> None:
        self._flush_progress(rt, force=True)
        self.runtimes.pop(job_id, None)
        self._teardown(rt)
        self.store.end_attempt(job_id, rt.attempt, "succeeded")
        self._failure_streaks.pop(job_id, None)
        fields = {"result": result} if result else {}
        msg = "finished"
        if result and "top1" in result:
            msg = f"finished: top1={result['top1']}"
        self.store.set_state(job_id, S.SUCCEEDED, msg, **fields)
        self._wake.set()

    def _attempt_failed(self, job_id: str, rt: Runtime, failure: Failure) -> None:
        """Decide retry or fail (policies.FailurePolicy), keep the placement when the
        decision says in place and the backend can hold it, then record the outcome."""
        self._flush_progress(rt, force=True)
        self.runtimes.pop(job_id, None)
        job = self.store.get_job(job_id)
        policy = restart_policy(job.spec.get("restart"))
        d = self.failure_policy.decide(failure, policy, job.restarts,
                                       self._failure_streaks.get(job_id, 0), rt.summary(),
                                       cancelled=job.state in TERMINAL)
        held = d.in_place and self._hold(rt)
        if not held:
            self._teardown(rt, failed=True)
        self.store.end_attempt(job_id, rt.attempt, "failed", failure.reason)
        job = self.store.get_job(job_id)
        if job.state in TERMINAL:
            self._release_held(job_id, f"the job is {job.state}")
            return
        self._failure_streaks[job_id] = d.streak
        if d.retry:
            self.store.set_state(job_id, S.RESTARTING,
                                 d.message(rt.attempt, failure.reason, held),
                                 restarts=d.restart, not_before=self.clock() + d.delay)
        else:
            self._failure_streaks.pop(job_id, None)
            history = "; ".join(f"#{a.n} {a.status}: {a.reason}"
                                for a in self.store.attempts(job_id))
            why = "" if d.retryable else " (not retryable: configuration or recipe error)"
            self.store.set_state(job_id, S.FAILED,
                                 f"failed after {job.restarts} restart(s){why}: "
                                 f"{failure.reason} [attempts: {history}]")
        self._wake.set()

    def _consider_growth(self) -> None:
        """Grow a running elastic job when more devices are free and nobody waits
        (policies.ScalingPolicy). The ranks are asked to save the next step and exit
        (grow on request); where the backend cannot pass that on, the switch happens at
        the job's next periodic checkpoint. Either way no step is lost."""
        with self.lock:
            candidates = [rt for rt in self.runtimes.values()
                          if rt.launched and rt.resize_to is None]
            if not candidates:
                return
            waits = bool(self._queued())
            if waits:
                return
            candidates = [rt for rt in candidates if rt.kind == "TrainJob" and
                          rt.request is not None and rt.plan.devices < rt.request.max_devices]
            if not candidates:
                return
            states = self.store.states({S.RUNNING})
            nodes = self._cluster_nodes()
            for rt in candidates:
                job = self.store.get_job(rt.job_id) if rt.job_id in states else None
                if job is None:
                    continue
                req = rt.request
                pool = self._pool(nodes)
                pool.give([s for s in rt.plan.slices if s.chips])  # its own chips count
                better = pool.plan(req, req.candidates(self._job_topology(job)))
                grow = self.scaling.decide(rt.plan.devices, req.max_devices,
                                           better.devices if better else None, waits)
                if grow is None:
                    continue
                rt.resize_to, rt.resize_after = grow.to_devices, self.clock()
                asked = grow.via == ResizeVia.REQUEST and self.backend.request_checkpoint(rt)
                rt.resize_via = ResizeVia.REQUEST if asked else ResizeVia.PERIODIC
                self.store.add_event(job.id, "grow_wanted", {
                    "from": grow.from_devices, "to": grow.to_devices,
                    "note": "asked the ranks for a checkpoint at the next step" if asked
                    else "waiting for the next periodic checkpoint"})
                if grow.via == ResizeVia.REQUEST and not asked:
                    self.store.add_event(job.id, "checkpoint_request_unsupported", {
                        "note": "the ranks cannot be asked to save; the grow waits for the "
                                "next periodic checkpoint"})

    def _wanted_devices(self) -> int:
        """Devices the queue needs to start (each job's minimum) or, when nothing
        waits, that running elastic jobs could still grow into."""
        queue = [qj for qj in self._queued() if qj.request is not None]
        if queue:
            return sum(qj.request.min_devices for qj in queue)
        growth = 0
        for rt in self.runtimes.values():
            job = self.store.get_job(rt.job_id)
            if (not rt.launched or rt.resize_to is not None or job is None
                    or job.kind != "TrainJob" or job.state != S.RUNNING):
                continue
            req = self._request(job)
            if req is not None:
                growth += max(0, req.max_devices - rt.plan.devices)
        return growth

    def _autoscale(self) -> None:
        """Ask Kubernetes for servers the jobs want; give back idle ones."""
        now = self.clock()
        if self.scaler is None or now - self._autoscaled_at < AUTOSCALE_INTERVAL_S:
            return
        self._autoscaled_at = now
        with self.lock:
            nodes = self._cluster_nodes()
            pool = self._pool(nodes)
            busy = {n for n, chips in nodes.items() if len(pool.free_chips(n)) < len(chips)}
            events = self.scaler.step({n: len(c) for n, c in nodes.items()}, busy,
                                      self._wanted_devices(), pool.total_free())
            for kind, data in events:
                log.info("kubernetes: %s %s", kind, data)
                self.store.add_event("controller", kind, data)

    def _resize(self, job_id: str, rt: Runtime, on_request: bool = False) -> None:
        self._flush_progress(rt, force=True)
        self.runtimes.pop(job_id, None)
        step = rt.summary().get("checkpoint_step")
        how = "saved on request" if on_request else "the periodic checkpoint"
        # the step stays the reason's last word: the fault suite reads it from there
        why = (f"growing from {rt.plan.devices} to {rt.resize_to} devices ({how}) at "
               f"checkpoint step {step}")
        self.store.set_state(job_id, S.RESIZING, why)
        self._teardown(rt)
        self.store.end_attempt(job_id, rt.attempt, "resized", why)
        self._wake.set()

    def _cancel_one(self, job_id: str, reason: str) -> None:
        job = self.store.get_job(job_id)
        if job is None or job.state in TERMINAL:
            return
        rt = self.runtimes.pop(job_id, None)
        self._failure_streaks.pop(job_id, None)
        self._release_held(job_id, reason)
        if rt is not None:
            self._teardown(rt)
            self.store.end_attempt(job_id, rt.attempt, "cancelled", reason)
        self.store.set_state(job_id, S.CANCELLED, reason)

    def _hold(self, rt: Runtime) -> bool:
        """Stop the ranks but keep the placement, agents and standbys for a restart in
        place; False (nothing kept) when an agent does not answer. The hold is written to
        the store before the backend is asked, so a controller that dies in between finds
        the row on restart and reattaches or releases the placement."""
        if rt.pg is None or not rt.agents:
            return False
        self.store.put_hold(rt.job_id, rt.attempt, rt.pg_name, rt.plan.to_dict(),
                            rt.next_port)
        stopped = self.backend.hold(rt)
        if stopped is None:
            self.store.drop_hold(rt.job_id, "an agent did not answer the hold")
            return False
        self._note_last_words(rt.job_id, rt, stopped)
        self._held[rt.job_id] = HeldPlacement(rt.job_id, rt.attempt, rt.plan, rt.pg_name,
                                              rt.pg, rt.agents, rt.next_port)
        return True

    def _note_last_words(self, job_id: str, rt: Runtime, results: list[dict | None]) -> None:
        """An event per rank that saved the last completed step as the attempt failed
        (`fleet status` shows it; the next attempt resumes from that step)."""
        for r in results:
            if r and r.get("last_words") and r["last_words"] not in rt.last_words:
                rt.last_words.add(r["last_words"])
                self.store.add_event(job_id, "last_words", {"attempt": rt.attempt,
                                                            "rank": r["last_words"]})

    def _teardown(self, group: Runtime | HeldPlacement, failed: bool = False) -> None:
        """Stop ranks, remove agents and placement (backend). failed: the attempt failed,
        so a surviving rank first saves its last words."""
        self.backend.teardown(group, failed=failed)

    # ---------------------------------------------------------------- workflows
    def _parent_running(self, parent_id: str) -> None:
        for state in TO_RUNNING.get(self.store.state(parent_id), ()):
            self.store.set_state(parent_id, state, "steps running")

    def _advance_workflows(self) -> None:
        with self.lock:
            for wf in self.store.jobs({S.PENDING, S.SCHEDULING, S.RUNNING}, kind="Workflow"):
                with self._deciding(wf.id, "advancing the workflow"):
                    self._advance_workflow(wf)

    def _advance_workflow(self, wf: JobRow) -> None:
        decision = decide_workflow(self.store.jobs(parent=wf.id))
        if isinstance(decision, WorkflowSucceeded):
            self._parent_running(wf.id)
            self.store.set_state(wf.id, S.SUCCEEDED, "all steps succeeded",
                                 result=decision.result)
        elif isinstance(decision, WorkflowFailed):
            for step in decision.cancel:
                self._cancel_one(step, decision.why)
            self.store.set_state(wf.id, S.FAILED, decision.message)

    # ---------------------------------------------------------------- recovery
    def _recover(self) -> None:
        """Rebuild runtimes after a (re)start: reattach to held and live groups, finish or
        undo what the old controller was in the middle of."""
        self._recover_holds()
        held_or_gone = {h.job for h in self.store.holds()}
        for job in self.store.jobs({S.RESTARTING}):
            atts = self.store.attempts(job.id)
            if job.id in held_or_gone or not atts or atts[-1].ended is None:
                continue
            # Not held: the old controller tore the placement down before it ended the
            # attempt; this removes what a crash in between may have left.
            last = atts[-1]
            rt = Runtime(job.id, last.n, Plan.from_dict(last.plan), last.pg_name)
            self.backend.find(rt)
            self._teardown(rt)
        for job in self.store.jobs(set(HOLDS_DEVICES)):
            att = self.store.open_attempt(job.id)
            if att is None:
                continue
            rt = self._runtime(job, att.n, Plan.from_dict(att.plan), att.pg_name)
            ok = self.backend.find(rt)
            if job.state == S.SCHEDULING:
                # The start thread died with the old controller: undo and requeue.
                self._teardown(rt)
                self.store.end_attempt(job.id, att.n, "interrupted",
                                       "controller restarted while scheduling")
                self.store.set_state(job.id, S.PENDING, "requeued after controller restart")
                continue
            if job.state == S.RESIZING:
                # The old controller died inside _resize, after it started stopping the ranks:
                # finish the resize instead of reattaching to an attempt that is going away.
                self._teardown(rt)
                self.store.end_attempt(job.id, att.n, "resized",
                                       "controller restarted while resizing")
                continue
            if ok:
                rt.launched = True
                rt.progress = dict(job.progress)
                self.runtimes[job.id] = rt
                self.store.add_event(job.id, "reattached", {"attempt": att.n})
            else:
                self._attempt_failed(job.id, rt, Failure(
                    FailureKind.RECOVERY, "agents lost while the controller was down"))

    def _recover_holds(self) -> None:
        """Each held placement of the store: reattached when the job still restarts and
        every agent answers, else released, and the store says which."""
        for row in self.store.holds():
            held = HeldPlacement.from_row(row)
            job = self.store.get_job(row.job)
            found = self.backend.find(held)
            if job is not None and job.state == S.RESTARTING and found:
                self._held[row.job] = held
                self.store.add_event(row.job, "hold_reattached", {"attempt": row.attempt,
                                                                  "placement": row.pg_name})
                continue
            why = ("agents lost while the controller was down" if not found
                   else f"the job is {job.state if job else 'gone'}")
            self._teardown(held)
            self.store.drop_hold(row.job, f"released after a controller restart: {why}")


class _Aborted(Exception):
    """The job was cancelled or superseded while its attempt was starting."""


def actor_class():
    import ray
    return ray.remote(Controller)


def get_or_create(home: str, poll_interval: float = 0.25, backfill: bool = False):
    """The named detached controller actor (created on first use)."""
    import ray
    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        pass
    cls = actor_class().options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=0, max_concurrency=32, num_cpus=0,
        # On the head node: the store is a file on the head's volume, and the head
        # outlives worker nodes (on Kubernetes: the head pod, not an NPU worker).
        resources={"node:__internal_head__": 0.001},
        # Ray re-runs __init__ on restart, which is where recovery happens.
        runtime_env={"env_vars": {"RAY_DEDUP_LOGS": "0"}})
    return cls.remote(home, poll_interval, backfill)
