"""The seed's mixed-precision recipe in real processes: AMP O3, dynamic loss scale, EMA.

One recipe throughout (volo_tiny on digits, global batch 8 as 2 ranks x 4 or 1 rank x 4 x 2),
with the loss scale started at 2**20 so that float16 gradients overflow at the first steps:

* 2 ranks x accumulation 1: the overflowed steps are dropped on both ranks alike (both
  heartbeats), each halves the scale, the parameters stay bitwise the initial ones, the
  ranks end with identical state, and the next steps train;
* 1 rank x accumulation 2 (the resize after a node loss) takes the same steps: same sample
  hashes, same overflow pattern and scales, losses and EMA weights within the bounds below;
* SIGKILL and resume of the 1-rank run: loss scale, counters and EMA come back from the
  checkpoint and the run ends where the uninterrupted one does.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_train_e2e import BASE, ROOT, TIMEOUT, _cluster_train, _events, _params, _train
from train_env import train_env

from workloads.volo.compile_cache import CACHE_DIRNAME as CACHE

pytestmark = pytest.mark.slow

RECIPE = ["--amp_level", "O3", "--val_amp_level", "O3", "--loss_scale_type", "dynamic",
          "--loss_scale", str(2 ** 20), "--drop_overflow_update", "True", "--ema", "True",
          "--ema_decay", "0.9995", "--batch_size", "4", "--max_steps", "8",
          "--keep_checkpoint_max", "10"]
STEPS = list(range(1, 9))
# 2x4x1 vs 1x4x2 compute the same float16 micro-batches and could differ only by float32
# summation order in the average (measured: bit-identical losses and EMA, difference 0)
LOSS_RTOL = 1e-4
EMA_ATOL = 1e-5
RESUME_ATOL = 1e-5  # MindSpore CPU kernels' run-to-run noise (tests/test_train_e2e.py)


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    """The 2-rank run (a checkpoint every step) and the 1-rank accumulation-2 run."""
    tmp = tmp_path_factory.mktemp("amp")
    for name in ("two", "one"):
        (tmp / name).mkdir()
    common = [*RECIPE, "--data_dir", str(digits), "--ckpt_save_steps", "1"]
    two = _cluster_train([*common, "--ckpt_save_dir", str(tmp / "two" / "ckpt")], tmp / "two",
                         workers=2)
    for r in two:
        assert r.returncode == 0, r.stderr[-3000:]
    # the 2-rank run's graphs serve the 1-rank side (same micro-batch, same recipe)
    shutil.copytree(tmp / "two" / "ckpt" / CACHE, tmp / "one" / "ckpt" / CACHE)
    one = _train([*common, "--ckpt_save_dir", str(tmp / "one" / "ckpt"),
                  "--gradient_accumulation_steps", "2"], tmp / "one", "one")
    assert one.returncode == 0, one.stderr[-3000:]
    return tmp


def _ema(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[len("ema."):]: v for k, v in params.items() if k.startswith("ema.")}


def test_overflow_is_skipped_on_both_ranks_and_resize_takes_the_same_steps(runs):
    r0, r1 = (_events(runs / "two" / f"rank{i}.hb.jsonl", "step") for i in (0, 1))
    one = _events(runs / "one" / "one.hb.jsonl", "step")
    assert [s["step"] for s in r0] == [s["step"] for s in r1] == [s["step"] for s in one] == STEPS
    fields = ("overflow", "skipped", "loss_scale", "overflow_steps", "skipped_steps",
              "sample_hash")
    pattern = [tuple(s[k] for k in fields) for s in r0]
    assert pattern == [tuple(s[k] for k in fields) for s in r1]  # both ranks alike
    assert pattern == [tuple(s[k] for k in fields) for s in one]  # the resize alike
    skipped = [s["step"] for s in r0 if s["skipped"]]
    print(f"overflowed and skipped: steps {skipped}, scales {[s['loss_scale'] for s in r0]}")
    assert skipped and skipped[0] == 1 and len(skipped) < len(STEPS) - 2
    assert skipped == list(range(1, len(skipped) + 1))  # then it trains
    for s, nxt in zip(r0, r0[1:]):
        assert nxt["loss_scale"] == (s["loss_scale"] / 2 if s["skipped"] else s["loss_scale"])
    first = len(skipped)
    # params after the skipped steps are the initial ones: the EMA (a copy of the initial
    # weights, not updated by a skipped step) equals them bit for bit; AdamW never stepped
    p = _params(runs / "two" / "ckpt", first)
    ema = _ema(p)
    for k, v in ema.items():
        if "moving_" not in k:  # BatchNorm statistics move in the forward pass
            assert np.array_equal(v, p[k]), k
    assert float(p["beta1_power"][0]) == 1.0
    assert all(not np.any(v) for k, v in p.items() if k.startswith(("adam_m.", "adam_v.")))
    amp = p["amp_state"]
    assert (amp[0], amp[2], amp[3], amp[4]) == (2.0 ** 20 / 2 ** first, first, first, 0)
    # and the applied steps trained
    last = _params(runs / "two" / "ckpt", 8)
    assert last["amp_state"][4] == len(STEPS) - first and float(last["beta1_power"][0]) < 1.0
    assert max(float(np.abs(last[k] - p[k]).max()) for k in ema if "moving_" not in k) > 1e-4
    # both ranks end with the same state, bit for bit
    d0, d1 = (_events(runs / "two" / f"rank{i}.hb.jsonl", "done")[0] for i in (0, 1))
    assert d0["status"] == d1["status"] == "ok"
    assert d0["state_sha256"] == d1["state_sha256"]
    # the resize: same losses, same EMA
    for a, b in zip(r0, one, strict=True):
        assert abs(a["loss"] - b["loss"]) <= LOSS_RTOL * abs(b["loss"]), (a, b)
    e2, e1 = _ema(_params(runs / "two" / "ckpt", 8)), _ema(_params(runs / "one" / "ckpt", 8))
    worst = max(float(np.abs(e2[k] - e1[k]).max()) for k in e1 if "moving_" not in k)
    losses = [abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(r0, one, strict=True)]
    print(f"2x4x1 vs 1x4x2: max |EMA difference| {worst:.3g}, loss rel diffs max "
          f"{max(losses):.3g}")
    assert worst <= EMA_ATOL


def test_exact_resume_after_sigkill_restores_scale_and_ema(digits, runs, tmp_path):
    ckpt = tmp_path / "ckpt"
    hb = tmp_path / "killed.hb.jsonl"
    shutil.copytree(runs / "one" / "ckpt" / CACHE, ckpt / CACHE)
    cmd = [sys.executable, "-m", "workloads.volo.train", *BASE, *RECIPE, "--data_dir",
           str(digits), "--ckpt_save_dir", str(ckpt), "--ckpt_save_steps", "2",
           "--gradient_accumulation_steps", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(FLEET_HEARTBEAT=str(hb)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if any(c["step"] >= 4 and c["ok"] for c in _events(hb, "checkpoint")):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (ckpt / "step-00000008").exists()
    r = _train([*RECIPE, "--data_dir", str(digits), "--ckpt_save_dir", str(ckpt),
                "--ckpt_save_steps", "2", "--gradient_accumulation_steps", "2"], tmp_path,
               "resumed", FLEET_ATTEMPT="1")
    assert r.returncode == 0, r.stderr[-3000:]
    start = _events(tmp_path / "resumed.hb.jsonl", "start")[0]
    assert 4 <= start["resumed_step"] < 8
    ref = {s["step"]: s for s in _events(runs / "one" / "one.hb.jsonl", "step")}
    for s in _events(tmp_path / "resumed.hb.jsonl", "step"):
        want = ref[s["step"]]
        for k in ("sample_hash", "loss_scale", "overflow_steps", "skipped", "skipped_steps"):
            assert s[k] == want[k], (k, s, want)
        assert abs(s["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"])
    a, b = _params(runs / "one" / "ckpt", 8), _params(ckpt, 8)
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    assert np.array_equal(a["amp_state"], b["amp_state"])
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    print(f"O3 + dynamic + EMA resume after SIGKILL: max |state difference| at step 8 = "
          f"{worst:.3g}")
    assert worst <= RESUME_ATOL


def test_validate_scores_the_ema_unless_raw_weights(digits, runs):
    import json

    ckpt = runs / "one" / "ckpt" / "step-00000008"
    out = {}
    for raw in ("False", "True"):
        r = subprocess.run([sys.executable, "-m", "workloads.volo.validate", *BASE, *RECIPE,
                            "--data_dir", str(digits), "--ckpt_path", str(ckpt),
                            "--raw_weights", raw, "--batch_size", "64"],
                           cwd=ROOT, env=train_env(), capture_output=True, text=True,
                           timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr[-3000:]
        out[raw] = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["False"]["weights"] == "ema" and out["True"]["weights"] == "raw"
    assert "(raw weights, O3)" in r.stderr
    # after 3 applied steps the EMA (decay ~0.0015 in its warm-up) is a step behind the
    # trained weights: two different models
    assert out["False"]["loss"] != out["True"]["loss"]
