"""A real, tiny training process that speaks heartbeat contract 2 (test driver).

Softmax regression on scikit-learn's 8x8 digits in NumPy: real loss, real
learning-rate schedule, real throughput, checkpoints it resumes from. It exists
so the exporter, dashboards and `fleet plot` are exercised by an actual process
appending to FLEET_HEARTBEAT, independent of the MindSpore train loop.

Reads the rank environment of contract 1 (FLEET_ATTEMPT, FLEET_CHECKPOINT_DIR,
FLEET_GLOBAL_BATCH, FLEET_MICRO_BATCH, FLEET_GRAD_ACCUM, FLEET_HEARTBEAT) plus
--rank/--world-size, since it runs without a MindSpore cluster.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps to reach")
    ap.add_argument("--ckpt-every", type=int, default=4)
    ap.add_argument("--val-every", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.5)
    # Paces steps so a 1 s Prometheus scrape sees the run progress, as it would
    # on an accelerator where a step takes seconds.
    ap.add_argument("--min-step-seconds", type=float, default=0.0)
    args = ap.parse_args()

    attempt = int(os.environ.get("FLEET_ATTEMPT", "0"))
    global_batch = int(os.environ["FLEET_GLOBAL_BATCH"])
    micro = int(os.environ["FLEET_MICRO_BATCH"])
    accum = int(os.environ["FLEET_GRAD_ACCUM"])
    if micro * accum * args.world_size != global_batch:
        raise SystemExit("FLEET_MICRO_BATCH * FLEET_GRAD_ACCUM * world size != FLEET_GLOBAL_BATCH")
    ckpt_dir = Path(os.environ["FLEET_CHECKPOINT_DIR"])
    hb_path = Path(os.environ["FLEET_HEARTBEAT"])
    hb_path.parent.mkdir(parents=True, exist_ok=True)
    # Open for the whole run: every line is appended and flushed as it happens.
    hb = hb_path.open("a", encoding="utf-8")  # noqa: SIM115

    def beat(event: str, **fields: object) -> None:
        rec = {"event": event, "ts": time.time(), "rank": args.rank, "attempt": attempt}
        hb.write(json.dumps({**rec, **fields}) + "\n")
        hb.flush()

    digits = load_digits()
    x_all = digits.data.astype(np.float64) / 16.0
    y_all = digits.target
    n_train = 1500
    x, y, xv, yv = x_all[:n_train], y_all[:n_train], x_all[n_train:], y_all[n_train:]
    w = np.zeros((64, 10))
    b = np.zeros(10)
    step = 0
    # Resume: every rank reads the same newest checkpoint, rank 0 writes them.
    ckpts = sorted(ckpt_dir.glob("step-*.npz"))
    if ckpts:
        state = np.load(ckpts[-1])
        w, b, step = state["w"], state["b"], int(state["step"])
    beat(
        "start",
        world_size=args.world_size,
        micro_batch=micro,
        grad_accum=accum,
        global_batch=global_batch,
        resumed_step=step,
    )

    def logits(xx: np.ndarray) -> np.ndarray:
        z = xx @ w + b
        return z - z.max(axis=1, keepdims=True)

    steps_per_epoch = n_train // global_batch
    while step < args.steps:
        t0 = time.time()
        epoch, pos = divmod(step, steps_per_epoch)
        order = np.random.default_rng(epoch).permutation(n_train)
        idx = order[pos * global_batch : (pos + 1) * global_batch]
        mine = idx[args.rank :: args.world_size]
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        gw, gb, loss = np.zeros_like(w), np.zeros_like(b), 0.0
        for a in range(accum):
            mb = mine[a * micro : (a + 1) * micro]
            z = logits(x[mb])
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            loss += float(-np.log(p[np.arange(len(mb)), y[mb]] + 1e-12).mean()) / accum
            p[np.arange(len(mb)), y[mb]] -= 1.0
            gw += x[mb].T @ p / len(mb) / accum
            gb += p.mean(axis=0) / accum
        w -= lr * gw
        b -= lr * gb
        step += 1
        elapsed = time.time() - t0
        if elapsed < args.min_step_seconds:
            time.sleep(args.min_step_seconds - elapsed)
        dt = time.time() - t0
        beat(
            "step",
            step=step,
            epoch=epoch,
            loss=loss,
            lr=lr,
            # Like the real train loop: the job's throughput as this rank timed it.
            images_per_second=global_batch / dt,
            step_seconds=dt,
            samples_seen=step * global_batch,
            sample_hash=hashlib.sha256(np.sort(idx).tobytes()).hexdigest(),
            # a float32 recipe's loss scale, as the train loop reports it
            loss_scale=1.0, overflow=False, skipped=False, overflow_steps=0, skipped_steps=0,
        )
        if args.rank == 0 and step % args.ckpt_every == 0:
            t1 = time.time()
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = ckpt_dir / f".tmp-step-{step:08d}.npz"
            np.savez(tmp, w=w, b=b, step=step)
            final = ckpt_dir / f"step-{step:08d}.npz"
            os.rename(tmp, final)
            beat("checkpoint", step=step, path=str(final), save_seconds=time.time() - t1, ok=True)
        if args.rank == 0 and step % args.val_every == 0:
            z = logits(xv)
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            top5 = np.argsort(-p, axis=1)[:, :5]
            beat(
                "val",
                step=step,
                top1=100.0 * float((top5[:, 0] == yv).mean()),
                top5=100.0 * float((top5 == yv[:, None]).any(axis=1).mean()),
                loss=float(-np.log(p[np.arange(len(yv)), yv] + 1e-12).mean()),
            )
    beat("done", step=step, status="ok")


def run_ranks(*, attempt: int, world: int, accum: int, steps: int, ckpt_dir: Path,
              heartbeat: Callable[[int], Path], every: int, extra: Sequence[str] = ()) -> None:
    """Run `world` ranks of this trainer to the end (for tests): global batch 32,
    a checkpoint and a validation every `every` steps, heartbeat file per rank."""
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "FLEET_ATTEMPT": str(attempt),
            "FLEET_GLOBAL_BATCH": "32",
            "FLEET_MICRO_BATCH": str(32 // (world * accum)),
            "FLEET_GRAD_ACCUM": str(accum),
            "FLEET_CHECKPOINT_DIR": str(ckpt_dir),
            "FLEET_HEARTBEAT": str(heartbeat(rank)),
        }
        procs.append(subprocess.Popen(  # noqa: S603 - argv list
            [sys.executable, __file__, "--rank", str(rank), "--world-size", str(world),
             "--steps", str(steps), "--ckpt-every", str(every), "--val-every", str(every),
             *extra], env=env))
    for p in procs:
        assert p.wait(timeout=60) == 0


if __name__ == "__main__":
    main()
