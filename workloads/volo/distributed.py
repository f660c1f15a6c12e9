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

__all__ = ["CollectiveCorrupted", "MeanAllReduce", "RankInfo", "init_ranks", "ring_chunk_ends",
           "wants_cluster"]

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


class CollectiveCorrupted(RuntimeError):
    """An all-reduce returned a buffer whose check values are wrong: its result is not the
    sum over all ranks, and no update may use it."""


def ring_chunk_ends(n: int, world_size: int) -> list[int]:
    """Exclusive end of each of the ``world_size`` chunks a ring all-reduce splits ``n``
    elements into (MindSpore's CPU collective: equal chunks, the remainder one element each
    to the first ones)."""
    base, extra = divmod(n, world_size)
    ends, at = [], 0
    for k in range(world_size):
        at += base + (1 if k < extra else 0)
        ends.append(at)
    return ends


class MeanAllReduce:
    """Averages a list of tensors across ranks with a single all-reduce of one flat buffer
    (one collective per optimizer step instead of one per parameter).

    ``verify``: put a 1.0 at the end of every ring chunk and require the sum to be exactly
    ``world_size`` there, raising :class:`CollectiveCorrupted` otherwise. MindSpore's CPU ring
    all-reduce moves the buffer chunk by chunk and, once in a CI run, returned a step whose
    loss was half the reference's, as if one peer's contribution to the last chunk were
    missing; the check turns such a step into a rank failure (the job restarts from the
    survivors' last words) instead of a silently wrong update. Sums of ones are exact in
    float32, so the check has no tolerance."""

    def __init__(self, world_size: int, verify: bool = False):
        from mindspore import ops

        self.world_size = world_size
        self.verify = verify and world_size > 1
        self._ops = ops
        self._allreduce = ops.AllReduce(ops.ReduceOp.SUM) if world_size > 1 else None
        self._layouts: dict[tuple[int, ...], _Layout] = {}

    def __call__(self, tensors: list) -> list:
        if self._allreduce is None:
            return tensors
        ops = self._ops
        sizes = tuple(int(t.size) for t in tensors)
        lay = self._layouts.get(sizes) if self.verify else None
        if self.verify and lay is None:
            lay = self._layouts[sizes] = _Layout.of(sizes, self.world_size)
        flats = [t.reshape(-1) for t in tensors]
        if lay is None:
            out = self._allreduce(ops.cat(flats)) / self.world_size
            return [p.reshape(t.shape) for p, t in zip(ops.split(out, list(sizes)), tensors,
                                                        strict=True)]
        one = ops.ones((1,), tensors[0].dtype)
        parts = [one if i is None else (flats[i] if ln == sizes[i] else
                                        ops.narrow(flats[i], 0, at, ln))
                 for i, at, ln in lay.segments]
        summed = self._allreduce(ops.cat(parts))
        self._check(summed, lay, sum(sizes))
        out = ops.split(summed / self.world_size, [ln for _, _, ln in lay.segments])
        pieces: list[list] = [[] for _ in tensors]
        for (i, _, _), piece in zip(lay.segments, out, strict=True):
            if i is not None:
                pieces[i].append(piece)
        return [(ps[0] if len(ps) == 1 else ops.cat(ps)).reshape(t.shape)
                for ps, t in zip(pieces, tensors, strict=True)]

    def _check(self, summed, lay: _Layout, m: int) -> None:
        import numpy as np

        checks = self._ops.gather(summed, lay.check_at, 0).asnumpy()
        if not np.all(checks == self.world_size):
            w = self.world_size
            raise CollectiveCorrupted(
                f"all-reduce of {m} values over {w} ranks came back corrupted: the check "
                f"values at the ends of its {w} chunks are {checks.tolist()}, not all {w}; "
                "this step's gradients are not applied")


@dataclass(frozen=True)
class _Layout:
    """Where the check values go in one flat buffer: ``segments`` in buffer order, each
    (tensor index, offset, length) of a tensor's data or (None, 0, 1) for a check value;
    ``check_at`` the buffer positions of the check values. A tensor is cut only where a
    chunk ends inside it, so most go into the buffer whole."""

    segments: tuple[tuple[int | None, int, int], ...]
    check_at: object

    @staticmethod
    def of(sizes: tuple[int, ...], world_size: int) -> _Layout:
        import numpy as np
        from mindspore import Tensor

        ends = ring_chunk_ends(sum(sizes) + world_size, world_size)
        # check value k goes at buffer position ends[k] - 1: after ends[k] - 1 - k data values
        cuts = [e - 1 - k for k, e in enumerate(ends)]
        segments: list[tuple[int | None, int, int]] = []
        pos, k = 0, 0  # data values placed so far; next check value
        for i, size in enumerate(sizes):
            at = 0
            while True:
                while k < len(cuts) and cuts[k] == pos:
                    segments.append((None, 0, 1))
                    k += 1
                if at == size:
                    break
                take = size - at if k == len(cuts) else min(size - at, cuts[k] - pos)
                segments.append((i, at, take))
                at, pos = at + take, pos + take
        segments.extend((None, 0, 1) for _ in range(len(cuts) - k))
        return _Layout(tuple(segments), Tensor(np.array(ends, np.int64) - 1))
