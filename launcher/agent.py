"""NodeAgent: runs the rank processes of one job on one node.

One agent per placement-group bundle. It is a plain class (usable and testable
without Ray) that the controller wraps with `ray.remote`. It

* spawns the ranks (argv lists, each in its own session so a whole rank tree
  can be signalled, with PDEATHSIG so ranks die with the agent),
* watches them itself and tears the whole group down at the first failed exit
  (MindSpore takes ~30-60 s to notice a dead peer - far too slow),
* tails the per-rank heartbeat files and hands new events to the controller,
* serves log chunks for `fleet logs`,
* when the controller restarts a job in place, starts the next attempt's ranks on the same
  devices, from standby processes that imported the workload while the last attempt
  trained (launcher/standby.py), or promotes the next attempt's processes that had already
  joined their cluster (launcher/prejoin.py),
* asks its ranks to stop at a checkpoint (`request_checkpoint`, the CHECKPOINT REQUEST
  protocol of launcher/contract.py) and reports ranks that did as "checkpointed", not failed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from launcher import contract as C
from launcher.prejoin import PrejoinedAttempt, eligible
from launcher.progress import HeartbeatTail
from launcher.ranks import RankSpec
from launcher.standby import module_of, standby_argv, standby_key

PR_SET_PDEATHSIG = 1
# Per rank and poll: a rank that wrote more (an agent that fell behind) hands over its
# non-step events and its newest steps, which carry the job's progress.
MAX_EVENTS_PER_RANK_POLL = 2000
# How long a surviving rank may take to save its last words before it is killed. It answers
# in ~0.2 s for volo_tiny; the bound is for a rank that never does.
LAST_WORDS_GRACE_S = 8.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # Linux only: if the agent dies (actor killed, node lost), its ranks get
    # SIGKILL instead of lingering as orphans holding devices.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _is_stopped(pid: int) -> bool:
    """SIGSTOPped (state T): it would never answer."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _rank_env(r: RankSpec) -> dict[str, str]:
    # Ray's own per-worker variables must not leak into the ranks' view of devices: the
    # rank env decides.
    return {**os.environ, **r.env}


def _thinned(records: list[dict]) -> list[dict]:
    if len(records) <= MAX_EVENTS_PER_RANK_POLL:
        return records
    keep = [e for e in records if e.get("event") != C.HeartbeatEvent.STEP]
    steps = [e for e in records if e.get("event") == C.HeartbeatEvent.STEP]
    return keep + steps[len(steps) - max(MAX_EVENTS_PER_RANK_POLL - len(keep), 1):]


class NodeAgent:
    def __init__(self, job_id: str, attempt: int, index: int, standby: bool = False):
        self.job_id = job_id
        self.attempt = attempt
        self.index = index
        # standby processes, spawned once the attempt's first step is done (they would
        # compete with the ranks' own imports and compile before that)
        self.standby = standby
        # (key, label of the rank it was spawned from, process)
        self._standbys: list[tuple[str, str, subprocess.Popen]] = []
        # the rank specs of the attempt that would follow a failure of this one, from the
        # controller, and their processes once spawned (after this attempt's first step)
        self._next_ranks: list[RankSpec] = []
        self._prejoined: PrejoinedAttempt | None = None
        self._lock = threading.RLock()
        self._generation = 0  # one per attempt: an old monitor thread must not watch a new one
        self._reset()

    def _reset(self) -> None:
        self._ranks: list[RankSpec] = []
        self._procs: dict[str, subprocess.Popen] = {}
        self._exits: dict[str, int] = {}
        self._tails: dict[str, HeartbeatTail] = {}
        self._status = "idle"
        self._reason = ""
        self._exit_code: int | None = None
        self._monitor: threading.Thread | None = None
        self._stopping = False
        self._started_at = 0.0
        self._standby_spawned = False
        self._last_words: str | None = None  # the rank that saved the last completed step
        self._checkpoint_requested = False  # request_checkpoint() asked the ranks to stop

    # -- info --------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        node_id = ip = None
        try:
            import ray
            ctx = ray.get_runtime_context()
            node_id = ctx.get_node_id()
            ip = ray.util.get_node_ip_address()
        except Exception:  # noqa: S110 - works without Ray too (unit tests)
            pass
        return {"job": self.job_id, "attempt": self.attempt, "index": self.index,
                "pid": os.getpid(), "node_id": node_id, "ip": ip or "127.0.0.1",
                "visible": os.environ.get("ASCEND_RT_VISIBLE_DEVICES")}

    def free_port(self, host: str) -> int:
        return self.free_ports(1, host)[0]

    def free_ports(self, n: int, host: str) -> list[int]:
        """n distinct ports free now on `host`, the address the MindSpore scheduler will
        bind (its MS_SCHED_HOST): a port free on another address of this node may be
        taken on that one. All are bound at once, so no two are the same; an address
        this node does not have raises OSError here instead of in the scheduler."""
        with contextlib.ExitStack() as stack:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            socks = [stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
                     for _ in range(n)]
            for s in socks:
                s.bind((host, 0))
            return [s.getsockname()[1] for s in socks]

    # -- processes ---------------------------------------------------------
    def start(self, ranks: list[dict], attempt: int | None = None,
              next_ranks: list[dict] | None = None) -> dict[str, Any]:
        """Start the ranks of this agent's attempt, or of a later `attempt` on the same
        devices once the previous one has ended (a restart in place). next_ranks: the
        ranks of the attempt that would restart this one in place, to join ahead of time."""
        with self._lock:
            if self._procs:
                if attempt is None or attempt == self.attempt or self._status == "running":
                    return {"status": self._status, "already": True}
                self._kill_all(grace=0)
                self._reset()
                self.attempt = attempt
            self._ranks = [RankSpec.from_dict(r) for r in ranks]
            self._started_at = time.time()
            self._generation += 1
            from_standby: list[str] = []
            promoted = self._take_prejoined()
            self._next_ranks = [RankSpec.from_dict(r) for r in next_ranks or []]
            for r in self._ranks:
                Path(r.log).parent.mkdir(parents=True, exist_ok=True)
                if r.heartbeat:
                    Path(r.heartbeat).parent.mkdir(parents=True, exist_ok=True)
                    self._tails[r.label] = HeartbeatTail(r.heartbeat)
                env = _rank_env(r)
                # lets a rank report how long its interpreter start and imports took
                env[C.SPAWN_TS_ENV] = repr(time.time())
                p = promoted.get(r.label)
                if p is None:
                    p = self._take_standby(r, env)
                    if p is not None:
                        from_standby.append(r.label)
                if p is None:
                    try:
                        p = self._spawn(r.argv, env, r.cwd, r.log, stdin=subprocess.DEVNULL)
                    except OSError as e:
                        self._status, self._reason = "failed", f"{r.label}: cannot start: {e}"
                        self._kill_all(grace=0)
                        return {"status": self._status, "reason": self._reason}
                self._procs[r.label] = p
            self._release_standbys()  # what is left matches no rank of this attempt
            self._status = "running"
            self._monitor = threading.Thread(target=self._watch, args=(self._generation,),
                                             daemon=True, name=f"agent-{self.job_id}")
            self._monitor.start()
        return {"status": "running", "pids": {k: p.pid for k, p in self._procs.items()},
                "from_standby": from_standby, "prejoined": sorted(promoted)}

    @staticmethod
    def _spawn(argv: list[str], env: dict[str, str], cwd: str | None, log: str,
               stdin: int) -> subprocess.Popen:
        logf = open(log, "ab")  # noqa: SIM115 - handed to the child
        try:
            return subprocess.Popen(  # noqa: S603 - argv list, no shell
                argv, env=env, cwd=cwd or None, stdout=logf, stderr=subprocess.STDOUT,
                stdin=stdin, start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            logf.close()

    # -- processes joined ahead of time ---------------------------------------
    def _take_prejoined(self) -> dict[str, subprocess.Popen]:
        """The held processes of self._ranks, promoted; {} to start cold (none held, or
        they were spawned for other specs: the plan, or the attempt, changed)."""
        held, self._prejoined = self._prejoined, None
        if held is None:
            return {}
        if not held.matches(self._ranks):
            held.release()
            return {}
        return held.promote({C.SPAWN_TS_ENV: repr(time.time())})

    def prejoined_for(self, ranks: list[dict]) -> bool:
        """Whether start(ranks) would promote held processes (all agents must agree)."""
        with self._lock:
            return self._prejoined is not None and self._prejoined.matches(
                [RankSpec.from_dict(r) for r in ranks])

    def _spawn_prejoined(self) -> None:
        """Start the next attempt's processes (poll(), after this attempt's first step)."""
        self._standby_spawned = True
        if not eligible(self._next_ranks) or self._prejoined is not None:
            return
        self._prejoined = PrejoinedAttempt(self._next_ranks)
        self._prejoined.spawn(self._spawn, _rank_env)

    def _release_prejoined(self) -> None:
        held, self._prejoined = self._prejoined, None
        if held is not None:
            held.release()

    # -- standbys ------------------------------------------------------------
    def _take_standby(self, r: RankSpec, env: dict[str, str]) -> subprocess.Popen | None:
        """A live standby for rank `r`, already told to become it; None to start cold.
        One spawned from the same rank comes first: /proc/PID/environ keeps showing the
        environment a process started with, so that one shows the right RANK_ID."""
        key = standby_key(r.argv, r.env, r.cwd)
        fits = [(lb != r.label, i) for i, (k, lb, p) in enumerate(self._standbys)
                if k == key and p.poll() is None]
        if not fits:
            return None
        p = self._standbys.pop(min(fits)[1])[2]
        launch = {"argv": r.argv, "env": env, "cwd": r.cwd, "log": r.log}
        try:
            assert p.stdin is not None
            p.stdin.write((json.dumps(launch) + "\n").encode())
            p.stdin.close()
        except OSError:  # it died between poll() and the write
            self._kill_standby(p)
            return None
        return p

    def _spawn_standbys(self) -> None:
        """One standby per rank of this attempt, for the next restart in place. Runs on the
        caller's thread: PDEATHSIG fires when the spawning *thread* ends, and the actor's
        request threads live as long as the actor."""
        self._standby_spawned = True
        for r in self._ranks:
            if module_of(r.argv) is None:
                continue
            log = str(Path(r.log).with_suffix(".standby.log"))
            try:
                p = self._spawn(standby_argv(r.argv), _rank_env(r), r.cwd, log,
                                stdin=subprocess.PIPE)
            except OSError:
                continue  # the next restart starts this rank cold
            self._standbys.append((standby_key(r.argv, r.env, r.cwd), r.label, p))

    @staticmethod
    def _kill_standby(p: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)

    def _release_standbys(self) -> None:
        standbys, self._standbys = self._standbys, []
        for _, _, p in standbys:
            self._kill_standby(p)

    def standbys(self) -> list[int]:
        """PIDs of the live standbys (for tests and `fleet status` debugging)."""
        with self._lock:
            held = self._prejoined.pids() if self._prejoined is not None else []
            return [p.pid for _, _, p in self._standbys if p.poll() is None] + held

    def _watch(self, generation: int) -> None:
        while True:
            with self._lock:
                if self._status != "running" or self._generation != generation:
                    return
                failed = None
                for label, p in self._procs.items():
                    if label in self._exits:
                        continue
                    rc = p.poll()
                    if rc is None:
                        continue
                    self._exits[label] = rc
                    if rc != 0 and not self._stopping and not self._checkpointed(rc):
                        failed = (label, rc)
                workers = [r.label for r in self._ranks if r.rank is not None]
                if failed:
                    label, rc = failed
                    why = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
                    self._status, self._reason = "failed", f"{label} exited with {why}"
                    self._exit_code = rc
                    self._ask_last_words()
                    self._kill_all(grace=2.0)
                    return
                codes = [self._exits.get(w) for w in workers]
                if workers and all(rc == 0 or self._checkpointed(rc) for rc in codes):
                    # a request that came at the run's last step ends it as usual (exit 0)
                    stopped = C.EXIT_CHECKPOINTED in codes
                    self._status = "checkpointed" if stopped else "succeeded"
                    self._exit_code = C.EXIT_CHECKPOINTED if stopped else 0
                    # The scheduler normally exits with the workers; do not wait on it.
                    self._kill_all(grace=5.0)
                    return
            time.sleep(0.2)

    def _checkpointed(self, rc: int | None) -> bool:
        """A rank's exit that was the answer to request_checkpoint(), not a failure."""
        return rc == C.EXIT_CHECKPOINTED and self._checkpoint_requested

    def request_checkpoint(self) -> bool:
        """Ask every running rank of this agent to stop at a checkpoint of the next step all
        ranks agree on (launcher/contract.py, CHECKPOINT REQUEST). True when each was asked;
        False when the ranks are not running or cannot be asked (their workload does not
        honour requests): then no rank was asked."""
        with self._lock:
            workers = [r for r in self._ranks if r.rank is not None]
            paths = [r.env.get(C.CHECKPOINT_REQUEST_ENV) for r in workers]
            if self._status != "running" or self._stopping or not workers or not all(paths):
                return False
            self._checkpoint_requested = True
            for path in paths:
                Path(path).touch()
            return True

    def _ask_last_words(self) -> None:
        """After a rank failed: ask one surviving worker that can (it created its ".armed"
        file; a stopped one cannot) to save the last completed step, and wait until it
        exits: 0 when it saved (workloads/volo/last_words.py)."""
        workers = sorted((r for r in self._ranks if r.rank is not None), key=lambda r: r.rank)
        for r in workers:
            p, path = self._procs.get(r.label), r.env.get(C.LAST_WORDS_ENV)
            if (p is None or p.poll() is not None or not path or _is_stopped(p.pid)
                    or not Path(path + C.LAST_WORDS_ARMED).exists()):
                continue
            Path(path).touch()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=LAST_WORDS_GRACE_S)
            if p.returncode is not None:
                self._exits[r.label] = p.returncode
            if p.returncode == C.LastWordsExit.SAID:
                self._last_words = r.label
            return

    def _kill_all(self, grace: float) -> None:
        live = {k: p for k, p in self._procs.items() if p.poll() is None}
        for p in live.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and any(p.poll() is None for p in live.values()):
            time.sleep(0.05)
        for k, p in live.items():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
            self._exits.setdefault(k, p.returncode if p.returncode is not None else -9)

    def stop(self, grace: float = 5.0, reason: str = "stopped",
             keep_standbys: bool = False, last_words: bool = False) -> dict[str, Any]:
        """Stop the ranks; the standbys too unless a restart in place follows. last_words:
        the attempt failed elsewhere (a hung rank, a lost node), so a survivor here saves
        the last completed step first."""
        with self._lock:
            self._stopping = True
            if self._status == "running":
                self._status, self._reason = "stopped", reason
                if last_words:
                    self._ask_last_words()
            self._kill_all(grace)
            if not keep_standbys:
                self._release_standbys()
                self._release_prejoined()
        return self.poll()

    # -- monitoring --------------------------------------------------------
    def poll(self) -> dict[str, Any]:
        with self._lock:
            events: list[dict] = []
            for t in self._tails.values():
                events += _thinned(t.read_records())
            # A rank that failed right after its first step still gets its standby: on a
            # busy node the poll that sees the step can come after the failure.
            if (not self._standby_spawned and not self._stopping
                    and self._status in ("running", "failed")
                    and any(e.get("event") == C.HeartbeatEvent.STEP for e in events)):
                if self._next_ranks:
                    self._spawn_prejoined()
                elif self.standby:
                    self._spawn_standbys()
            result = None
            if self._status == "succeeded":
                result = self._result()
            return {"status": self._status, "reason": self._reason,
                    "exit_code": self._exit_code, "exits": dict(self._exits), "events": events,
                    "started": self._started_at,
                    "result": result, "last_words": self._last_words}

    def _result(self) -> dict | None:
        """The last JSON object line printed by rank 0 (validate's contract)."""
        r0 = next((r for r in self._ranks if r.rank == 0), None)
        if r0 is None:
            return None
        try:
            with open(r0.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 65536))
                tail = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return None
        for line in reversed(tail):
            line = line.strip()
            if line.startswith("{") and line.endswith("}"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    return obj
        return None

    def read_log(self, label: str, offset: int = 0, limit: int = 1 << 20) -> dict[str, Any]:
        r = next((r for r in self._ranks if r.label == label), None)
        if r is None:
            return {"error": f"no process {label}", "data": "", "offset": offset}
        return read_file_chunk(r.log, offset, limit)


def read_file_chunk(path: str, offset: int, limit: int = 1 << 20) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(limit)
    except FileNotFoundError:
        return {"data": "", "offset": offset, "missing": True}
    return {"data": data.decode("utf-8", "replace"), "offset": offset + len(data)}
