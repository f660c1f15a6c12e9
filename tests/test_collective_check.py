"""MeanAllReduce's check values (workloads/volo/distributed.py).

A real two-rank all-reduce runs in every multi-rank train test (CPU ranks verify); here a
stand-in collective sums `world_size` identical copies, or damages them the way a lost or
mismatched ring message would, so that the check is seen to pass and to fail.
"""

import mindspore as ms
import numpy as np
import pytest

from workloads.volo.distributed import CollectiveCorrupted, MeanAllReduce, ring_chunk_ends


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


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("shapes", [[(1,)], [(3, 4), (5,), (1,)], [(2,), (2,)]])
def test_checked_mean_returns_the_inputs(world, shapes):
    ins = tensors(shapes)
    sent: list[np.ndarray] = []
    outs = reducer(world, sent=sent)(ins)
    # one check value of 1.0 ends each of the ring's chunks, data fills the rest in order
    (buf,) = sent
    at = np.array(ring_chunk_ends(buf.size, world)) - 1
    assert buf.size == sum(int(np.prod(s)) for s in shapes) + world
    assert np.all(buf[at] == 1.0)
    np.testing.assert_array_equal(np.delete(buf, at),
                                  np.concatenate([t.asnumpy().ravel() for t in ins]))
    assert [tuple(o.shape) for o in outs] == [tuple(s) for s in shapes]
    for a, b in zip(ins, outs, strict=True):
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=1e-6)


def test_a_peer_missing_from_the_tail_of_a_chunk_is_caught():
    def half_tail(out):  # one peer's last values never arrived: only this rank's remain
        out[-3:] /= 2

    with pytest.raises(CollectiveCorrupted, match=r"ends of its 2 chunks are \[2.0, 1.0\]"):
        reducer(2, half_tail)(tensors([(20,), (1,)]))


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
