"""The fleet controller: a named, detached Ray actor.

Owns the job queue and the device ledger. All durable state lives in the store
(SQLite); in memory there are only handles (placement groups, agents) that a
restarted controller finds again by name. The loop is

    observe (cluster nodes, agent polls) -> decide (policy, planner) -> act

and every decision is written to the store before it is acted on, so a crash
between the two is repaired on restart rather than lost.

Elasticity: a failed attempt re-plans on the
devices free *now* (shrink, same global batch); growing back is a RUNNING ->
RESIZING -> SCHEDULING transition decided in `_tick` when the planner finds a
better plan for a running job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import ranks, workloads
from launcher import spec as specmod
from launcher.checkpoints import select_checkpoint
from launcher.contract import NON_RETRYABLE_EXIT_CODES
from launcher.lifecycle import HOLDS_DEVICES, TERMINAL, JobState
from launcher.planner import ASCEND_910, FreePool, Plan, Request, Topology
from launcher.progress import JobProgress
from launcher.ranks import NodeLaunch, attempt_dir, build_launch, default_ckpt_dir
from launcher.scheduler import PriorityFifo, QueuedJob, schedule
from launcher.store import STATUS_EVENTS, JobRow, QueueRow, Store

log = logging.getLogger("fleet.controller")

CONTROLLER_NAME = "fleet-controller"
NAMESPACE = "fleet"
PG_READY_TIMEOUT_S = 30.0
# After an agent is lost, Ray may still list its node as alive for a while
# (until heartbeats time out); planning onto it would stall the restart.
SUSPECT_NODE_S = 60.0
PROGRESS_FLUSH_S = 1.0
# Scaling decisions list every Ray node: once a second is quick next to pods that take
# tens of seconds to start, and spares the GCS a query on every 0.25 s tick.
AUTOSCALE_INTERVAL_S = 1.0

S = JobState

LOG_LABEL = re.compile(r"(scheduler|rank-\d{1,6})")
# Where `launcher` and `workloads` are: the ranks' working directory and PYTHONPATH.
CODE_ROOT = Path(__file__).resolve().parents[1]

MAX_PENDING_ENV = "FLEET_MAX_PENDING"
MAX_PENDING_DEFAULT = 10_000


def max_pending(environ: dict[str, str] | None = None) -> int:
    """Most jobs (workflow steps count) that may wait at once; FLEET_MAX_PENDING sets it."""
    raw = (os.environ if environ is None else environ).get(MAX_PENDING_ENV, "")
    try:
        return max(1, int(raw)) if raw else MAX_PENDING_DEFAULT
    except ValueError:
        return MAX_PENDING_DEFAULT


def agent_name(placement: str, index: int) -> str:
    """Agents are named after their placement group: a restart in place keeps both."""
    return f"{placement.replace('fleet-pg-', 'fleet-agent-', 1)}-{index}"


def pg_name(job_id: str, attempt: int | str) -> str:
    return f"fleet-pg-{job_id}-a{attempt}"


@dataclass
class HeldPlacement:
    """A failed attempt's placement group and agents, kept for a restart in place."""

    plan: Plan
    pg: Any
    pg_name: str
    agents: list
    next_port: int | None = None  # the scheduler port its agents' prejoined processes use


class RestartInPlace:
    """Whether a failed attempt's ranks restart on the devices they had.

    A rank that exited or hung on a healthy node says nothing against its devices, and
    keeping them skips the placement group, the agents and (with standbys) the imports
    (bench/recovery.py). A rank that keeps failing with no new checkpoint may have a bad
    device: after `max_streak` such failures in a row the job is planned afresh, like
    MindCluster's move from process-level to pod-level rescheduling."""

    def __init__(self, max_streak: int = 2):
        self.max_streak = max_streak

    def keep(self, policy: dict, streak: int) -> bool:
        return bool(policy.get("inPlace", True)) and streak <= self.max_streak


@dataclass
class Runtime:
    """In-memory handles of a job's current attempt."""

    job_id: str
    attempt: int
    plan: Plan
    pg_name: str  # agents are named after it (agent_name)
    pg: Any = None
    agents: list = field(default_factory=list)
    launched: bool = False
    started: float = field(default_factory=time.time)
    # Per rank: one hung rank is a hang even if the others still write (they
    # usually block in the next all-reduce, but not always at once).
    rank_heartbeat: dict[str, float] = field(default_factory=dict)
    progress: dict = field(default_factory=dict)
    fold: JobProgress = field(default_factory=JobProgress)  # progress is its summary()
    progress_dirty: bool = False
    progress_flushed: float = 0.0
    # Grow: set when more devices are free; acted on at the next checkpoint.
    resize_to: int | None = None
    resize_after: float = 0.0
    checkpoint_ready: bool = False
    checkpoint_requested: bool = False  # the ranks were asked to stop at a checkpoint
    last_words: set[str] = field(default_factory=set)  # ranks that saved as it failed
    # MindSpore scheduler ports: this attempt's when fixed in advance (a restart in place
    # onto prejoined processes), and the one fixed for the attempt after it
    sched_port: int | None = None
    next_port: int | None = None


def failure_streak(previous: int, progress: dict) -> int:
    """The backoff's exponent after a failed attempt: failed attempts in a row that saved no
    checkpoint past the step they resumed from. A failure after a new checkpoint (a fault in a
    run that was training well) starts again from the base delay, as Kubernetes forgets a
    CrashLoopBackOff once a container has run a while; without this, a long run with a fault
    every few minutes waited 0.2, 0.4, 0.8, 1.6, 3.2 s... (measured: 6 of the 7.6 s of
    'reschedule' in a 30-minute goodput run with 5 faults)."""
    saved = progress.get("checkpoint_ok") and \
        (progress.get("checkpoint_step") or 0) > (progress.get("resumed_step") or 0)
    return 1 if saved else previous + 1


# 2**62 times any base a spec allows is still a finite float: the delay is capped by
# maxBackoffSeconds long before, and a long crash loop cannot overflow it.
MAX_BACKOFF_EXPONENT = 62


def backoff_seconds(policy: dict, restarts: int) -> float:
    base = float(policy.get("backoffSeconds", 2.0))
    cap = float(policy.get("maxBackoffSeconds", 60.0))
    exponent = min(max(0, restarts - 1), MAX_BACKOFF_EXPONENT)
    delay = min(cap, base * float(2 ** exponent))
    # Jitter so that many jobs failing together (a node loss) do not retry in lockstep.
    return delay * (1.0 + 0.25 * random.random())  # noqa: S311 - not crypto


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
        if rt is not None and rt.progress:
            d["progress"] = dict(rt.progress)
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
        if rt is not None and rt.progress:
            d["progress"] = dict(rt.progress)
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
            if rt is not None and rt.attempt == att.n:
                import ray
                for a in rt.agents:
                    with contextlib.suppress(Exception):
                        r = ray.get(a.read_log.remote(label, offset), timeout=10)
                        if "error" not in r:
                            out = r
                            break
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
                 start_loop: bool = True):
        import ray  # noqa: F401 - fail early if Ray is missing

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
        self.restart_placement = RestartInPlace()
        self._held: dict[str, HeldPlacement] = {}  # RESTARTING jobs that keep their devices
        self._plan_inputs: dict[str, tuple[Request | None, Topology]] = {}  # _planning_inputs
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ticks = 0
        self._last_error = ""
        self.started = time.time()
        self.k8s_error = ""
        self.k8s = self._start_k8s()
        self.scaler = self._start_scaler()
        self._known_nodes: frozenset[str] = frozenset()
        self._autoscaled_at = 0.0
        self._recover()
        self.exporter = self._start_metrics()
        self._thread = None
        if start_loop:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="fleet-loop")
            self._thread.start()

    def _start_metrics(self):
        """Prometheus exporter (launcher/metrics.py) over every job's heartbeats + this
        job table. Off with FLEET_METRICS=0; a busy port must not stop the controller."""
        if os.environ.get("FLEET_METRICS", "1") == "0":
            return None
        try:
            from launcher.metrics import start_fleet_exporter
            return start_fleet_exporter(self.home, self._metric_jobs, self.cluster)
        except Exception as e:  # noqa: BLE001 - metrics are optional, the queue is not
            log.warning("metrics exporter not started: %s", e)
            self.store.add_event("controller", "metrics_unavailable", {"error": str(e)})
            return None

    def _start_k8s(self):
        """FleetK8s (launcher/k8s/fleet.py) when running in a KubeRay cluster, else None."""
        try:
            from launcher.k8s.fleet import FleetK8s
            return FleetK8s.from_env()
        except Exception as e:  # noqa: BLE001 - Kubernetes is an aid, not a prerequisite
            log.warning("kubernetes integration off: %s", e)
            self.k8s_error = f"integration off: {e}"
            return None

    def _start_scaler(self):
        """Grows and shrinks the RayCluster worker group (launcher/autoscale.py)."""
        if self.k8s is None:
            return None
        from launcher.autoscale import ScalerSettings, WorkerGroupScaler
        try:
            return WorkerGroupScaler(self.k8s, ScalerSettings.from_env())
        except ValueError as e:  # a bad FLEET_K8S_* value: say so, keep scheduling
            log.warning("kubernetes scaling off: %s", e)
            self.k8s_error = f"scaling off: {e}"
            return None

    def _node_failure_reason(self, node_id: str) -> str:
        """Why a node's pod died (OOMKilled, Evicted, NodeNotReady...), if Kubernetes says."""
        if self.k8s is None:
            return ""
        try:
            f = self.k8s.why_node_died(node_id, wait_s=3.0)
        except Exception as e:  # noqa: BLE001
            return f"; kubernetes: unavailable ({e})"
        return "" if f is None else f"; kubernetes: {f.to_json()}"

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
        resolved = self._resolve_paths(job, paths)
        level = paths.get(ranks.MINDSPORE_LOG_LEVEL_KEY) if isinstance(paths, dict) else None
        if level is not None:
            # stored with each step, so restarts keep the level the submitting shell asked for
            level = ranks.mindspore_log_level(str(level))
            for step_paths in resolved.values():
                step_paths[ranks.MINDSPORE_LOG_LEVEL_KEY] = level
        paths = {"workdir": str(CODE_ROOT), "steps": resolved}
        with self.lock:
            self._check_queue_room(job)
            self._check_checkpoint_dirs(job, resolved)
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

    @staticmethod
    def _resolve_paths(job: specmod.AnyJob, client: dict) -> dict[str, dict[str, str]]:
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

    def _check_checkpoint_dirs(self, job: specmod.AnyJob,
                               resolved: dict[str, dict[str, str]]) -> None:
        """Two live jobs may not share a checkpoint directory (or one inside the other):
        each prunes its directory to its newest checkpoints, deleting the other's."""
        mine = [(name, Path(resolved[name]["ckpt_dir"])) for name, kind, _sp in
                specmod.steps_of(job) if kind == "TrainJob" and "ckpt_dir" in resolved[name]]
        if not mine:
            return
        taken = [(jid, Path(d) if d else default_ckpt_dir(self.home, jid))
                 for jid, d in self.store.checkpoint_dirs(set(S) - set(TERMINAL))]
        taken += mine
        problems = []
        for i, (name, d) in enumerate(mine):
            for other, od in taken[:len(taken) - len(mine) + i]:
                if d == od or d.is_relative_to(od) or od.is_relative_to(d):
                    problems.append((name, f"checkpoint.dir {d} is in use by {other} "
                                           f"({od}); give each job its own directory"))
        if problems:
            raise specmod.SpecError("<submitted>", problems)

    def _check_queue_room(self, job: specmod.AnyJob) -> None:
        """A queue limit: every waiting job costs the scheduler a little on every tick."""
        limit = max_pending()
        waiting = self.store.count({S.PENDING, S.RESTARTING})
        adding = len(job.spec.steps) + 1 if isinstance(job, specmod.Workflow) else 1
        if waiting + adding > limit:
            raise specmod.SpecError("<submitted>", [("(queue)", (
                f"the queue is full: {waiting} jobs wait and at most {limit} may "
                f"({MAX_PENDING_ENV}); wait for some to start or cancel some"))])

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
        import ray
        out = {}
        now = time.time()
        draining = self.scaler.draining if self.scaler is not None else {}
        for n in ray.nodes():
            if not n.get("Alive"):
                if n["NodeID"] in draining:
                    self.scaler.forget_node(n["NodeID"])
                continue
            if self.suspect_nodes.get(n["NodeID"], 0) > now or n["NodeID"] in draining:
                continue
            npus = int(n.get("Resources", {}).get("NPU", 0))
            if npus > 0:
                out[n["NodeID"]] = list(range(npus))
        if self.k8s is not None and frozenset(out) != self._known_nodes:
            # Map nodes to pods while they are alive: after a loss the pod may be gone.
            try:
                self.k8s.remember_nodes(ray.nodes())
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
        pool = FreePool.from_free(nodes, self._topology(nodes))
        holding = [Plan.from_dict(att.plan) for att in
                   (self.store.open_attempt(job.id) for job in self.store.jobs(set(HOLDS_DEVICES)))
                   if att is not None]
        holding += [held.plan for held in self._held.values()]  # restarts in place
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
        policy = job.spec.get("restart") or {}
        return job.kind == "TrainJob" and bool(policy.get("inPlace", True)) and \
            bool(policy.get("standby", True))

    @classmethod
    def _prejoin(cls, job: JobRow) -> bool:
        """...and that also joined the cluster and compiled ahead, where the workload's ranks
        can on this device type (its adapter says: launcher/workloads.py)."""
        device = (job.spec.get("resources") or {}).get("deviceType", "NPU")
        return cls._standby(job) and workloads.of_spec(job.spec).prejoins_on(device)

    @staticmethod
    def _job_topology(j: JobRow) -> Topology:
        res = specmod.Resources.model_validate(j.spec.get("resources") or {})
        return res.topology()

    def _restart_held(self) -> None:
        """Restart in place the jobs whose backoff is over; a placement on a node that is
        gone (or suspect) is released and the job planned like any other."""
        if not self._held:
            return
        now = time.time()
        with self.lock:
            nodes = self._cluster_nodes()
            for job_id, held in list(self._held.items()):
                job = self.store.get_job(job_id)
                if job is None or job.state != S.RESTARTING:
                    self._release_held(job_id)
                    continue
                if job.not_before > now:
                    continue
                if any(s.node not in nodes for s in held.plan.slices if s.chips):
                    self._release_held(job_id)
                    continue
                del self._held[job_id]
                with self._deciding(job_id, "restarting in place"):
                    self._begin_attempt(job_id, held.plan, held)

    def _release_held(self, job_id: str) -> None:
        held = self._held.pop(job_id, None)
        if held is not None:
            rt = Runtime(job_id, 0, held.plan, held.pg_name, held.pg, held.agents)
            self._teardown(rt)

    def _schedule(self) -> None:
        self._restart_held()
        with self.lock:
            queue = self._queued()
            if not queue:
                return
            nodes = self._cluster_nodes()
            pool = self._pool(nodes)
            now = time.time()
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
        att = self.store.add_attempt(job_id, plan.to_dict(),
                                     held.pg_name if held else pg_name(job_id, "{n}"))
        where = "in place, on the same devices" if held else f"on {len(plan.slices)} node(s)"
        self.store.set_state(job_id, S.SCHEDULING,
                             f"attempt {att.n}: {plan.devices} devices {where}")
        rt = Runtime(job_id, att.n, plan, att.pg_name)
        if held is not None:
            rt.pg, rt.agents, rt.sched_port = held.pg, held.agents, held.next_port
        self.runtimes[job_id] = rt
        if job.parent:
            self._parent_running(job.parent)
        threading.Thread(target=self._start_attempt, args=(job, rt, held is not None),
                         daemon=True, name=f"start-{job_id}").start()

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
        cpd = float((job.spec.get("resources") or {}).get("cpusPerDevice", 1.0))
        out = []
        for s in plan.slices:
            b: dict[str, float] = {"CPU": max(0.1, cpd * len(s.chips)) if s.chips else 0.5}
            if s.chips:
                b["NPU"] = float(len(s.chips))
            out.append(b)
        return out

    def _place(self, job: JobRow, rt: Runtime) -> None:
        """A placement group for the attempt's plan and one agent per bundle."""
        import ray
        from ray.util import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from launcher.agent import NodeAgent

        bundles = self._bundles(job, rt.plan)
        selectors = [{"ray.io/node-id": s.node} for s in rt.plan.slices]
        strategy = "STRICT_SPREAD" if len(bundles) > 1 else "PACK"
        name = rt.pg_name
        pg = placement_group(bundles, strategy=strategy, name=name, lifetime="detached",
                             bundle_label_selector=selectors)
        rt.pg = pg
        with self.lock:
            self.store.add_event(job.id, "placement_group", {"name": name, "bundles": bundles})
        ready, _ = ray.wait([pg.ready()], timeout=PG_READY_TIMEOUT_S)
        if not ready:
            raise _Unplaceable(f"placement group not placed within {PG_READY_TIMEOUT_S:.0f}s")
        # standbys serve restarts in place of a training job only; where the ranks can
        # hold after joining, prejoined processes replace them
        standby = self._standby(job) and not self._prejoin(job)
        agent_cls = ray.remote(NodeAgent)
        for i, b in enumerate(bundles):
            opts: dict[str, Any] = dict(
                name=agent_name(name, i), namespace=NAMESPACE,
                lifetime="detached", num_cpus=b["CPU"], max_restarts=0,
                max_concurrency=4,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i))
            if "NPU" in b:
                opts["resources"] = {"NPU": b["NPU"]}
            rt.agents.append(agent_cls.options(**opts).remote(job.id, rt.attempt, i, standby))

    def _launches(self, job: JobRow, rt: Runtime,
                  infos: list[dict]) -> tuple[list[NodeLaunch], list[list[dict]]]:
        """Each agent's ranks for this attempt, and (VOLO training) for the attempt that
        would restart it in place, which the agents start and join ahead of time
        (launcher/prejoin.py). A restart in place onto such processes reuses the scheduler
        port fixed for them, if every agent still holds them."""
        import ray

        agents = rt.agents
        # The scheduler runs on the first agent's node and binds its Ray node address.
        sched_host = infos[0]["ip"]
        ports = ray.get(agents[0].free_ports.remote(2, sched_host), timeout=30)

        def launch(attempt: int, port: int) -> list[NodeLaunch]:
            return build_launch(job_id=job.id, attempt=attempt, kind=job.kind, spec=job.spec,
                                paths=job.paths, plan=rt.plan, home=self.home,
                                sched_host=sched_host, sched_port=port)

        port = rt.sched_port or ports[0]
        launches = launch(rt.attempt, port)
        if rt.sched_port and not all(ray.get(
                [a.prejoined_for.remote([r.to_dict() for r in nl.ranks])
                 for a, nl in zip(agents, launches, strict=True)], timeout=30)):
            # a held process is gone or differs: all start cold, with a scheduler of their own
            port = next(p for p in ports if p != rt.sched_port)
            launches = launch(rt.attempt, port)
        if not self._prejoin(job):
            return launches, [[] for _ in agents]
        rt.next_port = next(p for p in ports if p != port)
        nexts = [[r.to_dict() for r in nl.ranks] for nl in launch(rt.attempt + 1, rt.next_port)]
        return launches, nexts

    def _start_attempt(self, job: JobRow, rt: Runtime, in_place: bool = False) -> None:
        """Runs on its own thread: placement group -> agents -> ranks (in place: the
        placement group and agents of the last attempt -> ranks)."""
        import ray

        try:
            if not in_place:
                self._place(job, rt)
            agents = rt.agents
            infos = ray.get([a.info.remote() for a in agents], timeout=120)
            launches, nexts = self._launches(job, rt, infos)
            with self.lock:
                cur = self.store.get_job(job.id)
                if cur.state != S.SCHEDULING or self.runtimes.get(job.id) is not rt:
                    raise _Aborted()
            res = ray.get([a.start.remote([r.to_dict() for r in nl.ranks], rt.attempt, nx)
                           for a, nl, nx in zip(agents, launches, nexts, strict=True)],
                          timeout=120)
            bad = [r for r in res if r.get("status") == "failed"]
            if bad:
                raise RuntimeError(bad[0].get("reason", "rank start failed"))
            from_standby = sorted(lb for r in res for lb in r.get("from_standby", []))
            prejoined = sorted(lb for r in res for lb in r.get("prejoined", []))
            with self.lock:
                cur = self.store.get_job(job.id)
                if cur.state != S.SCHEDULING or self.runtimes.get(job.id) is not rt:
                    raise _Aborted()
                rt.launched = True
                rt.started = time.time()
                self.store.add_event(job.id, "launched", {
                    "attempt": rt.attempt, "agents": infos, "in_place": in_place,
                    "from_standby": from_standby, "prejoined": prejoined,
                    "ranks": sum(len(nl.ranks) for nl in launches)})
                self.store.set_state(job.id, S.RUNNING, f"attempt {rt.attempt} running")
        except _Aborted:
            self._teardown(rt)
        except _Unplaceable as e:
            # Ray could not place what the ledger thought free (a node going away):
            # requeue without spending a restart.
            with self.lock:
                if self.runtimes.get(job.id) is rt:
                    self.runtimes.pop(job.id, None)
                    self._teardown(rt)
                    self.store.end_attempt(job.id, rt.attempt, "unplaceable", str(e))
                    cur = self.store.get_job(job.id)
                    if cur.state == S.SCHEDULING:
                        back = S.RESTARTING if cur.restarts else S.PENDING
                        self.store.set_state(job.id, back, f"requeued: {e}",
                                             not_before=time.time() + 2.0)
                else:
                    self._teardown(rt)
        except Exception as e:
            log.warning("job %s attempt %s failed to start: %s", job.id, rt.attempt, e)
            with self.lock, self._deciding(job.id, "handling a failed start"):
                if self.runtimes.get(job.id) is rt:
                    self._attempt_failed(job.id, rt, f"start failed: {type(e).__name__}: {e}")
                else:
                    self._teardown(rt)
        self._wake.set()

    # ---------------------------------------------------------------- monitor
    def _poll_running(self) -> None:
        import ray

        for job_id, rt in list(self.runtimes.items()):
            if not rt.launched:
                continue
            futs = [a.poll.remote() for a in rt.agents]
            results: list[dict | None] = []
            lost = None
            for i, f in enumerate(futs):
                try:
                    results.append(ray.get(f, timeout=10))
                except ray.exceptions.GetTimeoutError:
                    results.append(None)  # slow, not dead: try again next tick
                except Exception as e:
                    lost = f"agent {i} lost ({type(e).__name__}: node or actor died)"
                    if i < len(rt.plan.slices):
                        node = rt.plan.slices[i].node
                        self.suspect_nodes[node] = time.time() + SUSPECT_NODE_S
                        lost += f" on node {node[:12]}" + self._node_failure_reason(node)
                    break
            with self.lock, self._deciding(job_id, "acting on its ranks' state"):
                self._decide_running(job_id, rt, results, lost)

    def _decide_running(self, job_id: str, rt: Runtime, results: list[dict | None],
                        lost: str | None) -> None:
        """One running job's outcome from its agents' polls (under the lock)."""
        if self.runtimes.get(job_id) is not rt:
            return
        job = self.store.get_job(job_id)
        if job is None or job.state not in (S.RUNNING, S.RESIZING):
            return
        if lost:
            self._attempt_failed(job_id, rt, lost)
            return
        for r in results:
            if r:
                self._absorb(rt, r)
        self._flush_progress(rt)
        statuses = [r["status"] for r in results if r]
        if any(s == "failed" for s in statuses):
            self._note_last_words(job_id, rt, results)
            bad = next(r for r in results if r and r["status"] == "failed")
            self._attempt_failed(job_id, rt, bad["reason"], retry=bad.get(
                "exit_code") not in NON_RETRYABLE_EXIT_CODES, in_place=True)
        elif len(statuses) == len(rt.agents) and all(s == "succeeded" for s in statuses):
            result = next((r["result"] for r in results if r and r.get("result")), None)
            self._attempt_succeeded(job_id, rt, result)
        elif len(statuses) == len(rt.agents) and "checkpointed" in statuses and all(
                s in ("checkpointed", "succeeded") for s in statuses):
            self._resize(job_id, rt)  # the ranks stopped at the checkpoint it asked for
        elif rt.checkpoint_ready and not rt.checkpoint_requested:
            self._resize(job_id, rt)
        else:
            hung = self._hung(job, rt) if job.kind == "TrainJob" else None
            if hung:
                self._attempt_failed(job_id, rt, hung, in_place=True)

    @staticmethod
    def _hung(job: Any, rt: Runtime) -> str | None:
        """Why the attempt counts as hung, or None. A rank's first heartbeat only comes
        after its interpreter start, imports and collective join, which on a busy node take
        far longer than a step: until then it is held to the startup timeout, not to the
        hang timeout (a cold start was once taken for a hang)."""
        policy = job.spec.get("restart") or {}
        hang = float(policy.get("hangTimeoutSeconds", 600))
        startup = float(policy.get("startupTimeoutSeconds", 600))
        now = time.time()
        for r in range(max(rt.plan.devices, 1)):
            seen = rt.rank_heartbeat.get(f"rank-{r}")
            if seen is None and now - rt.started > startup:
                return (f"rank-{r} sent no heartbeat in {now - rt.started:.0f}s since launch "
                        f"(startupTimeoutSeconds={startup:g})")
            if seen is not None and now - seen > hang:
                return (f"heartbeat stalled for {now - seen:.0f}s on rank-{r} "
                        f"(hangTimeoutSeconds={hang:g})")
        return None

    def _absorb(self, rt: Runtime, r: dict) -> None:
        """Fold an agent's new heartbeat records into the job's progress (launcher/progress.py,
        the fold /metrics uses too) and take what the decisions need from it."""
        records = r.get("events") or []
        if not records:
            return
        fold = rt.fold
        for ev in records:
            fold.apply_record(ev)
        rt.progress.update(fold.summary())
        rt.progress_dirty = True
        for rank, ts in fold.last_heartbeat.items():
            rt.rank_heartbeat[f"rank-{rank}"] = ts
        ck = fold.last_checkpoint_ok
        if ck is not None and rt.resize_to and ck.ts >= rt.resize_after:
            rt.checkpoint_ready = True

    def _flush_progress(self, rt: Runtime, force: bool = False) -> None:
        if rt.progress_dirty and (force or time.time() - rt.progress_flushed > PROGRESS_FLUSH_S):
            self.store.update_job(rt.job_id, progress=rt.progress)
            rt.progress_dirty = False
            rt.progress_flushed = time.time()

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

    def _attempt_failed(self, job_id: str, rt: Runtime, reason: str,
                        retry: bool = True, in_place: bool = False) -> None:
        """in_place: the agents are alive (a rank exited or hung), so the ranks may restart
        on the same devices if the policy agrees."""
        self._flush_progress(rt, force=True)
        self.runtimes.pop(job_id, None)
        job = self.store.get_job(job_id)
        policy = job.spec.get("restart") or {}
        max_restarts = int(policy.get("maxRestarts", 3))
        streak = failure_streak(self._failure_streaks.get(job_id, 0), rt.progress)
        restarts = retry and job.state not in TERMINAL and job.restarts < max_restarts
        if not (restarts and in_place and self.restart_placement.keep(policy, streak)
                and self._hold(rt)):
            self._teardown(rt, failed=True)
        self.store.end_attempt(job_id, rt.attempt, "failed", reason)
        job = self.store.get_job(job_id)
        if job.state in TERMINAL:
            return
        self._failure_streaks[job_id] = streak
        if restarts:
            n = job.restarts + 1
            delay = backoff_seconds(policy, streak)
            in_a_row = f", {streak} failures in a row without a new checkpoint" if streak > 1 else ""
            where = " in place" if job_id in self._held else ""
            self.store.set_state(job_id, S.RESTARTING,
                                 f"attempt {rt.attempt} failed: {reason}; restart {n}/"
                                 f"{max_restarts}{where} in {delay:.1f}s{in_a_row}",
                                 restarts=n, not_before=time.time() + delay)
        else:
            self._failure_streaks.pop(job_id, None)
            history = "; ".join(f"#{a.n} {a.status}: {a.reason}"
                                for a in self.store.attempts(job_id))
            why = "" if retry else " (not retryable: configuration or recipe error)"
            self.store.set_state(job_id, S.FAILED,
                                 f"failed after {job.restarts} restart(s){why}: {reason} "
                                 f"[attempts: {history}]")
        self._wake.set()

    def _consider_growth(self) -> None:
        """Grow a running elastic job when more devices are free and nobody waits.

        Waiting jobs always come first: growth only uses devices the queue cannot.
        The switch happens at a checkpoint the ranks are asked for at the next step (or,
        where they cannot be asked, the next periodic one), so no step is lost.
        """
        with self.lock:
            candidates = [rt for rt in self.runtimes.values()
                          if rt.launched and rt.resize_to is None]
            if not candidates or self._queued():
                return
            nodes = self._cluster_nodes()
            for rt in candidates:
                job = self.store.get_job(rt.job_id)
                if job is None or job.kind != "TrainJob" or job.state != S.RUNNING:
                    continue
                req = self._request(job)
                if req is None or rt.plan.devices >= req.max_devices:
                    continue
                pool = self._pool(nodes)
                pool.give([s for s in rt.plan.slices if s.chips])  # its own chips count
                better = pool.plan(req, req.candidates(self._job_topology(job)))
                if better is None or better.devices <= rt.plan.devices:
                    continue
                rt.resize_to, rt.resize_after = better.devices, time.time()
                rt.checkpoint_requested = self._request_checkpoint(rt)
                self.store.add_event(job.id, "grow_wanted", {
                    "from": rt.plan.devices, "to": better.devices,
                    "note": "asked the ranks for a checkpoint at the next step"
                    if rt.checkpoint_requested else "waiting for the next checkpoint"})

    @staticmethod
    def _request_checkpoint(rt: Runtime) -> bool:
        """Ask every agent's ranks to stop at a checkpoint of the next step; False (the
        resize waits for a periodic checkpoint) unless every agent asked all of its ranks."""
        import ray

        try:
            return all(ray.get([a.request_checkpoint.remote() for a in rt.agents],
                               timeout=10))
        except Exception as e:  # noqa: BLE001 - any agent error: the periodic path remains
            log.warning("job %s: no checkpoint request (%s)", rt.job_id, e)
            return False

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
        if self.scaler is None or time.time() - self._autoscaled_at < AUTOSCALE_INTERVAL_S:
            return
        self._autoscaled_at = time.time()
        with self.lock:
            nodes = self._cluster_nodes()
            pool = self._pool(nodes)
            busy = {n for n, chips in nodes.items() if len(pool.free_chips(n)) < len(chips)}
            events = self.scaler.step({n: len(c) for n, c in nodes.items()}, busy,
                                      self._wanted_devices(), pool.total_free())
            for kind, data in events:
                log.info("kubernetes: %s %s", kind, data)
                self.store.add_event("controller", kind, data)

    def _resize(self, job_id: str, rt: Runtime) -> None:
        self._flush_progress(rt, force=True)
        self.runtimes.pop(job_id, None)
        step = rt.progress.get("checkpoint_step")
        why = (f"growing from {rt.plan.devices} to {rt.resize_to} devices at checkpoint "
               f"step {step}")
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
        self._release_held(job_id)
        if rt is not None:
            self._teardown(rt)
            self.store.end_attempt(job_id, rt.attempt, "cancelled", reason)
        self.store.set_state(job_id, S.CANCELLED, reason)

    def _hold(self, rt: Runtime) -> bool:
        """Stop the ranks but keep the placement group, agents and standbys for a restart
        in place; False (nothing kept) when an agent does not answer."""
        import ray

        if rt.pg is None or not rt.agents:
            return False
        try:
            stopped = ray.get([a.stop.remote(3.0, "restarting in place", True, True)
                               for a in rt.agents], timeout=20)
        except Exception as e:  # noqa: BLE001 - any agent error means: start afresh
            log.warning("job %s: no restart in place (%s)", rt.job_id, e)
            return False
        self._note_last_words(rt.job_id, rt, stopped)
        self._held[rt.job_id] = HeldPlacement(rt.plan, rt.pg, rt.pg_name, rt.agents,
                                              rt.next_port)
        return True

    def _note_last_words(self, job_id: str, rt: Runtime, results: list[dict | None]) -> None:
        """An event per rank that saved the last completed step as the attempt failed
        (`fleet status` shows it; the next attempt resumes from that step)."""
        for r in results:
            if r and r.get("last_words") and r["last_words"] not in rt.last_words:
                rt.last_words.add(r["last_words"])
                self.store.add_event(job_id, "last_words", {"attempt": rt.attempt,
                                                            "rank": r["last_words"]})

    def _teardown(self, rt: Runtime, failed: bool = False) -> None:
        """Stop ranks, kill agents, free the placement group. Best effort, bounded.
        failed: the attempt failed, so a surviving rank first saves its last words."""
        import ray
        from ray.util import remove_placement_group

        stops = []
        for a in rt.agents:
            with contextlib.suppress(Exception):
                stops.append(a.stop.remote(3.0, "stopped", False, failed))
        if stops:
            with contextlib.suppress(Exception):
                ray.wait(stops, num_returns=len(stops), timeout=20)
        for a in rt.agents:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        if rt.pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(rt.pg)
        else:
            self._remove_pg_by_name(rt.pg_name)

    @staticmethod
    def _remove_pg_by_name(name: str) -> None:
        from ray.util import get_placement_group, remove_placement_group
        with contextlib.suppress(Exception):
            remove_placement_group(get_placement_group(name))

    # ---------------------------------------------------------------- workflows
    def _parent_running(self, parent_id: str) -> None:
        p = self.store.get_job(parent_id)
        if p.state == S.PENDING:
            self.store.set_state(parent_id, S.SCHEDULING)
        p = self.store.get_job(parent_id)
        if p.state == S.SCHEDULING:
            self.store.set_state(parent_id, S.RUNNING, "steps running")

    def _advance_workflows(self) -> None:
        with self.lock:
            for wf in self.store.jobs({S.PENDING, S.SCHEDULING, S.RUNNING}):
                if wf.kind != "Workflow":
                    continue
                with self._deciding(wf.id, "advancing the workflow"):
                    self._advance_workflow(wf)

    def _advance_workflow(self, wf: JobRow) -> None:
        kids = self.store.jobs(parent=wf.id)
        states = {k.step: k.state for k in kids}
        if kids and all(s == S.SUCCEEDED for s in states.values()):
            summary = {k.step: k.result for k in kids if k.result}
            if wf.state == S.PENDING:
                self.store.set_state(wf.id, S.SCHEDULING)
            if self.store.get_job(wf.id).state == S.SCHEDULING:
                self.store.set_state(wf.id, S.RUNNING)
            self.store.set_state(wf.id, S.SUCCEEDED, "all steps succeeded",
                                 result=summary)
            return
        bad = [k for k in kids if k.state in (S.FAILED, S.CANCELLED)]
        if bad:
            for k in kids:
                if k.state not in TERMINAL:
                    self._cancel_one(k.id, f"step {bad[0].step} {bad[0].state}")
            self.store.set_state(
                wf.id, S.FAILED,
                f"step {bad[0].step} {bad[0].state}: {bad[0].message}")

    # ---------------------------------------------------------------- recovery
    def _recover(self) -> None:
        """Rebuild runtimes after a (re)start: reattach to live agents or restart."""
        import ray

        for job in self.store.jobs({S.RESTARTING}):
            # The old controller may have kept the job's devices for a restart in place;
            # that is in memory only, so give them back and plan the job afresh.
            atts = self.store.attempts(job.id)
            if atts and atts[-1].ended is not None:
                last = atts[-1]
                plan = Plan.from_dict(last.plan)
                self._teardown(Runtime(job.id, last.n, plan, last.pg_name,
                                       agents=self._find_agents(last.pg_name, len(plan.slices))))
        for job in self.store.jobs(set(HOLDS_DEVICES)):
            att = self.store.open_attempt(job.id)
            if att is None:
                continue
            plan = Plan.from_dict(att.plan)
            rt = Runtime(job.id, att.n, plan, att.pg_name)
            if job.state == S.SCHEDULING:
                # The start thread died with the old controller: undo and requeue.
                rt.agents = self._find_agents(att.pg_name, len(plan.slices))
                self._teardown(rt)
                self.store.end_attempt(job.id, att.n, "interrupted",
                                       "controller restarted while scheduling")
                self.store.set_state(job.id, S.PENDING, "requeued after controller restart")
                continue
            if job.state == S.RESIZING:
                # The old controller died inside _resize, after it started stopping the ranks:
                # finish the resize instead of reattaching to an attempt that is going away.
                rt.agents = self._find_agents(att.pg_name, len(plan.slices))
                self._teardown(rt)
                self.store.end_attempt(job.id, att.n, "resized",
                                       "controller restarted while resizing")
                continue
            agents = self._find_agents(att.pg_name, len(plan.slices))
            ok = len(agents) == len(plan.slices)
            if ok:
                try:
                    ray.get([a.info.remote() for a in agents], timeout=30)
                except Exception:
                    ok = False
            rt.agents = agents
            if ok:
                with contextlib.suppress(Exception):
                    from ray.util import get_placement_group
                    rt.pg = get_placement_group(att.pg_name)
                rt.launched = True
                rt.progress = dict(job.progress)
                self.runtimes[job.id] = rt
                self.store.add_event(job.id, "reattached", {"attempt": att.n})
            else:
                self._attempt_failed(job.id, rt, "agents lost while the controller was down")

    @staticmethod
    def _find_agents(placement: str, n: int) -> list:
        import ray
        out = []
        for i in range(n):
            try:
                out.append(ray.get_actor(agent_name(placement, i), namespace=NAMESPACE))
            except ValueError:
                break
        return out


class _Aborted(Exception):
    """The job was cancelled or superseded while its attempt was starting."""


class _Unplaceable(Exception):
    """The placement group did not come up in time."""


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
