"""Rank discovery and gradient averaging over MindSpore's dynamic cluster.

The launcher's agent (or ``msrun``) starts one scheduler process (``MS_ROLE=MS_SCHED``) and
N workers (``MS_ROLE=MS_WORKER``) running the same command. ``mindspore.communication.init()``
never returns in the scheduler: it serves the cluster and exits when the workers are done, so
everything after :func:`init_ranks` runs on workers only. Configuration is checked before
this call, so a bad recipe fails fast in every process rather than leaving a scheduler waiting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from workloads.volo.config import ConfigError

__all__ = ["MeanAllReduce", "RankInfo", "init_ranks", "wants_cluster"]

_REQUIRED = ("MS_SCHED_HOST", "MS_SCHED_PORT", "MS_WORKER_NUM")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    distributed: bool


def wants_cluster(distribute_flag: bool, environ: Mapping[str, str]) -> bool:
    """Join a cluster when msrun/the agent set MS_ROLE. ``--distribute True`` alone (MindCV
    recipes set it) runs single-process, since there is no cluster to join."""
    role = environ.get("MS_ROLE")
    if role is None:
        return False
    if role not in ("MS_SCHED", "MS_WORKER"):
        raise ConfigError(f"MS_ROLE={role!r} is not MS_SCHED or MS_WORKER")
    missing = [v for v in _REQUIRED if not environ.get(v)]
    if missing:
        raise ConfigError(f"MS_ROLE is set but {', '.join(missing)} is not; start ranks with "
                          "msrun or the fleet agent, or unset MS_ROLE for a single process")
    return True


def init_ranks(environ: Mapping[str, str] | None = None) -> RankInfo:
    environ = os.environ if environ is None else environ
    if not wants_cluster(False, environ):
        return RankInfo(0, 1, False)
    from mindspore.communication import get_group_size, get_rank, init

    init()  # the scheduler process does not come back from here
    return RankInfo(get_rank(), get_group_size(), True)


class MeanAllReduce:
    """Averages a list of tensors across ranks with a single all-reduce of one flat buffer
    (one collective per optimizer step instead of one per parameter)."""

    def __init__(self, world_size: int):
        from mindspore import ops

        self.world_size = world_size
        self._ops = ops
        self._allreduce = ops.AllReduce(ops.ReduceOp.SUM) if world_size > 1 else None

    def __call__(self, tensors: list) -> list:
        if self._allreduce is None:
            return tensors
        ops = self._ops
        shapes = [t.shape for t in tensors]
        sizes = [int(t.size) for t in tensors]
        flat = self._allreduce(ops.cat([t.reshape(-1) for t in tensors])) / self.world_size
        return [p.reshape(s) for p, s in zip(ops.split(flat, sizes), shapes, strict=True)]
