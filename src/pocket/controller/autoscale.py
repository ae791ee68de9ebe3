"""Autoscaling decisions: observed utilisation in, node additions and drains out.

Pure code over plain data (no sockets, no clock): the controller's monitor
loop (``ControllerServer._autoscale_tick``) builds a
:class:`ClusterObservation` from heartbeats and the allocation ledger every
``--autoscale-interval`` and applies what :func:`decide_scaling` returns.

Per tier, five resources are kept inside a target band (default 60–80%,
configurable per resource and per tier):

========== ===========================================================
resource   utilisation of the tier's active nodes
========== ===========================================================
cpu        CPU share reported by heartbeats ÷ one core per node
net        network bytes/s in + out ÷ the nodes' rated throughput
bytes      bytes stored ÷ capacity
throughput throughput allocated to jobs ÷ the nodes' rated throughput
capacity   capacity allocated to jobs ÷ capacity
========== ===========================================================

* **Scale out** when any resource is above its band: enough nodes to bring
  the worst one back to the middle of its band (draining nodes of the tier
  are taken back first, they are free), never beyond ``max_nodes`` or what
  the provider can start, not while nodes of the tier are still starting, and
  not within ``cooldown_out`` of the last scale-out (measured load lags one
  heartbeat behind a new node).
* **Scale in** when every resource has been below its band for
  ``scale_in_delay`` and nothing changed in the tier for ``cooldown_in`` (or
  at once, when a job of the tier left since the last change):
  drain the nodes the provider can remove that carry no job allocation,
  emptiest first, as long as the remaining nodes would stay at or below the
  *top* of every band under the *peak* demand of the last ``scale_in_delay``
  seconds.  That hysteresis (out above the top, in only if the recent peak
  would still fit under the top) is what stops flapping on oscillating load.
* **Remove** a draining node once it has reported zero bytes stored for
  ``drain_settle`` seconds (so a write placed just before the drain took
  effect shows up first), or, with ``--migrate-on-drain``, at its first
  zero-bytes heartbeat after every metadata server confirmed that nothing of
  theirs is on it or on its way there.  A node holding data is never removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional

RESOURCES = ("cpu", "net", "bytes", "throughput", "capacity")
#: The pseudo-tier of metadata servers in policies, histories and decisions.
METADATA = "metadata"
#: What metadata servers are scaled on: their CPU share and active jobs per server.
METADATA_RESOURCES = ("cpu", "jobs")


@dataclass(frozen=True)
class Band:
    """Target utilisation range of one resource, as fractions (0.6, 0.8)."""

    low: float = 0.6
    high: float = 0.8

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"a band needs 0 <= low < high, not {self.low}-{self.high}")

    @property
    def middle(self) -> float:
        return (self.low + self.high) / 2


#: Every resource defaults to ``default_band`` (60–80%, as in the original Pocket).  Allocated
#: throughput and capacity are reservations that rightsizing already sized to the jobs' hints
#: and packed to 100%, so a 60–80% band on them keeps 25–65% spare allocation; operators who
#: trust the hints can let allocation reach 100% (``--scale-band throughput=60-100
#: --scale-band capacity=60-100``; docs/AUTOSCALING.md measures both).
DEFAULT_BANDS: dict[str, "Band"] = {}


@dataclass(frozen=True)
class ScalingPolicy:
    """Bands, node limits and timing of autoscaling (seconds)."""

    #: resource → band, or ``"tier:resource"`` → band for one tier (default:
    #: :data:`DEFAULT_BANDS` over ``default_band``).
    bands: Mapping[str, Band] = field(default_factory=lambda: dict(DEFAULT_BANDS))
    default_band: Band = Band()
    #: tier → fewest active nodes kept (a tier below it is scaled out).
    min_nodes: Mapping[str, int] = field(default_factory=dict)
    #: tier → most nodes (active, draining and starting); missing = no limit but the provider's.
    max_nodes: Mapping[str, int] = field(default_factory=dict)
    cooldown_out: float = 2.0
    cooldown_in: float = 3.0
    scale_in_delay: float = 2.0
    drain_settle: float = 1.0
    #: Active jobs one metadata server is sized for (its ``jobs`` utilisation is 100% there).
    jobs_per_metadata: int = 16

    def band(self, tier: str, resource: str) -> Band:
        return self.bands.get(f"{tier}:{resource}") or self.bands.get(resource) or \
            self.default_band

    def describe(self) -> dict:
        return {"bands": {k: [b.low, b.high] for k, b in self.bands.items()},
                "default_band": [self.default_band.low, self.default_band.high],
                "min_nodes": dict(self.min_nodes), "max_nodes": dict(self.max_nodes),
                "cooldown_out": self.cooldown_out, "cooldown_in": self.cooldown_in,
                "scale_in_delay": self.scale_in_delay, "drain_settle": self.drain_settle,
                "jobs_per_metadata": self.jobs_per_metadata}


def parse_band(text: str) -> tuple[str, Band]:
    """``"bytes=50-70"`` or ``"dram:cpu=0.5-0.9"`` → (key, Band); percentages or fractions."""
    key, _, rng = text.partition("=")
    key = key.strip().lower()
    tier, _, resource = key.rpartition(":")
    allowed = METADATA_RESOURCES if tier == METADATA else RESOURCES
    if resource not in allowed:
        raise ValueError(f"unknown resource {resource!r} in band {text!r} "
                         f"(one of {', '.join(allowed)}; metadata:cpu, metadata:jobs)")
    lo, sep, hi = rng.partition("-")
    if not sep:
        raise ValueError(f"a band is RESOURCE=LOW-HIGH, e.g. bytes=60-80, not {text!r}")
    low, high = (float(v.strip().rstrip("%")) for v in (lo, hi))
    if high > 1.0:  # percentages
        low, high = low / 100, high / 100
    return key, Band(low, high)


def parse_tier_nodes(text: str) -> tuple[str, int, Optional[int]]:
    """``"dram=1:8"`` (min:max), ``"dram=2"`` (min) or ``"dram=:8"`` (max) → (tier, min, max)."""
    tier, sep, rng = text.partition("=")
    if not sep:
        raise ValueError(f"expected TIER=MIN:MAX, not {text!r}")
    lo, _, hi = rng.partition(":")
    low = int(lo) if lo.strip() else 0
    high = int(hi) if hi.strip() else None
    if low < 0 or (high is not None and high < low):
        raise ValueError(f"bad node limits {text!r}")
    return tier.strip().lower(), low, high


@dataclass(frozen=True)
class NodeObservation:
    """One storage node as the autoscaler sees it (from heartbeats and the ledger)."""

    id: str
    tier: str
    capacity: int
    throughput: float
    used: int = 0
    cpu: float = 0.0
    net: float = 0.0
    allocated_throughput: int = 0
    allocated_capacity: int = 0
    #: ``active`` or ``draining`` (``removing`` nodes are left out by the caller).
    state: str = "active"
    #: The node provider started it and can stop it.
    removable: bool = False
    #: Seconds it has reported zero bytes stored since its drain took effect (0 if not).
    empty_for: float = 0.0
    #: ``--migrate-on-drain``: every metadata server confirmed that nothing of theirs is on
    #: it (moved off, no put or read lease pending) and a later heartbeat reported zero bytes.
    confirmed_empty: bool = False


@dataclass(frozen=True)
class MetadataObservation:
    """One metadata server as the autoscaler sees it."""

    id: str
    cpu: float = 0.0
    #: Active jobs assigned to it.
    jobs: int = 0
    #: Namespaces it holds that must not be lost (active jobs, jobs with objects left,
    #: registrations in progress): a server holding one is never drained nor removed.
    holds: int = 0
    #: ``active`` or ``draining`` (no new jobs).
    state: str = "active"
    removable: bool = False
    #: Seconds it has held nothing since its drain (0 if not draining or holding).
    empty_for: float = 0.0


@dataclass
class TierHistory:
    """What the loop remembers per tier between observations (monotonic seconds)."""

    last_out: float = -math.inf
    last_in: float = -math.inf
    below_since: Optional[float] = None
    #: When a job of the tier last left (deregistered): its allocation is gone for certain,
    #: so the tier may scale in without waiting for ``scale_in_delay`` (see decide_scaling).
    job_left: float = -math.inf
    #: ``(time, demand per resource)`` of the last ``scale_in_delay`` seconds: scale-in
    #: projects their peak, not the last sample, so swinging load cannot cause a flap.
    recent: list = field(default_factory=list)

    def peak(self, since: float) -> dict[str, float]:
        """Highest demand per resource in the samples taken at or after ``since``."""
        out: dict[str, float] = {}
        for t, load in self.recent:
            if t < since:
                continue
            for r, v in load.items():
                out[r] = max(v, out.get(r, 0.0))
        return out


@dataclass(frozen=True)
class ClusterObservation:
    """Everything :func:`decide_scaling` looks at."""

    now: float
    nodes: tuple[NodeObservation, ...]
    #: tier → nodes a provider is starting for the autoscaler (not registered yet).
    starting: Mapping[str, int] = field(default_factory=dict)
    #: tier → how many more nodes the provider could start now.
    can_add: Mapping[str, int] = field(default_factory=dict)
    history: Mapping[str, TierHistory] = field(default_factory=dict)
    metadata: tuple[MetadataObservation, ...] = ()


@dataclass(frozen=True)
class Decision:
    """One thing to do: ``add`` ``count`` nodes to ``tier``, or ``drain``/``undrain``/``remove``
    ``node``; ``reason`` and ``utilisation`` (resource → fraction) explain it."""

    action: str
    tier: str
    reason: str
    utilisation: Mapping[str, float]
    count: int = 1
    node: Optional[str] = None


def tier_utilisation(nodes: list[NodeObservation]) -> dict[str, float]:
    """Utilisation of each resource over ``nodes`` (demand ÷ supply; 0 without nodes)."""
    load, supply = tier_load(nodes)
    return {r: (load[r] / supply[r] if supply[r] > 0 else 0.0) for r in RESOURCES}


def tier_load(nodes: list[NodeObservation]) -> tuple[dict[str, float], dict[str, float]]:
    """(demand, supply) per resource over ``nodes``."""
    load = {"cpu": sum(n.cpu for n in nodes), "net": sum(n.net for n in nodes),
            "bytes": float(sum(n.used for n in nodes)),
            "throughput": float(sum(n.allocated_throughput for n in nodes)),
            "capacity": float(sum(n.allocated_capacity for n in nodes))}
    return load, node_supply(nodes)


def node_supply(nodes: list[NodeObservation]) -> dict[str, float]:
    cap = float(sum(n.capacity for n in nodes))
    rate = float(sum(n.throughput for n in nodes))
    return {"cpu": float(len(nodes)), "net": rate, "bytes": cap, "throughput": rate,
            "capacity": cap}


def _percent(util: Mapping[str, float], keys) -> str:
    return ", ".join(f"{k} {util[k] * 100:.0f}%" for k in keys)


def decide_scaling(observed: ClusterObservation, policy: ScalingPolicy) -> list[Decision]:
    """What to do now, per tier: add nodes, drain or take back nodes, remove drained nodes;
    and the same for metadata servers (:func:`decide_metadata_scaling`, tier ``metadata``).

    Tiers are those with nodes, starting nodes or a ``min_nodes`` entry.  The
    caller records applied ``add``/``undrain`` decisions in
    ``history[tier].last_out`` and ``drain`` in ``last_in``, and keeps
    ``below_since`` (see :func:`update_history`).
    """
    decisions: list[Decision] = []
    tiers = sorted(({n.tier for n in observed.nodes} | set(observed.starting) |
                    {t for t, m in policy.min_nodes.items() if m > 0}) - {METADATA})
    now = observed.now
    for tier in tiers:
        nodes = [n for n in observed.nodes if n.tier == tier]
        active = [n for n in nodes if n.state == "active"]
        draining = [n for n in nodes if n.state == "draining"]
        hist = observed.history.get(tier) or TierHistory()
        starting = observed.starting.get(tier, 0)
        util = tier_utilisation(active)
        bands = {r: policy.band(tier, r) for r in RESOURCES}

        # Drained nodes that hold nothing leave, whatever else happens.
        for n in draining:
            if n.used == 0 and n.confirmed_empty:
                decisions.append(Decision("remove", tier, "drained, objects moved", util,
                                          node=n.id))
            elif n.used == 0 and n.empty_for >= policy.drain_settle:
                decisions.append(Decision("remove", tier, "drained and empty", util, node=n.id))

        n_active = len(active)
        limit = policy.max_nodes.get(tier)
        room = (limit - n_active - starting - len(draining)) if limit is not None else 1 << 30
        room = max(0, min(room, observed.can_add.get(tier, 0)))
        minimum = policy.min_nodes.get(tier, 0)

        above = [r for r in RESOURCES if util[r] > bands[r].high] if active else []
        if n_active + starting < minimum:
            want = minimum - n_active - starting
            reason = f"{n_active} active nodes, below the minimum of {minimum}"
        elif above and starting == 0 and now - hist.last_out >= policy.cooldown_out:
            load, supply = tier_load(active)
            want = 1
            for r in above:  # nodes that bring the worst resource back to its band's middle
                per_node = supply[r] / n_active
                want = max(want, math.ceil(load[r] / (bands[r].middle * per_node)) - n_active)
            reason = f"above band: {_percent(util, above)}"
        else:
            want = 0
        if want > 0:
            back = sorted(draining, key=lambda n: (-n.used, n.id))[:want]
            for n in back:  # a draining node is free to take back
                decisions.append(Decision("undrain", tier, reason, util, node=n.id))
            want -= len(back)
            if want > 0 and room > 0:
                decisions.append(Decision("add", tier, reason, util, count=min(want, room)))
            continue

        # Scale in: everything below its band, long enough, and nothing changed lately --
        # or at once when a job left since the last change (its allocation is gone for
        # certain; allocated resources then count as they are now, measured ones at their
        # recent peak, so the hysteresis below still holds).
        if not active or any(util[r] >= bands[r].low for r in RESOURCES) or starting:
            continue
        left = hist.job_left > max(hist.last_out, hist.last_in)
        if not left:
            if hist.below_since is None or now - hist.below_since < policy.scale_in_delay:
                continue
            if now - max(hist.last_out, hist.last_in) < policy.cooldown_in:
                continue
        load, _ = tier_load(active)
        peak = hist.peak(now - policy.scale_in_delay)
        measured = ("cpu", "net", "bytes") if left else RESOURCES
        load = {r: max(v, peak.get(r, 0.0)) if r in measured else v for r, v in load.items()}
        remaining = list(active)
        candidates = sorted((n for n in active if n.removable and n.allocated_capacity == 0
                             and n.allocated_throughput == 0),
                            key=lambda n: (n.used, n.cpu, n.id))
        for n in candidates:
            if len(remaining) - 1 < max(minimum, 1):
                break
            rest = [m for m in remaining if m is not n]
            supply = node_supply(rest)
            # Hysteresis: only if what stays would not be pushed above any band's top.
            if any(supply[r] <= 0 or load[r] / supply[r] > bands[r].high for r in RESOURCES):
                break
            remaining = rest
            decisions.append(Decision("drain", tier,
                                      f"below band: {_percent(util, RESOURCES)}", util, node=n.id))
    if observed.metadata or observed.starting.get(METADATA) or policy.min_nodes.get(METADATA):
        decisions += decide_metadata_scaling(observed, policy)
    return decisions


def metadata_load(servers: list[MetadataObservation], policy: ScalingPolicy
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """(demand, supply) per metadata resource over ``servers``."""
    n = float(len(servers))
    return ({"cpu": sum(m.cpu for m in servers), "jobs": float(sum(m.jobs for m in servers))},
            {"cpu": n, "jobs": n * policy.jobs_per_metadata})


def metadata_utilisation(servers: list[MetadataObservation], policy: ScalingPolicy
                         ) -> dict[str, float]:
    load, supply = metadata_load(servers, policy)
    return {r: (load[r] / supply[r] if supply[r] > 0 else 0.0) for r in METADATA_RESOURCES}


def decide_metadata_scaling(observed: ClusterObservation, policy: ScalingPolicy
                            ) -> list[Decision]:
    """Metadata servers, like a tier: add above the band of ``cpu`` or ``jobs`` (active
    jobs ÷ servers × ``jobs_per_metadata``), drain an idle one the provider started that
    holds no namespace below the band, remove a drained one that has held nothing for
    ``drain_settle``.  Same cool-downs, delay and hysteresis as storage tiers; new jobs go
    to the least-loaded active server (the controller), so no steering is needed."""
    tier, now = METADATA, observed.now
    servers = list(observed.metadata)
    active = [m for m in servers if m.state == "active"]
    draining = [m for m in servers if m.state == "draining"]
    hist = observed.history.get(tier) or TierHistory()
    starting = observed.starting.get(tier, 0)
    util = metadata_utilisation(active, policy)
    bands = {r: policy.band(tier, r) for r in METADATA_RESOURCES}
    decisions = [Decision("remove", tier, "drained and idle", util, node=m.id)
                 for m in draining if m.holds == 0 and m.empty_for >= policy.drain_settle]
    limit = policy.max_nodes.get(tier)
    room = (limit - len(active) - starting - len(draining)) if limit is not None else 1 << 30
    room = max(0, min(room, observed.can_add.get(tier, 0)))
    minimum = policy.min_nodes.get(tier, 0)
    above = [r for r in METADATA_RESOURCES if util[r] > bands[r].high] if active else []
    want = 0
    if len(active) + starting < minimum:
        want = minimum - len(active) - starting
        reason = f"{len(active)} active metadata servers, below the minimum of {minimum}"
    elif above and starting == 0 and now - hist.last_out >= policy.cooldown_out:
        load, supply = metadata_load(active, policy)
        want = max([1] + [math.ceil(load[r] / (bands[r].middle * supply[r] / len(active)))
                          - len(active) for r in above])
        reason = f"above band: {_percent(util, above)}"
    if want > 0:
        back = sorted(draining, key=lambda m: m.id)[:want]
        decisions += [Decision("undrain", tier, reason, util, node=m.id) for m in back]
        if want > len(back) and room > 0:
            decisions.append(Decision("add", tier, reason, util,
                                      count=min(want - len(back), room)))
        return decisions
    if not active or any(util[r] >= bands[r].low for r in METADATA_RESOURCES):
        return decisions
    if hist.below_since is None or now - hist.below_since < policy.scale_in_delay:
        return decisions
    if now - max(hist.last_out, hist.last_in) < policy.cooldown_in or starting:
        return decisions
    load, _ = metadata_load(active, policy)
    peak = hist.peak(now - policy.scale_in_delay)
    load = {r: max(v, peak.get(r, 0.0)) for r, v in load.items()}
    remaining = list(active)
    for m in sorted((m for m in active if m.removable and m.holds == 0 and m.jobs == 0),
                    key=lambda m: (m.cpu, m.id)):
        if len(remaining) - 1 < max(minimum, 1):
            break
        rest = [x for x in remaining if x is not m]
        _, supply = metadata_load(rest, policy)
        if any(load[r] / supply[r] > bands[r].high for r in METADATA_RESOURCES):
            break
        remaining = rest
        decisions.append(Decision("drain", tier, f"below band: {_percent(util, METADATA_RESOURCES)}",
                                  util, node=m.id))
    return decisions


def update_history(history: dict[str, TierHistory], observed: ClusterObservation,
                   policy: ScalingPolicy, decisions: list[Decision]) -> None:
    """Record ``decisions`` (applied at ``observed.now``) and whether each tier is below band."""
    now = observed.now
    for tier in ({n.tier for n in observed.nodes} | {d.tier for d in decisions}) - {METADATA}:
        hist = history.setdefault(tier, TierHistory())
        active = [n for n in observed.nodes if n.tier == tier and n.state == "active"]
        load, supply = tier_load(active)
        below = bool(active) and all(load[r] < policy.band(tier, r).low * supply[r]
                                     for r in RESOURCES)
        if not below:
            hist.below_since = None
        elif hist.below_since is None:
            hist.below_since = now
        hist.recent = [(t, x) for t, x in hist.recent if t >= now - policy.scale_in_delay]
        hist.recent.append((now, load))
        _record(hist, tier, now, decisions)
    if observed.metadata or any(d.tier == METADATA for d in decisions):
        hist = history.setdefault(METADATA, TierHistory())
        active = [m for m in observed.metadata if m.state == "active"]
        load, supply = metadata_load(active, policy)
        below = bool(active) and all(load[r] < policy.band(METADATA, r).low * supply[r]
                                     for r in METADATA_RESOURCES)
        if not below:
            hist.below_since = None
        elif hist.below_since is None:
            hist.below_since = now
        hist.recent = [(t, x) for t, x in hist.recent if t >= now - policy.scale_in_delay]
        hist.recent.append((now, load))
        _record(hist, METADATA, now, decisions)


def _record(hist: TierHistory, tier: str, now: float, decisions: list[Decision]) -> None:
    for d in decisions:
        if d.tier != tier:
            continue
        if d.action in ("add", "undrain"):
            hist.last_out = now
            hist.below_since = None
        elif d.action == "drain":
            hist.last_in = now


# -- data steering ----------------------------------------------------------------

#: A full node still gets this much headroom, so a job never loses all its nodes at once.
MIN_HEADROOM = 0.02


def node_headroom(node: NodeObservation) -> float:
    """How much room a node has left for new writes: its free fraction in the tighter of
    bytes stored and network rate (at least :data:`MIN_HEADROOM`)."""
    free_bytes = 1.0 - node.used / node.capacity if node.capacity > 0 else 0.0
    free_net = 1.0 - node.net / node.throughput if node.throughput > 0 else 1.0
    return max(MIN_HEADROOM, min(1.0, free_bytes, free_net))


def steer_weights(weights: Mapping[str, float], new: Mapping[str, float],
                  headroom: Mapping[str, float]) -> dict[str, float]:
    """A running job's weight map after nodes ``new`` joined its tier (data steering).

    The job's nodes and the new ones are weighted by their headroom, so new
    (empty) nodes get the largest weights and new writes flow there; existing
    data stays where it is.  ``new`` maps node → headroom too (usually 1.0).
    Weights sum to 1.
    """
    room = {n: headroom.get(n, MIN_HEADROOM) for n in weights}
    room.update(new)
    total = sum(room.values())
    return {n: r / total for n, r in sorted(room.items())} if total > 0 else dict(weights)


def drain_weights(weights: Mapping[str, float], gone: set[str],
                  fallback: Mapping[str, float]) -> dict[str, float]:
    """A weight map without the draining nodes ``gone``, renormalised; if nothing is left,
    ``fallback`` (the tier's active nodes by headroom)."""
    kept = {n: w for n, w in weights.items() if n not in gone and w > 0}
    total = sum(kept.values())
    if total <= 0:
        kept = {n: w for n, w in fallback.items() if n not in gone and w > 0}
        total = sum(kept.values())
    return {n: w / total for n, w in kept.items()} if total > 0 else {}
