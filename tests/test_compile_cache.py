"""A restarted rank loads its jit graphs from the job's compile cache instead of compiling them,
and what it computes from them equals an uncached run.

One small recipe (volo_tiny, G=8, one process): run A compiles and writes the cache (the
session's tiny reference run, tests/tiny_run.py: a fresh job directory and a fresh store), run B
resumes A's last checkpoint in a copy of A's job directory, cache included, and must hit it
(files untouched, first step measurably shorter), run C resumes a copy of A's checkpoints with
the cache off; B and C must agree within the e2e suite's resume tolerance.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_run import BASE, REFERENCE_STEPS, ROOT, compile_store, events
from train_env import train_env

TIMEOUT = 300
RESUME_RTOL = 1e-5  # as tests/test_train_e2e.py: CPU kernels are not bitwise reproducible
# A hit still loads the graphs and runs the first step's kernels; measured 2.4 s against 11.4 s
# for a compile on an idle core, so half leaves room for load that hits one run only.
HIT_FRACTION = 0.5


def _train(digits: Path, ckpt: Path, steps: int, hb: Path, **env: str) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "workloads.volo.train", *BASE, "--ckpt_save_steps",
                        "2", "--data_dir", str(digits), "--ckpt_save_dir", str(ckpt),
                        "--max_steps", str(steps)],
                       cwd=ROOT, env=train_env(FLEET_HEARTBEAT=str(hb), **env), capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return events(hb)


def _first(events: list[dict], kind: str) -> dict:
    return next(e for e in events if e["event"] == kind)


def _cache_files(ckpt: Path) -> dict[str, tuple[int, int]]:
    root = ckpt / ".compile-cache"
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*.mindir")}


def test_restart_loads_cached_graphs_and_matches_uncached(tmp_path, digits, tiny_reference):
    a = events(tiny_reference / "ref.hb.jsonl")
    assert _first(a, "start")["compile_cache"] == "miss"
    written = _cache_files(tiny_reference / "ckpt")
    assert len(written) >= 2, written  # the micro-step and the update graph

    # copies keep every file's mtime: B's cache files can be compared with what A wrote
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_reference / "ckpt", ckpt, symlinks=True)
    uncached = tmp_path / "uncached"
    shutil.copytree(tiny_reference / "ckpt", uncached, symlinks=True,
                    ignore=shutil.ignore_patterns(".compile-cache"))
    resumed, steps = REFERENCE_STEPS, REFERENCE_STEPS + 1

    b = _train(digits, ckpt, steps, tmp_path / "b.jsonl", FLEET_ATTEMPT="1")
    assert _first(b, "start")["compile_cache"] == "hit"
    assert _first(b, "start")["resumed_step"] == resumed
    assert _cache_files(ckpt) == written, "a hit must load the cache, not rewrite it"

    c = _train(digits, uncached, steps, tmp_path / "c.jsonl", FLEET_COMPILE_CACHE="0")
    assert _first(c, "start")["compile_cache"] == "off"
    assert not (uncached / ".compile-cache").exists()

    sb, sc = _first(b, "step"), _first(c, "step")
    assert sb["step"] == sc["step"] == steps and sb["sample_hash"] == sc["sample_hash"]
    assert abs(sb["loss"] - sc["loss"]) <= RESUME_RTOL * abs(sc["loss"]), (sb["loss"], sc["loss"])
    compiled = min(_first(a, "step")["step_seconds"], sc["step_seconds"])
    assert sb["step_seconds"] < HIT_FRACTION * compiled, (sb["step_seconds"], compiled)

    # another job with the same recipe (a resubmission) starts from A's published graphs
    d = _train(digits, tmp_path / "resubmitted", 1, tmp_path / "d.jsonl",
               FLEET_COMPILE_CACHE_STORE=str(compile_store(tiny_reference)))
    assert (_first(d, "start")["compile_cache"], _first(d, "start")["compile_cache_from"]) == (
        "hit", "store")
    sd, sa = _first(d, "step"), _first(a, "step")
    assert sd["step"] == sa["step"] == 1 and sd["sample_hash"] == sa["sample_hash"]
    assert abs(sd["loss"] - sa["loss"]) <= RESUME_RTOL * abs(sa["loss"]), (sd["loss"], sa["loss"])
    assert sd["step_seconds"] < HIT_FRACTION * compiled, (sd["step_seconds"], compiled)


def _plan(tmp: Path, micro: int = 4, accum: int = 1) -> SimpleNamespace:
    args = SimpleNamespace(mode=0, device_target="CPU", num_threads=1)
    return SimpleNamespace(args=args, ckpt_dir=tmp,
                           layout=SimpleNamespace(micro_batch=micro, grad_accum=accum),
                           recipe_hash="r" * 64, num_classes=10)


def test_key_separates_micro_batch_and_recipe(tmp_path):
    pytest.importorskip("mindspore")
    from workloads.volo.compile_cache import cache_key

    base = cache_key(_plan(tmp_path))
    assert cache_key(_plan(tmp_path)) == base
    # accumulation only repeats the micro-step graph (see compile_cache's docstring)
    assert cache_key(_plan(tmp_path, accum=2)) == base
    assert cache_key(_plan(tmp_path, micro=8)) != base
    other = _plan(tmp_path)
    other.recipe_hash = "s" * 64
    assert cache_key(other) != base
    other = _plan(tmp_path)
    other.args.num_threads = 2
    assert cache_key(other) != base


def test_unfinished_cache_is_discarded(tmp_path):
    pytest.importorskip("mindspore")
    from workloads.volo import compile_cache

    env: dict[str, str] = {}
    first = compile_cache.enable(_plan(tmp_path), 1, env)
    assert first is not None and not first.hit
    assert env["MS_COMPILER_CACHE_PATH"] == str(first.dir)
    partial = first.dir / "rank_1" / "graph_cache" / "compile_cache_0.mindir"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"cut short by SIGKILL")
    again = compile_cache.enable(_plan(tmp_path), 1, {})
    assert again is not None and not again.hit and not partial.exists()
    again.mark_complete()
    assert not compile_cache.enable(_plan(tmp_path), 1, {}).hit  # complete, yet no graphs

    # graphs saved by a cluster worker serve a lone process (a resize to 1 rank) and back
    worker = again.dir / "rank_1" / "graph_cache" / "MS_WORKERcompile_cache_0.mindir"
    worker.parent.mkdir(parents=True)
    worker.write_bytes(b"graph")
    assert compile_cache.enable(_plan(tmp_path), 1, {}).hit
    plain = worker.with_name("compile_cache_0.mindir")
    assert plain.read_bytes() == b"graph"
    worker.unlink()
    assert compile_cache.enable(_plan(tmp_path), 1, {"MS_ROLE": "MS_WORKER"}).hit
    assert worker.read_bytes() == b"graph"

    assert compile_cache.enable(_plan(tmp_path), 1, {"FLEET_COMPILE_CACHE": "0"}) is None
    user = {"MS_COMPILER_CACHE_ENABLE": "1", "MS_COMPILER_CACHE_PATH": "/elsewhere"}
    assert compile_cache.enable(_plan(tmp_path), 1, user) is None
    assert user["MS_COMPILER_CACHE_PATH"] == "/elsewhere"


def _fake_graphs(cache, names=("compile_cache_0.mindir", "compile_cache_1.mindir")) -> Path:
    gc = cache.dir / f"rank_{cache.rank}" / "graph_cache"
    gc.mkdir(parents=True)
    for n in names:
        (gc / n).write_bytes(n.encode())
    return gc


def test_shared_store_seeds_a_new_job_and_is_pruned(tmp_path):
    """A job's rank 0 publishes its complete graphs; another job with the same key starts
    from them (as a cluster worker too); the store keeps the most recently used keys."""
    pytest.importorskip("mindspore")
    from workloads.volo import compile_cache
    from workloads.volo.config import ConfigError

    store = tmp_path / "store"
    env = {"FLEET_COMPILE_CACHE_STORE": str(store), "MS_ROLE": "MS_WORKER"}
    first = compile_cache.enable(_plan(tmp_path / "job-a"), 0, dict(env))
    assert not first.hit and first.source == "none"
    _fake_graphs(first, ("MS_WORKERcompile_cache_0.mindir", "MS_WORKERcompile_dependency.hash"))
    first.mark_complete()
    first.publisher.join(30)
    entry = store / first.key
    assert (entry / "complete").is_file()
    assert sorted(p.name for p in (entry / "graph_cache").iterdir()) == [
        "compile_cache_0.mindir", "compile_dependency.hash"]  # one copy, lone-process names

    # a rank other than 0 never publishes; another job's rank 1 starts from the store
    other = compile_cache.enable(_plan(tmp_path / "job-b"), 1, dict(env))
    assert other.hit and other.source == "store"
    gc = other.dir / "rank_1" / "graph_cache"
    assert (gc / "MS_WORKERcompile_cache_0.mindir").read_bytes() == b"MS_WORKERcompile_cache_0.mindir"
    other.mark_complete()
    assert other.publisher is None
    # its own cache is complete now: the next attempt hits it without the store
    again = compile_cache.enable(_plan(tmp_path / "job-b"), 1, {})
    assert again.hit and again.source == "job"
    # another micro-batch is another key: a miss
    assert not compile_cache.enable(_plan(tmp_path / "job-c", micro=8), 0, dict(env)).hit

    # a second publisher of the same key loses the race quietly
    assert not compile_cache.publish(gc, store, first.key, 16)

    # pruning: most recently used first, a dead publisher's leftovers go, a live one's stay
    for i, name in enumerate(["k-old", "k-mid", "k-new"]):
        (store / name / "graph_cache").mkdir(parents=True)
        os.utime(store / name, (1000.0 + i, 1000.0 + i))
    stale, live = store / ".tmp-k-x-1-1", store / ".tmp-k-y-2-2"
    stale.mkdir()
    live.mkdir()
    os.utime(stale, (1000.0, 1000.0))
    removed = compile_cache.prune(store, keep=2)
    assert {p.name for p in removed} == {"k-old", "k-mid", stale.name}
    assert sorted(p.name for p in store.iterdir()) == sorted([first.key, "k-new", live.name])

    # an entry without its marker is not used, and leaves no half-filled cache behind
    seeded = compile_cache.enable(_plan(tmp_path / "job-d"), 0, {**env, "MS_ROLE": ""})
    assert seeded.hit
    (store / first.key / "complete").unlink()
    late = compile_cache.enable(_plan(tmp_path / "job-e"), 0, dict(env))
    assert not late.hit and not any(late.dir.rglob("*.mindir"))

    with pytest.raises(ConfigError, match="FLEET_COMPILE_CACHE_STORE_KEEP"):
        compile_cache.enable(_plan(tmp_path / "job-f"), 0, {**env, "FLEET_COMPILE_CACHE_STORE_KEEP": "0"})
