"""Recipe parsing: MindCV precedence (defaults < YAML < CLI), unknown keys and bad values."""

import subprocess
import sys
from pathlib import Path

import pytest

from workloads.volo.config import ConfigError, env_override, parse_args, recipe_hash

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "workloads" / "volo" / "configs"


def _yaml(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_yaml_cli_precedence(tmp_path):
    cfg = _yaml(tmp_path, "lr: 0.5\nbatch_size: 7\nscale: [0.2, 0.9]\n")
    a = parse_args(["-c", cfg])
    assert (a.lr, a.batch_size, a.scale) == (0.5, 7, [0.2, 0.9])
    assert a.weight_decay == 1e-6  # untouched default
    b = parse_args(["-c", cfg, "--lr", "0.25", "--scale", "0.3,1.0", "--epochs", "4"])
    assert (b.lr, b.batch_size, b.scale, b.epoch_size) == (0.25, 7, [0.3, 1.0], 4)


def test_unknown_key_names_key_and_file(tmp_path):
    cfg = _yaml(tmp_path, "lr: 0.1\nlearning_rat: 0.2\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["-c", cfg])
    assert "learning_rat" in str(e.value) and cfg in str(e.value)


@pytest.mark.parametrize("text,key", [("lr: fast\n", "lr"), ("opt: adamx\n", "opt"),
                                      ("batch_size: 2.5\n", "batch_size"),
                                      ("distribute: maybe\n", "distribute")])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        parse_args(["-c", _yaml(tmp_path, text)])


def test_missing_or_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["-c", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="mapping"):
        parse_args(["-c", _yaml(tmp_path, "- a\n- b\n")])


def test_shipped_recipes_parse():
    d1 = parse_args(["-c", str(CONFIGS / "volo_d1_ascend.yaml")])
    # MindCV's published volo_d1 recipe values
    assert (d1.model, d1.batch_size, d1.lr, d1.min_lr, d1.epoch_size) == (
        "volo_d1", 128, 0.0019, 0.00001, 300)
    assert (d1.warmup_epochs, d1.decay_epochs, d1.opt, d1.weight_decay) == (20, 280, "adamw", 0.05)
    assert (d1.label_smoothing, d1.mixup, d1.cutmix, d1.amp_level) == (0.1, 0.2, 1.0, "O3")
    assert d1.auto_augment == "randaug-m9-mstd0.5-inc1" and d1.crop_pct == 0.96
    assert d1.color_jitter == [0.4, 0.4, 0.4] and d1.loss_scale_type == "dynamic"
    tiny = parse_args(["-c", str(CONFIGS / "volo_tiny_digits.yaml")])
    assert tiny.model == "volo_tiny" and tiny.image_resize == 32 and tiny.device_target == "CPU"
    # the same recipe at the seed's precision, for the fault suite (FLEET_FAULTS_RECIPE):
    # every other key is the quickstart's
    o3 = parse_args(["-c", str(CONFIGS / "volo_tiny_digits_o3.yaml")])
    assert (o3.amp_level, o3.val_amp_level, o3.loss_scale_type, o3.loss_scale,
            o3.drop_overflow_update, o3.ema, o3.ema_decay) == (d1.amp_level, d1.val_amp_level,
                                                               "dynamic", 1024.0, True, True,
                                                               d1.ema_decay)
    differ = {k for k, v in vars(o3).items() if getattr(tiny, k) != v} - {"config"}
    assert differ == {"amp_level", "val_amp_level", "loss_scale_type", "loss_scale",
                      "drop_overflow_update", "ema", "ema_decay"}, differ


def test_fleet_env_overrides(tmp_path):
    a = parse_args(["-c", str(CONFIGS / "volo_tiny_digits.yaml"), "--ckpt_save_dir", "x"])
    env_override(a, {"FLEET_CHECKPOINT_DIR": str(tmp_path), "FLEET_GLOBAL_BATCH": "64",
                     "FLEET_MICRO_BATCH": "16", "FLEET_GRAD_ACCUM": "2",
                     "FLEET_NUM_THREADS": "3"})
    assert (a.ckpt_save_dir, a.global_batch, a.batch_size, a.gradient_accumulation_steps,
            a.num_threads) == (str(tmp_path), 64, 16, 2, 3)
    with pytest.raises(ConfigError, match="FLEET_MICRO_BATCH"):
        env_override(a, {"FLEET_MICRO_BATCH": "zero"})


def test_recipe_hash_ignores_devices_not_maths():
    base = ["-c", str(CONFIGS / "volo_tiny_digits.yaml")]
    h = recipe_hash(parse_args(base), 32)
    # micro-batch / accumulation / paths / cadence may change between attempts
    assert h == recipe_hash(parse_args(base + ["--batch_size", "16", "--data_dir", "/x",
                                               "--gradient_accumulation_steps", "2",
                                               "--ckpt_save_steps", "5"]), 32)
    assert h != recipe_hash(parse_args(base + ["--lr", "0.1"]), 32)
    assert h != recipe_hash(parse_args(base), 64)  # the global batch is part of the recipe


def test_train_cli_unknown_key_exits_2(tmp_path):
    cfg = _yaml(tmp_path, "model: volo_tiny\nnot_a_flag: 1\n")
    r = subprocess.run([sys.executable, "-m", "workloads.volo.train", "-c", cfg,
                        "--data_dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "not_a_flag" in r.stderr and cfg in r.stderr
