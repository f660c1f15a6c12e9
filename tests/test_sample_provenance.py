"""The per-step ``sample_hash`` and ``samples_seen`` come from the samples the input pipeline
delivered, not from the step number: a loader that replays or skips data shows in them, and
the fault suite's check (faults_harness.compare_to_reference) catches it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tiny_run import BASE, ROOT, compile_store, events
from train_env import train_env

from workloads.volo.sampling import (
    MAX_DATASET_SIZE,
    BatchLayout,
    DeliveredIndices,
    GlobalBatchSampler,
)

sys.path.insert(0, str(Path(__file__).parent / "faults"))
from faults_harness import Lineage, compare_to_reference  # noqa: E402


def _all_reduce_mean(parts: list[np.ndarray]) -> np.ndarray:
    """What MeanAllReduce gives every rank: the float32 sum over ranks over the world size."""
    total = np.zeros_like(parts[0])
    for p in parts:
        total = (total + p).astype(np.float32)
    return (total / np.float32(len(parts))).astype(np.float32)


@pytest.mark.parametrize("d,a", [(1, 1), (1, 3), (2, 1), (3, 2), (5, 1), (7, 3), (8, 2)])
def test_delivered_indices_survive_the_mean_all_reduce_exactly(d, a):
    m = 4
    lay = BatchLayout(d * m * a, d, m, a)
    codec = DeliveredIndices(lay)
    rng = np.random.default_rng(d * 10 + a)
    want = rng.choice(MAX_DATASET_SIZE, size=lay.global_batch, replace=False)
    want[0], want[-1] = 0, MAX_DATASET_SIZE - 1  # the extremes
    sampler_chunks = want.reshape(d * a, m)  # chunk k*d + r is rank r's micro-step k
    parts = [codec.encode(r, [sampler_chunks[k * d + r] for k in range(a)]) for r in range(d)]
    assert all(p.dtype == np.float32 and p.shape == (codec.width,) for p in parts)
    assert all(float(np.abs(p).max()) < 1.0 for p in parts)  # small beside the gradients
    got = codec.decode(_all_reduce_mean(parts))
    np.testing.assert_array_equal(got, want)


def test_a_rank_that_delivered_nothing_shows_as_missing_indices():
    lay = BatchLayout(8, 2, 4, 1)
    codec = DeliveredIndices(lay)
    mine = codec.encode(0, [np.array([5, 6, 7, 8])])
    got = codec.decode(_all_reduce_mean([mine, np.zeros_like(mine)]))
    assert got.tolist() == [5, 6, 7, 8, -1, -1, -1, -1]
    with pytest.raises(ValueError, match="delivered indices"):
        codec.encode(0, [np.array([1, 2, 3])])  # a short micro-batch


def _replaying_train(tmp: Path, data: Path, replay_step: int, store: Path) -> list[dict]:
    """One rank of the tiny recipe (tests/tiny_run.py) for 4 steps, whose input pipeline hands
    step ``replay_step`` the previous step's samples again (what a resume from the wrong stream
    position does). Its graphs come from ``store``: the replay is in the input pipeline, not in
    the graphs."""
    hb = tmp / "hb.jsonl"
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from workloads.volo import data
        replay = {replay_step!r}
        original = data._TrainSource.__getitem__
        def replaying(self, i):
            if (replay - 1) * 8 <= i < replay * 8:
                i -= 8
            return original(self, i)
        data._TrainSource.__getitem__ = replaying
        from workloads.volo.train import main
        sys.exit(main(sys.argv[1:]))
    """)
    r = subprocess.run([sys.executable, "-c", code, *BASE, "--data_dir", str(data),
                        "--max_steps", "4", "--ckpt_save_dir", str(tmp / "ckpt"),
                        "--ckpt_save_steps", "100"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=train_env(FLEET_HEARTBEAT=str(hb),
                                     FLEET_COMPILE_CACHE_STORE=str(store)))
    assert r.returncode == 0, r.stderr[-3000:]
    return events(hb, "step")


def test_a_replaying_loader_fails_the_fault_suites_sample_check(tmp_path, digits, tiny_reference):
    # the honest run: the session's uninterrupted reference of the same recipe, first 4 steps
    honest = [e for e in events(tiny_reference / "ref.hb.jsonl", "step") if e["step"] <= 4]
    replayed = _replaying_train(tmp_path / "replayed", digits, 3, compile_store(tiny_reference))

    from workloads.volo.data import scan_image_folder

    n = len(scan_image_folder(digits / "train"))
    sampler = GlobalBatchSampler(n, BatchLayout(8, 1, 8, 1), seed=42)
    expect = [sampler.sample_hash(sampler.step_indices(s)) for s in range(4)]
    assert [e["sample_hash"] for e in honest] == expect
    assert [e["sample_hash"] for e in replayed] == [expect[0], expect[1], expect[1], expect[3]]

    def chain(events):
        return Lineage(committed={e["step"]: e for e in events})

    cmp = compare_to_reference(chain(replayed), chain(honest), 4, 8)
    assert cmp["bad_hash"] == [3] and cmp["samples_replayed"] == 8, cmp
    assert compare_to_reference(chain(honest), chain(honest), 4, 8)["bad_hash"] == []


def test_the_smoke_workload_reports_the_samples_it_read(tmp_path):
    """A smoke rank resumes its sample stream at the checkpoint's ``samples_seen``: a
    checkpoint that says one step too few (a replay) shows in the next step's hash."""
    from launcher.smoke import write_checkpoint

    def run(ckpt: Path) -> list[dict]:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        hb = ckpt.parent / "hb.jsonl"
        r = subprocess.run([sys.executable, "-m", "launcher.smoke", "--max_steps", "5",
                            "--step_seconds", "0", "--ckpt_save_dir", str(ckpt)],
                           cwd=ROOT, env=train_env(FLEET_HEARTBEAT=str(hb),
                                                   FLEET_GLOBAL_BATCH="16"),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return [e for e in map(json.loads, hb.read_text().splitlines()) if e["event"] == "step"]

    whole = run(tmp_path / "whole" / "ckpt")
    write_checkpoint(tmp_path / "replay" / "ckpt", 3, 16, samples_seen=2 * 16)
    resumed = run(tmp_path / "replay" / "ckpt")
    by_step = {e["step"]: e for e in whole}
    assert [e["step"] for e in resumed] == [4, 5]
    assert resumed[0]["sample_hash"] == by_step[3]["sample_hash"]  # step 3's data again
    assert resumed[0]["samples_seen"] == 3 * 16 != by_step[4]["samples_seen"]
    cmp = compare_to_reference(Lineage(committed={e["step"]: e for e in resumed}),
                               Lineage(committed=by_step), 5, 16)
    assert cmp["bad_hash"] == [4, 5], cmp
