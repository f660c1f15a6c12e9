"""Bad input to the train/validate/export entry points: exit non-zero, name the culprit,
start no work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "workloads" / "volo" / "configs" / "volo_tiny_digits.yaml"


def _run(module: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MS_", "FLEET_"))}
    e.update(env)
    return subprocess.run([sys.executable, "-m", f"workloads.volo.{module}", *args], cwd=ROOT,
                          env=e, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    for split in ("train", "val"):
        for c in ("0", "1"):
            (root / split / c).mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(root / split / c / f"{i}.png")
    return root


def _train_args(data: Path, tmp: Path, *extra: str) -> list[str]:
    return ["-c", str(TINY), "--data_dir", str(data), "--ckpt_save_dir", str(tmp / "ck"),
            "--batch_size", "4", "--max_steps", "1", "--num_parallel_workers", "1", *extra]


def test_missing_data_dir(tmp_path):
    hb = tmp_path / "hb.jsonl"
    r = _run("train", _train_args(tmp_path / "nowhere", tmp_path), FLEET_HEARTBEAT=str(hb),
             FLEET_ATTEMPT="2")
    assert r.returncode == 2 and str(tmp_path / "nowhere" / "train") in r.stderr
    assert not (tmp_path / "ck").exists()
    done = json.loads(hb.read_text().splitlines()[-1])  # the agent learns why, too
    assert (done["event"], done["status"], done["attempt"]) == ("done", "error", 2)
    assert str(tmp_path / "nowhere") in done["error"]


def test_a_held_rank_that_fails_leaves_the_attempts_heartbeat_alone(tmp_path):
    # a process joined ahead for a later attempt (workloads/volo/prejoin.py) that fails
    # before it is promoted: the attempt may start cold, and its heartbeat file is its own
    hb = tmp_path / "attempt-3" / "rank-0.heartbeat.jsonl"
    r = _run("train", _train_args(tmp_path / "nowhere", tmp_path), FLEET_HEARTBEAT=str(hb),
             FLEET_ATTEMPT="3", FLEET_HOLD="1")
    assert r.returncode == 2 and str(tmp_path / "nowhere" / "train") in r.stderr
    assert not hb.parent.exists()


def test_empty_class_folder(small_folder, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(small_folder, data)
    (data / "train" / "7").mkdir()
    r = _run("train", _train_args(data, tmp_path))
    assert r.returncode == 2 and str(data / "train" / "7") in r.stderr and "no images" in r.stderr


def test_corrupt_image_is_named(small_folder, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(small_folder, data)
    for p in (data / "train").rglob("*.png"):
        p.write_bytes(b"not a png")  # every file: whichever the sampler reads first is named
    r = _run("train", _train_args(data, tmp_path, "--val_while_train", "False"))
    assert r.returncode == 2 and "cannot read image" in r.stderr
    assert str(data / "train") in r.stderr and ".png" in r.stderr
    assert not list((tmp_path / "ck").glob("step-*"))


def test_unknown_model(small_folder, tmp_path):
    r = _run("train", _train_args(small_folder, tmp_path, "--model", "volo_d9"))
    assert r.returncode == 2 and "volo_d9" in r.stderr


def test_unknown_config_key(small_folder, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(TINY.read_text() + "\nwarmup_epoch: 3\n")
    r = _run("train", ["-c", str(cfg), "--data_dir", str(small_folder)])
    assert r.returncode == 2 and "warmup_epoch" in r.stderr and str(cfg) in r.stderr


def test_global_batch_mismatch_before_any_work(small_folder, tmp_path):
    r = _run("train", _train_args(small_folder, tmp_path), FLEET_GLOBAL_BATCH="10",
             FLEET_MICRO_BATCH="4", FLEET_GRAD_ACCUM="2")
    assert r.returncode == 2 and "1 x 4 x 2 = 8" in r.stderr and "global batch is 10" in r.stderr
    assert not (tmp_path / "ck").exists()


def test_validate_and_export_bad_checkpoint(small_folder, tmp_path):
    r = _run("validate", ["-c", str(TINY), "--data_dir", str(small_folder), "--ckpt_path",
                          str(tmp_path / "none")])
    assert r.returncode == 2 and str(tmp_path / "none") in r.stderr
    r = _run("export", ["--ckpt_path", str(tmp_path / "none"), "--model", "volo_tiny",
                        "--out", str(tmp_path / "m.mindir")])
    assert r.returncode == 2 and str(tmp_path / "none") in r.stderr


@pytest.mark.parametrize("module,error,message", [
    ("distributed", "CollectiveCorrupted",
     "all-reduce of 9 values over 2 ranks came back corrupted"),
    ("step_guard", "StepCorrupted",
     "micro-step loss 0.1 is below 0.500288, the least cross-entropy its targets allow"),
])
def test_corrupted_step_fails_the_rank_cleanly(small_folder, tmp_path, module, error, message):
    """CollectiveCorrupted (workloads/volo/distributed.py) and StepCorrupted (step_guard.py)
    end the rank with exit 1, the message on stderr and in the heartbeat, and no traceback:
    the agent restarts the job."""
    code = ("import sys\n"
            "from workloads.volo import train\n"
            f"from workloads.volo.{module} import {error}\n"
            "def corrupted(*a, **k):\n"
            f"    raise {error}({message!r})\n"
            "train.run = corrupted\n"
            "sys.exit(train.main(sys.argv[1:]))\n")
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MS_", "FLEET_"))}
    hb = tmp_path / "hb.jsonl"
    e["FLEET_HEARTBEAT"] = str(hb)
    r = subprocess.run([sys.executable, "-c", code, *_train_args(small_folder, tmp_path)],
                       cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"error: {message}" in r.stderr
    assert "Traceback" not in r.stderr
    done = json.loads(hb.read_text().splitlines()[-1])
    assert (done["event"], done["status"]) == ("done", "error")
    assert message in done["error"]
