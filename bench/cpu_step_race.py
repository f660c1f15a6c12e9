"""Reproduce the wrong CPU micro-step under CPU contention, and compare conditions
(docs/known-issues.md; workloads/volo/step_guard.py).

    .venv/bin/python bench/cpu_step_race.py [--runs 6] [--load 3] [--steps 60]
        [--micro-batch 4] [--pin] [--env K=V] [--arm NAME[:ITEM,...]]... [--json F]

Runs the fault suite's job by hand, without Ray: a MindSpore scheduler and 2 CPU worker
ranks of workloads/volo/train.py (VOLO-tiny, digits images, global batch 2 x micro-batch,
a checkpoint every 2 steps), with the environment the fleet agent gives its ranks.
First one reference run per distinct set of train flags, without the burners, then `--runs`
runs of each `--arm` beside `--load` bursty CPU burners, the arms taking turns so that they
share the same load. The arithmetic is deterministic for a fixed thread layout (the
reference is pinned as the runs are), so every step's loss must equal the reference's. A
run whose loss differs at some step (beyond the fault suite's tolerance) applied a wrong
step; each run also lists the micro-steps the step guard computed again (rank, step, wrong
loss, recomputed loss). An arm is ``NAME:ITEM,ITEM`` with ``KEY=VALUE`` (environment),
``-KEY`` (unset) or ``--flag=value`` (a train.py flag), e.g.
``--arm base --arm nopipe:MS_DEV_RUNTIME_CONF=graph_pipeline:False``.
The table printed last gives, per arm, the runs, the runs with a wrong or recomputed step,
and the recomputed micro-steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "faults"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

STEPS = 60
# Short random bursts of work (0.2-2 ms) between short naps (0.5-3 ms), several at once: many
# preemptions per step, like the Ray processes around a fleet job. Wrong steps came in 1 of 4-5
# runs under 3-4 of these, 1 of 8 under two burners of longer, rarer bursts.
BURNER = ("import random, sys, time\n"
          "end = time.time() + float(sys.argv[1])\n"
          "while time.time() < end:\n"
          "    t = time.perf_counter() + random.uniform(0.0002, 0.002)\n"
          "    while time.perf_counter() < t:\n"
          "        pass\n"
          "    time.sleep(random.uniform(0.0005, 0.003))\n")


def rank_env(out: Path, node: str, port: int, code: Path = REPO) -> dict[str, str]:
    """What launcher/ranks.py sets for a 2-rank CPU job with cpusPerDevice 0.5."""
    env = dict(os.environ, PYTHONPATH=str(code), PYTHONUNBUFFERED="1", GLOG_v="2",
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


def one_run(out: Path, data: Path, pin: bool, timeout: float,
            extra_env: dict[str, str] | None = None, micro_batch: int = 4,
            extra_args: list[str] | None = None, steps: int = STEPS,
            code: Path = REPO) -> list[list[dict]]:
    """The two ranks' heartbeat events of one run. ``extra_env`` values of None unset."""
    from faults_harness import TINY_RECIPE, read_events
    from metrics_prometheus import free_port

    out.mkdir(parents=True)
    argv = [sys.executable, "-m", "workloads.volo.train", "-c", str(TINY_RECIPE),
            "--data_dir", str(data), "--ckpt_save_dir", str(out / "ckpt"),
            "--device_target", "CPU", "--distribute", "True", "--batch_size", str(micro_batch),
            "--gradient_accumulation_steps", "1", "--global_batch", str(2 * micro_batch),
            "--ckpt_save_steps", "2", "--keep_checkpoint_max", "3", "--max_steps", str(steps),
            "--epoch_size", str(-(-steps // 10)), "--num_parallel_workers", "1", "--val_while_train", "False",
            "--warmup_epochs", "0", "--lr", "0.001", *(extra_args or [])]
    port = free_port()
    procs = []
    for node, core in (("sched", 0), ("0", 0), ("1", 1)):
        def affinity(c: int = core) -> None:
            os.sched_setaffinity(0, {c % (os.cpu_count() or 1)})

        env = {**rank_env(out, node, port, code), **(extra_env or {})}
        with open(out / f"{node}.log", "wb") as log:
            procs.append(subprocess.Popen(argv, cwd=code,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          env={k: v for k, v in env.items() if v is not None},
                                          preexec_fn=affinity if pin else None))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    events = [read_events(out / f"rank-{r}.heartbeat.jsonl") for r in (0, 1)]
    # MindSpore 2.10 sometimes segfaults while a rank exits after its last step: a rank that
    # reported "done" has its results written
    finished = all(any(e.get("event") == "done" for e in evs) for evs in events)
    if any(p.returncode for p in procs) and not finished:
        raise RuntimeError(f"a process failed ({[p.returncode for p in procs]}), see {out}")
    return events


def losses(events: list[list[dict]]) -> dict[int, float]:
    """Step -> global loss, as rank 0 reported it."""
    return {e["step"]: e["loss"] for e in events[0] if e.get("event") == "step"}


def recomputed(events: list[list[dict]]) -> list[tuple[int, int, float, float]]:
    """(rank, step, wrong loss, recomputed loss) of every micro-step the step guard redid."""
    return [(r, e["step"], x["wrong_loss"], x["loss"]) for r, evs in enumerate(events)
            for e in evs if e.get("event") == "step" for x in e.get("recomputed", [])]


def env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--env {text!r}: expected KEY=VALUE")
    return key, value


@dataclass(frozen=True)
class Arm:
    """One experimental condition: environment to add (None: unset) and train flags."""

    name: str
    env: dict[str, str | None] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    code: Path = REPO  # the checkout whose train.py the ranks run


def arm_spec(text: str) -> Arm:
    """``NAME`` or ``NAME:ITEM,ITEM``; an ITEM is ``KEY=VALUE`` (environment), ``-KEY``
    (environment variable removed), ``--flag=value`` (train.py flag) or ``@DIR`` (run the
    train loop of another checkout, e.g. a ``git worktree`` of an older commit)."""
    name, _, rest = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"--arm {text!r}: expected NAME[:ITEM,...]")
    env: dict[str, str | None] = {}
    args: list[str] = []
    code = REPO
    for item in filter(None, rest.split(",")):
        if item.startswith("@"):
            code = Path(item[1:]).resolve()
            if not (code / "workloads" / "volo" / "train.py").is_file():
                raise argparse.ArgumentTypeError(f"--arm {text!r}: {code} has no train loop")
        elif item.startswith("--"):
            flag, sep, value = item.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"--arm {text!r}: {item!r} needs =value")
            args += [flag, value]
        elif item.startswith("-"):
            env[item[1:]] = None
        else:
            key, value = env_pair(item)
            env[key] = value
    return Arm(name, env, tuple(args), code)


def wrong_steps(run: dict[int, float], ref: dict[int, float]) -> list[tuple[int, float, float]]:
    from faults_harness import LOSS_ATOL, LOSS_RTOL

    return [(s, run[s], ref[s]) for s in sorted(ref)
            if s in run and abs(run[s] - ref[s]) > LOSS_ATOL + LOSS_RTOL * abs(ref[s])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=6, help="loaded runs of each arm")
    ap.add_argument("--load", type=int, default=3, help="bursty CPU burners beside the runs")
    ap.add_argument("--pin", action="store_true", help="each rank on its own core")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument("--micro-batch", type=int, default=4, help="images per rank and step")
    ap.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", type=env_pair,
                    help="extra environment for every loaded run (not the reference)")
    ap.add_argument("--arm", action="append", default=[], type=arm_spec,
                    metavar="NAME[:ITEM,...]",
                    help="a condition to compare (repeatable; runs alternate between arms); "
                         "ITEM: KEY=VALUE, -KEY (unset) or --flag=value; default: one arm "
                         "'base'")
    args = ap.parse_args(argv)

    from faults_harness import tiny_digits

    arms = args.arm or [Arm("base")]
    common_env = dict(args.env)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fleet-cpu-step-race-") as d:
        data = tiny_digits(Path(d) / "digits", per_class=max(8, 2 * args.micro_batch))
        refs: dict[tuple, dict[int, float]] = {}
        for arm in arms:
            if (arm.args, arm.code) not in refs:
                # pinned as the loaded runs are: at larger micro-batches MindSpore's CPU
                # kernels split their work by the cores a process may use, and the split
                # changes the float32 sums (a pinned reference differed from unpinned runs
                # by 3e-4 in loss by step 23 at micro-batch 32)
                refs[arm.args, arm.code] = losses(one_run(
                    Path(d) / f"reference-{len(refs)}", data, pin=args.pin,
                    timeout=args.timeout, micro_batch=args.micro_batch,
                    extra_args=list(arm.args), steps=args.steps, code=arm.code))
        burners = [subprocess.Popen([sys.executable, "-c", BURNER,
                                     str(args.timeout * (args.runs * len(arms) + 1))])
                   for _ in range(args.load)]
        try:
            for n in range(args.runs):
                for arm in arms:
                    t0 = time.time()
                    events = one_run(Path(d) / f"{arm.name}-run{n}", data, pin=args.pin,
                                     timeout=args.timeout, extra_env={**common_env, **arm.env},
                                     micro_batch=args.micro_batch, extra_args=list(arm.args),
                                     steps=args.steps, code=arm.code)
                    run = losses(events)
                    ref = refs[arm.args, arm.code]
                    bad = wrong_steps(run, ref)
                    redone = recomputed(events)
                    differ = [st for st in sorted(ref) if st in run and run[st] != ref[st]]
                    rows.append({"arm": arm.name, "run": n, "steps": len(run),
                                 "wrong_steps": len(bad), "first_wrong": bad[:3],
                                 "first_bit_difference": differ[0] if differ else None,
                                 "recomputed": redone, "seconds": round(time.time() - t0, 1)})
                    print(f"{arm.name} run {n}: {len(bad)} of {len(run)} steps differ from the "
                          f"reference{'; first ' + str(bad[:3]) if bad else ''} (first "
                          f"difference in the 6th decimal: step {differ[0] if differ else '-'}); "
                          f"{len(redone)} "
                          f"micro-steps recomputed{' ' + str(redone) if redone else ''} "
                          f"({time.time() - t0:.0f} s)", flush=True)
        finally:
            for b in burners:
                b.kill()
    table = {a.name: {"runs": sum(1 for r in rows if r["arm"] == a.name),
                      "runs_wrong": sum(1 for r in rows if r["arm"] == a.name and
                                        (r["wrong_steps"] or r["recomputed"])),
                      "micro_steps_recomputed": sum(len(r["recomputed"]) for r in rows
                                                    if r["arm"] == a.name),
                      "env": a.env, "args": list(a.args), "code": str(a.code)} for a in arms}
    res = {"arms": table, "runs": rows, "pin": args.pin, "load": args.load,
           "micro_batch": args.micro_batch, "env": common_env, "cpus": os.cpu_count()}
    print(json.dumps(table))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
