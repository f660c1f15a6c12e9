import random

import pytest

from launcher.planner import (
    ASCEND_910,
    FreePool,
    NodeSlice,
    Plan,
    Request,
    Topology,
    batch_split,
    explain_infeasible,
    plan,
    valid_device_counts,
)


def full(n):
    return {f"n{i}": range(8) for i in range(n)}


def test_valid_counts_are_ring_sizes_or_whole_servers():
    assert valid_device_counts(1, 40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert valid_device_counts(3, 20) == [4, 8, 16]
    assert valid_device_counts(5, 7) == []


def test_batch_split_least_accumulation():
    assert batch_split(256, 8, 32) == (32, 1)
    assert batch_split(256, 4, 32) == (32, 2)
    assert batch_split(96, 8, 5) == (4, 3)  # 12 per device, largest divisor <= 5 is 4
    assert batch_split(100, 8, 32) is None


def test_deepspeed_1920_trap_never_taken():
    # G=1920 divides 10, 12, 15, 20, 30 devices - none is a whole server.  The planner
    # must pick a topology-valid count: 4 free servers -> 32 devices, 60 per device
    # = micro-batch 30 x accumulation 2.
    p = plan(full(4), Request(1, 32, 1920, 32))
    assert (p.devices, p.micro_batch, p.grad_accum) == (32, 30, 2)
    # 3 servers: 24 devices, 80 per device = 20 x 4 (largest micro-batch <= 32 dividing 80).
    p = plan(full(3), Request(1, 32, 1920, 32))
    assert (p.devices, p.micro_batch, p.grad_accum) == (24, 20, 4)
    # 1.5 servers free: 12 chips would divide 1920 but is no topology -> 8.
    p = plan({"a": range(8), "b": range(4)}, Request(1, 32, 1920, 32))
    assert p.devices == 8
    assert ASCEND_910.is_valid_count(p.devices)


def test_prefers_more_devices_then_less_accum():
    p = plan(full(2), Request(1, 16, 512, 32))
    assert (p.devices, p.micro_batch, p.grad_accum) == (16, 32, 1)
    assert sorted(s.node for s in p.slices) == ["n0", "n1"]
    # Only 4 chips free in ring 1 of one node: falls back to 4 devices, accumulation 4.
    p = plan({"a": [4, 5, 6, 7]}, Request(1, 16, 512, 32))
    assert (p.devices, p.micro_batch, p.grad_accum) == (4, 32, 4)
    assert p.slices == (NodeSlice("a", (4, 5, 6, 7)),)


def test_partial_job_never_spans_rings():
    # 2 free in each ring: 4 chips free but no ring has 4 -> best is 2.
    p = plan({"a": [2, 3, 4, 5]}, Request(1, 4, 64, 64))
    assert p.devices == 2
    assert {p.slices[0].chips[0] // 4, p.slices[0].chips[1] // 4} == {p.slices[0].chips[0] // 4}


def test_multi_server_takes_whole_servers_only():
    free = {"a": range(8), "b": range(1, 8), "c": range(8)}
    p = plan(free, Request(16, 24, 48, 8))
    assert p.devices == 16
    assert sorted(s.node for s in p.slices) == ["a", "c"]
    assert all(s.chips == tuple(range(8)) for s in p.slices)
    assert plan(free, Request(24, 24, 48, 8)) is None


def test_best_fit_keeps_whole_servers_free():
    pool = FreePool.from_free({"a": range(8), "b": [0, 1, 2, 3, 4]})
    p = pool.plan(Request(1, 1, 8, 8))
    assert p.slices[0].node == "b" and p.slices[0].chips == (4,)
    pool.take(p.slices)
    assert pool.whole_nodes() == 1


def test_take_give_roundtrip_and_all_or_nothing():
    pool = FreePool.from_free(full(2))
    p = pool.plan(Request(16, 16, 16, 1))
    pool.take(p.slices)
    assert pool.total_free() == 0
    with pytest.raises(ValueError):
        pool.take([NodeSlice("n0", (0,))])
    pool.give(p.slices)
    assert pool.total_free() == 16 and pool.whole_nodes() == 2


def test_explain_infeasible():
    assert "not divisible" in explain_infeasible(Request(8, 16, 100, 32))
    assert "no valid device count" in explain_infeasible(Request(5, 7, 64, 8))
    assert explain_infeasible(Request(1, 8, 64, 8)) is None


def test_plan_dict_roundtrip():
    p = plan(full(1), Request(1, 8, 64, 8))
    assert Plan.from_dict(p.to_dict()) == p


def test_small_topology_for_cpu_standins():
    topo = Topology(2, 2)
    assert valid_device_counts(1, 8, topo) == [1, 2, 4, 6, 8]
    p = plan({"local": [0, 1]}, Request(1, 2, 32, 16), topo)
    assert (p.devices, p.micro_batch, p.grad_accum) == (2, 16, 1)


@pytest.mark.parametrize("seed", range(30))
def test_property_random_pools(seed):
    """Every plan is exact, topology-valid, uses only free chips, and is the best possible."""
    rng = random.Random(seed)
    topo = ASCEND_910
    free = {}
    for i in range(rng.randint(1, 6)):
        chips = [c for c in range(8) if rng.random() < 0.7]
        free[f"n{i}"] = chips
    cap = rng.choice([1, 4, 16, 32, 64])
    G = rng.choice([8, 24, 48, 96, 100, 256, 384, 1920, 2048, 3000])
    lo = rng.choice([1, 2, 4, 8])
    hi = rng.choice([lo, 8, 16, 32, 64])
    req = Request(lo, max(lo, hi), G, cap)
    p = plan(free, req, topo)
    if p is None:
        # No feasible count can be placed: check by brute force over all candidates.
        for d in req.candidates(topo):
            assert FreePool.from_free(free, topo).place(d) is None
        return
    assert p.devices * p.micro_batch * p.grad_accum == G
    assert p.micro_batch <= cap
    assert topo.is_valid_count(p.devices)
    assert lo <= p.devices <= req.max_devices
    assert sum(len(s.chips) for s in p.slices) == p.devices
    for s in p.slices:
        assert set(s.chips) <= set(free[s.node])
        if p.devices < 8:
            assert len({c // 4 for c in s.chips}) == 1
        else:
            assert s.chips == tuple(range(8))
    assert len({s.node for s in p.slices}) == len(p.slices)
    # Optimality: no feasible count larger than p.devices fits.
    for d in req.candidates(topo):
        if d > p.devices:
            assert FreePool.from_free(free, topo).place(d) is None
    # Least accumulation for that device count.
    per = G // p.devices
    assert all(per % m for m in range(p.micro_batch + 1, min(cap, per) + 1))


def test_property_no_invalid_counts_for_any_batch():
    for G in range(1, 600):
        for d in valid_device_counts(1, 64):
            s = batch_split(G, d, 32)
            if s is not None:
                assert d * s[0] * s[1] == G
        req = Request(1, 64, G, 32)
        for d in req.candidates(ASCEND_910):
            assert ASCEND_910.is_valid_count(d)


def _enumerated_counts(lo, hi, topo):
    """The definition the arithmetic must match: every count in range the topology takes."""
    return [d for d in range(max(lo, 1), hi + 1) if topo.is_valid_count(d)]


def _enumerated_split(G, d, cap):
    if G % d:
        return None
    per = G // d
    m = max(m for m in range(1, min(cap, per) + 1) if per % m == 0)
    return m, per // m


@pytest.mark.parametrize("topo", [ASCEND_910, Topology(2, 2), Topology(16, 4), Topology(3, 3),
                                  Topology(1, 1)])
def test_arithmetic_counts_and_splits_match_enumeration(topo):
    rng = random.Random(7)
    for _ in range(300):
        lo = rng.randint(1, 70)
        hi = rng.randint(lo, 140)
        assert valid_device_counts(lo, hi, topo) == _enumerated_counts(lo, hi, topo)
        G, cap = rng.randint(1, 5000), rng.randint(1, 300)
        feasible = [d for d in _enumerated_counts(lo, hi, topo)
                    if _enumerated_split(G, d, cap) is not None]
        assert Request(lo, hi, G, cap).candidates(topo) == feasible[::-1]
        for d in feasible[:3] + [rng.randint(1, 64)]:
            assert batch_split(G, d, cap) == _enumerated_split(G, d, cap)
