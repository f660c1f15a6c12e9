"""Fixed-global-batch sampler: order is f(seed, epoch); step s reads [sG, (s+1)G)."""

import numpy as np
import pytest

from workloads.volo.sampling import (
    BatchLayout,
    GlobalBatchSampler,
    LayoutError,
    resolve_layout,
)


def test_order_depends_only_on_seed_and_epoch():
    lay = BatchLayout(12, 2, 3, 2)
    a = GlobalBatchSampler(100, lay, seed=5)
    b = GlobalBatchSampler(100, BatchLayout(12, 1, 12, 1), seed=5)
    assert np.array_equal(a.epoch_order(3), b.epoch_order(3))
    assert sorted(a.epoch_order(0)) == list(range(100))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), GlobalBatchSampler(100, lay, 6).epoch_order(0))


def test_step_consumes_its_slice_split_over_ranks_and_micro_steps():
    lay = BatchLayout(12, 2, 3, 2)
    s = GlobalBatchSampler(100, lay, seed=1)
    assert s.steps_per_epoch == 8  # 100 // 12, remainder dropped
    for step in (0, 5, 7, 8, 17):
        epoch, within = divmod(step, 8)
        expect = s.epoch_order(epoch)[within * 12:(within + 1) * 12]
        got = np.concatenate([s.micro_indices(step, r, k) for k in range(2) for r in range(2)])
        assert np.array_equal(got, expect)
        assert np.array_equal(s.step_indices(step), expect)


@pytest.mark.parametrize("d,m,a", [(1, 12, 1), (2, 6, 1), (1, 6, 2), (3, 2, 2), (4, 1, 3)])
def test_every_layout_reads_the_same_global_batches(d, m, a):
    ref = GlobalBatchSampler(50, BatchLayout(12, 1, 12, 1), seed=3)
    s = GlobalBatchSampler(50, BatchLayout(12, d, m, a), seed=3)
    for step in range(9):
        got = np.concatenate([s.micro_indices(step, r, k) for r in range(d) for k in range(a)])
        assert sorted(got) == sorted(ref.step_indices(step))


def test_two_ranks_equal_one_rank_two_micro_steps_chunkwise():
    two = GlobalBatchSampler(64, BatchLayout(16, 2, 8, 1), seed=0)
    one = GlobalBatchSampler(64, BatchLayout(16, 1, 8, 2), seed=0)
    for step in range(6):
        for c in range(2):
            assert np.array_equal(two.micro_indices(step, c, 0), one.micro_indices(step, 0, c))


def test_rank_stream_is_the_concatenated_micro_batches():
    s = GlobalBatchSampler(40, BatchLayout(8, 2, 2, 2), seed=9)
    stream = s.rank_stream(1, 4, rank=1)
    expect = np.concatenate([s.micro_indices(st, 1, k) for st in range(1, 4) for k in range(2)])
    assert np.array_equal(stream, expect)


def test_layout_mismatch_is_an_error_naming_the_numbers():
    with pytest.raises(LayoutError, match=r"2 x 8 x 3 = 48.*global batch is 32"):
        BatchLayout(32, 2, 8, 3)
    with pytest.raises(LayoutError, match="not a multiple"):
        resolve_layout(3, 8, None, 32)
    assert resolve_layout(2, 8, None, 32) == BatchLayout(32, 2, 8, 2)
    assert resolve_layout(2, 8, None, None) == BatchLayout(16, 2, 8, 1)
    with pytest.raises(LayoutError, match="fewer than one global batch"):
        GlobalBatchSampler(10, BatchLayout(16, 1, 16, 1), seed=0)


def test_sample_hash_is_order_free_and_content_sensitive():
    h = GlobalBatchSampler.sample_hash
    assert h(np.array([3, 1, 2])) == h(np.array([1, 2, 3]))
    assert h(np.array([1, 2, 3])) != h(np.array([1, 2, 4]))
    assert len(h(np.array([0]))) == 64


def test_per_epoch_subset_changes_each_epoch():
    s = GlobalBatchSampler(100, BatchLayout(10, 1, 10, 1), seed=0, per_epoch=30)
    assert s.steps_per_epoch == 3
    e0 = np.concatenate([s.step_indices(i) for i in range(3)])
    e1 = np.concatenate([s.step_indices(i) for i in range(3, 6)])
    assert len(set(e0)) == 30 and set(e0) != set(e1)
    assert np.array_equal(e0, s.epoch_order(0)[:30])
