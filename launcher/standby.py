"""Standby rank processes: interpreters that have already imported the workload.

A restart in place (controller.py) starts the ranks of the next attempt on the same
devices. Importing MindSpore and the train loop costs 1.5-2.2 s of every rank's start
(measured, bench/recovery.py), on every restart. The agent therefore keeps one standby per
rank it runs: `python -m launcher.standby MODULE` imports MODULE and what it names in
STANDBY_PRELOAD, then blocks on stdin. At the next start the agent writes the launch (argv,
env, cwd, log) as one JSON line and the standby becomes that rank: same process, so the
agent's Popen handle gives the rank's real exit code and signal, PDEATHSIG and the session
still hold.

What cannot change after an import (OMP_NUM_THREADS and GLOG_v are read when MindSpore's
libraries load) is part of the standby's key: the agent uses a standby only for a rank
whose command and environment equal the standby's apart from PER_LAUNCH_ENV.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import sys
import threading
from collections.abc import Mapping, Sequence

from launcher import contract as C

# Differ between the attempts and ranks that one standby may serve; read by MindSpore and
# the train loop only when the rank starts (cluster init, device open, heartbeat).
# MS_ROLE is not among them: a scheduler and a worker stand by apart.
PER_LAUNCH_ENV = frozenset({
    C.ATTEMPT_ENV, C.HEARTBEAT_ENV, C.LAST_WORDS_ENV, C.CHECKPOINT_REQUEST_ENV, C.SPAWN_TS_ENV,
    C.STANDBY_ENV,
    "MS_SCHED_HOST", "MS_SCHED_PORT", "MS_WORKER_NUM", "MS_NODE_ID",
    "RANK_ID", "RANK_SIZE", "LOCAL_RANK", "DEVICE_ID", "ASCEND_RT_VISIBLE_DEVICES",
})


def module_of(argv: Sequence[str]) -> str | None:
    """MODULE of `python -m MODULE ...`, the only form a standby can become."""
    if len(argv) >= 3 and argv[1] == "-m":
        return argv[2]
    return None


def standby_key(argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> str:
    """Equal for two launches that one standby can serve."""
    static = {k: v for k, v in env.items() if k not in PER_LAUNCH_ENV}
    return json.dumps([argv[0], module_of(argv), cwd or "", sorted(static.items())])


def standby_argv(argv: Sequence[str]) -> list[str]:
    mod = module_of(argv)
    if mod is None:
        raise ValueError(f"not a `python -m MODULE` command: {list(argv)[:3]}")
    return [argv[0], "-m", "launcher.standby", mod]


def _preload_when_idle(module: str) -> None:
    """_preload on a thread that runs only when a core is idle (SCHED_IDLE).

    A standby imports while the ranks it will replace are training, on the same cores:
    at normal priority its imports slowed the steps after each start by ~4 s on a 2-core
    machine (bench/goodput.py 'after_start', three standbys). The policy is the importing
    thread's alone; the main thread, which later runs the rank, keeps the normal one
    (an unprivileged process cannot leave SCHED_IDLE). numpy is imported first, here,
    because its BLAS starts worker threads that would inherit the idle policy."""
    with contextlib.suppress(ImportError):
        import numpy  # noqa: F401
    failed: list[BaseException] = []

    def run() -> None:
        # not Linux: import at normal priority
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
        try:
            _preload(module)
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            failed.append(e)

    t = threading.Thread(target=run, name="standby-preload")
    t.start()
    t.join()
    if failed:
        raise failed[0]


def _preload(module: str) -> None:
    mod = importlib.import_module(module)
    for name in getattr(mod, "STANDBY_PRELOAD", ()):
        importlib.import_module(name)
    # run_module executes MODULE afresh as __main__; a copy left in sys.modules would make
    # two module objects (runpy warns), while what it imported stays cached
    del sys.modules[module]


def _become(launch: dict) -> None:
    """Turn this process into the rank that `launch` describes and run it. A launch without
    a log keeps the output the agent gave the process (launcher/prejoin.py moves that file
    while the process runs, so it must not be opened again by name)."""
    if launch.get("log"):
        fd = os.open(launch["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    if launch["env"].get(C.HOLD_ENV) != C.HOLD_ON:
        # a pre-joined rank (launcher/prejoin.py) keeps stdin: its go line comes there
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    if launch.get("cwd"):
        os.chdir(launch["cwd"])
    os.environ.clear()
    os.environ.update(launch["env"])
    os.environ[C.STANDBY_ENV] = "1"
    argv = launch["argv"]
    sys.argv = [argv[0], *argv[3:]]  # run_module replaces [0] with the module's file
    runpy.run_module(argv[2], run_name="__main__", alter_sys=True)


def main(args: list[str] | None = None) -> int:
    args = sys.argv[1:] if args is None else args
    if len(args) != 1:
        print("usage: python -m launcher.standby MODULE  (started by the node agent; it "
              "imports MODULE, then reads one JSON launch line on stdin)", file=sys.stderr)
        return 2
    _preload_when_idle(args[0])
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # the agent let it go unused
    launch = json.loads(line)
    if launch.get("argv", [None, None, None])[2] != args[0]:
        print(f"standby for {args[0]} cannot run {launch.get('argv')}", file=sys.stderr)
        return 2
    _become(launch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
