"""Step time on CPU with MindSpore's asynchronous host pipeline against blocking runs.

    .venv/bin/python bench/step_pipeline.py [--steps 60] [--worlds 1 2] [--json F]

Runs the rank program (workloads/volo/train.py) under plain msrun on 127.0.0.1, VOLO-tiny
on 80 digits images, global batch 8, once per (world size, MS_DEV_HOST_BLOCKING_RUN=0|1),
and reports each run's median step time after its first 15 steps plus the largest loss
difference between the two modes at equal steps (0: the same arithmetic).

Why: train.py sets MS_DEV_HOST_BLOCKING_RUN=1 on CPU (workloads/volo/runtime_env.py). The
asynchronous pipeline's waits busy-spin on the cores the CPU kernels need.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "faults"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

SETTLE = 15  # steps left out of the median: the first compiles, the next ones warm up


def train_args(world: int, steps: int, data: Path, out: Path) -> list[str]:
    """The rank program's arguments: VOLO-tiny, global batch 8 over `world` ranks, no
    validation, no checkpoint before the end."""
    return ["-c", str(REPO / "workloads" / "volo" / "configs" / "volo_tiny_digits.yaml"),
            "--data_dir", str(data), "--batch_size", str(8 // world), "--global_batch", "8",
            "--max_steps", str(steps), "--epoch_size", "100000", "--num_parallel_workers", "1",
            "--val_while_train", "False", "--warmup_epochs", "0", "--ckpt_save_steps", "1000000",
            "--ckpt_save_dir", str(out / "ckpt"), "--resume", "never"]


def rank0_steps(hb: Path) -> list[dict]:
    """Rank 0's step events in a heartbeat file the ranks share."""
    from faults_harness import read_events

    return [e for e in read_events(hb) if e.get("event") == "step" and e.get("rank", 0) == 0]


def run(world: int, blocking: bool, steps: int, data: Path, out: Path,
        timeout: float) -> dict:
    from metrics_prometheus import free_port  # the suite's loopback port picker

    hb = out / "hb.jsonl"
    env = dict(os.environ, FLEET_HEARTBEAT=str(hb), MS_DEV_HOST_BLOCKING_RUN="1" if blocking else "0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    msrun = str(Path(sys.executable).parent / "msrun")
    argv = [msrun, "--worker_num", str(world), "--local_worker_num", str(world),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--join", "True",
            "--log_dir", str(out / "logs"), str(REPO / "workloads" / "volo" / "train.py"),
            *train_args(world, steps, data, out)]
    t0 = time.time()
    with open(out / "msrun.log", "wb") as log:
        rc = subprocess.run(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            timeout=timeout, check=False).returncode
    if rc != 0:
        raise RuntimeError(f"world {world} blocking={blocking}: msrun exit {rc}, see {out}")
    st = rank0_steps(hb)
    times = [e["step_seconds"] for e in st]
    return {"world": world, "blocking": blocking, "steps": len(st),
            "median_step_s": round(statistics.median(times[SETTLE:] or times), 4),
            "first_step_s": round(times[0], 3), "wall_s": round(time.time() - t0, 1),
            "loss": {e["step"]: e["loss"] for e in st}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2], choices=[1, 2, 4, 8])
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    if args.steps <= SETTLE:
        ap.error(f"--steps must be > {SETTLE}")

    from faults_harness import tiny_digits

    rows = []
    with tempfile.TemporaryDirectory(prefix="fleet-step-pipeline-") as d:
        data = tiny_digits(Path(d) / "digits")
        for world in args.worlds:
            pair = {}
            for blocking in (False, True):
                out = Path(d) / f"w{world}-{'blocking' if blocking else 'async'}"
                out.mkdir()
                pair[blocking] = run(world, blocking, args.steps, data, out, args.timeout)
            common = set(pair[False]["loss"]) & set(pair[True]["loss"])
            diff = max((abs(pair[False]["loss"][s] - pair[True]["loss"][s]) for s in common),
                       default=None)
            row = {"world": world, "async_median_s": pair[False]["median_step_s"],
                   "blocking_median_s": pair[True]["median_step_s"],
                   "speedup": round(pair[False]["median_step_s"] / pair[True]["median_step_s"], 2),
                   "max_loss_diff": diff, "steps_compared": len(common),
                   "first_step_s": {"async": pair[False]["first_step_s"],
                                    "blocking": pair[True]["first_step_s"]}}
            rows.append(row)
            print(f"world {world}: async {row['async_median_s']} s/step, blocking "
                  f"{row['blocking_median_s']} s/step ({row['speedup']}x); largest loss "
                  f"difference over {len(common)} steps: {diff}", flush=True)
    res = {"rows": rows, "steps": args.steps, "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
