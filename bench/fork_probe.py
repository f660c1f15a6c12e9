"""Can a job's processes be forked from one process that has already imported MindSpore?

    .venv/bin/python bench/fork_probe.py [--steps 20] [--world 2] [--json F]

A probe for a fork server for standbys (docs/known-issues.md, "Goodput and recovery"): today
every restart in place spawns one standby per rank that imports MindSpore (~1.3 s of CPU each) while the
new attempt trains. Forked from a process that imported once, a standby would cost a fork.

Runs the rank program (VOLO-tiny, 80 digits images, global batch 8) twice on 127.0.0.1:
once under plain msrun (cold processes) and once as a scheduler and `--world` workers forked
from one parent that imported workloads.volo.train and MindSpore first, each child calling
train.main() with msrun's environment. Reports each run's exit codes, wall time and the
largest loss difference at equal steps (0.0: the same arithmetic). A child must leave through
normal interpreter exit: with os._exit the worker never unregisters, and the scheduler
reports it timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "faults"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def forked_run(world: int, steps: int, data: Path, out: Path) -> dict:
    """In this process: import, then fork the scheduler and the workers."""
    from metrics_prometheus import free_port
    from step_pipeline import train_args

    t0 = time.time()
    import mindspore  # noqa: F401

    from workloads.volo import train

    imported = time.time() - t0
    threads = len(os.listdir("/proc/self/task"))
    base = {"MS_SCHED_HOST": "127.0.0.1", "MS_SCHED_PORT": str(free_port()),
            "MS_WORKER_NUM": str(world), "FLEET_HEARTBEAT": str(out / "hb.jsonl")}
    args = train_args(world, steps, data, out)
    children = {}
    t1 = time.time()
    for role, node in [("MS_SCHED", "sched")] + [("MS_WORKER", str(r)) for r in range(world)]:
        pid = os.fork()
        if pid == 0:
            os.environ.update(base, MS_ROLE=role, MS_NODE_ID=node)
            log = os.open(out / f"{node}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.exit(train.main(args))  # normal exit: MindSpore's atexit unregisters the node
        children[node] = pid
    codes = {}
    for node, pid in children.items():
        _, status = os.waitpid(pid, 0)
        codes[node] = os.waitstatus_to_exitcode(status)
    return {"import_s": round(imported, 2), "threads_after_import": threads,
            "wall_s": round(time.time() - t1, 1), "exit_codes": codes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--world", type=int, default=2, choices=[1, 2, 4])
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--forked-into", help=argparse.SUPPRESS)  # internal: the forking parent
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.forked_into:
        res = forked_run(args.world, args.steps, Path(args.data), Path(args.forked_into))
        (Path(args.forked_into) / "forked.json").write_text(json.dumps(res))
        return 0

    import subprocess

    from faults_harness import tiny_digits
    from step_pipeline import rank0_steps, run

    with tempfile.TemporaryDirectory(prefix="fleet-fork-probe-") as d:
        data = tiny_digits(Path(d) / "digits")
        cold_dir, fork_dir = Path(d) / "msrun", Path(d) / "forked"
        cold_dir.mkdir()
        fork_dir.mkdir()
        cold = run(args.world, True, args.steps, data, cold_dir, args.timeout)
        # a fresh interpreter, so that this one never imports MindSpore before forking
        subprocess.run([sys.executable, __file__, "--forked-into", str(fork_dir), "--data",
                        str(data), "--steps", str(args.steps), "--world", str(args.world)],
                       env=dict(os.environ, MS_DEV_HOST_BLOCKING_RUN="1"), check=True,
                       timeout=args.timeout)
        forked = json.loads((fork_dir / "forked.json").read_text())
        losses = {e["step"]: e["loss"] for e in rank0_steps(fork_dir / "hb.jsonl")}
        common = set(losses) & set(cold["loss"])
        diff = max((abs(losses[s] - cold["loss"][s]) for s in common), default=None)
    res = {"world": args.world, "steps": args.steps,
           "msrun": {"wall_s": cold["wall_s"], "steps": cold["steps"]},
           "forked": dict(forked, steps=len(losses)), "max_loss_diff": diff,
           "steps_compared": len(common), "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    ok = (all(c == 0 for c in forked["exit_codes"].values()) and diff is not None
          and len(common) == args.steps)
    print(f"msrun: {cold['steps']} steps in {cold['wall_s']} s; forked from one import "
          f"({forked['import_s']} s, {forked['threads_after_import']} OS threads): "
          f"{len(losses)} steps in {forked['wall_s']} s, exit codes {forked['exit_codes']}; "
          f"largest loss difference over {len(common)} steps: {diff}")
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
