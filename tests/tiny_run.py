"""The tiny VOLO recipe as the process-level tests start it: its flags, one train process, its
heartbeat events, and the uninterrupted reference run that several modules compare with
(tests/conftest.py's ``tiny_reference``: one compile of the recipe's graphs per session)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from train_env import train_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "workloads" / "volo" / "configs" / "volo_tiny_digits.yaml"
# Small and quick: 8 images per optimizer step, no validation inside training.
BASE = ["-c", str(TINY), "--batch_size", "8", "--global_batch", "8", "--num_parallel_workers",
        "1", "--val_while_train", "False", "--lr", "0.001", "--warmup_epochs", "0",
        "--epoch_size", "1"]
TIMEOUT = 420
REFERENCE_STEPS = 6
REFERENCE_CHECKPOINT_EVERY = 3


def train(args: list[str], tmp: Path, name: str, **env: str) -> subprocess.CompletedProcess:
    """One train process of BASE + ``args``; its heartbeat is ``tmp/<name>.hb.jsonl``."""
    hb = tmp / f"{name}.hb.jsonl"
    return subprocess.run([sys.executable, "-m", "workloads.volo.train", *BASE, *args],
                          cwd=ROOT, env=train_env(FLEET_HEARTBEAT=str(hb), **env),
                          capture_output=True, text=True, timeout=TIMEOUT)


def events(path: Path, kind: str | None = None) -> list[dict]:
    """The heartbeat's events, or those of one kind."""
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines())
            if kind is None or e["event"] == kind]


def compile_store(reference: Path) -> Path:
    """The shared compile store the reference run published its graphs to."""
    return reference / "compile-store"


def run_reference(digits: Path, tmp: Path) -> Path:
    """REFERENCE_STEPS uninterrupted optimizer steps of BASE into a fresh job directory and a
    fresh compile store (so it compiles), a checkpoint every REFERENCE_CHECKPOINT_EVERY; its
    heartbeat is ``tmp/ref.hb.jsonl``, its checkpoints ``tmp/ckpt``."""
    r = train(["--data_dir", str(digits), "--ckpt_save_dir", str(tmp / "ckpt"),
               "--max_steps", str(REFERENCE_STEPS),
               "--ckpt_save_steps", str(REFERENCE_CHECKPOINT_EVERY)], tmp, "ref",
              FLEET_COMPILE_CACHE_STORE=str(compile_store(tmp)))
    assert r.returncode == 0, r.stderr[-3000:]
    # A healthy CPU run logs no ERROR (MindSpore's stream check did, at each first wait).
    assert "[ERROR]" not in r.stdout + r.stderr, r.stderr[-3000:]
    return tmp
