"""MeanAllReduce's verified all-reduce (workloads/volo/distributed.py).

A real two-rank all-reduce runs in every multi-rank train test (CPU ranks verify); here a
stand-in collective sums `world_size` copies, or different ranks' buffers in float32, or
damages them the way a lost, stale or half-read ring message would, so that the check is
seen to pass and to fail.
"""

import mindspore as ms
import numpy as np
import pytest

from workloads.volo.distributed import (
    TAIL,
    CollectiveCorrupted,
    MeanAllReduce,
    ring_chunk_ends,
)


def reducer(world: int, damage=None, sent: list | None = None) -> MeanAllReduce:
    r = MeanAllReduce(1, verify=False)  # no cluster in this process
    r.world_size, r.verify = world, True

    def fake_allreduce(x):
        if sent is not None:
            sent.append(x.asnumpy().copy())
        out = x.asnumpy() * world  # every rank sent the same buffer
        if damage is not None:
            damage(out)
        return ms.Tensor(out)

    r._allreduce = fake_allreduce
    return r


def tensors(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [ms.Tensor(rng.standard_normal(s).astype(np.float32)) for s in sizes]


@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (3, 4), (16, 8)])
def test_ring_chunks_cover_the_buffer_like_mindspore(n, world):
    ends = ring_chunk_ends(n, world)
    sizes = np.diff([0] + ends)
    assert ends[-1] == n and len(ends) == world
    assert sizes.max() - sizes.min() <= 1 and list(sizes) == sorted(sizes, reverse=True)


def tails(buf, world):
    """Positions of each chunk's [data sum, magnitude sum, 1.0]."""
    ends = np.array(ring_chunk_ends(buf.size, world))
    return ends - TAIL, ends - TAIL + 1, ends - TAIL + 2


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("shapes", [[(1,)], [(3, 4), (5,), (1,)], [(2,), (2,)]])
def test_checked_mean_returns_the_inputs(world, shapes):
    ins = tensors(shapes)
    sent: list[np.ndarray] = []
    outs = reducer(world, sent=sent)(ins)
    # each of the ring's chunks ends in [its data's sum, their magnitudes' sum, 1.0]; data
    # fills the rest in order
    (buf,) = sent
    s_at, a_at, one_at = tails(buf, world)
    assert buf.size == sum(int(np.prod(s)) for s in shapes) + TAIL * world
    assert np.all(buf[one_at] == 1.0)
    starts = np.concatenate([[0], one_at[:-1] + 1])
    for k in range(world):
        data = buf[starts[k]:s_at[k]]
        assert buf[s_at[k]] == np.float32(data.sum())
        assert buf[a_at[k]] == np.float32(np.abs(data).sum())
    np.testing.assert_array_equal(np.delete(buf, np.concatenate([s_at, a_at, one_at])),
                                  np.concatenate([t.asnumpy().ravel() for t in ins]))
    assert [tuple(o.shape) for o in outs] == [tuple(s) for s in shapes]
    for a, b in zip(ins, outs, strict=True):
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=1e-6)


def ring_of(world: int, damage=None):
    """A reducer whose stand-in collective adds `world` different ranks' sealed buffers in
    float32, one after another as the ring does: rank 0 is the caller, the others send
    their own gradients (scaled differently) and their own loss. Returns the reducer, rank
    0's inputs and the function that makes any rank's."""
    r = reducer(world)
    shapes = [(3000,), (517,), (64, 9), (1,)]

    def peer_inputs(rank):
        ins = tensors(shapes, seed=rank + 1)
        ins = [t * float(10.0 ** (rank % 3 - 4)) for t in ins[:-1]] + [ins[-1].abs() + 2]
        return ins

    def fake(x):
        bufs = [x.asnumpy()] + [r.sealed_buffer(peer_inputs(p))[0].asnumpy()
                                for p in range(1, world)]
        out = bufs[0].copy()
        for b in bufs[1:]:
            out += b
        if damage is not None:
            damage(out, bufs)
        return ms.Tensor(out)

    r._allreduce = fake
    return r, peer_inputs(0), peer_inputs


@pytest.mark.parametrize("world", [2, 4, 8])
def test_ranks_with_different_data_pass_within_float32_rounding(world):
    r, ins, peer_inputs = ring_of(world)
    out = r(ins)
    # each output is the mean of every rank's input, up to float32 rounding of the ring
    for i, o in enumerate(out):
        want = sum(peer_inputs(p)[i].asnumpy().astype(np.float64) for p in range(world)) / world
        np.testing.assert_allclose(o.asnumpy(), want, rtol=1e-5, atol=1e-9)


def test_a_peer_missing_from_the_tail_of_a_chunk_is_caught():
    def half_tail(out):  # one peer's last values never arrived: only this rank's remain
        out[-3:] /= 2

    with pytest.raises(CollectiveCorrupted, match=r"ends of its 2 chunks are \[2.0, 1.0\]"):
        reducer(2, half_tail)(tensors([(20,), (1,)]))


def test_a_peer_loss_missing_inside_a_chunk_with_intact_ends_is_caught():
    """The loss (the last value before the last chunk's tail) comes back as one rank's alone
    while every chunk's 1.0s sum to 2: invisible to a check of the chunk ends."""
    def one_loss(out, bufs):
        out[-TAIL - 1] = bufs[0][-TAIL - 1]

    r, ins, _ = ring_of(2, one_loss)
    with pytest.raises(CollectiveCorrupted, match=r"chunk 2 of 2 sums to .*, but the ranks "
                                                  r"sent data summing to"):
        r(ins)


def test_a_chunk_of_stale_gradients_with_intact_ends_is_caught():
    def stale(out, bufs):  # chunk 1's data from another step, its tail from this one
        end = ring_chunk_ends(out.size, 2)[0] - TAIL
        out[:end] = bufs[0][:end] * 1.5 + bufs[1][:end]

    r, ins, _ = ring_of(2, stale)
    with pytest.raises(CollectiveCorrupted, match="chunk 1 of 2 sums to"):
        r(ins)


def test_non_finite_data_is_left_to_the_loss_check():
    ins = tensors([(8,), (1,)])
    ins[0] = ins[0] / 0.0
    out = reducer(2)(ins)
    assert not np.isfinite(out[0].asnumpy()).all()


def test_a_wrong_message_in_a_middle_chunk_is_caught():
    def wrong_chunk(out):  # chunk 2 of 4 holds another message's data
        ends = ring_chunk_ends(out.size, 4)
        out[ends[0]:ends[1]] = np.linspace(-1, 1, ends[1] - ends[0])

    with pytest.raises(CollectiveCorrupted, match="not all 4"):
        reducer(4, wrong_chunk)(tensors([(40,)]))


def test_without_verify_nothing_is_added():
    r = reducer(2)
    r.verify = False
    sent = []
    inner = r._allreduce
    r._allreduce = lambda x: (sent.append(int(x.size)), inner(x))[1]
    r(tensors([(5,), (3,)]))
    assert sent == [8]
