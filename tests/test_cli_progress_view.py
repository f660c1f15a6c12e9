"""`--wait`'s progress: a live view in a real pseudo-terminal, plain lines in a pipe.

The CLI runs as a subprocess (`fleet status JOB --watch`, the same loop as `submit
--wait`) against a store with no cluster, so the test can move the job on by writing the
store while the view is up.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from launcher.lifecycle import JobState as S
from launcher.store import Store

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PLAN = {"devices": 2, "micro_batch": 16, "grad_accum": 2, "slices": []}


def progress(step: int) -> dict:
    return {"step": step, "stop_step": 10, "loss": 2.5 - step / 10,
            "images_per_second": 123.4, "avg_step_seconds": 2.0}


@pytest.fixture()
def running(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    store = Store(home / "fleet.db")
    job = store.add_job("tj", "TrainJob", {}, {}, 0)
    store.add_attempt(job.id, PLAN, "pg")
    for s in (S.SCHEDULING, S.RUNNING):
        store.set_state(job.id, s)
    store.update_job(job.id, progress=progress(3), restarts=1)
    return home, store, job.id


def finish(store: Store, job_id: str) -> None:
    store.update_job(job_id, progress=progress(10))
    store.set_state(job_id, S.SUCCEEDED, "done")


def cli_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, FLEET_HOME=str(home), TERM="xterm-256color", PYTHONUNBUFFERED="1")
    for k in ("RAY_ADDRESS", "NO_COLOR", "FORCE_COLOR"):
        env.pop(k, None)
    return env


def read_until(fd: int, needle: bytes, buf: bytearray, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            buf += chunk
    return needle in buf


def test_live_view_in_a_pseudo_terminal(running):
    home, store, job_id = running
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "launcher.cli", "status", job_id, "--watch"],
                         stdin=slave, stdout=slave, stderr=slave, cwd=REPO,
                         env=cli_env(home), close_fds=True)
    os.close(slave)
    buf = bytearray()
    try:
        assert read_until(master, b"3/10", buf, 30), buf.decode(errors="replace")
        first = ANSI.sub("", buf.decode(errors="replace"))
        finish(store, job_id)
        read_until(master, b"SUCCEEDED - done", buf, 30)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    raw = buf.decode(errors="replace")
    text = ANSI.sub("", raw)
    assert p.returncode == 0, text
    # The table's header and the running job's row: bar, step/total, loss, img/s, ETA
    # (7 steps x 2 s), devices x micro-batch x accumulation, attempt, restarts.
    for cell in ("progress", "img/s", "ETA", "devices × micro × accum", "restarts"):
        assert cell in first, first
    row = next(ln for ln in first.splitlines() if "3/10" in ln)
    assert "RUNNING" in row and "━" in row and "2.2000" in row and "123.4" in row
    assert "0:00:14" in row and "2 × 16 × 2" in row and re.search(r"│\s+1\s+│\s+1\s+│", row)
    # Redrawn in place (cursor up + erase line), ending on the finished frame.
    assert "\x1b[2K" in raw and re.search(r"\x1b\[\d*A", raw)
    last = next(ln for ln in reversed(text.splitlines()) if "10/10" in ln)
    assert "SUCCEEDED" in last
    assert f"{job_id}: SUCCEEDED - done" in text


def test_plain_lines_when_not_a_terminal(running):
    home, store, job_id = running
    p = subprocess.Popen([sys.executable, "-m", "launcher.cli", "status", job_id, "--watch"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                         env=cli_env(home), text=True)
    first = p.stdout.readline()
    finish(store, job_id)
    rest, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert first == (f"{job_id} RUNNING  step 3/10  loss 2.2000  123.4 img/s  ETA 0:00:14  "
                     "[2 dev, micro 16 x accum 2, attempt 1]  restarts 1\n")
    assert "\x1b[" not in first + rest
    assert f"{job_id} SUCCEEDED  step 10/10" in rest


def test_sigterm_during_the_live_view_gives_the_cursor_back(running):
    home, _store, job_id = running
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "launcher.cli", "status", job_id, "--watch"],
                         stdin=slave, stdout=slave, stderr=slave, cwd=REPO,
                         env=cli_env(home), close_fds=True)
    os.close(slave)
    buf = bytearray()
    try:
        assert read_until(master, b"3/10", buf, 30), buf.decode(errors="replace")
        p.send_signal(signal.SIGTERM)
        read_until(master, b"jobs keep running", buf, 10)
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    raw = buf.decode(errors="replace")
    assert p.returncode == 143
    hidden = raw.index("\x1b[?25l")  # rich hides the cursor while it draws
    assert "\x1b[?25h" in raw[hidden:]
