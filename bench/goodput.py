"""Goodput under periodic faults: useful training time / wall time since submit.

    .venv/bin/python bench/goodput.py [--duration 1800] [--fault-every 300]
                                      [--ckpt-every 10] [--workload volo|smoke]
                                      [--warm-cache] [--json F]

The tiny recipe (VOLO-tiny, 80 digits images, G=8, 2 CPU ranks on two Ray nodes with
{"NPU": 1}) trains for --duration seconds; every --fault-every seconds one rank is
SIGKILLed (alternating rank 1 / rank 0). At the end the job is cancelled and its
heartbeat files are split into:

  useful      committed optimizer steps (steps that reach the final model), each at its
              measured step time; an attempt's first step counts at the median step
              time, the excess is "compile"
  queue       submit -> first attempt started
  detect      fault -> the controller ends the attempt
  reschedule  attempt ended -> next attempt started (backoff, placement group, agents)
  rank_init   attempt started -> its first step begins (process start, imports, data
              index, cluster join, checkpoint load); init_split sums the ranks' own
              split of it (heartbeat "start": init_seconds)
  compile     first step's time above the median (graph build; a restart loads the
              graphs from the job's compile cache instead: compile_cache lists each
              attempt's hit|miss|off, see workloads/volo/compile_cache.py)
  lost_steps  steps run after the last checkpoint before a fault (redone)
  ckpt_gaps   rank 0's time between a step that checkpoints and the next step (the
              save's stall: waiting for the device, copying parameters to the writer)
  step_gaps   rank 0's time between other consecutive steps (heartbeats, a new input
              pipeline, validation)
  in_flight   the last step's end -> the fault (the step the fault cut short)
  after_start committed steps within AFTER_START_S of an attempt's first step: their time
              above the median (the next attempt's processes import MindSpore, join and
              compile then, on the same cores: launcher/prejoin.py; counted as lost, not
              useful, even where it is noise)
  other       the rest (should be ~0: time outside every attempt and the above)

Two figures: "goodput" (strict: useful / wall) and "goodput_committed", the issue's own
definition (steps that count / wall: every committed step at its measured time, after_start
included; an attempt's first step still counts at the median).

--warm-cache first runs the same recipe as another job until its graphs are in the fleet's
shared compile cache (workloads/volo/compile_cache.py), then cancels it: the timed job is a
resubmission, as most jobs of a recipe are, and its first attempt loads the graphs too.
Without it, the first attempt compiles (the cold case).

Goal (issue 6): >= 97 % with a fault every 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "faults"))
sys.path.insert(0, str(REPO / "tests"))  # ray_token, shared with the suite
sys.path.insert(0, str(REPO))

GOAL = 0.97
AFTER_START_S = 10.0


def job_doc(workload: str, ckpt_every: int, name: str = "goodput") -> dict:
    over: dict = {"max_steps": 1_000_000}
    if workload == "volo":
        over.update(epoch_size=100_000, num_parallel_workers=1, val_while_train=False,
                    warmup_epochs=0, lr=0.001)
    else:
        over.update(step_seconds=0.3)
    return {
        "apiVersion": "fleet/v1", "kind": "TrainJob", "metadata": {"name": name},
        "spec": {"workload": workload, "config": "recipe.yaml", "overrides": over,
                 "data": {"dir": "data"},
                 "resources": {"deviceType": "CPU", "devices": {"min": 2, "max": 2},
                               "cpusPerDevice": 0.5},
                 "batch": {"global": 8, "microBatchMax": 4},
                 "checkpoint": {"everySteps": ckpt_every, "keep": 2},
                 "restart": {"maxRestarts": 1000, "backoffSeconds": 0.2,
                             "hangTimeoutSeconds": 300}},
    }


def account(fleet, job_id: str, t_submit: float, t_end: float, faults: list[float],
            ckpt_every: int = 0, all_ranks: bool = True) -> dict:
    """``all_ranks``: steps from every rank's heartbeat (faults_harness.lineage); the
    model-free smoke ranks do not all-reduce, so for them only rank 0's count."""
    from faults_harness import lineage

    st = fleet.status(job_id)
    atts = st["attempts"]
    lin = lineage(fleet, job_id, len(atts), all_ranks=all_ranks)
    all_steps = [e for evs in lin.attempts for e in evs if e.get("event") == "step"]
    median = statistics.median(e["step_seconds"] for e in all_steps) if all_steps else 0.0
    firsts = set()
    b = dict.fromkeys(("queue", "detect", "reschedule", "rank_init", "compile", "lost_steps",
                       "ckpt_gaps", "step_gaps", "in_flight", "after_start"), 0.0)
    after_start: set[tuple[int, int]] = set()
    first_steps: list[list[float]] = []  # each attempt's first 15 step times, to read the above
    series: list[list] = []  # per attempt: [s since its first step, step s, split] of every step
    prev_end = None
    for a, evs in zip(atts, lin.attempts, strict=False):
        steps = [e for e in evs if e.get("event") == "step"]
        if prev_end is None:
            b["queue"] += a["started"] - t_submit
        else:
            b["reschedule"] += a["started"] - prev_end
        if steps:
            s0 = steps[0]
            firsts.add((a["n"], s0["step"]))
            b["rank_init"] += (s0["ts"] - s0["step_seconds"]) - a["started"]
            b["compile"] += max(0.0, s0["step_seconds"] - median)
            series.append([[round(e["ts"] - s0["ts"], 2), round(e["step_seconds"], 3),
                            e.get("split")] for e in steps])
            first_steps.append([r[1] for r in series[-1][:15]])
            after_start |= {(e["attempt"], e["step"]) for e in steps[1:]
                            if e["ts"] - e["step_seconds"] < s0["ts"] + AFTER_START_S}
        end = a["ended"] or t_end
        fault = next((t for t in faults if a["started"] <= t <= end), None)
        if fault is not None and a["ended"]:
            b["detect"] += a["ended"] - fault
        for prev, cur in zip(steps, steps[1:], strict=False):
            gap = max(0.0, (cur["ts"] - cur["step_seconds"]) - prev["ts"])
            saved = ckpt_every and prev["step"] % ckpt_every == 0
            b["ckpt_gaps" if saved else "step_gaps"] += gap
        if steps:
            cut = fault if fault is not None and a["ended"] else min(end, t_end)
            b["in_flight"] += max(0.0, cut - steps[-1]["ts"])
        prev_end = min(end, t_end)
    committed_ids = {(e["attempt"], e["step"]) for e in lin.committed.values()}
    useful = 0.0
    for e in all_steps:
        first = (e["attempt"], e["step"]) in firsts
        dt = median if first else e["step_seconds"]
        if (e["attempt"], e["step"]) in committed_ids:
            if (e["attempt"], e["step"]) in after_start:
                b["after_start"] += max(0.0, dt - median)
                dt = min(dt, median)
            useful += dt
        else:
            b["lost_steps"] += dt
    wall = t_end - t_submit
    b = {k: round(v, 2) for k, v in b.items()}
    b["other"] = round(wall - useful - sum(b.values()), 2)
    split: dict[str, float] = {}
    for start in lin.starts:
        for k, v in (start.get("init_seconds") or {}).items():
            split[k] = round(split.get(k, 0.0) + float(v), 2)
    # The issue's own definition, "steps that count": every committed step at the time it
    # took (an attempt's first step still at the median: its excess is the compile)
    counted = useful + b["after_start"]
    return {"wall_s": round(wall, 2), "useful_s": round(useful, 2),
            "goodput": round(useful / wall, 4) if wall > 0 else 0.0,
            "goodput_committed": round(counted / wall, 4) if wall > 0 else 0.0,
            "faults": len(faults), "attempts": len(atts),
            "committed_steps": len(lin.committed), "steps_lost": lin.steps_lost,
            "median_step_s": round(median, 4), "lost": b, "init_split": split,
            "compile_cache": [start.get("compile_cache", "off") for start in lin.starts],
            "first_steps": first_steps, "series": series,
            "restarts_in_place": [bool(e.get("in_place")) for e in st.get("events", [])
                                  if e.get("kind") == "launched"][1:],
            "from_standby": [len(e.get("from_standby") or []) for e in st.get("events", [])
                             if e.get("kind") == "launched"],
            "prejoined": [len(e.get("prejoined") or []) for e in st.get("events", [])
                          if e.get("kind") == "launched"]}


def warm_cache(fleet, home: Path, doc: dict, cfg: Path, data: Path, timeout: float = 600) -> None:
    """Run ``doc`` until rank 0 has published its graphs to the shared store, then cancel it
    and wait until its devices are free again."""
    from launcher.ranks import compile_cache_store

    store = compile_cache_store(home)
    j = fleet.submit(doc, cfg, data)
    deadline = time.time() + timeout
    while not any(store.glob("*/complete")):
        if time.time() > deadline:
            raise RuntimeError(f"no graphs in {store} after {timeout:.0f}s: {fleet.status(j)}")
        time.sleep(0.2)
    fleet.call("cancel", j)
    fleet.wait_for(j, lambda s: s and s["state"] == "CANCELLED", timeout=120, what="cancelled")
    print(f"compile cache warmed by {j}: {sorted(p.name for p in store.iterdir())}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds of training")
    ap.add_argument("--fault-every", type=float, default=300.0, help="seconds between kills")
    ap.add_argument("--ckpt-every", type=int, default=10, help="optimizer steps")
    ap.add_argument("--workload", choices=["volo", "smoke"], default="volo")
    ap.add_argument("--warm-cache", action="store_true",
                    help="time a resubmission: another job of the recipe fills the shared "
                         "compile cache first")
    ap.add_argument("--restart", choices=["standby", "in-place", "afresh"], default="standby",
                    help="how ranks restart: in place onto processes that joined and compiled "
                         "ahead (VOLO; standbys for smoke) (the default), "
                         "in place with fresh processes, or planned afresh (restart.inPlace off)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.fault_every <= 0:
        ap.error("--duration and --fault-every must be > 0")
    if args.warm_cache and args.workload != "volo":
        ap.error("--warm-cache needs --workload volo (the smoke workload compiles nothing)")

    from faults_harness import Fleet, rank_procs, workload_inputs

    with tempfile.TemporaryDirectory(prefix="fleet-goodput-") as d:
        home = Path(d)
        f = Fleet(home, [{"NPU": 1}, {"NPU": 1}])
        try:
            data, cfg = workload_inputs(home, args.workload)
            if args.warm_cache:
                warm_cache(f, home, job_doc(args.workload, args.ckpt_every, "goodput-warmup"),
                           cfg, data)
            t_submit = time.time()
            doc = job_doc(args.workload, args.ckpt_every)
            doc["spec"]["restart"].update(inPlace=args.restart != "afresh",
                                          standby=args.restart == "standby")
            j = f.submit(doc, cfg, data)
            t_stop = t_submit + args.duration
            faults: list[float] = []
            next_fault = t_submit + args.fault_every
            while time.time() < t_stop:
                time.sleep(min(1.0, max(0.0, t_stop - time.time())))
                if next_fault <= time.time() < t_stop:  # none in the run's last instant
                    label = "rank-1" if len(faults) % 2 == 0 else "rank-0"
                    p = rank_procs(j).get(label)
                    if p is not None:
                        faults.append(time.time())
                        os.kill(p.pid, signal.SIGKILL)
                        print(f"[{time.time() - t_submit:7.1f}s] SIGKILL {label}", flush=True)
                    next_fault += args.fault_every
            t_end = time.time()
            f.call("cancel", j)
            res = account(f, j, t_submit, t_end, faults, args.ckpt_every,
                          all_ranks=args.workload == "volo")
        finally:
            f.close()
    res.update(workload=args.workload, duration=args.duration, warm_cache=args.warm_cache,
               restart=args.restart,
               fault_every=args.fault_every, ckpt_every=args.ckpt_every,
               cpus=os.cpu_count(), load_avg=os.getloadavg())
    def verdict(x: float) -> str:
        return "meets" if x >= GOAL else "MISSES"

    print(f"goodput {100 * res['goodput']:.1f}% strict ({verdict(res['goodput'])} the "
          f"{100 * GOAL:.0f}% goal), {100 * res['goodput_committed']:.1f}% counting every "
          f"committed step's own time ({verdict(res['goodput_committed'])}); wall "
          f"{res['wall_s']}s, useful {res['useful_s']}s, {res['faults']} faults, "
          f"{res['committed_steps']} committed steps, {res['steps_lost']} redone")
    print("lost time:", ", ".join(f"{k} {v}s" for k, v in res["lost"].items()))
    print(f"init split (one rank per attempt, summed): {res['init_split']}; compile cache per attempt: "
          f"{res['compile_cache']}")
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
