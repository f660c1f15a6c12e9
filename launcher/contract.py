"""The rank contract: what the launcher and a workload's rank processes agree on.

Imported by both sides (`launcher/` and `workloads/`), so it imports nothing but the
standard library: a rank must be able to read it without Ray, pydantic or MindSpore.
docs/launcher.md describes the contract as a whole.

- Rank environment: the FLEET_* variables the agent sets in every rank (beside MindSpore's
  own MS_* ones).
- File protocols: files the agent and a rank use to talk while the rank runs, each named by
  a variable of the rank environment.
- Exit codes: what a rank's exit status tells the controller, and which ones a restart
  cannot fix.
- Heartbeat events: the `event` field of each JSON line a rank appends to its
  FLEET_HEARTBEAT file, and the statuses of the final `done` event.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

# ---------------------------------------------------------------------------- environment
JOB_ID_ENV = "FLEET_JOB_ID"
ATTEMPT_ENV = "FLEET_ATTEMPT"  # 1-based; a rank started outside the fleet reads 0
CHECKPOINT_DIR_ENV = "FLEET_CHECKPOINT_DIR"
GLOBAL_BATCH_ENV = "FLEET_GLOBAL_BATCH"
MICRO_BATCH_ENV = "FLEET_MICRO_BATCH"
GRAD_ACCUM_ENV = "FLEET_GRAD_ACCUM"
NUM_THREADS_ENV = "FLEET_NUM_THREADS"  # CPU threads for the rank (Ray's workers set 1)
HEARTBEAT_ENV = "FLEET_HEARTBEAT"  # the JSON-lines file the rank appends its events to
SPAWN_TS_ENV = "FLEET_SPAWN_TS"  # time.time() when the agent started the process
STANDBY_ENV = "FLEET_STANDBY"  # "1" in a rank that started from a standby process
COMPILE_CACHE_STORE_ENV = "FLEET_COMPILE_CACHE_STORE"  # the compile cache jobs share
# "1": join the cluster, then wait for the agent's go line on stdin (HOLD protocol below)
HOLD_ENV = "FLEET_HOLD"
LAST_WORDS_ENV = "FLEET_LAST_WORDS"  # LAST WORDS protocol below
CHECKPOINT_REQUEST_ENV = "FLEET_CHECKPOINT_REQUEST"  # CHECKPOINT REQUEST protocol below

# ---------------------------------------------------------------------------- file protocols
# LAST WORDS: after a peer failed, the agent creates the file FLEET_LAST_WORDS names to ask a
# surviving rank for a checkpoint of the last step every rank completed. The rank creates
# the same path + LAST_WORDS_ARMED once it can answer (an unarmed rank is never asked); it
# exits with LastWordsExit.SAID when it saved, LastWordsExit.DECLINED when it could not.
LAST_WORDS_ARMED = ".armed"
# HOLD: a process started with FLEET_HOLD=1 joins its cluster, then reads one JSON line
# {"env": {NAME: VALUE}} on stdin, applies it and trains; end of input releases it (exit 0,
# no heartbeat written).
HOLD_ON = "1"
# CHECKPOINT REQUEST: the agent creates the file FLEET_CHECKPOINT_REQUEST names (one per
# rank) to ask the job to stop at a checkpoint. A rank that honours it checks for the file at
# every step boundary; the ranks agree on one step, rank 0 saves a verified checkpoint of it
# (a checkpoint event with requested: true) and every rank exits with EXIT_CHECKPOINTED. A
# request seen at the run's last step ends the run as usual (exit 0).


class LastWordsExit(IntEnum):
    SAID = 0
    DECLINED = 1


# ---------------------------------------------------------------------------- exit codes
EXIT_OK = 0
EXIT_FAILED = 1  # anything else: retryable
EXIT_CONFIG = 2  # bad configuration or data: a restart cannot fix it
EXIT_RECIPE = 3  # the recipe differs from the checkpoint's: a restart cannot fix it
# stopped at a requested checkpoint; resume from it (75: EX_TEMPFAIL, "try again later")
EXIT_CHECKPOINTED = 75
NON_RETRYABLE_EXIT_CODES = frozenset({EXIT_CONFIG, EXIT_RECIPE})

# ---------------------------------------------------------------------------- heartbeats


class HeartbeatEvent(StrEnum):
    """The `event` field of a heartbeat line. A reader skips kinds it does not know."""

    START = "start"  # the rank is about to train: its layout, resumed_step
    STEP = "step"  # one optimizer step completed
    CHECKPOINT = "checkpoint"  # a save finished (ok true or false); requested / last_words
    VAL = "val"  # a validation's top1 / top5 / loss
    LAST_WORDS = "last_words"  # asked for last words, and the step was already saved
    DONE = "done"  # the rank's last line: status is one of DoneStatus


class DoneStatus(StrEnum):
    OK = "ok"  # the run finished
    ERROR = "error"  # the rank failed; `error` says why
    CHECKPOINTED = "checkpointed"  # stopped at a requested checkpoint (EXIT_CHECKPOINTED)
