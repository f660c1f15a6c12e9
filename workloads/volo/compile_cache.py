"""MindSpore's graph compile cache, per job and per rank, so a restarted rank skips the compile.

A restart (rank kill, node loss, resize) reruns the same jit graphs; compiling them costs
12 s (one rank alone) to 30+ s (two ranks on two loaded cores) per attempt. MindSpore 2.10 can
save compiled graphs and load them on the next run (``MS_COMPILER_CACHE_ENABLE=1``,
``MS_COMPILER_CACHE_PATH``), but what it keys a cache on is weak for a launcher:

* it checks only a hash of the entry script and the imported files outside ``sys.path``
  (none of this package when the repository is on ``sys.path``, as the agent sets it), not
  input shapes, the model config or the MindSpore version;
* graphs are matched to cache files by compile order.

So each cache lives in its own directory under the job's checkpoint directory, named by
everything that shapes the graphs (recipe hash, micro-batch, class count, device target,
threads, MindSpore and Python versions and this package's sources): a different micro-batch
or code gets a fresh directory, never a wrong graph. World size and accumulation are left out
on purpose: the two graphs (one micro-batch's loss and gradients, one optimizer update) hold
no collective - ranks average in PyNative between them - so they are the same graphs at any
world size, and a resize (2 ranks x 4 x 1 -> 1 rank x 4 x 2 after a node loss) reuses them.
MindSpore names a cluster worker's files ``MS_WORKER<name>`` and a lone process's ``<name>``,
so the other mode's files are hard-linked under this mode's names before use.
tests/test_train_e2e.py's resize test runs the 1-rank side from the 2-rank side's cache
(no file rewritten) and checks it against the 2-rank result.

A rank killed while MindSpore writes its cache leaves a partial one. MindSpore recompiles
when a cache file does not parse (measured with a truncated one: an error line, then the
compile), and besides a rank marks its directory complete only after its first optimizer
step (both graphs compiled and saved); an unmarked directory is removed before use.

Under ``python -m`` MindSpore records ``-m`` as its entry script when it is first imported and
the first cached compile dies on ``FileNotFoundError: .../-m``; that record is pointed at
train.py here, before any compile.

Shared store (``FLEET_COMPILE_CACHE_STORE``, set by the launcher to a directory every pod
mounts): rank 0 of the first job to complete a key's graphs publishes a copy there, and a
rank (any rank: the graphs are the same) whose own job has none for its key starts from that
copy. A second submission of the same
recipe (a rerun, a clone with another name, a workflow's next step on the same graphs) then
skips the first compile, which is the largest single loss of a job's goodput (12 s for the
tiny recipe on CPU, minutes for VOLO-D5 on Ascend). Entries are published whole: copied into a
private temporary directory, marked complete, then renamed into place, so a reader sees a
complete entry or none. The store keeps the ``FLEET_COMPILE_CACHE_STORE_KEEP`` (default 16)
most recently used keys; older ones, and temporary directories left by a killed publisher,
are removed when an entry is published.

``FLEET_COMPILE_CACHE=0`` turns this off; an ``MS_COMPILER_CACHE_ENABLE`` already set in the
environment is the user's and left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.contract import COMPILE_CACHE_STORE_ENV as STORE_ENV
from workloads.volo.config import ConfigError

__all__ = ["CompileCache", "cache_key", "enable", "prune", "publish"]

CACHE_DIRNAME = ".compile-cache"
_COMPLETE = "complete"
_OWNED = "FLEET_COMPILE_CACHE_DIR"
_WORKER_PREFIX = "MS_WORKER"  # MindSpore 2.10: a cluster worker's cache file names start so
_PACKAGE = Path(__file__).resolve().parent
_ENTRY = _PACKAGE / "train.py"
STORE_KEEP_ENV = "FLEET_COMPILE_CACHE_STORE_KEEP"
STORE_KEEP_DEFAULT = 16
_STALE_TMP_S = 3600.0  # a publisher still copying after an hour was killed


@dataclass
class CompileCache:
    dir: Path  # this rank's MS_COMPILER_CACHE_PATH
    hit: bool  # this mode's graphs from a complete cache are there: no compile expected
    rank: int = 0
    key: str = ""
    store: Path | None = None  # the shared store, when the launcher configured one
    source: str = "none"  # where the graphs came from: job | store | none (compiled here)
    keep: int = STORE_KEEP_DEFAULT
    publisher: threading.Thread | None = None

    @property
    def status(self) -> str:
        return "hit" if self.hit else "miss"

    def mark_complete(self) -> None:
        """Call after the first optimizer step: both graphs are compiled and saved by then.
        Rank 0 of a job that compiled them also publishes them to the shared store, on a
        thread (a large model's graphs take a while to copy); the process waits for it at
        exit."""
        marker = self.dir / _COMPLETE
        if not marker.exists():
            marker.write_text("graphs saved by a rank that completed an optimizer step\n")
        if self.store is not None and self.rank == 0 and self.publisher is None \
                and not (self.store / self.key / _COMPLETE).is_file():
            self.publisher = threading.Thread(
                target=publish, args=(self.dir / f"rank_{self.rank}" / "graph_cache",
                                      self.store, self.key, self.keep),
                name="compile-cache-publish")
            self.publisher.start()


def _sources_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(_PACKAGE.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def cache_key(plan: Any) -> str:
    """Directory name for the graphs of ``plan`` (any world size, any accumulation)."""
    import mindspore as ms

    args = plan.args
    micro = plan.layout.micro_batch
    parts = {"recipe": plan.recipe_hash, "micro_batch": micro, "num_classes": plan.num_classes,
             "device_target": args.device_target, "num_threads": args.num_threads,
             "mode": args.mode, "mindspore": ms.__version__, "python": sys.version,
             "sources": _sources_hash()}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return f"mb{micro}-{digest[:16]}"


def _point_entry_script() -> bool:
    """Give MindSpore the train loop as the entry script to hash; False if this MindSpore has
    no such record. Always the train loop: MindSpore records sys.argv[0] when it is imported,
    which is launcher/standby.py in a rank that started from a standby process (its graphs
    would never match: measured 11 s first steps on a "hit")."""
    try:
        from mindspore.graph import api
    except ImportError:
        return False
    if not hasattr(api, "entry_script_path"):
        return False
    api.entry_script_path = str(_ENTRY)
    return True


def _share_across_modes(d: Path, rank: int, in_cluster: bool) -> bool:
    """Link the other mode's graph files under this mode's names; True when this mode's
    graphs are there."""
    gc = d / f"rank_{rank}" / "graph_cache"
    if not gc.is_dir():
        return False
    for p in list(gc.iterdir()):
        plain = p.name[len(_WORKER_PREFIX):] if p.name.startswith(_WORKER_PREFIX) else p.name
        want = gc / (_WORKER_PREFIX + plain if in_cluster else plain)
        if want.exists():
            continue
        try:
            os.link(p, want)
        except OSError:
            shutil.copy2(p, want)
    return any(gc.glob(f"{_WORKER_PREFIX if in_cluster else ''}compile_cache_*.mindir"))


def store_keep(environ: Any = None) -> int:
    environ = os.environ if environ is None else environ
    raw = environ.get(STORE_KEEP_ENV, "")
    try:
        keep = int(raw) if raw else STORE_KEEP_DEFAULT
    except ValueError:
        keep = -1
    if keep < 1:
        raise ConfigError(f"{STORE_KEEP_ENV}={raw!r}: give the number of compile-cache keys the "
                         "shared store keeps, an integer >= 1")
    return keep


def _plain(name: str) -> str:
    return name[len(_WORKER_PREFIX):] if name.startswith(_WORKER_PREFIX) else name


def publish(graph_cache: Path, store: Path, key: str, keep: int) -> bool:
    """Copy one rank's complete graphs into ``store/key`` whole; False when another publisher
    got there first or the copy failed (the store is an optimisation: never an error)."""
    entry = store / key
    tmp = store / f".tmp-{key}-{os.getpid()}-{threading.get_ident()}"
    try:
        (tmp / "graph_cache").mkdir(parents=True)
        for p in sorted(graph_cache.iterdir()):
            dest = tmp / "graph_cache" / _plain(p.name)  # one copy, lone-process names
            if p.is_file() and not dest.exists():
                shutil.copy2(p, dest)
        (tmp / _COMPLETE).write_text(f"published by pid {os.getpid()}\n")
        os.rename(tmp, entry)  # atomic; fails when the entry exists
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    prune(store, keep)
    return True


def prune(store: Path, keep: int) -> list[Path]:
    """Remove all but the ``keep`` most recently used entries, and temporary directories of
    publishers that died; returns what was removed."""
    removed = []
    now = time.time()
    try:
        children = list(store.iterdir())
    except OSError:
        return removed
    entries = []
    for p in children:
        try:
            mtime = p.stat().st_mtime
        except OSError:
            continue
        if p.name.startswith(".tmp-"):
            if now - mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        elif p.is_dir():
            entries.append((mtime, p))
    for _, p in sorted(entries, reverse=True)[keep:]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _seed_from_store(store: Path, key: str, d: Path, rank: int) -> bool:
    """Start this rank's cache from the store's copy; False (and no partial copy) if none."""
    entry = store / key
    if not (entry / _COMPLETE).is_file():
        return False
    dest = d / f"rank_{rank}" / "graph_cache"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for p in (entry / "graph_cache").iterdir():
            shutil.copy2(p, dest / p.name)
        (d / _COMPLETE).write_text(f"graphs copied from {entry}\n")
        os.utime(entry)  # most recently used: the last to be pruned
    except OSError:
        # pruned or unreadable under us: compile instead
        shutil.rmtree(d, ignore_errors=True)
        return False
    return True


def enable(plan: Any, rank: int, environ: dict[str, str] | Any = None) -> CompileCache | None:
    """Turn the cache on for this rank before anything is compiled; None when it stays off."""
    environ = os.environ if environ is None else environ
    if environ.get("FLEET_COMPILE_CACHE", "1") == "0" or plan.args.mode != 0:
        return None
    if "MS_COMPILER_CACHE_ENABLE" in environ and _OWNED not in environ:
        _point_entry_script()
        return None
    if not _point_entry_script():
        return None
    key = cache_key(plan)
    store = Path(environ[STORE_ENV]) if environ.get(STORE_ENV) else None
    keep = store_keep(environ)
    d = Path(plan.ckpt_dir) / CACHE_DIRNAME / key / f"rank-{rank}"
    complete = (d / _COMPLETE).is_file()
    source = "job" if complete else "none"
    if d.exists() and not complete:
        shutil.rmtree(d, ignore_errors=True)
    if not complete and store is not None and _seed_from_store(store, key, d, rank):
        complete, source = True, "store"
    hit = complete and _share_across_modes(d, rank, environ.get("MS_ROLE") == "MS_WORKER")
    d.mkdir(parents=True, exist_ok=True)
    environ["MS_COMPILER_CACHE_PATH"] = str(d)
    environ["MS_COMPILER_CACHE_ENABLE"] = "1"
    environ[_OWNED] = str(d)  # a later Trainer in this process may move the cache
    return CompileCache(d, hit, rank=rank, key=key, store=store,
                        source=source if hit else "none", keep=keep)
