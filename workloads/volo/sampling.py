"""Which samples each rank reads at each micro-step, with the global batch as the invariant.

The sample order of epoch ``e`` is a permutation of ``range(num_samples)`` that depends only on
``(seed, epoch)``. Optimizer step ``s`` (0-based, counted over the whole run) consumes samples
``[s*G, (s+1)*G)`` of the stream formed by concatenating the epochs' orders, each epoch cut to
whole global batches (the remainder is dropped, as MindCV's ``drop_remainder``).

Those ``G`` samples are cut into ``d*a`` chunks of ``m`` samples (``d`` ranks, ``a``
accumulation micro-steps, micro-batch ``m``). Micro-step ``k`` on rank ``r`` gets chunk
``k*d + r``. So 2 ranks x accumulation 1 and 1 rank x accumulation 2 see the same chunks
(ranks 0,1 vs micro-steps 0,1), which is what makes a resized run reproduce the original's
per-step loss. Pure numpy: no MindSpore import, cheap to test.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

__all__ = ["MAX_DATASET_SIZE", "BatchLayout", "DeliveredIndices", "LayoutError",
           "GlobalBatchSampler", "resolve_layout"]

# Delivered sample indices travel in the step's float32 all-reduce as base-4096 digits of
# index + 1 scaled into [0, 1): each digit survives the all-reduce's mean (a division by the
# world size and the multiplication back) exactly, so the decoded indices are exact.
_DIGIT_BITS = 12
_DIGITS = 2
MAX_DATASET_SIZE = 2 ** (_DIGIT_BITS * _DIGITS) - 1


class LayoutError(ValueError):
    """The device count, micro-batch and accumulation do not multiply to the global batch."""


@dataclass(frozen=True)
class BatchLayout:
    global_batch: int  # G: samples per optimizer step, fixed for the whole job
    world_size: int  # d
    micro_batch: int  # m: samples per rank per micro-step
    grad_accum: int  # a: micro-steps per optimizer step

    def __post_init__(self) -> None:
        for name in ("global_batch", "world_size", "micro_batch", "grad_accum"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise LayoutError(f"{name} must be a positive integer, got {v!r}")
        if self.world_size * self.micro_batch * self.grad_accum != self.global_batch:
            raise LayoutError(
                f"devices x micro_batch x grad_accum = {self.world_size} x {self.micro_batch} x "
                f"{self.grad_accum} = {self.world_size * self.micro_batch * self.grad_accum}, "
                f"but the global batch is {self.global_batch}; choose values whose product is "
                "the global batch (FLEET_GLOBAL_BATCH / --global_batch, FLEET_MICRO_BATCH / "
                "--batch_size, FLEET_GRAD_ACCUM / --gradient_accumulation_steps)"
            )


def resolve_layout(world_size: int, micro_batch: int, grad_accum: int | None,
                   global_batch: int | None) -> BatchLayout:
    """Fill in what was not given: G from d*m*a, or a from G/(d*m); then check d*m*a == G."""
    if global_batch is None:
        return BatchLayout(world_size * micro_batch * (grad_accum or 1), world_size,
                           micro_batch, grad_accum or 1)
    if grad_accum is None:
        per_micro = world_size * micro_batch
        if per_micro <= 0 or global_batch % per_micro:
            raise LayoutError(
                f"global batch {global_batch} is not a multiple of devices x micro_batch = "
                f"{world_size} x {micro_batch}; set --gradient_accumulation_steps or change "
                "--batch_size so that devices x micro_batch x accumulation = global batch"
            )
        grad_accum = global_batch // per_micro
    return BatchLayout(global_batch, world_size, micro_batch, grad_accum)


class GlobalBatchSampler:
    """Maps (optimizer step, rank, micro-step) to dataset indices."""

    def __init__(self, num_samples: int, layout: BatchLayout, seed: int, shuffle: bool = True,
                 per_epoch: int | None = None):
        """``per_epoch``: use only this many samples per epoch (MindCV's ``num_samples``): the
        first ``per_epoch`` of each epoch's permutation, so each epoch sees a new subset."""
        per_epoch = num_samples if per_epoch is None else min(per_epoch, num_samples)
        if per_epoch < layout.global_batch:
            raise LayoutError(
                f"the dataset has {per_epoch} samples per epoch, fewer than one global batch "
                f"({layout.global_batch}); use a smaller global batch or more data"
            )
        self.num_samples = num_samples
        self.layout = layout
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = per_epoch // layout.global_batch
        self._cache: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation for ``epoch``; a function of (seed, epoch) only."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        self._cache = (epoch, order)
        return order

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def step_indices(self, step: int) -> np.ndarray:
        """All G indices of optimizer step ``step`` (0-based), in chunk order."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        g = self.layout.global_batch
        return self.epoch_order(epoch)[within * g:(within + 1) * g]

    def micro_indices(self, step: int, rank: int, micro: int) -> np.ndarray:
        lay = self.layout
        if not 0 <= rank < lay.world_size or not 0 <= micro < lay.grad_accum:
            raise ValueError(f"rank {rank} / micro-step {micro} outside {lay}")
        chunk = micro * lay.world_size + rank
        return self.step_indices(step)[chunk * lay.micro_batch:(chunk + 1) * lay.micro_batch]

    def rank_stream(self, start_step: int, end_step: int, rank: int) -> np.ndarray:
        """Indices rank ``rank`` reads for steps ``[start_step, end_step)``, in reading order:
        consecutive runs of ``micro_batch`` are its micro-batches."""
        parts = [self.micro_indices(s, rank, k)
                 for s in range(start_step, end_step) for k in range(self.layout.grad_accum)]
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(parts)

    @staticmethod
    def sample_hash(indices: np.ndarray) -> str:
        """sha256 hex of the sorted indices (heartbeat ``sample_hash``)."""
        return hashlib.sha256(np.sort(np.asarray(indices, dtype=np.int64)).tobytes()).hexdigest()


class DeliveredIndices:
    """The dataset indices that the ranks' input pipelines actually delivered for one
    optimizer step, gathered through the step's gradient all-reduce.

    Each rank writes the indices of its micro-batches at their chunks' places of a
    ``DIGITS * G`` float32 vector and zeros elsewhere (:meth:`encode`); every position has
    exactly one writer, so the all-reduce's mean times the world size is every rank's
    contribution at once, and :meth:`decode` gives the global batch's indices on every rank,
    -1 where a rank delivered none. The heartbeat's ``sample_hash`` and ``samples_seen``
    come from these, so a pipeline that replays or skips samples shows in them."""

    def __init__(self, layout: BatchLayout):
        self.layout = layout

    @property
    def width(self) -> int:
        return self.layout.global_batch * _DIGITS

    def encode(self, rank: int, micro_indices: list[np.ndarray]) -> np.ndarray:
        lay = self.layout
        if len(micro_indices) != lay.grad_accum:
            raise ValueError(f"{len(micro_indices)} micro-batches, expected {lay.grad_accum}")
        digits = np.zeros((lay.global_batch, _DIGITS), np.int64)
        for k, idx in enumerate(micro_indices):
            n = np.asarray(idx, np.int64).reshape(-1) + 1
            if n.size != lay.micro_batch or n.min(initial=1) < 1 or \
                    n.max(initial=1) > MAX_DATASET_SIZE:
                raise ValueError(f"micro-batch {k} of rank {rank} delivered indices {idx!r}")
            chunk = k * lay.world_size + rank
            rows = digits[chunk * lay.micro_batch:(chunk + 1) * lay.micro_batch]
            for d in range(_DIGITS):
                rows[:, d] = (n >> (_DIGIT_BITS * (_DIGITS - 1 - d))) & ((1 << _DIGIT_BITS) - 1)
        return (digits * 2.0 ** -_DIGIT_BITS).astype(np.float32).reshape(-1)

    def decode(self, mean: np.ndarray) -> np.ndarray:
        """The global batch's indices, in chunk order, from the all-reduced mean."""
        scaled = np.asarray(mean, np.float64).reshape(-1, _DIGITS) * self.layout.world_size
        digits = np.rint(scaled * 2.0 ** _DIGIT_BITS).astype(np.int64)
        n = np.zeros(len(digits), np.int64)
        for d in range(_DIGITS):
            n = (n << _DIGIT_BITS) | digits[:, d]
        return n - 1
