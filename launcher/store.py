"""Durable job store: SQLite (WAL) with jobs, attempts and events tables.

The controller is the only writer; a restarted controller rebuilds everything
it needs (queue, running attempts, device ledger) from these rows, which is why
every state change is committed before the action it describes is taken.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.lifecycle import TERMINAL, JobState, transition

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT UNIQUE NOT NULL,
    name       TEXT NOT NULL,
    kind       TEXT NOT NULL,
    parent     TEXT,             -- workflow id for a workflow step
    step       TEXT,             -- step name inside the workflow
    state      TEXT NOT NULL,
    priority   INTEGER NOT NULL DEFAULT 0,
    spec       TEXT NOT NULL,    -- validated spec document (JSON)
    paths      TEXT NOT NULL,    -- resolved paths (JSON)
    restarts   INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,   -- restart backoff: do not schedule before
    progress   TEXT NOT NULL DEFAULT '{}',
    result     TEXT,
    message    TEXT NOT NULL DEFAULT '',
    created    REAL NOT NULL,
    updated    REAL NOT NULL,
    started    REAL,
    finished   REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS attempts (
    job        TEXT NOT NULL,
    n          INTEGER NOT NULL,
    plan       TEXT NOT NULL,      -- planner.Plan as JSON
    pg_name    TEXT NOT NULL,
    started    REAL NOT NULL,
    ended      REAL,
    status     TEXT NOT NULL DEFAULT 'running',
    reason     TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job, n)
);
CREATE TABLE IF NOT EXISTS events (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    job   TEXT NOT NULL,
    ts    REAL NOT NULL,
    kind  TEXT NOT NULL,
    data  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job);
CREATE INDEX IF NOT EXISTS jobs_parent ON jobs(parent);
CREATE TABLE IF NOT EXISTS holds (  -- a failed attempt's placement kept for a restart in place
    job        TEXT PRIMARY KEY,
    attempt    INTEGER NOT NULL,   -- the attempt that failed
    pg_name    TEXT NOT NULL,
    plan       TEXT NOT NULL,
    next_port  INTEGER,            -- the scheduler port its prejoined processes use
    since      REAL NOT NULL
);
"""

# Events kept per job (the newest): a job in a long crash loop, or the controller's own
# "controller" stream, would otherwise grow the table without bound.
MAX_EVENTS_PER_JOB = 1000
# `fleet status` shows this many of a job's newest events.
STATUS_EVENTS = 50
# Exit code of the CLI when the job store cannot be read (also in `fleet --help`).
EXIT_STORE_CORRUPT = 5


class StoreCorrupt(Exception):
    """The SQLite file is not a readable job store. It is left as it is, for inspection."""

    def __init__(self, path: Path, error: Exception):
        self.path = path
        super().__init__(
            f"the job store {path} is corrupt or not a fleet database ({error}). It was not "
            f"changed; keep it for inspection and move it away (with its -wal and -shm "
            f"files) to start with an empty store")

    def __reduce__(self):  # picklable across Ray
        return (_store_corrupt, (str(self.path), str(self.args[0])))


def _store_corrupt(path: str, message: str) -> StoreCorrupt:
    e = StoreCorrupt.__new__(StoreCorrupt)
    Exception.__init__(e, message)
    e.path = Path(path)
    return e


@dataclass(frozen=True)
class QueueRow:
    """What the scheduler needs of a waiting job, without parsing its whole row."""

    id: str
    kind: str
    parent: str | None
    step: str | None
    priority: int
    seq: int
    not_before: float
    needs: tuple[str, ...]


@dataclass
class JobRow:
    id: str
    name: str
    kind: str
    state: JobState
    priority: int
    spec: dict
    paths: dict
    seq: int = 0
    parent: str | None = None
    step: str | None = None
    restarts: int = 0
    not_before: float = 0.0
    progress: dict = field(default_factory=dict)
    result: dict | None = None
    message: str = ""
    created: float = 0.0
    updated: float = 0.0
    started: float | None = None
    finished: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["state"] = str(self.state)
        return d


@dataclass
class AttemptRow:
    job: str
    n: int
    plan: dict
    pg_name: str
    started: float
    ended: float | None = None
    status: str = "running"
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class HoldRow:
    job: str
    attempt: int
    pg_name: str
    plan: dict
    next_port: int | None
    since: float


def _job(r: sqlite3.Row) -> JobRow:
    return JobRow(id=r["id"], name=r["name"], kind=r["kind"], state=JobState(r["state"]),
                  priority=r["priority"], spec=json.loads(r["spec"]),
                  paths=json.loads(r["paths"]), seq=r["seq"], parent=r["parent"],
                  step=r["step"], restarts=r["restarts"], not_before=r["not_before"],
                  progress=json.loads(r["progress"]),
                  result=json.loads(r["result"]) if r["result"] else None,
                  message=r["message"], created=r["created"], updated=r["updated"],
                  started=r["started"], finished=r["finished"])


def _attempt(r: sqlite3.Row) -> AttemptRow:
    return AttemptRow(job=r["job"], n=r["n"], plan=json.loads(r["plan"]),
                      pg_name=r["pg_name"], started=r["started"], ended=r["ended"],
                      status=r["status"], reason=r["reason"])


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: the controller's threads share it.
        self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                   isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        try:
            with self._lock:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(SCHEMA)
                # a damaged page inside an otherwise valid header shows up here, not above
                r = self._db.execute("PRAGMA quick_check(1)").fetchone()
                if r is None or r[0] != "ok":
                    raise sqlite3.DatabaseError(f"quick_check: {r[0] if r else 'no answer'}")
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise StoreCorrupt(self.path, e) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- jobs --------------------------------------------------------------
    def add_job(self, name: str, kind: str, spec: dict, paths: dict, priority: int,
                parent: str | None = None, step: str | None = None) -> JobRow:
        now = time.time()
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO jobs (id, name, kind, parent, step, state, priority, spec, paths,"
                " created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (f"tmp-{now}-{threading.get_ident()}", name, kind, parent, step,
                 str(JobState.PENDING), priority, json.dumps(spec), json.dumps(paths), now, now))
            seq = cur.lastrowid
            # The id is name + sequence number: unique, readable, and stable.
            job_id = f"{name}-{seq}"
            db.execute("UPDATE jobs SET id=? WHERE seq=?", (job_id, seq))
            self._event(db, job_id, "state", {"state": "PENDING"})
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> JobRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(r) if r else None

    def state(self, job_id: str) -> JobState | None:
        """A job's state alone (the controller checks it between the steps of a start)."""
        with self._lock:
            r = self._db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
        return JobState(r["state"]) if r else None

    def states(self, states: set[JobState]) -> dict[str, JobState]:
        """id -> state of the jobs in `states`, in one query (the loop's observation)."""
        q = f"SELECT id, state FROM jobs WHERE state IN ({','.join('?' * len(states))})"  # noqa: S608
        with self._lock:
            return {r["id"]: JobState(r["state"]) for r in
                    self._db.execute(q, [str(x) for x in states]).fetchall()}

    def jobs(self, states: set[JobState] | None = None, parent: str | None = None,
             top_level: bool = False, kind: str | None = None) -> list[JobRow]:
        q, args = "SELECT * FROM jobs", []
        where = []
        if kind is not None:
            where.append("kind=?")
            args.append(kind)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += [str(s) for s in states]
        if parent is not None:
            where.append("parent=?")
            args.append(parent)
        if top_level:
            where.append("parent IS NULL")
        if where:
            q += " WHERE " + " AND ".join(where)
        q += " ORDER BY seq"
        with self._lock:
            return [_job(r) for r in self._db.execute(q, args).fetchall()]

    def queue_rows(self, states: set[JobState]) -> list[QueueRow]:
        """Jobs (not workflows) in `states`, in submit order, from the indexed columns and
        one JSON field: 10k waiting jobs in milliseconds, where full rows took 0.45 s."""
        q = (f"SELECT id, kind, parent, step, priority, seq, not_before, "  # noqa: S608
             f"json_extract(paths, '$.needs') AS needs FROM jobs WHERE state IN "
             f"({','.join('?' * len(states))}) AND kind != 'Workflow' ORDER BY seq")
        with self._lock:
            rows = self._db.execute(q, [str(x) for x in states]).fetchall()
        return [QueueRow(r["id"], r["kind"], r["parent"], r["step"], r["priority"], r["seq"],
                         r["not_before"], tuple(json.loads(r["needs"]) if r["needs"] else ()))
                for r in rows]

    def checkpoint_dirs(self, states: set[JobState]) -> list[tuple[str, str | None]]:
        """(job id, its checkpoint.dir or None for the default) of TrainJobs in `states`."""
        q = (f"SELECT id, json_extract(paths, '$.ckpt_dir') AS d FROM jobs WHERE "  # noqa: S608
             f"kind = 'TrainJob' AND state IN ({','.join('?' * len(states))}) ORDER BY seq")
        with self._lock:
            return [(r["id"], r["d"]) for r in
                    self._db.execute(q, [str(x) for x in states]).fetchall()]

    def count(self, states: set[JobState]) -> int:
        q = f"SELECT COUNT(*) FROM jobs WHERE state IN ({','.join('?' * len(states))})"  # noqa: S608
        with self._lock:
            return self._db.execute(q, [str(x) for x in states]).fetchone()[0]

    def active_jobs(self) -> list[JobRow]:
        return self.jobs({s for s in JobState if s not in TERMINAL})

    def set_state(self, job_id: str, dst: JobState, message: str | None = None, *,
                  events: tuple[tuple[str, dict], ...] = (), **fields: Any) -> JobRow:
        """Checked transition; extra fields (restarts, not_before, result...) and events in
        the same tx."""
        with self.tx() as db:
            self._set_state(db, job_id, dst, message, fields)
            for kind, data in events:
                self._event(db, job_id, kind, data)
        return self.get_job(job_id)

    def begin_attempt(self, job_id: str, plan: dict, pg_name: str, dst: JobState,
                      message: str, events: tuple[tuple[str, dict], ...] = ()) -> AttemptRow:
        """A new attempt, the job's move to `dst` and `events`, in one tx ("{n}" in the
        message, the placement name and the events' string values: the attempt's number)."""
        with self.tx() as db:
            att = self._add_attempt(db, job_id, plan, pg_name)
            self._set_state(db, job_id, dst, message.format(n=att.n), {})
            for kind, data in events:
                self._event(db, job_id, kind, {k: v.format(n=att.n) if isinstance(v, str)
                                               else v for k, v in data.items()})
        return att

    def _set_state(self, db: sqlite3.Connection, job_id: str, dst: JobState,
                   message: str | None, fields: dict[str, Any]) -> None:
        now = time.time()
        r = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
        if r is None:
            raise KeyError(job_id)
        src = JobState(r["state"])
        if src != dst:
            transition(src, dst)
        sets = {"state": str(dst), "updated": now}
        if message is not None:
            sets["message"] = message
        if dst == JobState.RUNNING and "started" not in fields:
            db.execute("UPDATE jobs SET started=COALESCE(started, ?) WHERE id=?",
                       (now, job_id))
        if dst in TERMINAL:
            sets["finished"] = now
        for k, v in fields.items():
            sets[k] = json.dumps(v) if k in ("progress", "result") else v
        cols = ", ".join(f"{k}=?" for k in sets)
        db.execute(f"UPDATE jobs SET {cols} WHERE id=?",  # noqa: S608 - fixed column names
                   (*sets.values(), job_id))
        if src != dst:
            self._event(db, job_id, "state", {"from": str(src), "state": str(dst),
                                              "message": message or ""})

    def update_job(self, job_id: str, **fields: Any) -> None:
        allowed = {"progress", "result", "message", "restarts", "not_before", "paths"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"cannot update {bad}")
        sets = {k: (json.dumps(v) if k in ("progress", "result", "paths") else v)
                for k, v in fields.items()}
        sets["updated"] = time.time()
        cols = ", ".join(f"{k}=?" for k in sets)
        with self.tx() as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE id=?",  # noqa: S608 - fixed column names
                       (*sets.values(), job_id))

    def update_progress(self, progress: dict[str, dict]) -> None:
        """Several jobs' progress summaries in one tx (the loop folds them every tick)."""
        if not progress:
            return
        now = time.time()
        with self.tx() as db:
            db.executemany("UPDATE jobs SET progress=?, updated=? WHERE id=?",
                           [(json.dumps(p), now, j) for j, p in progress.items()])

    # -- attempts ----------------------------------------------------------
    def add_attempt(self, job_id: str, plan: dict, pg_name: str) -> AttemptRow:
        with self.tx() as db:
            return self._add_attempt(db, job_id, plan, pg_name)

    def _add_attempt(self, db: sqlite3.Connection, job_id: str, plan: dict,
                     pg_name: str) -> AttemptRow:
        now = time.time()
        r = db.execute("SELECT COALESCE(MAX(n), 0) AS n FROM attempts WHERE job=?",
                       (job_id,)).fetchone()
        n = r["n"] + 1
        pg_name = pg_name.format(n=n)
        db.execute("INSERT INTO attempts (job, n, plan, pg_name, started) VALUES (?,?,?,?,?)",
                   (job_id, n, json.dumps(plan), pg_name, now))
        self._event(db, job_id, "attempt", {"n": n, "plan": plan})
        return AttemptRow(job_id, n, plan, pg_name, now)

    def end_attempt(self, job_id: str, n: int, status: str, reason: str = "") -> None:
        with self.tx() as db:
            db.execute("UPDATE attempts SET ended=?, status=?, reason=? WHERE job=? AND n=? "
                       "AND ended IS NULL", (time.time(), status, reason, job_id, n))
            self._event(db, job_id, "attempt_end", {"n": n, "status": status, "reason": reason})

    def attempts(self, job_id: str) -> list[AttemptRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM attempts WHERE job=? ORDER BY n",
                                    (job_id,)).fetchall()
        return [_attempt(r) for r in rows]

    def open_attempt(self, job_id: str) -> AttemptRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM attempts WHERE job=? AND ended IS NULL "
                                 "ORDER BY n DESC LIMIT 1", (job_id,)).fetchone()
        return _attempt(r) if r else None

    def open_plans(self, states: set[JobState]) -> list[dict]:
        """The plans of the open attempts of jobs in `states`, in one query (the device
        ledger reads them every tick)."""
        q = ("SELECT a.plan FROM attempts a JOIN jobs j ON a.job = j.id WHERE "  # noqa: S608
             f"a.ended IS NULL AND j.state IN ({','.join('?' * len(states))})")
        with self._lock:
            return [json.loads(r["plan"]) for r in
                    self._db.execute(q, [str(x) for x in states]).fetchall()]

    # -- holds -------------------------------------------------------------
    def put_hold(self, job_id: str, attempt: int, pg_name: str, plan: dict,
                 next_port: int | None) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO holds (job, attempt, pg_name, plan, next_port, "
                       "since) VALUES (?,?,?,?,?,?)",
                       (job_id, attempt, pg_name, json.dumps(plan), next_port, time.time()))
            self._event(db, job_id, "hold", {"attempt": attempt, "placement": pg_name})

    def drop_hold(self, job_id: str, why: str) -> bool:
        """Forget a job's held placement (restarted on it, or released); False if none."""
        with self.tx() as db:
            gone = db.execute("DELETE FROM holds WHERE job=?", (job_id,)).rowcount
            if gone:
                self._event(db, job_id, "hold_end", {"why": why})
        return bool(gone)

    def holds(self) -> list[HoldRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM holds ORDER BY since").fetchall()
        return [HoldRow(r["job"], r["attempt"], r["pg_name"], json.loads(r["plan"]),
                        r["next_port"], r["since"]) for r in rows]

    # -- events ------------------------------------------------------------
    @staticmethod
    def _event(db: sqlite3.Connection, job_id: str, kind: str, data: dict) -> None:
        db.execute("INSERT INTO events (job, ts, kind, data) VALUES (?,?,?,?)",
                   (job_id, time.time(), kind, json.dumps(data)))
        # keeps each job at its newest MAX_EVENTS_PER_JOB (an index walk of that many rows;
        # with fewer events the subquery is NULL and nothing is deleted)
        db.execute("DELETE FROM events WHERE job=? AND id < (SELECT id FROM events WHERE job=? "
                   "ORDER BY id DESC LIMIT 1 OFFSET ?)", (job_id, job_id, MAX_EVENTS_PER_JOB - 1))

    def add_event(self, job_id: str, kind: str, data: dict) -> None:
        with self.tx() as db:
            self._event(db, job_id, kind, data)

    def events(self, job_id: str, limit: int | None = None) -> list[dict]:
        """A job's events, oldest first; with `limit`, only the newest `limit`."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM (SELECT * FROM events WHERE job=? ORDER BY id DESC LIMIT ?) "
                "ORDER BY id", (job_id, -1 if limit is None else limit)).fetchall()
        return [{"ts": r["ts"], "kind": r["kind"], **json.loads(r["data"])} for r in rows]
