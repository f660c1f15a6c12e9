"""The next attempt's rank processes, started and joined while the current one trains.

A restart in place used to pay, on its critical path, the import of MindSpore (standbys,
launcher/standby.py, took that off) and the cluster join: ~3 s on CPU, most of it a fixed
sleep inside MindSpore (workloads/volo/prejoin.py says why it cannot be shortened). So once
the current attempt has made its first step, the agent starts the processes of the attempt
that would follow a failure: the same devices, the same plan, the next attempt's paths and a
scheduler port of their own, all fixed in advance by the controller. They import at idle
priority (as standbys), join their own cluster and hold (``FLEET_HOLD=1``, the HOLD protocol
of launcher/contract.py). When the current
attempt fails and the controller restarts it in place with exactly those rank specs, the
agent promotes them: one JSON line each, and training resumes from the newest checkpoint.

All or nothing: a cluster cannot mix promoted and cold processes (they would wait for
different schedulers), so a missing, dead or different process releases the whole group
and the attempt starts cold, as before.

While they hold, their stdout goes to ``jobs/JOB/prejoin-N/rank-0.log``, not into
``attempt-N/``: the attempt's directory appears only when the attempt starts, and no tool or
test takes a held process for a rank. Promotion moves each file into ``attempt-N/``; the
process keeps writing to the same file, now under the rank's path.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from launcher import contract as C
from launcher.ranks import RankSpec
from launcher.standby import module_of, standby_argv

Spawn = Callable[[list[str], dict[str, str], str | None, str, int], subprocess.Popen]


def hold_log(log: str) -> str:
    """Where a held process writes until it is promoted: .../attempt-N/rank-0.log ->
    .../prejoin-N/rank-0.log."""
    p = Path(log)
    return str(p.parent.with_name("prejoin-" + p.parent.name.removeprefix("attempt-")) / p.name)


def eligible(ranks: list[RankSpec]) -> bool:
    """Only `python -m MODULE` ranks can start as standbys and hold."""
    return bool(ranks) and all(module_of(r.argv) is not None for r in ranks)


class PrejoinedAttempt:
    """One agent's held processes for one future attempt."""

    def __init__(self, ranks: list[RankSpec]):
        self.ranks = ranks
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, spawn: Spawn, env_of: Callable[[RankSpec], dict[str, str]]) -> None:
        """Start every process; each imports, then becomes its rank and holds after the join.
        A process that cannot start leaves the group incomplete: it will not be promoted."""
        for r in self.ranks:
            env = {**env_of(r), C.HOLD_ENV: C.HOLD_ON}
            log = hold_log(r.log)
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            try:
                p = spawn(standby_argv(r.argv), env, r.cwd, log, subprocess.PIPE)
                launch = {"argv": r.argv, "env": env, "cwd": r.cwd, "log": None}
                assert p.stdin is not None
                p.stdin.write((json.dumps(launch) + "\n").encode())
                p.stdin.flush()  # stdin stays open: the go line comes later
            except OSError:
                continue
            self.procs[r.label] = p

    def matches(self, ranks: list[RankSpec]) -> bool:
        """Every rank of the attempt has a live held process started from the same spec."""
        mine = {r.label: r.to_dict() for r in self.ranks}
        return (len(ranks) == len(mine) and set(self.procs) == set(mine)
                and all(mine.get(r.label) == r.to_dict() for r in ranks)
                and all(p.poll() is None for p in self.procs.values()))

    def promote(self, env: dict[str, str]) -> dict[str, subprocess.Popen]:
        """Hand the processes over as the attempt's ranks; {} (and all released) if one of
        them is gone by now."""
        by_label = {r.label: r for r in self.ranks}
        go = (json.dumps({"env": env}) + "\n").encode()
        try:
            for label, p in self.procs.items():
                r = by_label[label]
                Path(r.log).parent.mkdir(parents=True, exist_ok=True)
                os.replace(hold_log(r.log), r.log)
                assert p.stdin is not None
                p.stdin.write(go)
                p.stdin.close()
        except OSError:  # a process died since matches(), or its log went away
            self.release()
            return {}
        procs, self.procs = self.procs, {}
        self._remove_hold_dirs()
        return procs

    def release(self) -> None:
        """Let the processes go: they were not needed (the job ended, the plan changed)."""
        procs, self.procs = self.procs, {}
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            if p.stdin is not None:
                with contextlib.suppress(OSError):
                    p.stdin.close()
        for p in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self._remove_hold_dirs()

    def _remove_hold_dirs(self) -> None:
        """Remove this agent's logs of processes that never trained, then the directory once
        every agent of the job has done so (the others' files are theirs to move)."""
        for r in self.ranks:
            with contextlib.suppress(OSError):
                os.unlink(hold_log(r.log))
        for d in {Path(hold_log(r.log)).parent for r in self.ranks}:
            with contextlib.suppress(OSError):
                d.rmdir()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.poll() is None]
