"""A rank that joins its cluster ahead of time and waits to be told to train.

Joining MindSpore's CPU cluster costs every restart ~3 s that no setting removes: the worker
that finds a peer's collective address missing sleeps a fixed 3 s (``FetchNodeAddress``),
with the GIL held, so nothing else in the process can use the time. On a restart in place
the node agent therefore starts the *next* attempt's processes while the current attempt
trains (launcher/prejoin.py): they import, join a cluster of their own (its own scheduler
port) and stop here. When the current attempt fails, the agent promotes them and the new
attempt starts at the checkpoint load.

Protocol with the agent, for a process started with ``FLEET_HOLD=1``: after the cluster join
the rank reads one JSON line on stdin, ``{"env": {NAME: VALUE, ...}}``, applies it to its
environment and goes on. End of input (the agent let the process go unused) ends the process
with exit 0 before it writes any heartbeat or checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import MutableMapping
from typing import IO

from launcher.contract import HOLD_ENV, HOLD_ON

HOLDING = "holding until the agent starts it"  # in the log once held (benches wait for it)


class Released(Exception):
    """The agent closed the hold without promoting this process."""


def holding(environ: MutableMapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get(HOLD_ENV) == HOLD_ON


def wait_for_go(stream: IO[str] | None = None,
                environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Block until the agent promotes this process; returns (and applies) the env it sent."""
    stream = sys.stdin if stream is None else stream
    environ = os.environ if environ is None else environ
    line = stream.readline()
    if not line.strip():
        raise Released()
    try:
        msg = json.loads(line)
        env = msg["env"]
        if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise TypeError("env must map names to strings")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{HOLD_ENV}: the agent's go line is not {{\"env\": {{...}}}}: "
                         f"{line[:200]!r} ({e})") from e
    environ.pop(HOLD_ENV, None)
    environ.update(env)
    return env
