"""`workload: smoke` - a model-free rank process for cluster burn-in and tests.

It speaks the rank contract (FLEET_* env, heartbeat JSON lines, a step
checkpoint it resumes from) so scheduling, restarts and monitoring can be
exercised in seconds without compiling a network. It accepts and ignores the
train flags it does not know, so the launcher builds the same argv for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _hb(path: str | None, **ev) -> None:
    if not path:
        return
    ev.setdefault("ts", time.time())
    ev.setdefault("rank", int(os.environ.get("RANK_ID", "0")))
    ev.setdefault("attempt", int(os.environ.get("FLEET_ATTEMPT", "0")))
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(ev) + "\n")
        f.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="launcher.smoke")
    ap.add_argument("--max_steps", type=int, default=10)
    ap.add_argument("--step_seconds", type=float, default=0.2)
    ap.add_argument("--fail_at_step", type=int, default=0,
                    help="exit 3 at this step on the first attempt (restart tests)")
    ap.add_argument("--ckpt_save_dir", default="")
    args, _unknown = ap.parse_known_args(argv)

    if os.environ.get("MS_ROLE") == "MS_SCHED":
        # Stand-in for MindSpore's scheduler: lives until the workers are done.
        while True:
            time.sleep(1)

    hb = os.environ.get("FLEET_HEARTBEAT")
    rank = int(os.environ.get("RANK_ID", "0"))
    attempt = int(os.environ.get("FLEET_ATTEMPT", "1"))
    ckpt_dir = Path(os.environ.get("FLEET_CHECKPOINT_DIR") or args.ckpt_save_dir or ".")
    state = ckpt_dir / "smoke-step.txt"
    start = 0
    if state.exists():
        start = int(state.read_text().strip() or 0)
    g = int(os.environ.get("FLEET_GLOBAL_BATCH", "1"))
    _hb(hb, event="start", world_size=int(os.environ.get("RANK_SIZE", "1")),
        micro_batch=int(os.environ.get("FLEET_MICRO_BATCH", "1")),
        grad_accum=int(os.environ.get("FLEET_GRAD_ACCUM", "1")), global_batch=g,
        resumed_step=start, total_steps=args.max_steps)
    for step in range(start + 1, args.max_steps + 1):
        t0 = time.time()
        time.sleep(args.step_seconds)
        if args.fail_at_step and step == args.fail_at_step and attempt == 1:
            print(f"smoke: injected failure at step {step}", flush=True)
            return 3
        dt = time.time() - t0
        _hb(hb, event="step", step=step, epoch=0, loss=1.0 / step, lr=0.1,
            images_per_second=g / dt, step_seconds=dt, samples_seen=step * g)
        print(f"step {step} loss {1.0 / step:.4f}", flush=True)
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = ckpt_dir / ".smoke-step.tmp"
            tmp.write_text(str(step))
            os.replace(tmp, state)
    _hb(hb, event="done", step=args.max_steps, status="ok")
    print(json.dumps({"top1": 1.0, "top5": 1.0, "loss": 0.0, "images": 0}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
