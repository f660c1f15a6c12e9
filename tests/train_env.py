"""The environment a test gives a train/validate process it starts by hand."""

from __future__ import annotations

import os


def train_env(**extra: str) -> dict[str, str]:
    """This process's environment without any rank or launcher settings (MS_*, FLEET_*,
    RANK_SIZE) that would make the child join a cluster or write elsewhere; one thread."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MS_", "FLEET_")) and k != "RANK_SIZE"}
    env.update(OMP_NUM_THREADS="1", FLEET_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env
