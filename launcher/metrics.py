"""Prometheus exporter: heartbeat files + controller state -> fleet_* metrics.

Files are read at scrape time (a custom collector), not by a background
thread: each scrape sees every line written before it, and an idle exporter
costs nothing. Metric names follow ../shared/DESIGN.md and Prometheus naming
(base units in the name, ``_total`` on counters).

The per-job label is ``job_name``, not ``job``: Prometheus attaches its own
``job`` label (the scrape job) to every series and would rename ours to
``exported_job`` unless every scrape config set ``honor_labels``. This is the
same choice kube-state-metrics made for Kubernetes Jobs.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from launcher.metrics_history import heartbeat_files
from launcher.progress import HeartbeatTail, JobProgress

log = logging.getLogger(__name__)

JOB_LABEL = "job_name"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464
JOB_STATES = ("pending", "running", "recovering", "succeeded", "failed", "cancelled")
# The controller's finer state machine (launcher/lifecycle.py) folded into the
# states a fleet dashboard shows.
CONTROLLER_STATES = {
    "PENDING": "pending",
    "SCHEDULING": "pending",
    "RUNNING": "running",
    "RESTARTING": "recovering",
    "RESIZING": "recovering",
    "SUCCEEDED": "succeeded",
    "FAILED": "failed",
    "CANCELLED": "cancelled",
}
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_job_name(name: str) -> str:
    if len(name) > 63 or not _DNS1123.match(name):
        raise ValueError(
            f"job name {name!r} is not a DNS-1123 label "
            "(lowercase letters, digits and '-', at most 63 characters)"
        )
    return name


@dataclass
class FleetSnapshot:
    """What only the controller knows; every field optional.

    The controller passes a callable returning one of these; without it the
    exporter derives job states from the heartbeats alone.
    """

    devices_total: int | None = None
    # Free devices by the controller's ledger (placements it holds count as used, a job
    # waiting in RESTARTING for devices does not); None: derive from the heartbeats.
    devices_free: int | None = None
    # Controller's view of job states (includes jobs still queued, which have
    # no heartbeat yet); overrides the heartbeat-derived state per job.
    job_states: dict[str, str] = field(default_factory=dict)
    # Unix time each job was submitted: queue wait = first start - submitted.
    submitted_ts: dict[str, float] = field(default_factory=dict)
    # Restarts the controller counted, including attempts that died before
    # their ranks wrote a heartbeat.
    restarts: dict[str, int] = field(default_factory=dict)


def snapshot_from_controller(
    jobs: list[dict[str, object]], cluster: dict[str, object] | None = None
) -> FleetSnapshot:
    """FleetSnapshot from the controller's ``list_jobs()`` and ``cluster()`` answers."""
    snap = FleetSnapshot()
    if cluster and isinstance(cluster.get("devices"), int):
        snap.devices_total = int(cluster["devices"])
        if isinstance(cluster.get("free"), int):
            snap.devices_free = min(max(int(cluster["free"]), 0), snap.devices_total)
    for job in jobs:
        job_id = str(job.get("id", ""))
        state = CONTROLLER_STATES.get(str(job.get("state", "")))
        if not job_id or state is None:
            continue
        snap.job_states[job_id] = state
        created = job.get("created")
        if isinstance(created, int | float) and created > 0:
            snap.submitted_ts[job_id] = float(created)
        restarts = job.get("restarts")
        if isinstance(restarts, int) and restarts >= 0:
            snap.restarts[job_id] = restarts
    return snap


@dataclass
class WatchedJob:
    name: str
    root: Path
    submitted_ts: float | None = None
    progress: JobProgress = field(default_factory=JobProgress)
    tails: dict[Path, HeartbeatTail] = field(default_factory=dict)

    def poll(self) -> int:
        """Read what the ranks appended since the last poll; returns events applied."""
        for path in heartbeat_files(self.root):
            if path not in self.tails:
                self.tails[path] = HeartbeatTail(path)
        applied = 0
        for tail in self.tails.values():
            for event in tail.read_all_new():
                self.progress.apply(event)
                applied += 1
        return applied

    @property
    def bad_lines(self) -> int:
        return sum(t.bad_lines for t in self.tails.values())


class FleetCollector(Collector):
    """Builds every fleet_* family from the watched jobs at scrape time."""

    def __init__(self, fleet: Callable[[], FleetSnapshot] | None = None) -> None:
        self._jobs: dict[str, WatchedJob] = {}
        self._lock = threading.Lock()
        self._fleet = fleet
        self._homes: list[Path] = []

    def watch_home(self, home: Path) -> None:
        """Follow every job under ``home``/jobs/<job-id>/ (the launcher's layout), new ones too."""
        with self._lock:
            self._homes.append(Path(home))

    def _discover(self) -> None:
        for home in self._homes:
            jobs_dir = home / "jobs"
            if not jobs_dir.is_dir():
                continue
            for d in sorted(jobs_dir.iterdir()):
                if d.is_dir() and d.name not in self._jobs and _DNS1123.match(d.name):
                    self._jobs[d.name] = WatchedJob(d.name, d)

    def watch(self, job: str, root: Path, submitted_ts: float | None = None) -> None:
        """Follow the heartbeat files under ``root`` (file or directory) as ``job``."""
        check_job_name(job)
        with self._lock:
            self._jobs[job] = WatchedJob(job, Path(root), submitted_ts)

    def unwatch(self, job: str) -> None:
        with self._lock:
            self._jobs.pop(job, None)

    def poll(self) -> None:
        with self._lock:
            for job in self._jobs.values():
                job.poll()

    def progress(self, job: str) -> JobProgress:
        with self._lock:
            return self._jobs[job].progress

    def collect(self) -> Iterator[Metric]:
        snapshot = FleetSnapshot()
        if self._fleet is not None:
            try:
                snapshot = self._fleet()
            except Exception:  # a busy or restarting controller must not blank job metrics
                log.warning("fleet snapshot failed; serving heartbeat-derived metrics only",
                            exc_info=True)
        with self._lock:
            self._discover()
            for job in self._jobs.values():
                job.poll()
            yield from _families(list(self._jobs.values()), snapshot)


def _gauge(name: str, doc: str, labels: list[str], unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels, unit=unit)


def _families(jobs: list[WatchedJob], snap: FleetSnapshot) -> Iterator[Metric]:
    jr = [JOB_LABEL, "rank"]
    j = [JOB_LABEL]
    loss = _gauge("fleet_train_loss", "Training loss of the rank's last optimizer step.", jr)
    ips = _gauge(
        "fleet_train_images_per_second",
        "Job throughput (global batch / step time) as timed by the rank at its last step.",
        jr,
    )
    step_s = _gauge("fleet_train_step_seconds", "Wall time of the rank's last optimizer step.", jr)
    hb = _gauge(
        "fleet_rank_last_heartbeat_timestamp_seconds",
        "Unix time of the rank's newest heartbeat line (any event).",
        jr,
    )
    lr = _gauge("fleet_train_lr", "Learning rate of the last optimizer step.", j)
    step = _gauge("fleet_train_step", "Optimizer steps done (falls back on resume).", j)
    epoch = _gauge("fleet_train_epoch", "Epoch of the last optimizer step.", j)
    samples = _gauge("fleet_train_samples_seen", "Samples consumed up to the last step.", j)
    top1 = _gauge("fleet_val_top1", "Top-1 accuracy of the last validation.", j)
    top5 = _gauge("fleet_val_top5", "Top-5 accuracy of the last validation.", j)
    val_loss = _gauge("fleet_val_loss", "Loss of the last validation.", j)
    devices = _gauge("fleet_job_devices", "Devices (ranks) of the current attempt.", j)
    gbatch = _gauge("fleet_job_global_batch", "Global batch (fixed across resizes).", j)
    mbatch = _gauge("fleet_job_micro_batch", "Per-device micro-batch of the attempt.", j)
    accum = _gauge("fleet_job_grad_accum", "Gradient accumulation steps of the attempt.", j)
    attempt = _gauge("fleet_job_attempt", "Current attempt number.", j)
    state = _gauge("fleet_job_state", "1 for the job's current state, 0 otherwise.", [*j, "state"])
    restarts = CounterMetricFamily("fleet_job_restarts", "Restarts of the job.", labels=j)
    ckpt_s = _gauge("fleet_checkpoint_save_seconds", "Duration of the last good save.", j)
    ckpt_step = _gauge("fleet_checkpoint_step", "Optimizer step of the last good checkpoint.", j)
    ckpt_ts = _gauge(
        "fleet_checkpoint_last_success_timestamp_seconds",
        "Unix time of the last good checkpoint (age = time() - this).",
        j,
    )
    ckpt_fail = CounterMetricFamily(
        "fleet_checkpoint_failures", "Checkpoint saves that failed.", labels=j
    )
    recovery = _gauge(
        "fleet_recovery_seconds",
        "Last restart: failed attempt's last heartbeat -> first step of the next attempt.",
        j,
    )
    goodput = _gauge(
        "fleet_goodput_ratio", "Seconds of kept optimizer steps / wall seconds of the job.", j
    )
    queue_wait = _gauge("fleet_queue_wait_seconds", "Submission -> first rank start.", j)
    bad = CounterMetricFamily(
        "fleet_heartbeat_bad_lines", "Heartbeat lines skipped as malformed.", labels=j
    )
    loss_scale = _gauge("fleet_train_loss_scale",
                        "Loss scale of the last optimizer step (1 without loss scaling).", j)
    overflows = CounterMetricFamily(
        "fleet_train_overflow_steps",
        "Optimizer steps whose gradients overflowed on some rank (dropped where the recipe "
        "drops them; counted once when a restart redoes a step).",
        labels=j,
    )
    recomputed = CounterMetricFamily(
        "fleet_train_recomputed_micro_steps",
        "Micro-steps a CPU rank computed again because their loss was impossible.",
        labels=j,
    )

    counts = dict.fromkeys(JOB_STATES, 0)
    used_devices = 0
    seen = set()
    for job in jobs:
        seen.add(job.name)
        p = job.progress
        name = job.name
        cur = p.current_attempt
        for rank, ev in sorted(p.last_step.items()):
            # Only the live attempt's ranks: a rank of a smaller, older attempt
            # would otherwise keep reporting its stale loss and throughput.
            if cur is not None and ev.attempt != cur.attempt:
                continue
            loss.add_metric([name, str(rank)], ev.loss)
            ips.add_metric([name, str(rank)], ev.images_per_second)
            step_s.add_metric([name, str(rank)], ev.step_seconds)
        for rank, ts in sorted(p.last_heartbeat.items()):
            hb.add_metric([name, str(rank)], ts)
        lead = p.lead_step
        if lead is not None:
            lr.add_metric([name], lead.lr)
            step.add_metric([name], lead.step)
            epoch.add_metric([name], lead.epoch)
            samples.add_metric([name], lead.samples_seen)
            if lead.loss_scale is not None:
                loss_scale.add_metric([name], lead.loss_scale)
        overflows.add_metric([name], len(p.overflow_steps))
        if p.last_val is not None:
            top1.add_metric([name], p.last_val.top1)
            top5.add_metric([name], p.last_val.top5)
            val_loss.add_metric([name], p.last_val.loss)
        start = p.current_start
        if start is not None:
            devices.add_metric([name], start.world_size)
            gbatch.add_metric([name], start.global_batch)
            mbatch.add_metric([name], start.micro_batch)
            accum.add_metric([name], start.grad_accum)
        if cur is not None:
            attempt.add_metric([name], cur.attempt)
        job_state = snap.job_states.get(name, p.state)
        for s in JOB_STATES:
            state.add_metric([name, s], 1.0 if s == job_state else 0.0)
        if job_state in counts:
            counts[job_state] += 1
        if job_state in ("running", "recovering") and start is not None:
            used_devices += start.world_size
        # Both counts only grow, so their max is a valid counter.
        restarts.add_metric([name], max(p.restarts, snap.restarts.get(name, 0)))
        if p.last_checkpoint_ok is not None:
            ckpt_s.add_metric([name], p.last_checkpoint_ok.save_seconds)
            ckpt_step.add_metric([name], p.last_checkpoint_ok.step)
            ckpt_ts.add_metric([name], p.last_checkpoint_ok.ts)
        ckpt_fail.add_metric([name], p.checkpoint_failures)
        recomputed.add_metric([name], p.recomputed_micro_steps)
        rec = p.recovery_seconds()
        if rec:
            recovery.add_metric([name], rec[-1])
        ratio = p.goodput_ratio()
        if ratio is not None:
            goodput.add_metric([name], ratio)
        submitted = snap.submitted_ts.get(name, job.submitted_ts)
        first_attempt = p.attempts[min(p.attempts)] if p.attempts else None
        if submitted is not None and first_attempt is not None:
            queue_wait.add_metric([name], max(first_attempt.first_ts - submitted, 0.0))
        bad.add_metric([name], job.bad_lines)
    # Jobs the controller knows about that have not written a heartbeat yet
    # (queued) still count in fleet_jobs.
    for name, s in snap.job_states.items():
        if name not in seen and s in counts:
            counts[s] += 1

    jobs_f = _gauge("fleet_jobs", "Jobs by state.", ["state"])
    for s, n in counts.items():
        jobs_f.add_metric([s], n)
    devices_f = _gauge("fleet_devices", "Devices by state (free needs the fleet size).", ["state"])
    if snap.devices_total is not None and snap.devices_free is not None:
        # The heartbeats would still count a job that gave its devices back and waits for
        # new ones (RESTARTING) at its last world size.
        used_devices = snap.devices_total - snap.devices_free
    devices_f.add_metric(["used"], used_devices)
    if snap.devices_total is not None:
        devices_f.add_metric(["free"], max(snap.devices_total - used_devices, 0))

    yield from (loss, ips, step_s, hb, lr, step, epoch, samples, loss_scale, overflows, top1,
                top5, val_loss)
    yield from (devices, gbatch, mbatch, accum, attempt, state, restarts)
    yield from (ckpt_s, ckpt_step, ckpt_ts, ckpt_fail, recovery, goodput, queue_wait, bad,
                recomputed)
    yield from (jobs_f, devices_f)


class MetricsExporter:
    """A registry holding only fleet metrics, optionally served over HTTP."""

    def __init__(self, fleet: Callable[[], FleetSnapshot] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = FleetCollector(fleet)
        self.registry.register(self.collector)
        self._server = None
        self._thread: threading.Thread | None = None

    def watch(self, job: str, root: Path, submitted_ts: float | None = None) -> None:
        self.collector.watch(job, root, submitted_ts)

    def watch_home(self, home: Path) -> None:
        self.collector.watch_home(home)

    def serve(self, port: int = DEFAULT_PORT, host: str = DEFAULT_HOST) -> int:
        """Serve /metrics on host:port (port 0 = pick a free one); returns the port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def start_fleet_exporter(
    home: Path,
    list_jobs: Callable[[], list[dict[str, object]]],
    cluster: Callable[[], dict[str, object]] | None = None,
    port: int | None = None,
    host: str | None = None,
) -> MetricsExporter:
    """What the controller runs: every job under ``home``/jobs plus its own job table.

    ``list_jobs``/``cluster`` are the controller's methods of the same names. Address:
    arguments, else FLEET_METRICS_HOST / FLEET_METRICS_PORT (set in the k8s head pod,
    where Prometheus scrapes the pod IP), else 127.0.0.1:9464.
    """
    host = host or os.environ.get("FLEET_METRICS_HOST") or DEFAULT_HOST
    if port is None:
        port = int(os.environ.get("FLEET_METRICS_PORT") or DEFAULT_PORT)
    exporter = MetricsExporter(
        fleet=lambda: snapshot_from_controller(list_jobs(), cluster() if cluster else None)
    )
    exporter.watch_home(home)
    exporter.serve(port=port, host=host)
    return exporter


def _parse_watch(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not path:
        raise click.BadParameter(f"expected JOB=DIR, got {value!r}", param_hint="--watch")
    try:
        check_job_name(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--watch") from exc
    root = Path(path)
    if not root.exists():
        raise click.BadParameter(f"{root} does not exist", param_hint="--watch")
    return name, root


@click.command("serve", short_help="Serve metrics from heartbeat files over HTTP.")
@click.option(
    "--watch",
    "watches",
    multiple=True,
    metavar="JOB=DIR",
    help="Job name and the directory (or file) holding its ranks' heartbeat *.jsonl files.",
)
@click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="A fleet state directory: follow every job under HOME/jobs/ (new ones too).",
)
@click.option(
    "--host",
    default=DEFAULT_HOST,
    envvar="FLEET_METRICS_HOST",
    show_default=True,
    help="Address to bind (env FLEET_METRICS_HOST).",
)
@click.option(
    "--port",
    default=DEFAULT_PORT,
    envvar="FLEET_METRICS_PORT",
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port (env FLEET_METRICS_PORT; 0 picks a free one).",
)
@click.option(
    "--devices-total",
    type=click.IntRange(0),
    default=None,
    help="Fleet size, so fleet_devices{state=\"free\"} can be reported.",
)
@click.option(
    "--max-seconds",
    type=click.FloatRange(min=0),
    default=None,
    help="Stop after this long (tests, demos); default: until interrupted.",
)
def serve_command(
    watches: tuple[str, ...],
    home: Path | None,
    host: str,
    port: int,
    devices_total: int | None,
    max_seconds: float | None,
) -> None:
    """Serve fleet metrics from heartbeat files on http://HOST:PORT/metrics."""
    started = time.time()
    snapshot = FleetSnapshot(devices_total=devices_total)
    exporter = MetricsExporter(fleet=lambda: snapshot)
    # Validate every --watch before serving anything: nothing half-started.
    if not watches and home is None:
        raise click.UsageError("give --home and/or at least one --watch JOB=DIR")
    for name, root in [_parse_watch(v) for v in watches]:
        exporter.watch(name, root)
    if home is not None:
        exporter.watch_home(home)
    bound = exporter.serve(port=port, host=host)
    # The bound port on stdout lets a caller that asked for port 0 find us.
    click.echo(f"serving fleet metrics on http://{host}:{bound}/metrics")
    deadline = None if max_seconds is None else started + max_seconds
    try:
        while deadline is None or time.time() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        exporter.close()


if __name__ == "__main__":
    serve_command()
