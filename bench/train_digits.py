"""Time-to-accuracy of the CPU quickstart and the cost of checkpointing.

    .venv/bin/python bench/train_digits.py [--data data/digits] [--out /tmp/volo-bench]
        [--threads N] [--ckpt_save_steps 11] [--d1_save]

1. Writes the digits ImageFolder if missing, then runs the unmodified quickstart recipe
   (``volo_tiny_digits.yaml``) as docs/volo.md does, with a heartbeat file, checkpointing every
   ``--ckpt_save_steps`` optimizer steps on top of the recipe's per-epoch saves.
2. From the heartbeat: wall time from process start to the first validation >= 90% top-1,
   final top-1, and checkpoint overhead = time the training loop was blocked by saves /
   training time (the part of a save that hashes, fsyncs and renames runs on a thread).
3. Validates the best checkpoint with ``workloads.volo.validate`` (the command in docs/volo.md).
4. ``--d1_save``: the same save path for VOLO-D1's parameters + AdamW state (~330 MB):
   how long a save blocks training and how long the background part takes, on this disk.

Prints one JSON object; nothing is hard-coded, every figure comes from this run.
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

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "workloads" / "volo" / "configs" / "volo_tiny_digits.yaml"


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_recipe(data: Path, out: Path, threads: int | None, save_steps: int) -> dict:
    ckpt = out / "ckpt"
    hb = out / "train.hb.jsonl"
    for p in (hb,):
        p.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MS_", "FLEET_"))}
    env["FLEET_HEARTBEAT"] = str(hb)
    if threads:
        env["FLEET_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "workloads.volo.train", "-c", str(RECIPE), "--data_dir",
           str(data), "--ckpt_save_dir", str(ckpt), "--resume", "never",
           "--ckpt_save_steps", str(save_steps)]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"training failed ({r.returncode}):\n{r.stderr[-4000:]}")
    ev = _events(hb)
    vals = [e for e in ev if e["event"] == "val"]
    steps = [e for e in ev if e["event"] == "step"]
    done = next(e for e in ev if e["event"] == "done")
    saves = [e for e in ev if e["event"] == "checkpoint"]
    first90 = next((v for v in vals if v["top1"] >= 90.0), None)
    return {
        "command": " ".join(cmd[1:]),
        "wall_seconds": round(wall, 1),
        "optimizer_steps": steps[-1]["step"],
        "val_top1_by_epoch": [round(v["top1"], 2) for v in vals],
        "final_val_top1": vals[-1]["top1"] if vals else None,
        "seconds_to_90pct": round(first90["ts"] - t0, 1) if first90 else None,
        "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
        "median_step_seconds": sorted(s["step_seconds"] for s in steps)[len(steps) // 2],
        "train_seconds": done["train_seconds"],
        "checkpoints": len(saves),
        "ckpt_blocking_seconds": done["ckpt_blocking_seconds"],
        "ckpt_total_save_seconds": done["ckpt_save_seconds"],
        "ckpt_overhead_pct": round(100 * done["ckpt_blocking_seconds"]
                                   / max(done["train_seconds"], 1e-9), 3),
        "ckpt_dir": str(ckpt),
    }


def validate(data: Path, ckpt: Path) -> dict:
    best = ckpt / "best"
    r = subprocess.run([sys.executable, "-m", "workloads.volo.validate", "-c", str(RECIPE),
                        "--data_dir", str(data), "--ckpt_path", str(best if best.exists()
                                                                     else ckpt)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"validate failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def d1_save_cost(out: Path) -> dict:
    import mindspore as ms
    from mindspore import nn

    from workloads.volo import create_model
    from workloads.volo.checkpoint import CheckpointManager, CheckpointState

    net = create_model("volo_d1", num_classes=1000)
    opt = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-3)
    params = list(net.get_parameters()) + list(opt.get_parameters())
    mgr = CheckpointManager(out / "d1ckpt", keep_last=1)
    state = CheckpointState(step=1, epoch=0, samples_seen=1024, global_batch=1024, world_size=8,
                            micro_batch=128, grad_accum=1, seed=0, recipe_hash="bench",
                            model="volo_d1")
    t0 = time.perf_counter()
    mgr.save(state, lambda p: ms.save_checkpoint(params, str(p)))
    blocking = time.perf_counter() - t0
    mgr.wait()
    size = sum(f.stat().st_size for f in (out / "d1ckpt" / "step-00000001").iterdir())
    return {"bytes": size, "blocking_seconds": round(blocking, 3),
            "total_seconds": round(mgr.total_save_seconds, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "digits")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None, help="FLEET_NUM_THREADS for the run")
    ap.add_argument("--ckpt_save_steps", type=int, default=11)
    ap.add_argument("--d1_save", action="store_true")
    a = ap.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="volo-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    from workloads.volo.digits import write_digits

    write_digits(a.data)
    result = {"cpu_count": os.cpu_count(), "load_avg_at_start": os.getloadavg()}
    result["train"] = run_recipe(a.data, out, a.threads, a.ckpt_save_steps)
    result["load_avg_at_end"] = os.getloadavg()
    result["validate_best"] = validate(a.data, Path(result["train"]["ckpt_dir"]))
    if a.d1_save:
        result["volo_d1_save"] = d1_save_cost(out)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
