"""Reproduce the wrong CPU micro-step under CPU contention (README, Known gaps).

    .venv/bin/python bench/cpu_step_race.py [--runs 6] [--load 2] [--pin] [--json F]

Runs the fault suite's job by hand, without Ray: a MindSpore scheduler and 2 CPU worker
ranks of workloads/volo/train.py (VOLO-tiny, 80 digits images, global batch 8, 60 steps,
a checkpoint every 2 steps), with the environment the fleet agent gives its ranks.
First one reference run on an otherwise idle machine, then `--runs` runs beside `--load`
bursty CPU burners. The arithmetic is deterministic, so every step's loss must equal the
reference's. A run whose loss differs at some step (beyond the fault suite's tolerance)
computed a wrong step. `--pin` gives each worker its own core (sched_setaffinity).

Measured on the shared 2-core machine (stop 17), with a debug build that also logged each
rank's own loss:
* unpinned: wrong steps in 5 of 15 runs. The rank's own loss was 0.0-0.4, below the
  0.50 floor of label smoothing 0.1, while the graph's inputs were right.
* pinned: wrong steps in 0 of 6 runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "faults"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

STEPS = 60
BURNER = ("import sys, time\n"
          "end = time.time() + float(sys.argv[1])\n"
          "while time.time() < end:\n"
          "    s = sum(range(150000))\n"
          "    time.sleep(0.03)\n")


def rank_env(out: Path, node: str, port: int) -> dict[str, str]:
    """What launcher/ranks.py sets for a 2-rank CPU job with cpusPerDevice 0.5."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", GLOG_v="2",
               OMP_NUM_THREADS="1", FLEET_NUM_THREADS="1", MS_RETRY_INTERVAL_LOWER="1",
               MS_RETRY_INTERVAL_UPPER="1", MS_SCHED_HOST="127.0.0.1", MS_SCHED_PORT=str(port),
               MS_WORKER_NUM="2", FLEET_CHECKPOINT_DIR=str(out / "ckpt"),
               FLEET_COMPILE_CACHE_STORE=str(out.parent / "compile-store"),
               FLEET_HEARTBEAT=str(out / f"rank-{node}.heartbeat.jsonl"),
               FLEET_LAST_WORDS=str(out / f"rank-{node}.last-words"))
    if node == "sched":
        env["MS_ROLE"] = "MS_SCHED"
    else:
        env.update(MS_ROLE="MS_WORKER", MS_NODE_ID=node, RANK_ID=node, RANK_SIZE="2")
    return env


def one_run(out: Path, data: Path, pin: bool, timeout: float) -> dict[int, float]:
    from faults_harness import TINY_RECIPE, read_events
    from metrics_prometheus import free_port

    out.mkdir(parents=True)
    argv = [sys.executable, "-m", "workloads.volo.train", "-c", str(TINY_RECIPE),
            "--data_dir", str(data), "--ckpt_save_dir", str(out / "ckpt"),
            "--device_target", "CPU", "--distribute", "True", "--batch_size", "4",
            "--gradient_accumulation_steps", "1", "--global_batch", "8",
            "--ckpt_save_steps", "2", "--keep_checkpoint_max", "3", "--max_steps", str(STEPS),
            "--epoch_size", "6", "--num_parallel_workers", "1", "--val_while_train", "False",
            "--warmup_epochs", "0", "--lr", "0.001"]
    port = free_port()
    procs = []
    for node, core in (("sched", 0), ("0", 0), ("1", 1)):
        def affinity(c: int = core) -> None:
            os.sched_setaffinity(0, {c % (os.cpu_count() or 1)})

        with open(out / f"{node}.log", "wb") as log:
            procs.append(subprocess.Popen(argv, cwd=REPO, env=rank_env(out, node, port),
                                          stdout=log, stderr=subprocess.STDOUT,
                                          preexec_fn=affinity if pin else None))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a process failed ({[p.returncode for p in procs]}), see {out}")
    return {e["step"]: e["loss"] for e in read_events(out / "rank-0.heartbeat.jsonl")
            if e.get("event") == "step"}


def wrong_steps(run: dict[int, float], ref: dict[int, float]) -> list[tuple[int, float, float]]:
    from faults_harness import LOSS_ATOL, LOSS_RTOL

    return [(s, run[s], ref[s]) for s in sorted(ref)
            if s in run and abs(run[s] - ref[s]) > LOSS_ATOL + LOSS_RTOL * abs(ref[s])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--load", type=int, default=2, help="bursty CPU burners beside the runs")
    ap.add_argument("--pin", action="store_true", help="each rank on its own core")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)

    from faults_harness import tiny_digits

    rows = []
    with tempfile.TemporaryDirectory(prefix="fleet-cpu-step-race-") as d:
        data = tiny_digits(Path(d) / "digits")
        ref = one_run(Path(d) / "reference", data, pin=True, timeout=args.timeout)
        burners = [subprocess.Popen([sys.executable, "-c", BURNER,
                                     str(args.timeout * (args.runs + 1))])
                   for _ in range(args.load)]
        try:
            for n in range(args.runs):
                t0 = time.time()
                run = one_run(Path(d) / f"run{n}", data, pin=args.pin, timeout=args.timeout)
                bad = wrong_steps(run, ref)
                rows.append({"run": n, "steps": len(run), "wrong_steps": len(bad),
                             "first_wrong": bad[:3], "seconds": round(time.time() - t0, 1)})
                print(f"run {n}: {len(bad)} of {len(run)} steps differ from the reference"
                      f"{'; first ' + str(bad[:3]) if bad else ''}", flush=True)
        finally:
            for b in burners:
                b.kill()
    res = {"runs": rows, "runs_wrong": sum(1 for r in rows if r["wrong_steps"]),
           "pin": args.pin, "load": args.load, "cpus": os.cpu_count()}
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
