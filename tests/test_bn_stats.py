"""BatchNorm running statistics advance once per optimizer step by the whole global batch
(workloads/volo/bn_stats.py): the same result for any devices x accumulation layout."""

from __future__ import annotations

import numpy as np

from workloads.volo.bn_stats import StepRunningStats, running_stat_params

MOMENTUM = np.float32(0.9)


class Param:
    """A host stand-in for a MindSpore Parameter."""

    def __init__(self, name: str, value):
        self.name = name
        self.value = np.asarray(value, np.float32)

    def asnumpy(self):
        return self.value


def assign(p: Param, value) -> None:
    p.value = np.array(value, np.float32, copy=True)


def forward(p: Param, batch_mean: np.ndarray) -> None:
    """What a training forward does to a running mean."""
    p.value = (MOMENTUM * p.value + (1 - MOMENTUM) * batch_mean).astype(np.float32)


def one_step(start: np.ndarray, chunks: list[np.ndarray], ranks: int) -> np.ndarray:
    """An optimizer step over len(chunks) micro-batches on `ranks` ranks (chunk k*d + r is
    rank r's micro-step k), the all-reduce as the float32 mean of the ranks' values."""
    accum = len(chunks) // ranks
    local = []
    for r in range(ranks):
        p = Param("stem.1.moving_mean", start)
        stats = StepRunningStats([p], assign)
        stats.begin()
        for k in range(accum):
            forward(p, chunks[k * ranks + r])
            stats.collect()
            np.testing.assert_array_equal(p.value, start)  # reset for the next micro-step
        local.append(stats.local_mean()[0])
    mean = (np.sum(local, axis=0, dtype=np.float32) / np.float32(ranks)).astype(np.float32)
    stats.apply([mean])
    return p.value


def test_the_statistics_do_not_depend_on_the_layout():
    rng = np.random.default_rng(0)
    start = rng.standard_normal(8).astype(np.float32)
    chunks = [rng.standard_normal(8).astype(np.float32) for _ in range(2)]
    two_ranks = one_step(start, chunks, ranks=2)
    one_rank_accum_2 = one_step(start, chunks, ranks=1)
    np.testing.assert_array_equal(two_ranks, one_rank_accum_2)
    # m*s + (1-m)*mean(b): the mean over the global batch's micro-batches
    want = MOMENTUM * start + (1 - MOMENTUM) * (chunks[0] + chunks[1]) / 2
    np.testing.assert_allclose(two_ranks, want, rtol=1e-6)
    # not what a rank applying its two micro-steps in a row would hold
    p = Param("m.moving_mean", start)
    forward(p, chunks[0])
    forward(p, chunks[1])
    assert np.abs(p.value - two_ranks).max() > 1e-3


def test_only_running_statistics_are_taken():
    params = [Param("stem.1.moving_mean", [0.0]), Param("stem.1.moving_variance", [1.0]),
              Param("stem.1.gamma", [1.0]), Param("head.weight", [0.0])]
    assert [p.name for p in running_stat_params(params)] == ["stem.1.moving_mean",
                                                             "stem.1.moving_variance"]
    assert not StepRunningStats([], assign)
