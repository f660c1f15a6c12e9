"""Fault-injection harness: a real local Ray cluster, the fleet controller, rank
processes found by their FLEET_* env, and the heartbeat analysis every fault test
shares (committed step lineage, steps lost, samples replayed, recovery time).

Used by tests/faults/ and by bench/recovery.py + bench/goodput.py, so the figures
in the benchmarks are computed exactly as the suite checks them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_token import share_token

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOG_v", "3")
# The Prometheus exporter is not under test here; a second controller on a busy port
# would only add noise.
os.environ.setdefault("FLEET_METRICS", "0")

REPO = Path(__file__).resolve().parents[2]
# FLEET_FAULTS_RECIPE runs the VOLO faults with another recipe of the same model and data,
# e.g. volo_tiny_digits_o3.yaml (mixed precision, dynamic loss scale, EMA).
TINY_RECIPE = Path(os.environ.get("FLEET_FAULTS_RECIPE") or
                   REPO / "workloads" / "volo" / "configs" / "volo_tiny_digits.yaml")
# Loss equality across attempts: resumed parameters are bit-identical, but a resize
# changes the accumulation order of the gradient sum (float32), so allow rounding.
LOSS_RTOL = 2e-4
LOSS_ATOL = 2e-5


# ------------------------------------------------------------------ results table
@dataclass
class FaultResult:
    fault: str
    recovered: bool
    recovery_s: float | None
    steps_lost: int | None
    samples_replayed: int | None
    note: str = ""


RESULTS: list[FaultResult] = []


def record(res: FaultResult) -> FaultResult:
    RESULTS.append(res)
    return res


def format_table(rows: list[FaultResult]) -> str:
    head = ("fault", "recovered", "recovery s", "steps lost", "samples replayed", "note")
    body = [(r.fault, "yes" if r.recovered else "no",
             "-" if r.recovery_s is None else f"{r.recovery_s:.1f}",
             "-" if r.steps_lost is None else str(r.steps_lost),
             "-" if r.samples_replayed is None else str(r.samples_replayed), r.note)
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


# ------------------------------------------------------------------ data
def workload_inputs(home: Path, workload: str) -> tuple[Path, Path]:
    """(data dir, recipe) for a bench job: tiny digits + the tiny VOLO recipe, or the smoke
    workload's empty data dir and one-line recipe."""
    if workload == "volo":
        return tiny_digits(home / "digits"), REPO / "workloads" / "volo" / "configs" / "volo_tiny_digits.yaml"
    data = home / "data"
    data.mkdir()
    cfg = home / "recipe.yaml"
    cfg.write_text("model: smoke\n")
    return data, cfg


def tiny_digits(out: Path, per_class: int = 8, val_per_class: int = 0,
                full: Path | None = None) -> Path:
    """An ImageFolder of per_class images x 10 digits (and val_per_class of the validation
    split), cut from the project's digits data: small enough that a VOLO-tiny step takes
    well under a second. ``full``: that data already written (the test session's), read
    only; without it a copy is written next to ``out`` and removed."""
    from workloads.volo.digits import write_digits

    source = full if full is not None else out.parent / f"{out.name}-full"
    if full is None:
        write_digits(source)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for cls in sorted((source / split).iterdir()) if n else []:
            dest = out / split / cls.name
            dest.mkdir(parents=True)
            for img in sorted(cls.iterdir())[:n]:
                shutil.copy(img, dest / img.name)
    if full is None:
        shutil.rmtree(source)
    return out


# ------------------------------------------------------------------ cluster
class Fleet:
    """One Ray cluster on 127.0.0.1 + the detached fleet controller, for one module."""

    def __init__(self, home: Path, nodes: list[dict[str, float]], cpus: int = 2):
        from launcher import local

        self.home = home
        local.quiet_ray()
        share_token(home)
        local.use_local_token(home, create=True)
        import ray
        from ray.cluster_utils import Cluster

        from launcher import controller as ctl

        self.ray, self.ctl = ray, ctl
        self.cluster = Cluster()
        for i, res in enumerate(nodes):
            self.cluster.add_node(num_cpus=cpus, resources=dict(res),
                                  node_ip_address="127.0.0.1",
                                  include_dashboard=False if i == 0 else None)
        ray.init(address=self.cluster.address, namespace=ctl.NAMESPACE,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
        c = ctl.get_or_create(str(home), 0.2)
        ray.get(c.ping.remote(), timeout=120)

    def close(self) -> None:
        try:
            c = self.controller()
            for j in self.ray.get(c.list_jobs.remote(False), timeout=30):
                self.ray.get(c.cancel.remote(j["id"]), timeout=60)
            self.ray.kill(c, no_restart=True)
        except Exception:  # noqa: BLE001 - teardown is best effort; the cluster goes anyway
            pass
        finally:
            self.ray.shutdown()
            self.cluster.shutdown()

    # -- controller API
    def controller(self):
        return self.ray.get_actor(self.ctl.CONTROLLER_NAME, namespace=self.ctl.NAMESPACE)

    def call(self, method: str, *args: Any, timeout: float = 60) -> Any:
        return self.ray.get(getattr(self.controller(), method).remote(*args), timeout=timeout)

    def submit(self, doc: dict, config: Path, data_dir: Path,
               ckpt_dir: Path | None = None) -> str:
        name = doc["metadata"]["name"]
        step = {"config": str(config), "data_dir": str(data_dir)}
        if ckpt_dir is not None:
            step["ckpt_dir"] = str(ckpt_dir)
        return self.call("submit", doc, {"workdir": str(REPO), "steps": {name: step}})["id"]

    def status(self, job_id: str) -> dict | None:
        try:
            return self.call("status", job_id, timeout=20)
        except Exception:  # noqa: BLE001 - the controller may be restarting
            return None

    def wait_for(self, job_id: str, pred, timeout: float = 120, what: str = "",
                 interval: float = 0.2) -> dict:
        deadline = time.time() + timeout
        st = None
        while time.time() < deadline:
            cur = self.status(job_id)
            if cur is not None:
                st = cur
                if pred(st):
                    return st
            time.sleep(interval)
        raise AssertionError(f"{job_id}: timed out after {timeout:.0f}s waiting for {what}; "
                             f"last status: {_short(st)}")

    def wait_done(self, job_id: str, timeout: float = 240) -> dict:
        return self.wait_for(job_id, lambda s: s["state"] in ("SUCCEEDED", "FAILED",
                                                              "CANCELLED"),
                             timeout=timeout, what="a terminal state")

    def kill_controller(self, timeout: float = 90) -> float:
        """ray.kill with restart; returns seconds until the new controller answers."""
        old = self.call("ping")["pid"]
        t0 = time.time()
        self.ray.kill(self.controller(), no_restart=False)
        deadline = t0 + timeout
        while time.time() < deadline:
            try:
                if self.call("ping", timeout=10)["pid"] != old:
                    return time.time() - t0
            except Exception:  # noqa: BLE001 - restarting
                pass
            time.sleep(0.2)
        raise AssertionError(f"controller not back within {timeout}s")

    # -- store, read directly: fast enough to see a transient state like RESIZING
    def db_state(self, job_id: str) -> str | None:
        con = sqlite3.connect(f"file:{self.home / 'fleet.db'}?mode=ro", uri=True, timeout=1)
        try:
            row = con.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        except sqlite3.Error:
            return None
        finally:
            con.close()
        return row[0] if row else None

    # -- files
    def attempt_dir(self, job_id: str, n: int) -> Path:
        return self.home / "jobs" / job_id / f"attempt-{n}"

    def ckpt_dir(self, job_id: str) -> Path:
        return self.home / "jobs" / job_id / "checkpoints"

    def heartbeats(self, job_id: str, n: int, rank: int = 0) -> list[dict]:
        return read_events(self.attempt_dir(job_id, n) / f"rank-{rank}.heartbeat.jsonl")

    def progress_step(self, job_id: str, attempt: int | None = None) -> int:
        """Newest optimizer step in the newest attempt (or in `attempt`), from rank 0's
        heartbeat file."""
        d = self.home / "jobs" / job_id
        if attempt is not None:
            atts = [self.attempt_dir(job_id, attempt)]
        else:
            atts = sorted(d.glob("attempt-*"), key=lambda p: int(p.name.split("-")[1])) \
                if d.is_dir() else []
        for a in reversed(atts):
            steps = [e["step"] for e in read_events(a / "rank-0.heartbeat.jsonl")
                     if e.get("event") == "step"]
            if steps:
                return steps[-1]
        return 0

    def wait_step(self, job_id: str, step: int, timeout: float = 180,
                  attempt: int | None = None) -> None:
        """Until rank 0 has completed `step`; with `attempt`, in that attempt, failing at
        once if a later attempt has started (a fault injected then would hit the wrong
        processes)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.progress_step(job_id, attempt) >= step:
                return
            if attempt is not None and self.attempt_dir(job_id, attempt + 1).exists():
                raise AssertionError(f"{job_id}: attempt {attempt} ended before step {step}; "
                                     f"{_short(self.status(job_id))}")
            time.sleep(0.05)
        raise AssertionError(f"{job_id}: step {step} not reached in {timeout}s; "
                             f"{_short(self.status(job_id))}")


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line torn by SIGKILL mid-write
    return out


def _short(st: dict | None) -> str:
    if not st:
        return "none"
    return json.dumps({"state": st.get("state"), "message": st.get("message"),
                       "attempts": [(a["n"], a["status"], a.get("reason"))
                                    for a in st.get("attempts", [])]})[:1500]


# ------------------------------------------------------------------ rank processes
_RANK_LOG = re.compile(r"/attempt-(\d+)/(rank-\d+|scheduler)\.log$")


def rank_role(pid: int) -> tuple[int, str] | None:
    """(attempt, label) of a rank process, from the log its stdout writes to.

    Not from /proc/PID/environ: a rank that started from a standby process
    (launcher/standby.py) still shows the environment the standby started with."""
    try:
        m = _RANK_LOG.search(os.readlink(f"/proc/{pid}/fd/1"))
    except OSError:
        return None
    return (int(m.group(1)), m.group(2)) if m else None


def rank_procs(job_id: str, attempt: int | None = None) -> dict[str, Any]:
    """label ('rank-0', 'scheduler') -> psutil.Process of a job's live rank processes."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid"]):
        try:
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if env.get("FLEET_JOB_ID") != job_id:
            continue
        role = rank_role(p.pid)  # None: a standby that is not a rank yet
        if role is None or (attempt is not None and role[0] != attempt):
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        label = role[1]
        # The rank's own python, not a helper it forked (dataset workers inherit env).
        if label not in out or p.pid < out[label].pid:
            out[label] = p
    return out


def wait_prejoined(fleet: Fleet, job_id: str, attempt: int, workers: int = 2,
                   timeout: float = 120) -> bool:
    """Until `workers` processes of `attempt` hold, joined and compiled ahead
    (launcher/prejoin.py): a restart in place after that starts at the checkpoint load, as
    it does in a long run. False on timeout."""
    from workloads.volo.prejoin import HOLDING

    d = fleet.home / "jobs" / job_id / f"prejoin-{attempt}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        logs = [p.read_text(errors="replace") for p in d.glob("rank-*.log")]
        if len(logs) == workers and all(HOLDING in t for t in logs):
            return True
        time.sleep(0.2)
    return False


def wait_rank(job_id: str, label: str, attempt: int | None = None, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = rank_procs(job_id, attempt).get(label)
        if p is not None:
            return p
        time.sleep(0.1)
    raise AssertionError(f"{job_id}: no live {label} process within {timeout}s")


def signal_rank(job_id: str, label: str, sig: int = signal.SIGKILL) -> int:
    p = wait_rank(job_id, label)
    os.kill(p.pid, sig)
    return p.pid


# ------------------------------------------------------------------ lineage
@dataclass
class Lineage:
    """The optimizer steps that make up the final model, across attempts.

    Every attempt resumes at `resumed_step`: the steps an earlier attempt ran past that
    point were redone (steps lost = wasted work); the rest are the committed chain.
    """

    committed: dict[int, dict] = field(default_factory=dict)  # step -> its step event
    validations: dict[int, dict] = field(default_factory=dict)  # step -> its val event
    steps_lost: int = 0
    gaps: list[int] = field(default_factory=list)  # resumed past steps nobody ran
    starts: list[dict] = field(default_factory=list)
    lost_at: list[int] = field(default_factory=list)  # steps redone by each of `starts`
    attempts: list[list[dict]] = field(default_factory=list)
    ckpt_dir: Path | None = None  # where the job's checkpoints are, when a test records it


def lineage(fleet: Fleet, job_id: str, n_attempts: int, all_ranks: bool = False) -> Lineage:
    """``all_ranks``: also take a step from another rank's heartbeat where rank 0 logged none
    (data-parallel ranks that all-reduce: a step any rank completed had every rank's
    gradients, and a rank can die between the all-reduce and its heartbeat)."""
    lin = Lineage()
    for n in range(1, n_attempts + 1):
        evs = fleet.heartbeats(job_id, n)
        if all_ranks:
            have = {e["step"] for e in evs if e.get("event") == "step"}
            for path in sorted(fleet.attempt_dir(job_id, n).glob("rank-*.heartbeat.jsonl")):
                more = [e for e in read_events(path)
                        if e.get("event") == "step" and e["step"] not in have]
                have |= {e["step"] for e in more}
                evs = evs + more
        lin.attempts.append(evs)
        start = next((e for e in evs if e.get("event") == "start"), None)
        if start is None:
            continue  # never got to training (start failed, killed while scheduling)
        lin.starts.append(start)
        r = int(start["resumed_step"])
        later = sorted(s for s in lin.committed if s > r)
        lin.steps_lost += len(later)
        lin.lost_at.append(len(later))
        for s in later:
            del lin.committed[s]
        for s in [s for s in lin.validations if s > r]:
            del lin.validations[s]
        if r > 0 and r not in lin.committed and not any(s > r for s in lin.committed):
            lin.gaps.append(r)
        for e in evs:
            if e.get("event") == "step":
                lin.committed[int(e["step"])] = e
            elif e.get("event") == "val":
                lin.validations[int(e["step"])] = e
    return lin


def compare_to_reference(lin: Lineage, ref: Lineage, total: int, global_batch: int
                         ) -> dict[str, Any]:
    """What a fault changed in the committed chain, versus the uninterrupted run."""
    missing = [s for s in range(1, total + 1) if s not in lin.committed]
    extra = [s for s in lin.committed if s > total]
    bad_hash = []
    bad_loss = []
    for s in range(1, total + 1):
        a, b = lin.committed.get(s), ref.committed.get(s)
        if a is None or b is None:
            continue
        # A step without a hash cannot be shown to have trained the reference's samples.
        if a.get("sample_hash") is None or a.get("sample_hash") != b.get("sample_hash"):
            bad_hash.append(s)
        if a.get("samples_seen") != b.get("samples_seen"):
            bad_hash.append(s)
        la, lb = float(a["loss"]), float(b["loss"])
        if abs(la - lb) > LOSS_ATOL + LOSS_RTOL * abs(lb):
            bad_loss.append((s, la, lb))
    bad_hash = sorted(set(bad_hash))
    # Validations score the model a step left, BatchNorm running statistics included, which
    # the training loss never sees: each must be the reference's
    bad_val = [(s, {k: v.get(k) for k in VAL_KEYS}, {k: b.get(k) for k in VAL_KEYS})
               for s, b in sorted(ref.validations.items()) if s <= total
               for v in [lin.validations.get(s, {})] if not _same_validation(v, b)]
    return {"missing": missing, "extra": extra, "bad_hash": bad_hash, "bad_loss": bad_loss,
            "bad_val": bad_val,
            # A step whose samples differ from the reference's trained other samples
            # (some seen twice, some never): count its whole global batch.
            "samples_replayed": global_batch * (len(bad_hash) + len(extra)),
            "gaps": lin.gaps}


VAL_KEYS = ("top1", "top5", "loss", "images")
# Validation loss across attempts: the same rounding allowance as the training loss. Top-1 and
# top-5 are counts of images, so they must be equal.
VAL_LOSS_RTOL = LOSS_RTOL


def _same_validation(a: dict, b: dict) -> bool:
    if not a or any(a.get(k) != b.get(k) for k in ("top1", "top5", "images")):
        return False
    return abs(float(a["loss"]) - float(b["loss"])) <= VAL_LOSS_RTOL * abs(float(b["loss"]))


# workloads/volo/optim.py's AdamW (and MindSpore's optimizers): moments, powers, counters
OPTIMIZER_STATE = {"adam_m", "adam_v", "moments", "beta1_power", "beta2_power", "global_step",
                   "learning_rate"}


def checkpoint_params(path: Path) -> dict[str, Any]:
    """Every value a checkpoint holds (model, BatchNorm statistics, optimizer state)."""
    import mindspore as ms

    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path / "model.ckpt")).items()}


def max_param_differences(a: Path, b: Path) -> dict[str, float]:
    """Largest |difference| between two checkpoints, per kind of value: trainable weights,
    BatchNorm running statistics and optimizer state; raises if their keys differ."""
    import numpy as np

    pa, pb = checkpoint_params(a), checkpoint_params(b)
    assert set(pa) == set(pb), sorted(set(pa) ^ set(pb))
    kinds: dict[str, float] = {"weights": 0.0, "bn_statistics": 0.0, "optimizer": 0.0}
    for k in pa:
        kind = ("bn_statistics" if "moving_" in k else
                "optimizer" if k.split(".")[0] in OPTIMIZER_STATE else "weights")
        diff = float(np.abs(pa[k].astype(np.float64) - pb[k].astype(np.float64)).max(initial=0))
        kinds[kind] = max(kinds[kind], diff)
    return kinds


def recovery_seconds(fleet: Fleet, job_id: str, fault_ts: float, attempt: int) -> float | None:
    """Fault -> first optimizer step completed after it, by `attempt` or a later one
    (a restart that itself failed to start counts inside the recovery)."""
    n = attempt
    while fleet.attempt_dir(job_id, n).is_dir():
        for e in fleet.heartbeats(job_id, n):
            if e.get("event") == "step" and e["ts"] >= fault_ts:
                return e["ts"] - fault_ts
        n += 1
    return None


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    steps = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
    return steps[-1] if steps else None


def wait_checkpoint(ckpt_dir: Path, step: int, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = ckpt_dir / f"step-{step:08d}"
        if (p / "MANIFEST.sha256").exists():
            return p
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {step} in {ckpt_dir} within {timeout}s")


def signal_safe(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
