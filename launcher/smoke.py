"""`workload: smoke` - a model-free rank process for cluster burn-in and tests.

It speaks the rank contract (launcher/contract.py: FLEET_* env, heartbeat JSON lines, a
step checkpoint it resumes from, the checkpoint request) so scheduling, restarts and
monitoring can be exercised in seconds without compiling a network. It accepts and ignores
the train flags it does not know, so the launcher builds the same argv for it.

Its ranks share no state and no collective: rank 0 alone checkpoints, after every step. So a
checkpoint request needs no agreement between ranks: each rank stops at the first step
boundary after its request file appears, rank 0 with a checkpoint of the step it just
completed (marked requested), which is all the next attempt resumes from. The other ranks'
own step counts carry nothing into it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from launcher import contract as C
from launcher.workloads import EXPORT, TRAIN, VALIDATE, WarmStarts, WorkloadAdapter

_STEP = re.compile(r"^step-(\d{8})$")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def write_checkpoint(ckpt_dir: Path, step: int, g: int, keep: int = 3,
                     samples_seen: int | None = None) -> Path:
    """A checkpoint in the train loop's layout (tmp dir + rename, sha256 manifest)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:08d}"
    tmp = ckpt_dir / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "model.ckpt").write_bytes(f"smoke model at step {step}\n".encode())
    seen = step * g if samples_seen is None else samples_seen
    state = {"step": step, "epoch": 0, "samples_seen": seen, "global_batch": g,
             "world_size": int(os.environ.get("RANK_SIZE", "1")),
             "micro_batch": int(os.environ.get(C.MICRO_BATCH_ENV, "1")),
             "grad_accum": int(os.environ.get(C.GRAD_ACCUM_ENV, "1")), "seed": 0,
             "recipe_hash": "smoke", "model": "smoke", "saved_at": time.time()}
    (tmp / "state.json").write_text(json.dumps(state))
    (tmp / "MANIFEST.sha256").write_text(
        "".join(f"{_sha(tmp / n)}  {n}\n" for n in ("model.ckpt", "state.json")))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    steps = sorted(p for p in ckpt_dir.iterdir() if _STEP.match(p.name))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _newest_valid(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint whose manifest verifies (a torn one is skipped), and its state."""
    if not ckpt_dir.is_dir():
        return None
    for p in sorted((p for p in ckpt_dir.iterdir() if _STEP.match(p.name)), reverse=True):
        try:
            lines = (p / "MANIFEST.sha256").read_text().splitlines()
            if all(_sha(p / name) == digest
                   for digest, name in (ln.split("  ", 1) for ln in lines if ln)):
                state = json.loads((p / "state.json").read_text())
                state["step"], state["samples_seen"] = int(state["step"]), int(
                    state["samples_seen"])
                return p, state
        except (OSError, ValueError, KeyError):
            continue
    return None


def latest_checkpoint(ckpt_dir: Path) -> tuple[int, int]:
    """(step, samples_seen) of the newest checkpoint that verifies; (0, 0) when none does."""
    found = _newest_valid(ckpt_dir)
    if found is None:
        return 0, 0
    return found[1]["step"], found[1]["samples_seen"]


def select_checkpoint(ckpt_dir: Path, select: str) -> Path | None:
    """The checkpoint a validate or export step gets: the newest valid one (smoke runs
    validate nothing, so "best" is the newest too)."""
    found = _newest_valid(ckpt_dir)
    return None if found is None else found[0]


ADAPTER = WorkloadAdapter(
    name="smoke",
    modules=dict.fromkeys((TRAIN, VALIDATE, EXPORT), "launcher.smoke"),
    select_checkpoint=select_checkpoint,
    # a smoke rank imports little, and has no cluster join to do ahead of time
    warm_starts=WarmStarts(standby=True, prejoin_devices=frozenset()),
    checkpoint_on_request=True,
)


class SampleReader:
    """The smoke workload's input pipeline: reads the fixed-G sample stream from a position
    (a checkpoint's ``samples_seen``), so that what a step reports is what it read, not what
    its step number says it should have read."""

    def __init__(self, sampler, position: int):
        self.sampler, self.position = sampler, position

    def next_global_batch(self) -> np.ndarray:
        g = self.sampler.layout.global_batch
        first, offset = divmod(self.position, g)
        parts = [self.sampler.step_indices(first)[offset:]]
        if offset:
            parts.append(self.sampler.step_indices(first + 1)[:offset])
        self.position += g
        return np.concatenate(parts)


def _hb(hb_file: str | None, **ev) -> None:
    if not hb_file:
        return
    ev.setdefault("ts", time.time())
    ev.setdefault("rank", int(os.environ.get("RANK_ID", "0")))
    ev.setdefault("attempt", int(os.environ.get(C.ATTEMPT_ENV, "0")))
    with open(hb_file, "a", encoding="utf-8") as f:
        f.write(json.dumps(ev) + "\n")
        f.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="launcher.smoke")
    ap.add_argument("--max_steps", type=int, default=10)
    ap.add_argument("--step_seconds", type=float, default=0.2)
    ap.add_argument("--fail_at_step", type=int, default=0,
                    help="exit 17 at this step on the first attempt (restart tests)")
    ap.add_argument("--fail_at_steps", default="",
                    help="comma list: attempt k exits 17 at the k-th step listed, 0 for none "
                         "(crash-loop and backoff tests)")
    ap.add_argument("--ckpt_save_dir", default="")
    ap.add_argument("--ckpt_path", default="", help="validate/export stand-in: input")
    ap.add_argument("--out", default="", help="export stand-in: output file")
    ap.add_argument("--smoke_samples", type=int, default=4096,
                    help="size of the pretend dataset the fixed-G sampler orders")
    ap.add_argument("--seed", type=int, default=0)
    args, _unknown = ap.parse_known_args(argv)

    if args.ckpt_path:
        # Validate / export stand-in: needs a real checkpoint path from the launcher.
        ck = Path(args.ckpt_path)
        if not (ck / "state.json").is_file():
            print(f"smoke: {ck} is not a checkpoint", file=sys.stderr)
            return C.EXIT_CONFIG
        step = json.loads((ck / "state.json").read_text())["step"]
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(f"smoke export of {ck} (step {step})\n")
            print(json.dumps({"exported": args.out, "step": step}), flush=True)
        else:
            print(json.dumps({"top1": 100.0, "top5": 100.0, "loss": 0.0, "images": 0,
                              "step": step}), flush=True)
        return C.EXIT_OK

    if os.environ.get("MS_ROLE") == "MS_SCHED":
        # Stand-in for MindSpore's scheduler: lives until the workers are done.
        while True:
            time.sleep(1)

    hb = os.environ.get(C.HEARTBEAT_ENV)
    rank = int(os.environ.get("RANK_ID", "0"))
    attempt = int(os.environ.get(C.ATTEMPT_ENV, "1"))
    ckpt_dir = Path(os.environ.get(C.CHECKPOINT_DIR_ENV) or args.ckpt_save_dir or ".")
    request = os.environ.get(C.CHECKPOINT_REQUEST_ENV)
    start, seen = latest_checkpoint(ckpt_dir)
    g = int(os.environ.get(C.GLOBAL_BATCH_ENV, "1"))
    # The train loop's own sampler: a fault test can check that every optimizer step,
    # across restarts and resizes, trains the same global batch as an uninterrupted run.
    from workloads.volo.sampling import GlobalBatchSampler, resolve_layout
    layout = resolve_layout(int(os.environ.get("RANK_SIZE", "1")),
                            int(os.environ.get(C.MICRO_BATCH_ENV, str(g))),
                            int(os.environ.get(C.GRAD_ACCUM_ENV, "1")), g)
    sampler = GlobalBatchSampler(max(args.smoke_samples, g), layout, args.seed)
    reader = SampleReader(sampler, seen)
    _hb(hb, event=C.HeartbeatEvent.START, world_size=layout.world_size, micro_batch=layout.micro_batch,
        grad_accum=layout.grad_accum, global_batch=g, resumed_step=start,
        total_steps=args.max_steps)
    fail_plan = [int(x) for x in args.fail_at_steps.split(",") if x.strip()]
    fail_at = fail_plan[attempt - 1] if attempt <= len(fail_plan) else 0
    if attempt == 1 and args.fail_at_step:
        fail_at = args.fail_at_step
    for step in range(start + 1, args.max_steps + 1):
        t0 = time.time()
        time.sleep(args.step_seconds)
        if fail_at and step == fail_at:
            print(f"smoke: injected failure at step {step}", flush=True)
            return 17
        dt = time.time() - t0
        indices = reader.next_global_batch()
        # A loss that is a function of the samples: a wrong batch shows in the curve too.
        loss = 1.0 / step + float(indices.mean()) / sampler.num_samples
        fields = dict(step=step, epoch=sampler.epoch_of(step - 1), loss=round(loss, 6), lr=0.1,
                      images_per_second=g / dt, step_seconds=dt, samples_seen=reader.position)
        if rank == 0:
            fields["sample_hash"] = sampler.sample_hash(indices)
        _hb(hb, event=C.HeartbeatEvent.STEP, **fields)
        print(f"step {step} loss {loss:.4f}", flush=True)
        requested = bool(request) and os.path.exists(request)
        if rank == 0:
            t1 = time.time()
            path = write_checkpoint(ckpt_dir, step, g, samples_seen=reader.position)
            _hb(hb, event=C.HeartbeatEvent.CHECKPOINT, step=step, path=str(path),
                save_seconds=time.time() - t1, ok=True, **({"requested": True} if requested
                                                           else {}))
        if requested and step < args.max_steps:
            _hb(hb, event=C.HeartbeatEvent.DONE, step=step, status=C.DoneStatus.CHECKPOINTED)
            return C.EXIT_CHECKPOINTED
    _hb(hb, event=C.HeartbeatEvent.DONE, step=args.max_steps, status=C.DoneStatus.OK)
    return C.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
