"""Rightsizing as pure functions: the policy table row by row, packing, the ledger, cost."""

from __future__ import annotations

import random

import pytest

from pocket.controller.planner import (DEFAULT_CONFIG, DEFAULT_PROFILES, GB, AllocationLedger,
                                       NodeLoad, PlannerConfig, Slice, TierView,
                                       allocation_rates, cheapest_tier, job_demand,
                                       nodes_needed, pack_allocation, parse_profile,
                                       plan_allocation, spread_allocation, usage_report,
                                       weight_map)
from pocket.errors import Unavailable

P = DEFAULT_PROFILES
RATE = 600e6 / 8  # one lambda: 600 Mb/s in bytes/s
HOLD = DEFAULT_CONFIG.hold_time


def roomy(*tiers: str, nodes: int = 100) -> dict[str, TierView]:
    """A cluster view where each given tier has ``nodes`` empty nodes of its default profile."""
    return {t: TierView(P[t], nodes, nodes * P[t].throughput, nodes * P[t].capacity)
            for t in tiers}


ALL = ("dram", "nvme", "ssd", "hdd")


# -- the policy table, row by row (docs/POLICY.md) ---------------------------------

def test_row_no_hints_conservative_defaults_on_dram() -> None:
    a = plan_allocation({}, roomy(*ALL))
    assert a.tier == "dram"
    assert a.throughput == int(DEFAULT_CONFIG.default_throughput) == 50 * 10**9
    assert a.capacity == int(DEFAULT_CONFIG.default_throughput * HOLD)
    assert a.derived == ("throughput", "capacity")
    assert "conservative" in a.reason


def test_row_latency_sensitive_true_is_dram_even_when_flash_is_cheaper() -> None:
    hints = {"capacity": 1000 * GB, "throughput": 1e8}
    assert plan_allocation({**hints, "latency_sensitive": False}, roomy(*ALL)).tier != "dram"
    a = plan_allocation({**hints, "latency_sensitive": True}, roomy(*ALL))
    assert a.tier == "dram" and a.capacity == 1000 * GB and a.throughput == 10**8


def test_row_latency_sensitive_false_is_the_cheapest_tier_that_meets_the_rest() -> None:
    cluster = roomy(*ALL)
    for capacity, throughput in [(1000 * GB, 1e8), (10 * GB, 20e9), (100 * GB, 1e9),
                                 (5 * GB, 5e8), (20000 * GB, 2e9)]:
        a = plan_allocation({"capacity": capacity, "throughput": throughput,
                             "latency_sensitive": False}, cluster)
        costs = {t: P[t].hourly_cost(throughput, capacity) for t in ALL}
        assert a.hourly_cost == pytest.approx(min(costs.values()))
        assert a.tier == min(costs, key=costs.get)
    # capacity-heavy, little throughput: HDD; throughput-heavy, little data: DRAM is the
    # cheapest per Gb/s (r4 and i3 have the same network at a lower price)
    assert plan_allocation({"capacity": 10000 * GB, "throughput": 1e8,
                            "latency_sensitive": False}, cluster).tier == "hdd"
    assert plan_allocation({"capacity": 1 * GB, "throughput": 50e9,
                            "latency_sensitive": False}, cluster).tier == "dram"
    assert plan_allocation({"capacity": 400 * GB, "throughput": 4e9,
                            "latency_sensitive": False}, cluster).tier == "nvme"


def test_row_lambdas_set_throughput_at_600_mbps_each() -> None:
    a = plan_allocation({"lambdas": 250}, roomy(*ALL))
    assert a.throughput == int(250 * RATE) and a.capacity == int(250 * RATE * HOLD)
    assert a.tier == "dram" and a.derived == ("capacity",)  # latency unknown: DRAM
    fast = PlannerConfig(lambda_rate=1e9 / 8)
    assert plan_allocation({"lambdas": 8}, roomy("dram"), fast).throughput == 10**9


def test_row_capacity_as_given_on_a_tier_whose_free_capacity_fits() -> None:
    a = plan_allocation({"capacity": 50 * GB, "latency_sensitive": False}, roomy(*ALL))
    assert a.capacity == 50 * GB and a.throughput == int(50 * GB / HOLD)
    assert a.derived == ("throughput",)
    # the cheapest tier for it (HDD) has no room and no provider: the next cheapest that fits
    cluster = roomy(*ALL)
    cluster["hdd"] = TierView(P["hdd"], 1, P["hdd"].throughput, 10 * GB)
    hints = {"capacity": 5000 * GB, "throughput": 1e8, "latency_sensitive": False}
    assert plan_allocation(hints, roomy(*ALL)).tier == "hdd"
    assert plan_allocation(hints, cluster).tier == "ssd"
    # ... unless a provider can add HDD nodes
    cluster["hdd"] = TierView(P["hdd"], 1, P["hdd"].throughput, 10 * GB, can_add=3)
    assert plan_allocation(hints, cluster).tier == "hdd"


def test_row_throughput_as_given_on_the_cheapest_tier_that_sustains_it() -> None:
    hints = {"throughput": 3e9, "capacity": 20 * GB, "latency_sensitive": False}
    a = plan_allocation(hints, roomy(*ALL))
    assert a.throughput == 3 * 10**9 and a.tier == "dram"
    # DRAM without spare throughput and no provider: the next cheapest that sustains it
    cluster = roomy(*ALL)
    cluster["dram"] = TierView(P["dram"], 2, 0.0, 120 * GB)
    assert plan_allocation(hints, cluster).tier == "nvme"
    # the throughput hint wins over lambdas
    assert plan_allocation({"throughput": 1e9, "lambdas": 1000}, roomy("dram")).throughput == 10**9


def test_explicit_tier_wins() -> None:
    a = plan_allocation({"tier": "hdd", "latency_sensitive": True, "throughput": 50e9},
                        roomy(*ALL))
    assert a.tier == "hdd" and "asked" in a.reason
    with pytest.raises(Unavailable, match="no ssd storage server"):
        plan_allocation({"tier": "ssd"}, roomy("dram", "nvme"))
    assert plan_allocation({"tier": "ssd"}, {"ssd": TierView(P["ssd"], can_add=1)}).tier == "ssd"


def test_only_tiers_that_exist_or_can_be_added_are_candidates() -> None:
    # latency-sensitive (or unknown) without DRAM: the fastest tier there is
    a = plan_allocation({}, roomy("ssd", "hdd"))
    assert a.tier == "ssd" and "no DRAM" in a.reason
    # an empty tier a provider can fill is a candidate
    a = plan_allocation({}, {"dram": TierView(P["dram"], can_add=2), **roomy("nvme")})
    assert a.tier == "dram"
    with pytest.raises(Unavailable):
        plan_allocation({}, {"dram": TierView(P["dram"])})


def test_nothing_fits_prefers_capacity_then_cost() -> None:
    tiers = {"dram": TierView(P["dram"], 1, 1e9, 60 * GB),
             "hdd": TierView(P["hdd"], 1, 1.5e8, 2000 * GB)}
    # neither fits 20 GB/s; only HDD fits 500 GB of capacity
    assert cheapest_tier(20e9, 500 * GB, tiers) == "hdd"
    # neither fits either dimension: the cheaper one
    assert cheapest_tier(20e9, 5000 * GB, tiers) == min(
        tiers, key=lambda t: P[t].hourly_cost(20e9, 5000 * GB))


def test_job_demand_derivations() -> None:
    assert job_demand({"capacity": 111 * GB}) == (10**9, 111 * GB, ("throughput",))
    assert job_demand({"throughput": 2e9}) == (2 * 10**9, int(2e9 * HOLD), ("capacity",))
    assert job_demand({"lambdas": 4, "capacity": 7}) == (int(4 * RATE), 7, ())
    t, c, _ = job_demand({"capacity": 1})
    assert t >= 1 and c == 1


def test_parse_profile() -> None:
    p = parse_profile("nvme:capacity=1.9TB,throughput=10Gbps,price=0.7,instance=i3x")
    assert (p.tier, p.capacity, p.throughput, p.price, p.instance) == (
        "nvme", 1_900_000_000_000, 1.25e9, 0.7, "i3x")
    assert parse_profile("hdd:price=1") == P["hdd"].__class__(
        "hdd", P["hdd"].instance, P["hdd"].capacity, P["hdd"].throughput, 1.0)
    for bad in ("tape:price=1", "dram:colour=red", "dram:capacity", "dram:capacity=0"):
        with pytest.raises(ValueError):
            parse_profile(bad)


# -- packing ------------------------------------------------------------------

def node(i: str, capacity: int = 100, throughput: float = 100, alloc_c: int = 0,
         alloc_t: int = 0, tier: str = "dram", price: float = 1.0) -> NodeLoad:
    return NodeLoad(i, tier, capacity, throughput, price, alloc_c, alloc_t)


def totals(slices) -> tuple[int, int]:
    return sum(s.throughput for s in slices), sum(s.capacity for s in slices)


def test_pack_fits_on_one_node() -> None:
    p = pack_allocation(30, 40, [node("a"), node("b")])
    assert p.complete and p.slices == (Slice("a", 30, 40),)
    assert weight_map(p.slices, 30, 40) == {"a": 1.0}


def test_pack_splits_across_nodes_in_the_jobs_ratio() -> None:
    p = pack_allocation(250, 50, [node("a"), node("b"), node("c")])  # throughput binds
    assert p.complete and totals(p.slices) == (250, 50)
    assert [(s.node, s.throughput, s.capacity) for s in p.slices] == [
        ("a", 100, 20), ("b", 100, 20), ("c", 50, 10)]
    assert weight_map(p.slices, 250, 50) == pytest.approx({"a": 0.4, "b": 0.4, "c": 0.2})


def test_pack_three_to_one() -> None:
    p = pack_allocation(400, 4, [node("a", throughput=300), node("b", throughput=300)])
    assert weight_map(p.slices, 400, 4) == pytest.approx({"a": 0.75, "b": 0.25})


def test_pack_fullest_first_in_the_binding_dimension() -> None:
    nodes = [node("a"), node("b", alloc_t=60), node("c", alloc_t=30), node("d", alloc_c=90)]
    p = pack_allocation(50, 10, nodes)  # throughput binds: b (60% full), then c
    assert [s.node for s in p.slices] == ["b", "c"]
    assert totals(p.slices) == (50, 10)
    q = pack_allocation(5, 50, nodes)  # capacity binds: d is fullest in capacity
    assert q.slices[0].node == "d" and q.slices[0].capacity == 10
    # a node full in the other dimension has no room at all
    assert all(s.node != "e" for s in pack_allocation(10, 10, [node("e", alloc_c=100),
                                                               node("f")]).slices)


def test_pack_shortfall_and_nodes_needed() -> None:
    p = pack_allocation(350, 35, [node("a", alloc_t=50), node("b")])
    assert not p.complete
    assert totals(p.slices) == (150, 15)
    assert (p.unmet_throughput, p.unmet_capacity) == (200, 20)
    prof = DEFAULT_PROFILES["dram"]
    assert nodes_needed(2.5e9, 1, prof) == 3
    assert nodes_needed(2e9, 1, prof) == 2
    assert nodes_needed(1, 90 * GB, prof) == 2
    assert nodes_needed(0, 0, prof) == 0
    assert pack_allocation(5, 5, []).unmet_throughput == 5


def test_spread_overcommits_in_proportion_to_size() -> None:
    p = spread_allocation(30001, 3001, [node("a", throughput=200), node("b", throughput=100)])
    assert totals(p.slices) == (30001, 3001)  # everything placed, exactly
    assert weight_map(p.slices, 30001, 3001) == pytest.approx({"a": 2 / 3, "b": 1 / 3}, abs=1e-3)


def test_ledger_many_jobs_and_exact_return() -> None:
    rng = random.Random(5)
    ledger = AllocationLedger()
    for i in range(20):
        ledger.add_node(node(f"n{i:02d}", capacity=rng.randint(50, 500) * 10**6,
                             throughput=rng.randint(1, 10) * 10**8))
    empty = {n.id: (0, 0) for n in ledger.nodes.values()}
    demands = {}
    for j in range(60):
        t, c = rng.randint(10**6, 6 * 10**8), rng.randint(10**6, 4 * 10**8)
        p = pack_allocation(t, c, ledger.tier_nodes("dram"))
        ledger.take(f"job{j}", p.slices)
        demands[f"job{j}"] = (t, c, p)
        for n in ledger.nodes.values():  # packing never overfills a node
            assert n.allocated_throughput <= n.throughput and n.allocated_capacity <= n.capacity
        if p.complete:
            assert totals(p.slices) == (t, c)
            assert sum(weight_map(p.slices, t, c).values()) == pytest.approx(1.0)
    assert any(not p.complete for _, _, p in demands.values())  # the cluster filled up
    snapshot = {n.id: (n.allocated_throughput, n.allocated_capacity) for n in ledger.nodes.values()}
    # one job leaves and comes back: every node is exactly as before
    t, c, p = demands["job7"]
    assert ledger.release("job7") == list(p.slices)
    ledger.take("job7", p.slices)
    assert snapshot == {n.id: (n.allocated_throughput, n.allocated_capacity)
                        for n in ledger.nodes.values()}
    for job in rng.sample(sorted(demands), len(demands)):
        ledger.release(job)
    assert {n.id: (n.allocated_throughput, n.allocated_capacity)
            for n in ledger.nodes.values()} == empty
    assert ledger.release("job7") == []  # twice is harmless


def test_ledger_view_and_reserved_nodes() -> None:
    ledger = AllocationLedger()
    ledger.add_node(node("a", tier="nvme", alloc_t=40, alloc_c=10))
    ledger.add_node(node("b", tier="nvme"))
    ledger.set_reserved("b", "job1")
    view = ledger.view(DEFAULT_PROFILES, {"dram": 2})
    assert view["nvme"].nodes == 1 and view["nvme"].spare_throughput == 60
    assert view["dram"].nodes == 0 and view["dram"].can_add == 2 and view["dram"].available
    assert ledger.view(DEFAULT_PROFILES, {}, job="job1")["nvme"].nodes == 2
    assert [n.id for n in ledger.tier_nodes("nvme")] == ["a"]
    assert [n.id for n in ledger.tier_nodes("nvme", "job1")] == ["a", "b"]
    ledger.remove_node("a")
    assert ledger.view(DEFAULT_PROFILES, {})["nvme"].nodes == 0


# -- cost ---------------------------------------------------------------------------

def test_cost_accounting() -> None:
    nodes = {"d": node("d", capacity=60 * GB, throughput=1e9, price=0.532),
             "n": node("n", capacity=111 * GB, throughput=1e9, price=0.624, tier="nvme")}
    slices = [Slice("d", 5 * 10**8, 6 * GB), Slice("n", 10**8, 111 * GB)]
    rates = allocation_rates(slices, nodes)
    assert rates["dram"].nodes == pytest.approx(0.5)  # throughput binds: half the node
    assert rates["nvme"].nodes == pytest.approx(1.0)  # capacity binds: the whole node
    report = usage_report(rates, 3600)
    assert report["tiers"]["dram"]["cost"] == pytest.approx(0.266)
    assert report["tiers"]["nvme"]["cost"] == pytest.approx(0.624)
    assert report["cost"] == pytest.approx(0.89)
    assert report["node_seconds"] == pytest.approx(1.5 * 3600)
    assert report["tiers"]["dram"]["capacity_seconds"] == pytest.approx(6 * GB * 3600)
    assert report["tiers"]["dram"]["throughput_seconds"] == pytest.approx(5e8 * 3600)
    # an overcommitted job pays for at most the whole node
    over = allocation_rates([Slice("d", 10**10, 600 * GB)], nodes)
    assert over["dram"].nodes == 1.0 and over["dram"].dollars_per_hour == pytest.approx(0.532)


def test_ledger_view_stays_consistent_under_random_changes() -> None:
    rng = random.Random(9)
    ledger = AllocationLedger()
    ids = [f"{t}-{i}" for t in ("dram", "nvme") for i in range(8)]
    for i in ids:
        ledger.add_node(node(i, capacity=1000, throughput=1000, tier=i.split("-")[0]))
    for step in range(400):
        op = rng.random()
        if op < 0.4:
            t, c = rng.randint(1, 900), rng.randint(1, 900)
            tier = rng.choice(("dram", "nvme"))
            p = pack_allocation(t, c, ledger.tier_nodes(tier))
            ledger.take(f"j{step}", p.slices + spread_allocation(
                p.unmet_throughput, p.unmet_capacity, ledger.tier_nodes(tier)).slices)
        elif op < 0.7 and ledger.jobs:
            ledger.release(rng.choice(sorted(ledger.jobs)))
        elif op < 0.8:
            ledger.set_reserved(rng.choice(ids), rng.choice([None, "jx"]))
        elif op < 0.9:
            ledger.set_capacity(rng.choice(ids), rng.randint(500, 1500))
        else:
            gone = ledger.remove_node(rng.choice(ids))
            if gone is not None:
                gone.reserved_for = None
                gone.allocated_capacity = gone.allocated_throughput = 0
                for job in ledger.jobs.values():  # as if its slices were never placed
                    job[:] = [s for s in job if s.node != gone.id]
                ledger.add_node(gone)
        for job in (None, "jx"):
            view = ledger.view(DEFAULT_PROFILES, {}, job=job)
            for tier in ("dram", "nvme"):
                mine = [n for n in ledger.nodes.values() if n.tier == tier
                        and n.reserved_for in (None, job)]
                assert view[tier].nodes == len(mine)
                assert view[tier].spare_throughput == sum(max(0, n.spare_throughput) for n in mine)
                assert view[tier].spare_capacity == sum(max(0, n.spare_capacity) for n in mine)
