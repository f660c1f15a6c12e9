"""Checkpoint directories: atomic rename, manifest verification, retention, recipe guard."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workloads.volo.checkpoint import (
    CheckpointManager,
    CheckpointState,
    RecipeMismatchError,
    check_resumable,
    latest_valid,
    list_checkpoints,
    read_state,
    verify,
)

ROOT = Path(__file__).resolve().parents[1]


def _state(step, top1=None, recipe_hash="r1", recipe=None):
    return CheckpointState(step=step, epoch=step // 10, samples_seen=step * 8, global_batch=8,
                           world_size=2, micro_batch=4, grad_accum=1, seed=0,
                           recipe_hash=recipe_hash, model="volo_tiny", recipe=recipe or {},
                           top1=top1)


def _payload(data: bytes):
    return lambda p: p.write_bytes(data)


def test_save_layout_and_verify(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=3)
    m.save(_state(5), _payload(b"weights-5" * 100), block=True)
    d = tmp_path / "step-00000005"
    assert sorted(p.name for p in d.iterdir()) == ["MANIFEST.sha256", "model.ckpt", "state.json"]
    assert verify(d) is None
    st = read_state(d)
    assert (st.step, st.samples_seen, st.global_batch, st.world_size) == (5, 40, 8, 2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_truncated_newest_is_skipped_with_a_warning(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=5)
    for s in (2, 4, 6):
        m.save(_state(s), _payload(os.urandom(4096)), block=True)
    model = tmp_path / "step-00000006" / "model.ckpt"
    model.write_bytes(model.read_bytes()[:100])  # truncated after the rename
    warnings = []
    assert latest_valid(tmp_path, warn=warnings.append) == tmp_path / "step-00000004"
    assert len(warnings) == 1 and "step-00000006" in warnings[0] and "sha256" in warnings[0]


def test_partial_dirs_are_never_chosen(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=5)
    m.save(_state(3), _payload(b"x"), block=True)
    (tmp_path / ".tmp-step-00000009-123").mkdir()  # killed mid-save
    (tmp_path / ".tmp-step-00000009-123" / "model.ckpt").write_bytes(b"half")
    no_manifest = tmp_path / "step-00000008"  # e.g. restored from a backup without manifest
    no_manifest.mkdir()
    (no_manifest / "model.ckpt").write_bytes(b"y")
    warnings = []
    assert latest_valid(tmp_path, warn=warnings.append) == tmp_path / "step-00000003"
    assert "step-00000008" in warnings[0] and "MANIFEST" in warnings[0]
    assert [p.name for p in m.clean_stale()] == [".tmp-step-00000009-123"]
    assert latest_valid(tmp_path / "missing") is None


def test_keep_last_k_and_best(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    for step, top1 in [(1, 50.0), (2, 90.0), (3, 70.0), (4, 80.0), (5, 60.0)]:
        m.save(_state(step, top1), _payload(b"%d" % step), block=True)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000002", "step-00000004", "step-00000005"]  # best + last 2
    assert m.best() == tmp_path / "step-00000002" and m.best_top1() == 90.0
    assert os.readlink(tmp_path / "best") == "step-00000002"  # relative link


def test_resave_same_step_replaces(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    m.save(_state(4), _payload(b"old"), block=True)
    m.save(_state(4), _payload(b"new"), block=True)
    assert (tmp_path / "step-00000004" / "model.ckpt").read_bytes() == b"new"
    assert verify(tmp_path / "step-00000004") is None


def test_failed_payload_leaves_nothing_and_raises(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    m.save(_state(1), _payload(b"ok"), block=True)

    def boom(p):
        p.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(Exception, match="disk full"):
        m.save(_state(2), boom, block=True)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("step-")] == []
    assert latest_valid(tmp_path) == tmp_path / "step-00000001"


def test_recipe_change_refused_unless_forced(tmp_path):
    st = _state(1, recipe_hash="aaa", recipe={"lr": 0.1, "model": "volo_tiny"})
    check_resumable(st, tmp_path, "aaa", {"lr": 0.1}, force=False)
    with pytest.raises(RecipeMismatchError, match=r"lr: 0.1 -> 0.2.*--force"):
        check_resumable(st, tmp_path, "bbb", {"lr": 0.2, "model": "volo_tiny"}, force=False)
    check_resumable(st, tmp_path, "bbb", {"lr": 0.2, "model": "volo_tiny"}, force=True)


def test_sigkill_during_save_keeps_previous_valid(tmp_path):
    """A writer killed while writing the payload of step 2 leaves step 1 as the newest valid."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from workloads.volo.checkpoint import CheckpointManager, CheckpointState
        m = CheckpointManager({str(tmp_path)!r}, keep_last=3)
        def st(s):
            return CheckpointState(step=s, epoch=0, samples_seen=s, global_batch=1, world_size=1,
                                   micro_batch=1, grad_accum=1, seed=0, recipe_hash="h",
                                   model="volo_tiny")
        m.save(st(1), lambda p: p.write_bytes(b"one" * 1000), block=True)
        def slow(p):
            with open(p, "wb") as f:
                f.write(b"two" * 1000)
                f.flush()
                print("WRITING", flush=True)
                time.sleep(60)
        m.save(st(2), slow, block=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(p.name.startswith(".tmp-step-00000002") for p in tmp_path.iterdir())
    assert latest_valid(tmp_path) == tmp_path / "step-00000001"
    assert json.loads((tmp_path / "step-00000001" / "state.json").read_text())["step"] == 1


def test_a_deferred_payload_is_written_on_the_writer_thread(tmp_path):
    """write_payload may take what it needs and return the writing for the background
    thread; a failure there reaches the training thread and leaves the previous save."""
    import threading

    m = CheckpointManager(tmp_path, keep_last=2)
    writers = []

    def deferred(data):
        def take(p):
            def finish():
                writers.append(threading.current_thread().name)
                p.write_bytes(data)
            return finish
        return take

    m.save(_state(1), deferred(b"w1"), block=True)
    assert writers == ["ckpt-1"]
    verify(tmp_path / "step-00000001")  # raises on a bad manifest
    assert (tmp_path / "step-00000001" / "model.ckpt").read_bytes() == b"w1"

    def full(p):
        def finish():
            p.write_bytes(b"part")
            raise OSError("no space left on device")
        return finish

    m.save(_state(2), full)  # the error surfaces at the next save or wait
    with pytest.raises(Exception, match="no space left"):
        m.wait()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("step-")] == []
    assert latest_valid(tmp_path) == tmp_path / "step-00000001"


def test_payload_snapshot_loads_like_mindspores_own_save(tmp_path, monkeypatch):
    """ckpt_payload writes what ms.save_checkpoint writes: same names, dtypes, shapes and
    values through ms.load_checkpoint, for every dtype the train loop saves, a scalar, and
    a parameter split into slices."""
    import mindspore as ms
    import numpy as np

    from workloads.volo import ckpt_payload

    rng = np.random.default_rng(0)
    params = [
        ms.Parameter(ms.Tensor(rng.standard_normal((3, 5)).astype(np.float32)), name="w"),
        ms.Parameter(ms.Tensor(rng.standard_normal((7,)).astype(np.float16)), name="h"),
        ms.Parameter(ms.Tensor(np.array(42, dtype=np.int32)), name="global_step"),
        ms.Parameter(ms.Tensor(rng.integers(0, 9, (2, 2, 2)).astype(np.int64)), name="i"),
        ms.Parameter(ms.Tensor(rng.standard_normal((9, 4)).astype(np.float32)), name="big"),
    ]
    ms.save_checkpoint(params, str(tmp_path / "theirs.ckpt"))
    snap = ckpt_payload.snapshot(params)
    monkeypatch.setattr(ckpt_payload, "SLICE_BYTES", 40)  # "big" (144 bytes) in 4 slices
    ckpt_payload.write(tmp_path / "ours.ckpt", snap)
    theirs = ms.load_checkpoint(str(tmp_path / "theirs.ckpt"))
    ours = ms.load_checkpoint(str(tmp_path / "ours.ckpt"))
    assert list(ours) == list(theirs) == ["w", "h", "global_step", "i", "big"]
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert ours[name].shape == theirs[name].shape, name
        np.testing.assert_array_equal(ours[name].asnumpy(), theirs[name].asnumpy())
    # the snapshot is a copy: changing a parameter afterwards does not change the save
    params[0].set_data(ms.Tensor(np.zeros((3, 5), np.float32)))
    assert snap[0][2].any()
