"""Atomic, verifiable checkpoint directories (cross-team contract 3).

Layout under ``ckpt_dir``::

    step-00000012/            one per optimizer step saved
        model.ckpt            model parameters + optimizer state (MindSpore checkpoint)
        state.json            CheckpointState: step, epoch, samples seen, batch layout, RNG, recipe
        MANIFEST.sha256       "<sha256>  <file>" for every other file; written last
    best -> step-00000010     symlink to the saved step with the highest val top-1
    .tmp-step-00000014-<pid>  a save in progress (or killed mid-way); never read

A directory is renamed into place only after its files and manifest are fsynced, so a crash
leaves either the old set of checkpoints or the old set plus one complete new one. A reader
still verifies every digest, because storage can truncate or corrupt a file after the rename.

This module does not import MindSpore: the payload (``model.ckpt``) is written by a callback,
and the launcher can call :func:`latest_valid` without loading the framework.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointState",
    "RecipeMismatchError",
    "latest_valid",
    "list_checkpoints",
    "read_state",
    "select",
    "verify",
]

log = logging.getLogger(__name__)

MODEL_FILE = "model.ckpt"
STATE_FILE = "state.json"
MANIFEST_FILE = "MANIFEST.sha256"
BEST_LINK = "best"
_STEP_RE = re.compile(r"^step-(\d{8})$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read."""


class RecipeMismatchError(CheckpointError):
    """The checkpoint was made by a different recipe; resuming would silently change the run."""


@dataclass
class CheckpointState:
    step: int  # optimizer steps done
    epoch: int  # epoch the next step belongs to
    samples_seen: int  # step * global_batch
    global_batch: int
    world_size: int
    micro_batch: int
    grad_accum: int
    seed: int
    recipe_hash: str
    model: str
    rng: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    top1: float | None = None
    top5: float | None = None
    val_loss: float | None = None
    # loss scale, its counters and EMA updates (workloads/volo/train.py); also in model.ckpt
    amp: dict[str, Any] = field(default_factory=dict)
    saved_at: float = 0.0
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckpointState:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # not supported everywhere (some network file systems); rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """Step directories (complete or not), oldest first; temporary ones are not listed."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and not p.is_symlink():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def verify(path: str | os.PathLike[str]) -> str | None:
    """``None`` if the checkpoint's manifest verifies, else the reason it does not."""
    p = Path(path)
    manifest = p / MANIFEST_FILE
    if not manifest.is_file():
        return f"no {MANIFEST_FILE} (partial save?)"
    try:
        lines = manifest.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return f"unreadable {MANIFEST_FILE}: {e}"
    listed: dict[str, str] = {}
    for line in lines:
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or "/" in name or name in ("", ".", ".."):
            return f"malformed {MANIFEST_FILE} line {line!r}"
        listed[name] = digest
    for required in (MODEL_FILE, STATE_FILE):
        if required not in listed:
            return f"{MANIFEST_FILE} does not list {required}"
    for name, digest in listed.items():
        f = p / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its sha256 (truncated or corrupt)"
    try:
        state = json.loads((p / STATE_FILE).read_text())
        CheckpointState.from_json(state)
    except (ValueError, TypeError) as e:
        return f"{STATE_FILE} is not a valid state: {e}"
    return None


def read_state(path: str | os.PathLike[str]) -> CheckpointState:
    return CheckpointState.from_json(json.loads((Path(path) / STATE_FILE).read_text()))


def latest_valid(ckpt_dir: str | os.PathLike[str],
                 warn: Callable[[str], None] | None = None) -> Path | None:
    """Newest checkpoint whose manifest verifies; each newer broken one is reported by name."""
    warn = warn or log.warning
    for p in reversed(list_checkpoints(ckpt_dir)):
        reason = verify(p)
        if reason is None:
            return p
        warn(f"skipping checkpoint {p}: {reason}")
    return None


def select(ckpt_dir: str | os.PathLike[str], which: str = "best") -> Path | None:
    """The checkpoint a validate or export step gets: ``best`` (the best-by-top-1 link)
    falling back to the newest valid one; ``latest``: the newest valid one."""
    d = Path(ckpt_dir)
    if which == "best":
        best = d / BEST_LINK
        if best.exists() and verify(best) is None:
            return best.resolve()
    return latest_valid(d)


def check_resumable(state: CheckpointState, path: Path, recipe_hash: str,
                    recipe: dict[str, Any], force: bool) -> None:
    """Refuse to continue a run whose recipe changed (device counts may change freely)."""
    if state.recipe_hash == recipe_hash:
        return
    changed = sorted(k for k in set(state.recipe) | set(recipe)
                     if state.recipe.get(k) != recipe.get(k))
    detail = ", ".join(f"{k}: {state.recipe.get(k)!r} -> {recipe.get(k)!r}" for k in changed[:8])
    msg = (f"checkpoint {path} was written by a different recipe ({detail or 'hash differs'}); "
           "resuming would change the run. Use a new checkpoint dir, or pass --force to resume "
           "anyway")
    if not force:
        raise RecipeMismatchError(msg)
    log.warning("--force: %s", msg)


def _require_payload(tmp: Path) -> None:
    if not (tmp / MODEL_FILE).is_file():
        raise CheckpointError(f"payload writer did not create {MODEL_FILE}")


# Writes model.ckpt at the path it is given and returns None, or returns a function that
# writes it later on the checkpoint writer thread.
PayloadWriter = Callable[[Path], "Callable[[], None] | None"]


class CheckpointManager:
    """Writes checkpoints on a background thread, keeps the last K and the best by top-1.

    Only one save is in flight; a new ``save`` waits for the previous one, so a slow disk
    throttles training rather than piling up copies of the model in memory.
    """

    def __init__(self, ckpt_dir: str | os.PathLike[str], keep_last: int = 3,
                 on_saved: Callable[[dict[str, Any]], None] | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.on_saved = on_saved
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.total_blocking_seconds = 0.0  # time the training loop waited on saves
        self.total_save_seconds = 0.0  # time spent writing, on any thread
        self.saves = 0

    # -- writing ---------------------------------------------------------------------------
    def clean_stale(self) -> list[Path]:
        """Remove ``.tmp-*`` leftovers of killed saves; call once at start, before saving."""
        removed = []
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(".tmp-") or p.name.startswith(".old-"):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    def save(self, state: CheckpointState, write_payload: PayloadWriter,
             block: bool = False) -> None:
        """Save ``state``: ``write_payload(path)`` runs on the calling thread (MindSpore is
        not safe to call beside a running step; measured: a save on another thread corrupted
        the next step's loss). It writes model.ckpt, or takes what it needs and returns a
        function that writes it on the background thread (workloads/volo/ckpt_payload.py).
        Hashing, fsync, rename and pruning run on that thread while training continues."""
        t0 = time.perf_counter()
        self.wait()
        try:
            tmp, finish = self._stage(state, write_payload)
        except BaseException as e:
            self._report(state, False, time.perf_counter() - t0, e)
            raise CheckpointError(f"checkpoint save at step {state.step} failed: {e}") from e
        staged = time.perf_counter() - t0
        self._thread = threading.Thread(target=self._run, args=(state, tmp, staged, finish),
                                        name=f"ckpt-{state.step}", daemon=False)
        self._thread.start()
        if block:
            self.wait()
        self.total_blocking_seconds += time.perf_counter() - t0

    def wait(self) -> None:
        """Wait for the in-flight save; re-raise its error here, on the training thread."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"checkpoint save failed: {err}") from err

    def _report(self, state: CheckpointState, ok: bool, seconds: float,
                error: BaseException | None = None) -> None:
        self.total_save_seconds += seconds
        self.saves += 1
        event: dict[str, Any] = {"step": state.step,
                                 "path": str(self.dir / step_dir_name(state.step)),
                                 "save_seconds": round(seconds, 6), "ok": ok}
        if error is not None:
            event["error"] = f"{type(error).__name__}: {error}"
        if self.on_saved is not None:
            try:
                self.on_saved(event)
            except Exception:  # noqa: BLE001 - a reporting hiccup must not fail the save
                log.exception("on_saved callback failed")

    def _run(self, state: CheckpointState, tmp: Path, staged_seconds: float,
             finish: Callable[[], None] | None = None) -> None:
        t0 = time.perf_counter()
        try:
            self._finish_payload(tmp, finish)
            self._commit(state, tmp)
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread by wait()
            self._error = e
            self._report(state, False, staged_seconds + time.perf_counter() - t0, e)
            return
        self._report(state, True, staged_seconds + time.perf_counter() - t0)

    def write(self, state: CheckpointState, write_payload: PayloadWriter) -> Path:
        """Synchronous save: temp dir, payload, state, manifest, fsync, rename, prune."""
        tmp, finish = self._stage(state, write_payload)
        self._finish_payload(tmp, finish)
        return self._commit(state, tmp)

    def _stage(self, state: CheckpointState,
               write_payload: PayloadWriter) -> tuple[Path, Callable[[], None] | None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-{step_dir_name(state.step)}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            result = write_payload(tmp / MODEL_FILE)
            finish = result if callable(result) else None
            if finish is None:
                _require_payload(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp, finish

    @staticmethod
    def _finish_payload(tmp: Path, finish: Callable[[], None] | None) -> None:
        if finish is None:
            return
        try:
            finish()
            _require_payload(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _commit(self, state: CheckpointState, tmp: Path) -> Path:
        name = step_dir_name(state.step)
        final = self.dir / name
        try:
            state.saved_at = time.time()
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1, sort_keys=True))
            lines = []
            for f in sorted(tmp.iterdir()):
                _fsync_file(f)
                lines.append(f"{_sha256(f)}  {f.name}\n")
            (tmp / MANIFEST_FILE).write_text("".join(lines))
            _fsync_file(tmp / MANIFEST_FILE)
            _fsync_dir(tmp)
            if final.exists():
                # Same step saved again (e.g. a resumed run re-saving): swap, then drop the old.
                old = self.dir / f".old-{name}-{os.getpid()}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if state.top1 is not None:
            self._update_best(final, state.top1)
        self.prune()
        return final

    # -- best and retention ----------------------------------------------------------------
    def best(self) -> Path | None:
        link = self.dir / BEST_LINK
        if not link.is_symlink():
            return None
        target = self.dir / os.readlink(link)
        return target if target.is_dir() else None

    def best_top1(self) -> float | None:
        b = self.best()
        if b is None or verify(b) is not None:
            return None
        return read_state(b).top1

    def _update_best(self, path: Path, top1: float) -> None:
        current = self.best_top1()
        if current is not None and current >= top1:
            return
        tmp_link = self.dir / f".tmp-best-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        os.symlink(path.name, tmp_link)  # relative: the directory can be moved or mounted
        os.replace(tmp_link, self.dir / BEST_LINK)
        _fsync_dir(self.dir)

    def prune(self) -> list[Path]:
        """Delete all but the newest ``keep_last`` step dirs, never the ``best`` one."""
        steps = list_checkpoints(self.dir)
        best = self.best()
        keep = set(steps[-self.keep_last:])
        if best is not None:
            keep.add(best)
        removed = []
        for p in steps:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed
