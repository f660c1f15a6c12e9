"""Device planner: pure code, no Ray.

Given the free chips of every node and a job's device range and global batch G,
choose devices d, micro-batch m and gradient accumulation a with d*m*a == G, and
the chips on each node that the ranks get.

Ascend 910 topology: a server's 8 chips form two HCCS rings of 4 (chips 0-3 and
4-7). A job smaller than a server must sit inside one ring and use 1, 2 or 4
chips (collectives across rings, or on 3 chips, are not supported by HCCL); a
job of more than one server takes whole servers. The valid device counts are
therefore {1, 2, 4} and multiples of 8 - which is why a heuristic that ignores
granularity (DeepSpeed's elastic batch picking G=1920, only divisible on 10, 12,
15, 20 or 30 devices) is wrong for this hardware; every count this module
returns is one `Topology.is_valid_count` accepts.

The free-chip index (`FreePool`) is incremental so that a scheduler can take
thousands of decisions per second on thousands of nodes (bench/scheduler_sim.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice


@dataclass(frozen=True)
class Topology:
    """Shape of one server. The default is an 8-chip Ascend 910 server."""

    devices_per_node: int = 8
    ring_size: int = 4

    def __post_init__(self) -> None:
        if self.devices_per_node < 1 or self.ring_size < 1:
            raise ValueError("devices_per_node and ring_size must be positive")
        if self.devices_per_node % self.ring_size:
            raise ValueError("devices_per_node must be a multiple of ring_size")

    @property
    def rings(self) -> int:
        return self.devices_per_node // self.ring_size

    def ring_of(self, chip: int) -> int:
        return chip // self.ring_size

    def partial_sizes(self) -> tuple[int, ...]:
        """Device counts a job may use inside one ring: powers of two up to the ring."""
        sizes = []
        s = 1
        while s <= self.ring_size:
            sizes.append(s)
            s *= 2
        # A ring whose size is not a power of two (e.g. a 3-device CPU stand-in node)
        # can still be used whole.
        if sizes[-1] != self.ring_size:
            sizes.append(self.ring_size)
        return tuple(sizes)

    def is_valid_count(self, d: int) -> bool:
        if d <= 0:
            return False
        if d in self.partial_sizes():
            return True
        return d % self.devices_per_node == 0


ASCEND_910 = Topology(8, 4)
MESSAGE_COUNTS = 12  # device counts an error message lists before '...'


def iter_valid_device_counts(min_devices: int, max_devices: int,
                             topo: Topology = ASCEND_910) -> Iterator[int]:
    """Topology-valid device counts in [min_devices, max_devices], ascending, lazily: a
    caller that needs a few (a message) or one (a check) does work for those only."""
    partial = [d for d in topo.partial_sizes() if min_devices <= d <= max_devices]
    n = topo.devices_per_node
    first = max(1, -(-min_devices // n))  # the first whole-server count in range
    if partial and partial[-1] == n:
        partial.pop()  # a ring that is the whole server: counted with the multiples
    yield from partial
    k = first
    while k * n <= max_devices:
        yield k * n
        k += 1


def valid_device_counts(min_devices: int, max_devices: int, topo: Topology = ASCEND_910,
                        max_total: int | None = None) -> list[int]:
    """All topology-valid device counts in [min_devices, max_devices], ascending."""
    hi = max_devices if max_total is None else min(max_devices, max_total)
    return list(iter_valid_device_counts(min_devices, hi, topo))


def any_valid_device_count(min_devices: int, max_devices: int,
                           topo: Topology = ASCEND_910) -> bool:
    return next(iter(iter_valid_device_counts(min_devices, max_devices, topo)), None) is not None


def divisors(n: int) -> list[int]:
    """Divisors of n >= 1, ascending, from its prime factorisation (trial division up to
    sqrt(n)): a prime near 1e9 costs ~31k divisions, not 1e9."""
    factors: list[tuple[int, int]] = []
    rest, p = n, 2
    while p * p <= rest:
        if rest % p == 0:
            e = 0
            while rest % p == 0:
                rest //= p
                e += 1
            factors.append((p, e))
        p += 1 if p == 2 else 2
    if rest > 1:
        factors.append((rest, 1))
    out = [1]
    for prime, e in factors:
        out = [d * prime**k for d in out for k in range(e + 1)]
    return sorted(out)


def batch_split(global_batch: int, devices: int, micro_batch_cap: int) -> tuple[int, int] | None:
    """(micro_batch, grad_accum) for G on d devices with m <= cap, least accumulation first.

    Returns None when G is not divisible by d: every rank must see the same
    number of samples per optimizer step or the global batch would change.
    """
    if devices <= 0 or global_batch <= 0 or micro_batch_cap <= 0:
        return None
    if global_batch % devices:
        return None
    per_device = global_batch // devices
    if per_device <= micro_batch_cap:
        return per_device, 1
    # Largest divisor of per_device not above the cap = least accumulation.
    m = max(d for d in divisors(per_device) if d <= micro_batch_cap)
    return m, per_device // m


def feasible_device_counts(global_batch: int, micro_batch_cap: int, min_devices: int,
                           max_devices: int, topo: Topology = ASCEND_910) -> list[int]:
    """Valid device counts in range that also split G exactly (ascending).

    A count splits G exactly iff it divides G (micro-batch 1 always fits the cap), so the
    candidates are G's divisors, however wide the device range."""
    if global_batch <= 0 or micro_batch_cap <= 0:
        return []
    return [d for d in divisors(global_batch)
            if min_devices <= d <= max_devices and topo.is_valid_count(d)]


@dataclass(frozen=True)
class NodeSlice:
    node: str
    chips: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    devices: int
    micro_batch: int
    grad_accum: int
    slices: tuple[NodeSlice, ...]

    @property
    def global_batch(self) -> int:
        return self.devices * self.micro_batch * self.grad_accum

    @property
    def nodes(self) -> int:
        return len(self.slices)

    def to_dict(self) -> dict:
        return {"devices": self.devices, "micro_batch": self.micro_batch,
                "grad_accum": self.grad_accum,
                "slices": [{"node": s.node, "chips": list(s.chips)} for s in self.slices]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Plan:
        return cls(int(d["devices"]), int(d["micro_batch"]), int(d["grad_accum"]),
                   tuple(NodeSlice(str(s["node"]), tuple(int(c) for c in s["chips"]))
                         for s in d["slices"]))


@dataclass(frozen=True)
class Request:
    """What a job asks the planner for."""

    min_devices: int
    max_devices: int
    global_batch: int
    micro_batch_cap: int

    def candidates(self, topo: Topology) -> list[int]:
        """Feasible device counts, most devices first (the preference order)."""
        return list(reversed(feasible_device_counts(
            self.global_batch, self.micro_batch_cap, self.min_devices, self.max_devices, topo)))


class PlacementPolicy:
    """Chooses which ring hosts a partial-server job. Pluggable for experiments."""

    def pick_ring(self, pool: FreePool, size: int) -> tuple[str, int] | None:
        raise NotImplementedError


class BestFitRing(PlacementPolicy):
    """Tightest ring first, and rings on already-broken servers before whole ones.

    Keeping whole servers intact is what lets multi-server jobs start: a 1-chip
    job placed on an empty server would block a 16-chip job for its lifetime.
    """

    def pick_ring(self, pool: FreePool, size: int) -> tuple[str, int] | None:
        for free in range(size, pool.topo.ring_size + 1):
            bucket = pool._ring_bucket.get((free, False))
            if bucket:
                return next(iter(bucket))
        for free in range(size, pool.topo.ring_size + 1):
            bucket = pool._ring_bucket.get((free, True))
            if bucket:
                return next(iter(bucket))
        return None


@dataclass
class FreePool:
    """Free chips per node with indexes for O(1)-ish placement queries."""

    topo: Topology = ASCEND_910
    policy: PlacementPolicy = field(default_factory=BestFitRing)
    _free: dict[str, set[int]] = field(default_factory=dict)
    # Nodes with every chip free, insertion-ordered for deterministic picks.
    _whole: dict[str, None] = field(default_factory=dict)
    # (free chips in ring, node is whole-free) -> {(node, ring): None}
    _ring_bucket: dict[tuple[int, bool], dict[tuple[str, int], None]] = field(
        default_factory=dict)

    @classmethod
    def from_free(cls, free: Mapping[str, Iterable[int]], topo: Topology = ASCEND_910,
                  policy: PlacementPolicy | None = None) -> FreePool:
        pool = cls(topo=topo, policy=policy or BestFitRing())
        for node, chips in free.items():
            pool.add_node(node, chips)
        return pool

    # -- index maintenance -------------------------------------------------
    def _unindex(self, node: str) -> None:
        chips = self._free[node]
        whole = len(chips) == self.topo.devices_per_node
        self._whole.pop(node, None)
        for r in range(self.topo.rings):
            n = self._ring_free(chips, r)
            if n:
                self._ring_bucket.get((n, whole), {}).pop((node, r), None)

    def _index(self, node: str) -> None:
        chips = self._free[node]
        whole = len(chips) == self.topo.devices_per_node
        if whole:
            self._whole[node] = None
        for r in range(self.topo.rings):
            n = self._ring_free(chips, r)
            if n:
                self._ring_bucket.setdefault((n, whole), {})[(node, r)] = None

    def _ring_free(self, chips: set[int], ring: int) -> int:
        lo = ring * self.topo.ring_size
        return sum(1 for c in chips if lo <= c < lo + self.topo.ring_size)

    # -- public API --------------------------------------------------------
    def add_node(self, node: str, chips: Iterable[int] | None = None) -> None:
        """Add (or replace) a node; default: all chips free."""
        if node in self._free:
            self._unindex(node)
        cs = set(range(self.topo.devices_per_node)) if chips is None else set(chips)
        bad = [c for c in cs if not 0 <= c < self.topo.devices_per_node]
        if bad:
            raise ValueError(
                f"node {node}: chip ids {bad} outside 0..{self.topo.devices_per_node - 1}")
        self._free[node] = cs
        self._index(node)

    def remove_node(self, node: str) -> None:
        if node in self._free:
            self._unindex(node)
            del self._free[node]

    def free_chips(self, node: str) -> frozenset[int]:
        return frozenset(self._free.get(node, ()))

    def nodes(self) -> list[str]:
        return list(self._free)

    def total_free(self) -> int:
        return sum(len(c) for c in self._free.values())

    def whole_nodes(self) -> int:
        return len(self._whole)

    def take(self, slices: Iterable[NodeSlice]) -> None:
        slices = list(slices)
        for s in slices:  # check everything first: all or nothing
            have = self._free.get(s.node)
            if have is None or not set(s.chips) <= have:
                raise ValueError(f"chips {s.chips} on node {s.node} are not free")
        for s in slices:
            self._unindex(s.node)
            self._free[s.node] -= set(s.chips)
            self._index(s.node)

    def give(self, slices: Iterable[NodeSlice]) -> None:
        for s in slices:
            if s.node not in self._free:
                continue  # node left the cluster while the job ran
            self._unindex(s.node)
            self._free[s.node] |= set(s.chips)
            self._index(s.node)

    def place(self, devices: int) -> tuple[NodeSlice, ...] | None:
        """Chips for exactly `devices` devices, or None if they are not free now."""
        topo = self.topo
        if not topo.is_valid_count(devices):
            return None
        if devices % topo.devices_per_node == 0:
            n = devices // topo.devices_per_node
            if len(self._whole) < n:
                return None
            out = []
            for node in self._whole:
                out.append(NodeSlice(node, tuple(range(topo.devices_per_node))))
                if len(out) == n:
                    break
            return tuple(out)
        picked = self.policy.pick_ring(self, devices)
        if picked is None:
            return None
        node, ring = picked
        lo = ring * topo.ring_size
        chips = sorted(c for c in self._free[node] if lo <= c < lo + topo.ring_size)
        return (NodeSlice(node, tuple(self._aligned(chips, devices))),)

    @staticmethod
    def _aligned(chips: list[int], size: int) -> list[int]:
        # Prefer an aligned block (e.g. chips 2,3 rather than 1,2) so the rest of
        # the ring stays usable by another 2-chip job.
        have = set(chips)
        for start in chips:
            if start % size == 0 and all(c in have for c in range(start, start + size)):
                return list(range(start, start + size))
        return chips[:size]

    def plan(self, req: Request, candidates: list[int] | None = None) -> Plan | None:
        """Best plan for `req` on the chips free now: most devices, then least accumulation."""
        for d in candidates if candidates is not None else req.candidates(self.topo):
            slices = self.place(d)
            if slices is None:
                continue
            split = batch_split(req.global_batch, d, req.micro_batch_cap)
            if split is None:  # pragma: no cover - candidates are feasible by construction
                continue
            return Plan(d, split[0], split[1], slices)
        return None


def plan(free: Mapping[str, Iterable[int]], req: Request,
         topo: Topology = ASCEND_910) -> Plan | None:
    """Convenience wrapper: plan on a snapshot {node: free chip ids}."""
    return FreePool.from_free(free, topo).plan(req)


def explain_infeasible(req: Request, topo: Topology = ASCEND_910) -> str | None:
    """A human sentence when no device count can ever satisfy `req`, else None."""
    if not any_valid_device_count(req.min_devices, req.max_devices, topo):
        return (f"no valid device count in [{req.min_devices}, {req.max_devices}]: "
                f"allowed are {', '.join(map(str, topo.partial_sizes()))} inside one ring "
                f"or multiples of {topo.devices_per_node} (whole servers)")
    if not feasible_device_counts(req.global_batch, req.micro_batch_cap, req.min_devices,
                                  req.max_devices, topo):
        shown = list(islice(iter_valid_device_counts(req.min_devices, req.max_devices, topo),
                            MESSAGE_COUNTS + 1))
        counts = ", ".join(map(str, shown[:MESSAGE_COUNTS])) + \
            (", ..." if len(shown) > MESSAGE_COUNTS else "")
        return (f"global batch {req.global_batch} is not divisible by any allowed device "
                f"count ({counts}); pick a global batch divisible by one of them")
    return None
