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
from typing import Any

from workloads.volo.config import ConfigError

__all__ = ["TAIL", "CollectiveCorrupted", "MeanAllReduce", "RankInfo", "init_ranks",
           "ring_chunk_ends", "wants_cluster"]

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


TAIL = 3  # values that end each ring chunk in a verified buffer: data sum, magnitude sum, 1.0
# Relative tolerance of a chunk's data sum, per rank, in units of its magnitude sum: numpy's
# float32 pairwise sums (here and on every rank) and the ring's float32 additions stay below
# 2**-18 of it; a missing loss of ~2.3 in volo_tiny's 2-rank chunks (magnitude ~5,600) is ~300x it.
SUM_RTOL = 2.0 ** -15


class MeanAllReduce:
    """Averages a list of tensors across ranks with a single all-reduce of one flat buffer
    (one collective per optimizer step instead of one per parameter).

    ``verify`` (CPU ranks): every one of the ``world_size`` chunks MindSpore's CPU ring
    all-reduce moves ends in three values this rank writes, the float32 sum of its data in that
    chunk, the sum of their magnitudes, and 1.0. After the all-reduce, every chunk's 1.0s must
    sum to exactly ``world_size`` (each rank's message for it arrived) and its data must sum to
    the ranks' sums within float32 rounding (no value lost, doubled, or taken before it was
    complete); otherwise :class:`CollectiveCorrupted` turns the step into a rank failure (the
    job restarts from the survivors' last words) instead of a silently wrong update. The first
    version checked the chunk ends only; the two halved losses seen in CI that prompted it came
    from a wrong micro-step on one rank, not from here (docs/known-issues.md). Writing the sums
    reads the buffer on the host first, which also waits for everything that fills it
    before the collective is launched. Cost: ~2 ms per step for volo_tiny's 1.3 M values."""

    def __init__(self, world_size: int, verify: bool = False):
        from mindspore import ops

        self.world_size = world_size
        self.verify = verify and world_size > 1
        self._ops = ops
        self._allreduce = ops.AllReduce(ops.ReduceOp.SUM) if world_size > 1 else None
        self._layouts: dict[tuple[int, ...], _Layout] = {}
        self._tails: dict[object, object] = {}  # dtype -> the [0, 0, 1] tensor of a chunk tail

    def __call__(self, tensors: list) -> list:
        if self._allreduce is None:
            return tensors
        ops = self._ops
        sizes = tuple(int(t.size) for t in tensors)
        if not self.verify:
            out = self._allreduce(ops.cat([t.reshape(-1) for t in tensors])) / self.world_size
            return [p.reshape(t.shape) for p, t in zip(ops.split(out, list(sizes)), tensors,
                                                        strict=True)]
        buf, lay = self.sealed_buffer(tensors)
        summed = self._allreduce(buf)
        self._check(summed.asnumpy(), lay, sum(sizes))
        out = ops.split(summed / self.world_size, [ln for _, _, ln in lay.segments])
        pieces: list[list] = [[] for _ in tensors]
        for (i, _, _), piece in zip(lay.segments, out, strict=True):
            if i is not None:
                pieces[i].append(piece)
        return [(ps[0] if len(ps) == 1 else ops.cat(ps)).reshape(t.shape)
                for ps, t in zip(pieces, tensors, strict=True)]

    def sealed_buffer(self, tensors: list) -> tuple[Any, _Layout]:
        """This rank's verified all-reduce input: ``tensors`` laid out around the chunk tails,
        each tail holding the sums of its chunk's data."""
        import numpy as np
        from mindspore import Tensor

        ops = self._ops
        sizes = tuple(int(t.size) for t in tensors)
        lay = self._layouts.get(sizes)
        if lay is None:
            lay = self._layouts[sizes] = _Layout.of(sizes, self.world_size)
        dtype = tensors[0].dtype
        tail = self._tails.get(dtype)
        if tail is None:
            tail = self._tails[dtype] = Tensor(np.array([0, 0, 1], np.float32)).astype(dtype)
        flats = [t.reshape(-1) for t in tensors]
        buf = ops.cat([tail if i is None else (flats[i] if ln == sizes[i] else
                                               ops.narrow(flats[i], 0, at, ln))
                       for i, at, ln in lay.segments])
        host = buf.asnumpy()  # waits for the cat, so the collective sends a complete buffer
        view = host.ctypes.data == buf.data_ptr()
        if not view:  # a copy: fill it and send that instead
            host = host.copy()
        host[lay.sum_at], host[lay.abs_at] = lay.chunk_sums(host)
        return (buf if view else Tensor(host)), lay

    def _check(self, summed, lay: _Layout, m: int) -> None:
        import numpy as np

        w = self.world_size
        ones = summed[lay.one_at]
        if not np.all(ones == w):
            raise CollectiveCorrupted(
                f"all-reduce of {m} values over {w} ranks came back corrupted: the check "
                f"values at the ends of its {w} chunks are {ones.tolist()}, not all {w}; "
                "this step's gradients are not applied")
        got, _ = lay.chunk_sums(summed, magnitudes=False)
        for k, (g, s, a) in enumerate(zip(got, summed[lay.sum_at], summed[lay.abs_at],
                                          strict=True)):
            if not np.isfinite(s):
                continue  # a rank sent inf/nan: the loss check of the train loop reports it
            tol = w * SUM_RTOL * float(a)
            if not abs(float(g) - float(s)) <= tol:
                raise CollectiveCorrupted(
                    f"all-reduce of {m} values over {w} ranks came back corrupted: chunk "
                    f"{k + 1} of {w} sums to {float(g):.7g}, but the ranks sent data summing "
                    f"to {float(s):.7g} (tolerance {tol:.2g}); this step's gradients are not "
                    "applied")


@dataclass(frozen=True)
class _Layout:
    """Where the chunk tails go in one flat buffer: ``segments`` in buffer order, each
    (tensor index, offset, length) of a tensor's data or (None, 0, TAIL) for a tail;
    ``ends`` each chunk's exclusive end. A tensor is cut only where a tail falls inside it,
    so most go into the buffer whole."""

    segments: tuple[tuple[int | None, int, int], ...]
    ends: tuple[int, ...]

    @property
    def sum_at(self) -> Any:
        import numpy as np

        return np.array(self.ends) - TAIL

    @property
    def abs_at(self) -> Any:
        return self.sum_at + 1

    @property
    def one_at(self) -> Any:
        return self.sum_at + 2

    def chunk_sums(self, buf: Any, magnitudes: bool = True) -> tuple[list[float], list[float]]:
        """Each chunk's data sum and (``magnitudes``) sum of magnitudes, as numpy sums them
        (float32, pairwise)."""
        import numpy as np

        sums, mags = [], []
        start = 0
        # inf/nan data make nan sums, which the caller allows: not worth a warning each step
        with np.errstate(invalid="ignore", over="ignore"):
            for end in self.ends:
                data = buf[start:end - TAIL]
                sums.append(float(data.sum()))
                if magnitudes:
                    mags.append(float(np.abs(data).sum()))
                start = end
        return sums, mags

    @staticmethod
    def of(sizes: tuple[int, ...], world_size: int) -> _Layout:
        ends = ring_chunk_ends(sum(sizes) + TAIL * world_size, world_size)
        # chunk k's tail starts at buffer position ends[k] - TAIL, after this many data values
        cuts = [e - TAIL * (k + 1) for k, e in enumerate(ends)]
        segments: list[tuple[int | None, int, int]] = []
        pos, k = 0, 0  # data values placed so far; next tail
        for i, size in enumerate(sizes):
            at = 0
            while True:
                while k < len(cuts) and cuts[k] == pos:
                    segments.append((None, 0, TAIL))
                    k += 1
                if at == size:
                    break
                take = size - at if k == len(cuts) else min(size - at, cuts[k] - pos)
                segments.append((i, at, take))
                at, pos = at + take, pos + take
        segments.extend((None, 0, TAIL) for _ in range(len(cuts) - k))
        return _Layout(tuple(segments), tuple(ends))
