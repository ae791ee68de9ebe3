"""Rightsizing: job hints → an allocation → a weight map, and what it costs.

Everything here is plain data and pure functions (plus one small ledger
class), so the policy is unit-tested without servers and benchmarked on its
own (``bench/planner.py``).  The controller is a thin shell around it.

Three steps, after the original Pocket (OSDI 2018) and docs/POLICY.md:

1. :func:`job_demand` completes the hints into a throughput (bytes/s) and a
   capacity (bytes).  ``throughput`` wins, else ``lambdas`` × the per-lambda
   rate (600 Mb/s); a missing dimension is derived from the other through the
   *hold time* (capacity = throughput × 111 s: one NVMe node's bytes per node
   of throughput, as the original sized it); with neither, a conservative
   default (50 nodes × 8 Gb/s, the original's 50-node default).
2. :func:`plan_allocation` picks the tier: an explicit ``tier`` wins;
   latency-sensitive jobs — and jobs that did not say, conservatively — get
   DRAM; the others the tier whose nodes meet both dimensions at the lowest
   $/hour (``price × max(throughput / node throughput, capacity / node
   capacity)``) among those with room or a provider that can add nodes.
3. :func:`pack_allocation` places the allocation on the tier's nodes (online
   bin-packing, *fullest first* in the job's binding dimension; see its
   docstring for the rule and why); the shortfall is what a node provider is
   asked for (:func:`nodes_needed`), or, when nobody can add nodes,
   overcommitted across the tier (:func:`spread_allocation`).  The slices
   become the job's weight map (:func:`weight_map`) and its cost
   (:func:`allocation_rates`, :func:`usage_report`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence

from ..errors import Unavailable
from ..units import parse_rate, parse_size

#: Tiers, fastest first; also the order in which a full tier spills.
TIER_ORDER = ("dram", "nvme", "ssd", "hdd")

GB = 1000**3


def format_rate(rate: float) -> str:
    """``1.25e9`` (bytes/s) → ``10 Gb/s``."""
    bits = rate * 8
    for unit, scale in (("Tb/s", 1e12), ("Gb/s", 1e9), ("Mb/s", 1e6), ("kb/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}"
    return f"{bits:.3g} b/s"


@dataclass(frozen=True)
class NodeProfile:
    """What one node of a tier offers and costs.

    ``throughput`` is what the node sustains for data: the smaller of its
    network rate and, for disks, its device rate (bytes/s).  ``price`` is
    $/hour (on-demand).
    """

    tier: str
    instance: str
    capacity: int
    throughput: float
    price: float

    def nodes_for(self, throughput: float, capacity: float) -> float:
        """Node-equivalents this profile needs to carry both dimensions."""
        return max(throughput / self.throughput, capacity / self.capacity)

    def hourly_cost(self, throughput: float, capacity: float) -> float:
        """$/hour for ``throughput`` and ``capacity`` on nodes of this profile."""
        return self.price * self.nodes_for(throughput, capacity)


#: Defaults after the original's instances; AWS on-demand, us-east-1, Linux
#: (prices and sources in docs/POLICY.md).  The NVMe capacity (111 GB) is the
#: original's figure, not the i3.2xlarge's whole 1.9 TB device; device rates
#: of the SSD and HDD classes are modelling assumptions (SATA-class SSD,
#: one 7200-rpm disk).  All of it is configurable (``--profile``).
DEFAULT_PROFILES: dict[str, NodeProfile] = {
    "dram": NodeProfile("dram", "r4.2xlarge", 60 * GB, 8e9 / 8, 0.532),
    "nvme": NodeProfile("nvme", "i3.2xlarge", 111 * GB, 8e9 / 8, 0.624),
    "ssd": NodeProfile("ssd", "m5d.2xlarge", 300 * GB, 500e6, 0.452),
    "hdd": NodeProfile("hdd", "h1.2xlarge", 2000 * GB, 150e6, 0.468),
}


def parse_profile(text: str, profiles: Mapping[str, NodeProfile] = DEFAULT_PROFILES
                  ) -> NodeProfile:
    """``"nvme:capacity=1.9TB,throughput=8Gbps,price=0.624,instance=i3.2xlarge"`` → a profile.

    Fields not given keep the value in ``profiles`` for that tier.
    """
    tier, _, rest = text.strip().partition(":")
    tier = tier.strip().lower()
    if tier not in TIER_ORDER:
        raise ValueError(f"unknown tier {tier!r} in profile {text!r}")
    base = profiles.get(tier, DEFAULT_PROFILES[tier])
    changes: dict = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ValueError(f"expected key=value in profile {text!r}, got {item!r}")
        if key == "capacity":
            changes[key] = parse_size(value)
        elif key == "throughput":
            changes[key] = parse_rate(value)
        elif key == "price":
            changes[key] = float(value)
        elif key == "instance":
            changes[key] = value.strip()
        else:
            raise ValueError(f"unknown profile field {key!r} (capacity, throughput, price, "
                             f"instance)")
    profile = replace(base, **changes)
    if profile.capacity <= 0 or profile.throughput <= 0 or profile.price < 0:
        raise ValueError(f"profile {text!r}: capacity and throughput must be positive, "
                         f"price not negative")
    return profile


@dataclass(frozen=True)
class PlannerConfig:
    """The planner's constants (controller flags ``--lambda-rate``, ``--default-throughput``,
    ``--hold-time``)."""

    #: Bytes/s one lambda moves at most (AWS Lambda: ~600 Mb/s).
    lambda_rate: float = 600e6 / 8
    #: Throughput given to a job with no size hints: 50 nodes × 8 Gb/s.
    default_throughput: float = 50 * 8e9 / 8
    #: Seconds of peak throughput a job is assumed to hold when it gives no
    #: capacity (and the rate it needs per byte when it gives no throughput).
    hold_time: float = 111.0


DEFAULT_CONFIG = PlannerConfig()


@dataclass(slots=True)
class TierView:
    """What the planner needs to know of one tier of the cluster (built fresh per plan)."""

    profile: NodeProfile
    nodes: int = 0
    spare_throughput: float = 0.0
    spare_capacity: float = 0.0
    #: Nodes a node provider could still start in this tier.
    can_add: int = 0

    @property
    def available(self) -> bool:
        return self.nodes > 0 or self.can_add > 0

    def fits(self, throughput: float, capacity: float) -> bool:
        """Whether spare allocation plus what a provider can add covers both dimensions."""
        p = self.profile
        return (self.spare_throughput + self.can_add * p.throughput >= throughput and
                self.spare_capacity + self.can_add * p.capacity >= capacity)

    def fits_capacity(self, capacity: float) -> bool:
        return self.spare_capacity + self.can_add * self.profile.capacity >= capacity


@dataclass(frozen=True)
class Allocation:
    """A job's allocation: one tier, throughput (bytes/s) and capacity (bytes)."""

    tier: str
    throughput: int
    capacity: int
    #: Node-equivalents of the tier's profile and their $/hour.
    nodes: float = 0.0
    hourly_cost: float = 0.0
    #: Whether the tier has (or can get) room for all of it.
    fits: bool = True
    #: Which dimensions were derived rather than hinted.
    derived: tuple[str, ...] = ()
    reason: str = ""

    def as_dict(self) -> dict:
        return {"tier": self.tier, "throughput": self.throughput, "capacity": self.capacity,
                "nodes": round(self.nodes, 4), "hourly_cost": round(self.hourly_cost, 6),
                "fits": self.fits, "derived": list(self.derived), "reason": self.reason}


def job_demand(hints: Mapping[str, object], config: PlannerConfig = DEFAULT_CONFIG
               ) -> tuple[int, int, tuple[str, ...]]:
    """``(throughput, capacity, derived)`` from hints (already normalised: ints/floats)."""
    throughput = hints.get("throughput")
    if not throughput and hints.get("lambdas"):
        throughput = hints["lambdas"] * config.lambda_rate  # type: ignore[operator]
    capacity = hints.get("capacity") or None
    derived: tuple[str, ...] = ()
    if not throughput and capacity is None:
        throughput = config.default_throughput
        capacity = throughput * config.hold_time
        derived = ("throughput", "capacity")
    elif not throughput:
        throughput = capacity / config.hold_time  # type: ignore[operator]
        derived = ("throughput",)
    elif capacity is None:
        capacity = throughput * config.hold_time
        derived = ("capacity",)
    return max(1, int(throughput)), max(1, int(capacity)), derived  # type: ignore[arg-type]


def plan_allocation(hints: Mapping[str, object], cluster: Mapping[str, TierView],
                    config: PlannerConfig = DEFAULT_CONFIG) -> Allocation:
    """The cheapest allocation that meets the hints (the table in docs/POLICY.md).

    ``hints`` holds any of ``lambdas``, ``capacity`` (bytes), ``throughput``
    (bytes/s), ``latency_sensitive``, ``tier`` and ``replicas``; ``cluster``
    maps each tier to a :class:`TierView`.  A job keeping ``replicas`` copies
    of its objects is allocated ``replicas`` × the capacity (its throughput
    is left as hinted: reads move one copy).  Raises :class:`Unavailable`
    when an explicit tier, or every tier, has no node and no provider to add one.
    """
    throughput, capacity, derived = job_demand(hints, config)
    capacity *= int(hints.get("replicas") or 1)  # type: ignore[call-overload]
    tier = hints.get("tier")
    if tier:
        view = cluster.get(tier)  # type: ignore[arg-type]
        if view is None or not view.available:
            raise Unavailable(f"no {tier} storage server has registered with the controller")
        reason = f"tier {tier} asked for"
    else:
        usable = [t for t in TIER_ORDER if t in cluster and cluster[t].available]
        if not usable:
            raise Unavailable("no storage server has registered with the controller")
        if hints.get("latency_sensitive") is not False:
            said = "latency-sensitive" if hints.get("latency_sensitive") else \
                "latency unknown (conservative)"
            tier = usable[0]
            reason = f"{said}: DRAM" if tier == "dram" else f"{said}: no DRAM, fastest is {tier}"
        else:
            tier = cheapest_tier(throughput, capacity, {t: cluster[t] for t in usable})
            reason = "latency-insensitive: cheapest tier that meets throughput and capacity"
    view = cluster[tier]  # type: ignore[index]
    profile = view.profile
    return Allocation(tier, throughput, capacity,  # type: ignore[arg-type]
                      nodes=profile.nodes_for(throughput, capacity),
                      hourly_cost=profile.hourly_cost(throughput, capacity),
                      fits=view.fits(throughput, capacity), derived=derived, reason=reason)


def cheapest_tier(throughput: float, capacity: float, tiers: Mapping[str, TierView]) -> str:
    """The tier meeting both dimensions at the lowest $/hour.

    Preference: tiers that fit both dimensions, then tiers whose capacity
    fits (bytes that do not fit are refused; throughput that does not fit is
    only slower), then any; ties go to the faster tier.
    """
    best = None
    for order, tier in enumerate(TIER_ORDER):
        view = tiers.get(tier)
        if view is None:
            continue
        p = view.profile
        grow = view.can_add
        fits_c = view.spare_capacity + grow * p.capacity >= capacity
        fits_t = view.spare_throughput + grow * p.throughput >= throughput
        key = (0 if fits_c and fits_t else 1 if fits_c else 2,
               p.price * max(throughput / p.throughput, capacity / p.capacity), order, tier)
        if best is None or key < best:
            best = key
    if best is None:
        raise Unavailable("no storage tier is available")
    return best[3]


# -- packing ---------------------------------------------------------------------

@dataclass(eq=False)
class NodeLoad:
    """One storage node as the packer sees it: size, price and what is allocated on it."""

    id: str
    tier: str
    capacity: int
    throughput: float
    price: float = 0.0
    allocated_capacity: int = 0
    allocated_throughput: int = 0
    #: A job that asked a provider for this node and has not packed it yet.
    reserved_for: Optional[str] = None

    @property
    def spare_capacity(self) -> int:
        return self.capacity - self.allocated_capacity

    @property
    def spare_throughput(self) -> float:
        return self.throughput - self.allocated_throughput

    def share(self, throughput: float, capacity: float) -> float:
        """The fraction of this node that ``throughput`` and ``capacity`` occupy."""
        return max(throughput / self.throughput if self.throughput > 0 else 0.0,
                   capacity / self.capacity if self.capacity > 0 else 0.0)


class Slice(NamedTuple):
    """The part of a job's allocation placed on one node."""

    node: str
    throughput: int
    capacity: int


@dataclass(frozen=True)
class Packing:
    """Slices placed, and what is left unmet (zero when the allocation fits)."""

    slices: tuple[Slice, ...]
    unmet_throughput: int = 0
    unmet_capacity: int = 0

    @property
    def complete(self) -> bool:
        return self.unmet_throughput <= 0 and self.unmet_capacity <= 0


def pack_allocation(throughput: int, capacity: int, nodes: Iterable[NodeLoad]) -> Packing:
    """Online bin-packing of one allocation into ``nodes`` (of one tier).

    The allocation is cut into *slices that keep the job's own ratio* of
    throughput to capacity: placement follows the weight map, so a node with
    weight w receives w of the job's bytes and about w of its traffic, and
    must hold w of both dimensions.  A node can therefore take the fraction
    ``min(spare throughput / throughput, spare capacity / capacity)`` of the
    job — its room in the job's binding dimension on that node.

    Rule: **fullest first** in the job's binding dimension (the dimension
    that needs more of these nodes), ties by node id.  Like the original
    (which filled the smallest gap first), this keeps allocations on as few
    nodes as possible and leaves the emptiest nodes empty, so that they can
    be drained and released (data is never migrated; a node leaves only
    empty) and so that a large job still finds whole empty nodes.  It also
    makes the packing deterministic.  Spreading (emptiest first) would keep
    every node partly allocated and none releasable.

    The slices' sums equal the allocation exactly when it fits; otherwise
    ``unmet_*`` say what is missing.
    """
    if throughput <= 0 or capacity <= 0:
        raise ValueError("an allocation needs positive throughput and capacity")
    if not isinstance(nodes, (list, tuple)):
        nodes = list(nodes)
    total_t = total_c = 0
    for n in nodes:
        total_t += n.throughput
        total_c += n.capacity
    by_throughput = throughput * total_c >= capacity * total_t  # which dimension binds
    # (-fullness, id, node): a heap, because the job is usually met by the first few nodes
    heap = []
    for n in nodes:
        at, ac = n.allocated_throughput, n.allocated_capacity
        if n.throughput > at and n.capacity > ac:
            heap.append((-(at / n.throughput) if by_throughput else -(ac / n.capacity), n.id, n))
    heapq.heapify(heap)
    rem_t, rem_c = throughput, capacity
    slices = []
    while heap:
        n = heapq.heappop(heap)[2]
        room = min((n.throughput - n.allocated_throughput) / throughput,
                   (n.capacity - n.allocated_capacity) / capacity)
        if room >= rem_t / throughput and room >= rem_c / capacity:
            slices.append(Slice(n.id, rem_t, rem_c))
            rem_t = rem_c = 0
            break
        t = min(rem_t, int(room * throughput))
        c = min(rem_c, int(room * capacity))
        if t or c:
            slices.append(Slice(n.id, t, c))
            rem_t -= t
            rem_c -= c
    return Packing(tuple(slices), rem_t, rem_c)


def pack_replicated(throughput: int, capacity: int, nodes: Iterable[NodeLoad],
                    replicas: int) -> Packing:
    """:func:`pack_allocation` for a job that keeps ``replicas`` copies of each object,
    whose weight map must name at least ``replicas`` nodes (each copy of a piece
    goes to a distinct node).

    The allocation is cut into ``replicas`` equal parts; the first is packed
    as usual (fullest first), each next one only into nodes the earlier parts
    did not use.  So a small job that would fit in one node is spread over
    ``replicas`` nodes when the tier has them; what cannot be placed on new
    nodes is left unmet (for a node provider, or overcommit).  With
    ``replicas=1`` this is :func:`pack_allocation`.
    """
    if replicas <= 1:
        return pack_allocation(throughput, capacity, nodes)
    nodes = list(nodes)
    slices: list[Slice] = []
    used: set[str] = set()
    unmet_t = unmet_c = 0
    for k in range(replicas):
        last = k == replicas - 1
        t = throughput - (throughput // replicas) * k if last else throughput // replicas
        c = capacity - (capacity // replicas) * k if last else capacity // replicas
        part = pack_allocation(max(1, t), max(1, c), [n for n in nodes if n.id not in used])
        slices.extend(part.slices)
        used.update(s.node for s in part.slices)
        unmet_t += part.unmet_throughput
        unmet_c += part.unmet_capacity
    return Packing(tuple(slices), unmet_t, unmet_c)


def spread_allocation(throughput: int, capacity: int, nodes: Sequence[NodeLoad]) -> Packing:
    """Overcommit: spread what could not be placed over ``nodes`` in proportion to their size.

    Used when no provider can add nodes: the job still gets the best map over
    the nodes that exist (each node overcommitted by the same factor).
    """
    nodes = sorted(nodes, key=lambda n: n.id)
    if not nodes or (throughput <= 0 and capacity <= 0):
        return Packing((), max(0, throughput), max(0, capacity))
    total_t = sum(n.throughput for n in nodes)
    total_c = sum(n.capacity for n in nodes)
    by_t = throughput * total_c >= capacity * total_t
    sizes = [n.throughput if by_t else n.capacity for n in nodes]
    total = sum(sizes) or len(nodes)
    slices = []
    left_t, left_c = throughput, capacity
    for i, (n, size) in enumerate(zip(nodes, sizes)):
        if i == len(nodes) - 1:
            t, c = left_t, left_c
        else:
            f = (size or 1) / total
            t, c = int(throughput * f), int(capacity * f)
        left_t -= t
        left_c -= c
        if t or c:
            slices.append(Slice(n.id, t, c))
    return Packing(tuple(slices))


def nodes_needed(throughput: float, capacity: float, profile: NodeProfile) -> int:
    """Whole new nodes of ``profile`` that carry an unmet remainder."""
    if throughput <= 0 and capacity <= 0:
        return 0
    return max(1, math.ceil(profile.nodes_for(max(0.0, throughput), max(0.0, capacity)) - 1e-9))


def weight_map(slices: Iterable[Slice], throughput: int, capacity: int) -> dict[str, float]:
    """Node → fraction of the job's data (sums to 1), from its slices."""
    shares: dict[str, float] = {}
    for s in slices:
        shares[s.node] = shares.get(s.node, 0.0) + (s.throughput / throughput +
                                                     s.capacity / capacity) / 2
    total = sum(shares.values())
    if total <= 0:
        return {}
    return {node: share / total for node, share in shares.items() if share > 0}


class AllocationLedger:
    """What is allocated on each storage node, and to which job — returned exactly.

    Amounts are integers (bytes, bytes/s), so releasing a job's slices gives
    each node back exactly what the job took.  Per-tier sums of spare
    allocation are kept up to date on every change, so :meth:`view` costs the
    same with 10 nodes or 10,000.  Change nodes through the ledger
    (:meth:`take`, :meth:`release`, :meth:`set_reserved`, :meth:`set_capacity`)
    so the sums stay right.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, NodeLoad] = {}
        self.jobs: dict[str, list[Slice]] = {}
        self._tiers: dict[str, dict[str, NodeLoad]] = {}
        #: tier → [nodes, spare throughput, spare capacity] over unreserved nodes.
        self._sums: dict[str, list] = {}
        self._reserved: dict[str, NodeLoad] = {}

    def _account(self, node: NodeLoad, sign: int) -> None:
        if node.reserved_for is not None:
            return
        s = self._sums.setdefault(node.tier, [0, 0, 0])
        s[0] += sign
        s[1] += sign * max(0, node.throughput - node.allocated_throughput)
        s[2] += sign * max(0, node.capacity - node.allocated_capacity)

    def add_node(self, node: NodeLoad) -> None:
        self.remove_node(node.id)
        self.nodes[node.id] = node
        self._tiers.setdefault(node.tier, {})[node.id] = node
        if node.reserved_for is not None:
            self._reserved[node.id] = node
        self._account(node, +1)

    def remove_node(self, node_id: str) -> Optional[NodeLoad]:
        """Forget a node (its slices stay listed under their jobs, and are ignored on release)."""
        node = self.nodes.pop(node_id, None)
        if node is not None:
            self._account(node, -1)
            del self._tiers[node.tier][node_id]
            self._reserved.pop(node_id, None)
        return node

    def set_reserved(self, node_id: str, job: Optional[str]) -> None:
        """Keep a new node for ``job`` (other jobs do not pack into it), or release it (None)."""
        node = self.nodes.get(node_id)
        if node is None:
            return
        self._account(node, -1)
        node.reserved_for = job
        if job is None:
            self._reserved.pop(node_id, None)
        else:
            self._reserved[node_id] = node
        self._account(node, +1)

    def set_capacity(self, node_id: str, capacity: int) -> None:
        node = self.nodes.get(node_id)
        if node is not None and node.capacity != capacity:
            self._account(node, -1)
            node.capacity = capacity
            self._account(node, +1)

    def tier_nodes(self, tier: str, job: Optional[str] = None) -> list[NodeLoad]:
        """Nodes of ``tier`` that ``job`` may pack into (others' reserved nodes left out)."""
        nodes = self._tiers.get(tier, {}).values()
        if not self._reserved:
            return list(nodes)
        return [n for n in nodes if n.reserved_for is None or n.reserved_for == job]

    def _change(self, slices: Iterable[Slice], sign: int) -> None:
        nodes, sums = self.nodes, self._sums
        for s in slices:
            node = nodes.get(s.node)
            if node is None:
                continue
            old_t = node.throughput - node.allocated_throughput
            old_c = node.capacity - node.allocated_capacity
            node.allocated_throughput += sign * s.throughput
            node.allocated_capacity += sign * s.capacity
            if node.reserved_for is None:  # _account(-1) then _account(+1), inlined: hot path
                new_t = node.throughput - node.allocated_throughput
                new_c = node.capacity - node.allocated_capacity
                acc = sums[node.tier]
                acc[1] += (new_t if new_t > 0 else 0) - (old_t if old_t > 0 else 0)
                acc[2] += (new_c if new_c > 0 else 0) - (old_c if old_c > 0 else 0)

    def take(self, job: str, slices: Iterable[Slice]) -> None:
        slices = list(slices)
        missing = [s.node for s in slices if s.node not in self.nodes]
        if missing:
            raise KeyError(f"unknown node {missing[0]}")
        self._change(slices, +1)
        self.jobs.setdefault(job, []).extend(slices)

    def release(self, job: str) -> list[Slice]:
        """Give back everything ``job`` took; returns its slices."""
        slices = self.jobs.pop(job, [])
        self._change(slices, -1)
        return slices

    def view(self, profiles: Mapping[str, NodeProfile], can_add: Mapping[str, int],
             job: Optional[str] = None) -> dict[str, TierView]:
        """A :class:`TierView` per tier (spare allocation is never counted below zero);
        nodes reserved for ``job`` count as its own."""
        sums = {t: list(self._sums.get(t, (0, 0, 0))) for t in profiles}
        if job is not None:
            for n in self._reserved.values():
                if n.reserved_for == job and n.tier in sums:
                    s = sums[n.tier]
                    s[0] += 1
                    s[1] += max(0, n.throughput - n.allocated_throughput)
                    s[2] += max(0, n.capacity - n.allocated_capacity)
        return {t: TierView(profiles[t], s[0], s[1], s[2], can_add.get(t, 0))
                for t, s in sums.items()}


# -- accounting ------------------------------------------------------------------

@dataclass
class TierRate:
    """A job's allocation on one tier, per second: bytes, bytes/s, node-equivalents, $."""

    capacity: int = 0
    throughput: int = 0
    nodes: float = 0.0
    dollars_per_hour: float = 0.0


def allocation_rates(slices: Iterable[Slice], nodes: Mapping[str, NodeLoad]) -> dict[str, TierRate]:
    """Per tier: what the slices hold, the node-equivalents they occupy and their $/hour.

    A slice occupies ``max(throughput share, capacity share)`` of its node —
    the binding dimension is what the node cannot sell to anyone else — but
    never more than the whole node: an overcommitted job (no provider could
    add nodes) pays for at most the nodes that exist.
    """
    per_node: dict[str, list[int]] = {}
    for s in slices:
        acc = per_node.setdefault(s.node, [0, 0])
        acc[0] += s.throughput
        acc[1] += s.capacity
    rates: dict[str, TierRate] = {}
    for node_id, (throughput, capacity) in per_node.items():
        node = nodes.get(node_id)
        if node is None:
            continue
        r = rates.setdefault(node.tier, TierRate())
        share = min(1.0, node.share(throughput, capacity))
        r.capacity += capacity
        r.throughput += throughput
        r.nodes += share
        r.dollars_per_hour += share * node.price
    return rates


@dataclass
class JobUsage:
    """A job's allocation over time: integrates rates from ``started`` to ``ended`` (or now)."""

    started: float
    rates: dict[str, TierRate] = field(default_factory=dict)
    ended: Optional[float] = None

    def seconds(self, now: float) -> float:
        return max(0.0, (self.ended if self.ended is not None else now) - self.started)

    def report(self, now: float) -> dict:
        return usage_report(self.rates, self.seconds(now))


def usage_report(rates: Mapping[str, TierRate], seconds: float) -> dict:
    """Usage and cost of ``rates`` held for ``seconds``, per tier and in total.

    ``capacity_seconds`` is bytes × s, ``throughput_seconds`` (bytes/s) × s,
    ``node_seconds`` node-equivalents × s, ``cost`` dollars.
    """
    tiers = {}
    for tier, r in rates.items():
        tiers[tier] = {"capacity_seconds": r.capacity * seconds,
                       "throughput_seconds": r.throughput * seconds,
                       "node_seconds": r.nodes * seconds,
                       "cost": r.dollars_per_hour * seconds / 3600}
    return {"seconds": seconds, "tiers": tiers,
            "node_seconds": sum(t["node_seconds"] for t in tiers.values()),
            "cost": sum(t["cost"] for t in tiers.values())}
