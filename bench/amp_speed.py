"""float32 vs the seed's mixed precision (O3, dynamic loss scale, EMA) on this machine.

    .venv/bin/python bench/amp_speed.py [--out DIR] [--threads N] [--epochs 3] [--d1]

1. The tiny digits recipe, shortened as tests/test_train_learns.py shortens it (640 images
   a epoch), once at O0 and once at O3 + dynamic scale 1024 + EMA 0.9995: median
   images/s over the steps after the first (compile), last validation top-1 (EMA weights
   for the O3 run), overflowed steps.
2. ``--d1``: one VOLO-D1 optimizer step at 224 px (micro-batch 2, compiled), O0 vs O3, same
   threads: median seconds of 3 steps after the first.

Prints one JSON object; every figure comes from this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "workloads" / "volo" / "configs" / "volo_tiny_digits.yaml"
O3 = ["--amp_level", "O3", "--val_amp_level", "O3", "--loss_scale_type", "dynamic",
      "--loss_scale", "1024", "--drop_overflow_update", "True", "--ema", "True",
      "--ema_decay", "0.9995"]


def tiny(data: Path, out: Path, threads: int, epochs: int, extra: list[str]) -> dict:
    hb = out / "hb.jsonl"
    env = {"FLEET_HEARTBEAT": str(hb), "FLEET_NUM_THREADS": str(threads),
           "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "workloads.volo.train", "-c", str(RECIPE),
                        "--data_dir", str(data), "--ckpt_save_dir", str(out / "ckpt"),
                        "--num_samples", "640", "--epoch_size", str(epochs),
                        "--warmup_epochs", "0", "--decay_epochs", str(epochs),
                        "--num_parallel_workers", "1", *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    events = [json.loads(line) for line in hb.read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    vals = [e for e in events if e["event"] == "val"]
    return {"wall_seconds": round(time.time() - t0, 1),
            "images_per_second": statistics.median(s["images_per_second"] for s in steps[1:]),
            "top1": vals[-1]["top1"] if vals else None,
            "overflow_steps": steps[-1].get("overflow_steps", 0),
            "last_loss_scale": steps[-1].get("loss_scale")}


D1_PROBE = r"""
import json, statistics, sys, time
import numpy as np
from workloads.volo import train as T
from workloads.volo.config import parse_args
level, data, threads = sys.argv[1], sys.argv[2], sys.argv[3]
args = parse_args(["-c", "workloads/volo/configs/volo_d1_ascend.yaml", "--data_dir", data,
                   "--device_target", "CPU", "--batch_size", "2", "--global_batch", "2",
                   "--num_threads", threads, "--amp_level", level, "--val_while_train", "False",
                   "--num_classes", "10"])
plan = T.make_plan(args, 1)
T._configure_mindspore(args)
tr = T.Trainer(plan, 1)
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
t = np.eye(10, dtype=np.float32)[[1, 2]]
times = []
for i in range(4):
    t0 = time.perf_counter(); tr.step([(x, t)], 1e-4); times.append(time.perf_counter() - t0)
print(json.dumps({"first": round(times[0], 2), "median": round(statistics.median(times[1:]), 3),
                  "skipped": tr.scaler.skipped_steps}))
"""


def d1(data: Path, threads: int, level: str) -> dict:
    r = subprocess.run([sys.executable, "-c", D1_PROBE, level, str(data), str(threads)],
                       cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                      "OMP_NUM_THREADS": str(threads)},
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--d1", action="store_true")
    a = ap.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="amp-bench-"))
    from workloads.volo.digits import write_digits

    data = out / "digits"
    if not (data / "train").is_dir():
        write_digits(data)
    res: dict = {"threads": a.threads}
    for name, extra in (("O0", []), ("O3", O3)):
        (out / name).mkdir(parents=True, exist_ok=True)
        res[f"tiny_{name}"] = tiny(data, out / name, a.threads, a.epochs, extra)
    res["tiny_O3_over_O0_img_per_s"] = round(res["tiny_O3"]["images_per_second"]
                                             / res["tiny_O0"]["images_per_second"], 3)
    if a.d1:
        res["d1_O0"] = d1(data, a.threads, "O0")
        res["d1_O3"] = d1(data, a.threads, "O3")
        res["d1_O3_over_O0_step_time"] = round(res["d1_O3"]["median"] / res["d1_O0"]["median"], 3)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
