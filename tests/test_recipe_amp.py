"""MindCV's recipe keys in one process: amp levels, loss scaling, EMA, clipping, bad values.

The trainers here run volo_tiny on random 32x32 inputs: what is checked is the arithmetic of
a step, not learning (tests/test_recipe_e2e.py runs the real
processes).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from workloads.volo.config import ConfigError, parse_args, recipe_file_problems
from workloads.volo.loss_scale import LossScaleConfig, LossScaler

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "workloads" / "volo" / "configs" / "volo_tiny_digits.yaml"
D1 = ROOT / "workloads" / "volo" / "configs" / "volo_d1_ascend.yaml"
# Measured on volo_tiny (random init, 8 random images): max |logit - float32 logit| /
# max |float32 logit| was 1.4e-3 at O2 and 0.9e-3 at O3; 3x that is the bound.
FP16_REL_BOUND = 4e-3


def _args(*extra: str):
    return parse_args(["-c", str(TINY), "--batch_size", "8", "--global_batch", "8",
                       "--val_while_train", "False", "--num_threads", "1", *extra])


# -- loss scaling -----------------------------------------------------------------------------

def test_dynamic_scaler_matches_mindspores_update_cell():
    """The host scaler against the cell MindCV's DynamicLossScaleManager hands its train step,
    over a pattern of overflows, with a window of 3 so that increases happen."""
    import mindspore as ms
    from mindspore import nn

    ms.set_context(mode=ms.PYNATIVE_MODE)
    cell = nn.DynamicLossScaleUpdateCell(loss_scale_value=1024.0, scale_factor=2, scale_window=3)
    scale = ms.Parameter(ms.Tensor(1024.0, ms.float32), name="scale")
    ours = LossScaler(LossScaleConfig(dynamic=True, init_scale=1024.0, drop_overflow_update=True,
                                      window=3))
    pattern = [False] * 4 + [True, True] + [False] * 7 + [True] + [False] * 3
    for overflow in pattern:
        cell(scale, ms.Tensor(overflow))
        applied = ours.after_step(overflow)
        assert applied is not overflow
        assert ours.scale == float(scale.asnumpy()), (pattern, ours)
    assert ours.overflow_steps == ours.skipped_steps == 3
    # halving stops at 1, as MindSpore's minimum_loss_scale
    low = LossScaler(LossScaleConfig(dynamic=True, init_scale=2.0, drop_overflow_update=True))
    for _ in range(3):
        low.after_step(True)
    assert low.scale == 1.0


def test_fixed_scale_and_mindcv_defaults():
    keep = LossScaler(LossScaleConfig.from_args(_args("--loss_scale", "128")))
    assert keep.after_step(True) and keep.scale == 128.0 and keep.skipped_steps == 0
    drop = LossScaler(LossScaleConfig.from_args(_args("--loss_scale", "128",
                                                      "--drop_overflow_update", "True")))
    assert not drop.after_step(True) and drop.scale == 128.0 and drop.skipped_steps == 1
    d1 = LossScaleConfig.from_args(parse_args(["-c", str(D1)]))
    assert (d1.dynamic, d1.init_scale, d1.factor, d1.window, d1.drop_overflow_update) == \
        (True, 1024.0, 2, 2000, True)
    # "auto": what mindspore.Model picks for the level
    o2 = LossScaleConfig.from_args(_args("--loss_scale_type", "auto", "--amp_level", "O2"))
    o3 = LossScaleConfig.from_args(_args("--loss_scale_type", "auto", "--amp_level", "O3"))
    assert (o2.dynamic, o2.init_scale) == (True, 2.0 ** 24)
    assert (o3.dynamic, o3.init_scale, o3.drop_overflow_update) == (False, 1.0, False)


# -- bad values ------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,needle", [
    ("loss_scale", "0", "'loss_scale' must be >= 1"),
    ("loss_scale", "-4", "'loss_scale' must be >= 1"),
    ("ema_decay", "1.0", "'ema_decay' must be in (0, 1)"),
    ("ema_decay", "0", "'ema_decay' must be in (0, 1)"),
    ("clip_value", "0", "'clip_value' must be > 0"),
    ("amp_level", "O4", "'amp_level' must be one of"),
    ("loss_scale_type", "bogus", "'loss_scale_type' must be one of"),
])
def test_bad_recipe_value_names_key_and_file(tmp_path, key, value, needle):
    from workloads.volo.train import _check_supported

    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text() + f"\n{key}: {value}\n")
    with pytest.raises(ConfigError) as e:
        _check_supported(parse_args(["-c", str(bad)]))
    assert needle in str(e.value) and str(bad) in str(e.value)
    # the launcher's check of the same file (fleet validate, submit --dry-run)
    problems = recipe_file_problems(bad)
    assert problems and needle.split("'")[1] in " ".join(k + m for k, m in problems)


def test_dynamic_without_drop_is_refused_as_mindcv_does():
    problems = recipe_file_problems(TINY, {"loss_scale_type": "dynamic"})
    assert [k for k, _ in problems] == ["drop_overflow_update"]
    assert recipe_file_problems(D1) == []
    assert recipe_file_problems(TINY, {"no_such_key": 1})[0][0] == "no_such_key"


def test_seed_recipe_prints_no_not_implemented():
    from workloads.volo.train import _check_supported

    # the seed's recipe sets none of the keys still unsupported: no warning at all
    assert _check_supported(parse_args(["-c", str(D1)])) == []


def test_docs_call_not_implemented_only_the_keys_the_trainer_warns_about():
    """A recipe key the README or docs/ say is not implemented is one the trainer warns
    about, and the README's known limits name every such key."""
    import re

    from workloads.volo.train import _check_supported

    args = _args("--aug_repeats", "3", "--layer_decay", "0.75", "--amp_cast_list", "x")
    warned = {w.split()[0] for w in _check_supported(args) if "not implemented" in w}
    assert warned, "the flags above no longer reach the trainer's warnings"
    keys = set(vars(args))
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for chunk in re.split(r"\n\s*\n|\n(?=\s*[*-] )", doc.read_text()):
            if "not implemented" in chunk.lower():
                named = set(re.findall(r"`([a-z_][a-z0-9_]*)`", chunk)) & keys
                assert named <= warned, (doc.name, sorted(named - warned), chunk)
    readme = (ROOT / "README.md").read_text()
    limits = readme.split("## Known limits", 1)[1].split("\n## ", 1)[0]
    assert {k for k in warned if f"`{k}`" not in limits} == set()


# -- cast policy and numerics -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_weights():
    import mindspore as ms

    from workloads.volo import create_model

    ms.set_context(mode=ms.PYNATIVE_MODE)
    if ms.get_context("device_target") != "CPU":
        ms.set_device("CPU")
    ms.set_seed(0)
    net = create_model("volo_tiny", num_classes=10)
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def _tiny(weights):
    import mindspore as ms
    from mindspore.nn.utils import no_init_parameters

    from workloads.volo import create_model

    with no_init_parameters():
        net = create_model("volo_tiny", num_classes=10)
    for p in net.get_parameters():
        p.set_data(ms.Tensor(weights[p.name]))
    return net


def test_cast_policy_cell_by_cell(tiny_weights):
    from mindspore import nn

    from workloads.volo.amp import apply_amp, cell_precisions

    norm = (nn.LayerNorm, nn.BatchNorm2d)
    white = (nn.Dense, nn.Conv2d)
    for level in ("O0", "O1", "O2", "O3"):
        net = apply_amp(_tiny(tiny_weights), level)
        prec = cell_precisions(net)
        cells = dict(net.cells_and_names())
        leaves = {n: c for n, c in cells.items() if isinstance(c, norm + white)}
        assert sum(isinstance(c, norm) for c in leaves.values()) >= 10
        for name, cell in leaves.items():
            want = {"O0": "NOTSET",
                    "O1": "FP16" if isinstance(cell, white) else "NOTSET",
                    "O2": "FP32" if isinstance(cell, norm) else "FP16",
                    "O3": "FP16"}[level]
            assert prec[name] == want, (level, name, type(cell).__name__, prec[name])
        # parameters keep their names and stay float32 masters
        assert sorted(p.name for p in net.get_parameters()) == sorted(tiny_weights)
        assert {str(p.dtype) for p in net.get_parameters()} == {"Float32"}


def test_o2_o3_forward_within_fp16_bound(tiny_weights):
    import mindspore as ms

    from workloads.volo.amp import apply_amp

    x = ms.Tensor(np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    ref = _tiny(tiny_weights)
    ref.set_train(False)
    y0 = ref(x).asnumpy()
    for level in ("O1", "O2", "O3"):
        net = apply_amp(_tiny(tiny_weights), level)
        net.set_train(False)
        y = net(x)
        assert y.dtype == ms.float32
        rel = float(np.abs(y.asnumpy() - y0).max() / np.abs(y0).max())
        print(f"{level}: max |logit - fp32 logit| / max |fp32 logit| = {rel:.3g}")
        # float16 shows: not the float32 result bit for bit, and within its rounding
        assert 1e-6 < rel <= FP16_REL_BOUND, (level, rel)


# -- one trainer: overflow skip, EMA reference, clipping --------------------------------------

def _trainer(data: Path, *extra: str, mode: int = 1):
    from workloads.volo import train as T

    args = _args("--data_dir", str(data), "--mode", str(mode), *extra)
    T._check_supported(args)
    plan = T.make_plan(args, 1)
    T._configure_mindspore(args)
    return T.Trainer(plan, 1)


def _batch(seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    return x, np.eye(10, dtype=np.float32)[rng.integers(0, 10, 8)]


def _raw(tr) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy().copy() for p in tr.net.get_parameters()}


def test_overflow_skips_and_ema_follows_mindcvs_formula(digits):
    """O3, dynamic scale from 2**20 (float16 gradients overflow at first), EMA 0.999, clip:
    every overflowed step leaves the trained parameters, the optimizer state and the EMA
    bitwise as they were and halves the scale; the applied steps' EMA equals MindCV's formula
    in NumPy over the same parameter history."""
    tr = _trainer(digits, "--amp_level", "O3", "--loss_scale_type", "dynamic", "--loss_scale",
                  str(2 ** 20), "--drop_overflow_update", "True", "--ema", "True",
                  "--ema_decay", "0.999", "--clip_grad", "True", "--lr", "0.01",
                  "--warmup_epochs", "0", mode=0)  # compiled: PyNative O3 steps are slow
    decay = np.float32(0.999)
    ema = {k: v.astype(np.float32) for k, v in _raw(tr).items()}
    opt_before = {p.name: p.asnumpy().copy() for p in tr.opt.get_parameters()}
    n, skipped, scales = 0, 0, []
    for i in range(8):
        before = _raw(tr)
        scale = tr.scaler.scale
        tr.step([_batch(i)], 0.01)
        scales.append(scale)
        after = _raw(tr)
        if tr.last_skipped:
            skipped += 1
            assert tr.scaler.scale == scale / 2
            for k in before:
                if "moving_" not in k:  # BatchNorm statistics move in the forward pass
                    assert np.array_equal(before[k], after[k]), k
            opt_now = {p.name: p.asnumpy() for p in tr.opt.get_parameters()}
            if n == 0:
                assert all(np.array_equal(opt_before[k], opt_now[k]) for k in opt_now
                           if k != "learning_rate")
        else:
            n += 1
            d = np.float32(decay * (1 - math.exp(-n / 2000)))
            ema = {k: ema[k] * d + after[k] * (np.float32(1) - d) for k in ema}
    assert skipped >= 1 and n >= 2, (skipped, n, scales)
    assert tr.scaler.overflow_steps == skipped and tr.ema_updates == n
    got = {p.name[len("ema."):]: p.asnumpy() for p in tr.ema}
    worst = max(float(np.abs(got[k] - ema[k]).max()) for k in ema)
    print(f"EMA vs NumPy reference after {n} updates ({skipped} skipped): {worst:.3g}")
    assert worst <= 1e-6
    # the EMA is not the raw weights (the test can tell them apart)
    raw = _raw(tr)
    assert max(float(np.abs(got[k] - raw[k]).max()) for k in raw) > 1e-4
    state = dict(zip(("loss_scale", "good", "overflow", "skipped", "ema"),
                     tr.amp_state.asnumpy().tolist(), strict=True))
    assert state == {"loss_scale": tr.scaler.scale, "good": tr.scaler.good_steps,
                     "overflow": skipped, "skipped": skipped, "ema": n}
    # last words copy the EMA and the scaler state through host views like the weights
    from workloads.volo.last_words import host_views

    views = host_views(tr.state_params())
    assert views is not None
    names = {name for name, _, _ in views}
    assert "amp_state" in names and {"ema." + k for k in raw} <= names


def test_clip_grad_bounds_the_global_norm_of_the_update(digits):
    """SGD without momentum or decay: the update is -lr x the (clipped) mean gradient, so its
    global norm is lr x clip_value when the gradient's norm is larger."""
    lr, clip = 0.1, 1e-3

    def update_norm(*extra: str) -> float:
        tr = _trainer(digits, "--opt", "sgd", "--weight_decay", "0", "--momentum", "0", *extra)
        before = _raw(tr)
        tr.step([_batch(0)], lr)
        after = _raw(tr)
        return math.sqrt(sum(float(((after[k] - before[k]).astype(np.float64) ** 2).sum())
                             for k in before if "moving_" not in k)) / lr

    free = update_norm()
    clipped = update_norm("--clip_grad", "True", "--clip_value", str(clip))
    assert free > 10 * clip
    assert clipped == pytest.approx(clip, rel=1e-3)


def test_bad_value_exits_2_before_the_scheduler_starts(tmp_path):
    """As the agent starts the scheduler process: it must fail on the recipe, not serve a
    cluster whose workers will never come."""
    import subprocess
    import sys

    from train_env import train_env

    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text() + "\nloss_scale_type: dynamic\nloss_scale: 1024\n")
    env = train_env(MS_ROLE="MS_SCHED", MS_SCHED_HOST="127.0.0.1", MS_SCHED_PORT="1",
                    MS_WORKER_NUM="2")
    r = subprocess.run([sys.executable, "-m", "workloads.volo.train", "-c", str(bad)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "'drop_overflow_update'" in r.stderr and str(bad) in r.stderr


def test_export_writes_the_ema_weights_unless_raw_weights(tiny_weights, tmp_path):
    """export.py takes a checkpoint's EMA, as validate.py does; --raw_weights the trained
    weights. The EMA here is the trained weights with the head's bias moved by 1, so the two
    exported networks' logits differ by exactly that."""
    import json
    import subprocess
    import sys

    import mindspore as ms
    from train_env import train_env

    from workloads.volo.ema import EMA_PREFIX

    ema = {EMA_PREFIX + k: v + np.float32(k == "head.bias") for k, v in tiny_weights.items()}
    ckpt = tmp_path / "model.ckpt"
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)}
                        for k, v in {**tiny_weights, **ema}.items()], str(ckpt))
    logits, which = {}, {}
    for raw in ("False", "True"):
        r = subprocess.run([sys.executable, "-m", "workloads.volo.export", "--ckpt_path",
                            str(ckpt), "--model", "volo_tiny", "--out", str(tmp_path / raw),
                            "--raw_weights", raw], cwd=ROOT, env=train_env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        info = json.loads(r.stdout.strip().splitlines()[-1])
        which[raw] = info["weights"]
        run = ("import sys, json, numpy as np, mindspore as ms\n"
               "ms.set_context(mode=ms.GRAPH_MODE)\n"
               "net = ms.nn.GraphCell(ms.load(sys.argv[1]))\n"
               "x = ms.Tensor(np.zeros((1, 3, int(sys.argv[2]), int(sys.argv[2])), np.float32))\n"
               "print(json.dumps(net(x).asnumpy().tolist()))\n")
        r = subprocess.run([sys.executable, "-c", run, info["out"], str(info["image_size"])],
                           cwd=ROOT, env=train_env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        logits[raw] = np.array(json.loads(r.stdout.strip().splitlines()[-1]))
    assert which == {"False": "ema", "True": "raw"}
    np.testing.assert_allclose(logits["False"] - logits["True"], 1.0, atol=1e-4)
