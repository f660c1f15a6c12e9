"""Scale benchmark of the controller's whole decision path on the in-memory backend.

    .venv/bin/python bench/scale_reconciler.py [--jobs 10000] [--nodes 4096] [--seed 0]

The real controller (submit -> store -> reconciler tick: poll, decide, schedule, start)
over a SQLite store and `launcher.backend_fake.FakeBackend` with --nodes 8-device servers.
--jobs jobs arrive in waves of --wave per tick; a fraction (--fail) of them exit 1 after a
few steps and restart (in place or afresh, as the failure policy decides); once all run,
--lose servers are lost and their jobs restart elsewhere. A *placement* is one attempt
started on its devices. Reported (one JSON line): placements per second end to end (submit
included; also per second of this process's CPU time, which a loaded machine inflates
less) and of tick time alone, and the tick time (median, p99) while the queue drains
and at full size (every job running). Goal: >= 1,000 placements/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.backend_fake import Fail, FakeBackend, Run  # noqa: E402
from launcher.lifecycle import JobState  # noqa: E402

# (devices, share): 1/2/4 chips inside a ring, whole servers; about 3 devices a job, so
# 10,000 jobs fill ~90 % of 4,096 servers
SIZES = [(1, 0.45), (2, 0.25), (4, 0.17), (8, 0.09), (16, 0.04)]


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def doc(name: str, devices: int) -> dict:
    return {"apiVersion": "fleet/v1", "kind": "TrainJob", "metadata": {"name": name},
            "spec": {"workload": "smoke", "config": "recipe.yaml", "data": {"dir": "data"},
                     "resources": {"deviceType": "CPU", "devicesPerNode": 8,
                                   "devices": {"min": devices, "max": devices}},
                     "batch": {"global": 8 * devices, "microBatchMax": 8},
                     "restart": {"maxRestarts": 5, "backoffSeconds": 0.0,
                                 "maxBackoffSeconds": 0.0}}}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def run(jobs: int, nodes: int, wave: int, fail: float, lose: int, seed: int,
        home: Path, full_ticks: int = 10) -> dict:
    from launcher.controller import Controller

    os.environ["FLEET_METRICS"] = "0"
    os.environ.pop("FLEET_K8S_RAYCLUSTER", None)
    os.environ["FLEET_MAX_PENDING"] = str(jobs + 1)
    rng = random.Random(seed)
    clock = Clock()
    backend = FakeBackend.servers(nodes, 8, clock=clock)
    ctl = Controller(str(home), start_loop=False, backend=backend, clock=clock,
                     inline_starts=True)
    sizes, weights = zip(*SIZES, strict=True)
    todo = [doc(f"j{i}", rng.choices(sizes, weights)[0]) for i in range(jobs)]
    ticks: list[float] = []
    tick_cpu: list[float] = []
    submit_s = 0.0
    failing = 0
    t0, cpu0 = time.perf_counter(), time.process_time()

    def tick() -> None:
        s, c = time.perf_counter(), time.process_time()
        ctl._tick()
        ticks.append(time.perf_counter() - s)
        tick_cpu.append(time.process_time() - c)
        clock.t += 0.5

    while todo:
        s = time.perf_counter()
        for d in todo[:wave]:
            jid = ctl.submit(d, {"base": str(home)})["id"]
            if rng.random() < fail:
                backend.script(jid, Fail(1, after=rng.randint(1, 4)), Run())
                failing += 1
        submit_s += time.perf_counter() - s
        del todo[:wave]
        tick()
    waiting = {JobState.PENDING, JobState.RESTARTING, JobState.SCHEDULING}
    # every injected failure fires within 4 polls of its start, and restarts at once
    for i in range(200):
        tick()
        if i >= 6 and ctl.store.count(waiting) == 0:
            break
    for n in rng.sample(sorted(backend.cluster), lose):
        backend.lose_node(n)
    for i in range(200):
        tick()
        if i >= 1 and ctl.store.count(waiting) == 0:
            break
    starts = backend.count("start")
    drain, drain_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    drain_ticks = list(ticks)
    for _ in range(full_ticks):
        tick()
    running = ctl.store.count({JobState.RUNNING})
    return {
        "jobs": jobs, "nodes": nodes, "devices": nodes * 8, "seed": seed,
        "failing_jobs": failing, "lost_nodes": lose, "running_at_end": running,
        "waiting_at_end": ctl.store.count({JobState.PENDING, JobState.RESTARTING}),
        "placements": starts, "placement_groups": backend.count("place"),
        "restarts_in_place": starts - backend.count("place"),
        "seconds_end_to_end": round(drain, 2), "seconds_submit": round(submit_s, 2),
        "seconds_ticks": round(sum(drain_ticks), 2), "ticks": len(drain_ticks),
        "cpu_seconds_end_to_end": round(drain_cpu, 2),
        "placements_per_s_end_to_end": round(starts / drain, 1),
        "placements_per_cpu_s_end_to_end": round(starts / drain_cpu, 1),
        "placements_per_s_ticks": round(starts / sum(drain_ticks), 1),
        "placements_per_cpu_s_ticks": round(starts / sum(tick_cpu[:len(drain_ticks)]), 1),
        "tick_ms_median_draining": round(1e3 * statistics.median(drain_ticks), 1),
        "tick_ms_p99_draining": round(1e3 * pct(drain_ticks, 0.99), 1),
        "tick_ms_median_full": round(1e3 * statistics.median(ticks[len(drain_ticks):]), 1),
        "tick_ms_p99_full": round(1e3 * pct(ticks[len(drain_ticks):], 0.99), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--nodes", type=int, default=4096)
    ap.add_argument("--wave", type=int, default=1000, help="jobs arriving per tick")
    ap.add_argument("--fail", type=float, default=0.05, help="share of jobs that exit 1 once")
    ap.add_argument("--lose", type=int, default=16, help="servers lost once all run")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.jobs < 1 or a.nodes < 1 or a.wave < 1 or not 0 <= a.fail <= 1 or \
            not 0 <= a.lose <= a.nodes:
        ap.error("--jobs, --nodes, --wave >= 1; 0 <= --fail <= 1; 0 <= --lose <= --nodes")
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as home:
        out = run(a.jobs, a.nodes, a.wave, a.fail, a.lose, a.seed, Path(home))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
