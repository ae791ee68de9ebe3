"""Autoscaling decisions, row by row, without servers (``controller/autoscale.py``)."""

from __future__ import annotations

import dataclasses

import pytest

from pocket.controller.autoscale import (METADATA, Band, ClusterObservation, MetadataObservation,
                                         NodeObservation,
                                         ScalingPolicy, TierHistory, decide_scaling, parse_band,
                                         parse_tier_nodes, tier_utilisation, update_history)

MiB = 1 << 20
RATE = 100e6  # bytes/s per node


def node(i: int, used: float = 0.0, *, cpu: float = 0.0, net: float = 0.0, alloc: float = 0.0,
         state: str = "active", removable: bool = True, empty_for: float = 0.0,
         tier: str = "dram") -> NodeObservation:
    """A 100 MiB, 100 MB/s node; ``used`` and ``alloc`` are fractions of it."""
    return NodeObservation(f"{tier}-{i}", tier, 100 * MiB, RATE, used=int(used * 100 * MiB),
                           cpu=cpu, net=net * RATE, allocated_throughput=int(alloc * RATE),
                           allocated_capacity=int(alloc * 100 * MiB), state=state,
                           removable=removable, empty_for=empty_for)


def observe(nodes, now: float = 100.0, *, can_add: int = 8, starting: int = 0,
            history=None) -> ClusterObservation:
    return ClusterObservation(now, tuple(nodes), {"dram": starting} if starting else {},
                              {"dram": can_add}, history or {})


LONG_BELOW = {"dram": TierHistory(below_since=0.0)}  # below band since long ago
# Uniform 60-80% bands (the default).
POLICY = ScalingPolicy(bands={}, min_nodes={"dram": 1})


def actions(decisions) -> list[tuple]:
    return [(d.action, d.count if d.action == "add" else d.node) for d in decisions]


def test_utilisation_per_resource() -> None:
    util = tier_utilisation([node(0, 0.5, cpu=0.2, net=0.4, alloc=0.1), node(1, 0.3, cpu=0.4)])
    assert util["bytes"] == pytest.approx(0.4) and util["cpu"] == pytest.approx(0.3)
    assert util["net"] == pytest.approx(0.2) and util["capacity"] == pytest.approx(0.05, rel=1e-3)


@pytest.mark.parametrize("resource", ["bytes", "cpu", "net", "throughput", "capacity"])
def test_scale_out_above_band_on_each_resource(resource) -> None:
    kw = {"bytes": {"used": 0.9}, "cpu": {"cpu": 0.9}, "net": {"net": 0.9},
          "throughput": {"alloc": 0.9}, "capacity": {"alloc": 0.9}}[resource]
    d = decide_scaling(observe([node(0, **kw), node(1, **kw)]), POLICY)
    assert [x.action for x in d] == ["add"]
    assert resource in d[0].reason and d[0].utilisation[resource] == pytest.approx(0.9, abs=0.01)


def test_scale_out_count_brings_worst_resource_to_band_middle() -> None:
    # 2 nodes at 150% bytes = 3 node-loads; at 70% per node that needs ceil(3/0.7) = 5 nodes
    d = decide_scaling(observe([node(0, 1.5), node(1, 1.5)]), POLICY)
    assert actions(d) == [("add", 3)]


def test_within_band_nothing() -> None:
    assert decide_scaling(observe([node(0, 0.7), node(1, 0.65, cpu=0.75)],
                                  history=LONG_BELOW), POLICY) == []


def test_scale_in_below_band_drains_removable_empty_node_first() -> None:
    nodes = [node(0, 0.2, removable=False), node(1, 0.1), node(2, 0.0), node(3, 0.05)]
    d = decide_scaling(observe(nodes, history=LONG_BELOW), POLICY)
    # total bytes 0.35 node: the fixed node stays; the rest drain emptiest first
    assert actions(d) == [("drain", "dram-2"), ("drain", "dram-3"), ("drain", "dram-1")]
    assert all("below band" in x.reason for x in d)


def test_scale_in_keeps_minimum_and_never_the_last_node() -> None:
    nodes = [node(i) for i in range(4)]
    d = decide_scaling(observe(nodes, history=LONG_BELOW), ScalingPolicy(min_nodes={"dram": 3}))
    assert len(d) == 1
    assert decide_scaling(observe([node(0)], history=LONG_BELOW), ScalingPolicy()) == []


def test_scale_in_hysteresis_stops_at_band_top() -> None:
    # 3 nodes at 50% = 1.5 node-loads: dropping one leaves 75% (ok), dropping two 150% (no)
    d = decide_scaling(observe([node(i, 0.5) for i in range(3)], history=LONG_BELOW),
                       ScalingPolicy(bands={"bytes": Band(0.6, 0.8)}))
    assert [x.action for x in d] == ["drain"]


def test_nodes_with_allocation_or_not_removable_are_not_drained() -> None:
    nodes = [node(0, removable=False), node(1, alloc=0.01), node(2, removable=False)]
    assert decide_scaling(observe(nodes, history=LONG_BELOW), POLICY) == []


def test_max_nodes_and_provider_room_respected() -> None:
    hot = [node(0, 1.5), node(1, 1.5)]
    d = decide_scaling(observe(hot), ScalingPolicy(max_nodes={"dram": 3}))
    assert actions(d) == [("add", 1)]
    assert decide_scaling(observe(hot), ScalingPolicy(max_nodes={"dram": 2})) == []
    assert actions(decide_scaling(observe(hot, can_add=2), POLICY)) == [("add", 2)]
    assert decide_scaling(observe(hot, can_add=0), POLICY) == []


def test_minimum_is_filled() -> None:
    d = decide_scaling(observe([]), ScalingPolicy(min_nodes={"dram": 2}))
    assert actions(d) == [("add", 2)] and "minimum" in d[0].reason


def test_no_scale_out_while_nodes_start_or_within_cooldown() -> None:
    hot = [node(0, 0.95)]
    assert decide_scaling(observe(hot, starting=1), POLICY) == []
    recent = {"dram": TierHistory(last_out=99.0)}
    assert decide_scaling(observe(hot, now=100.0, history=recent), POLICY) == []
    assert decide_scaling(observe(hot, now=101.5, history=recent), POLICY)


def test_scale_in_waits_for_delay_and_cooldown() -> None:
    cold = [node(0), node(1)]
    assert decide_scaling(observe(cold, history={"dram": TierHistory(below_since=99.0)}),
                          POLICY) == []
    assert decide_scaling(observe(cold, history={"dram": TierHistory(
        below_since=0.0, last_out=98.0)}), POLICY) == []
    assert decide_scaling(observe(cold, history={"dram": TierHistory(below_since=0.0)}), POLICY)


def test_draining_node_taken_back_before_adding() -> None:
    nodes = [node(0, 0.95), node(1, 0.5, state="draining")]
    assert actions(decide_scaling(observe(nodes), POLICY)) == [("undrain", "dram-1")]


def test_drained_node_removed_only_when_empty_for_a_while() -> None:
    base = [node(0, 0.7)]
    assert decide_scaling(observe(base + [node(1, 0.01, state="draining", empty_for=9)]),
                          POLICY) == []
    assert decide_scaling(observe(base + [node(1, state="draining", empty_for=0.5)]),
                          POLICY) == []
    d = decide_scaling(observe(base + [node(1, state="draining", empty_for=1.0)]), POLICY)
    assert actions(d) == [("remove", "dram-1")]


def test_migrated_node_removed_at_its_first_empty_heartbeat() -> None:
    base = node(0, 0.3, removable=False)
    moved = dataclasses.replace(node(1, state="draining"), confirmed_empty=True)
    assert actions(decide_scaling(observe([base, moved]), POLICY)) == [("remove", "dram-1")]
    assert decide_scaling(observe([base, moved]), POLICY)[0].reason == "drained, objects moved"
    # still holding bytes (a read lease, say): never, whatever the metadata servers said
    holding = dataclasses.replace(node(1, 0.1, state="draining"), confirmed_empty=True)
    assert actions(decide_scaling(observe([base, holding]), POLICY)) == []


def test_band_per_tier_and_resource() -> None:
    policy = ScalingPolicy(bands={"dram:bytes": Band(0.2, 0.3), "cpu": Band(0.1, 0.5)})
    assert policy.band("dram", "bytes") == Band(0.2, 0.3)
    assert policy.band("nvme", "bytes") == Band(0.6, 0.8)
    assert policy.band("nvme", "cpu") == Band(0.1, 0.5)
    assert [x.action for x in decide_scaling(observe([node(0, 0.4)]), policy)] == ["add"]


def test_parse_flags() -> None:
    assert parse_band("bytes=50-70") == ("bytes", Band(0.5, 0.7))
    assert parse_band("nvme:cpu=0.4-0.9") == ("nvme:cpu", Band(0.4, 0.9))
    assert parse_tier_nodes("dram=1:8") == ("dram", 1, 8)
    assert parse_tier_nodes("nvme=:4") == ("nvme", 0, 4)
    for bad in ("disk=1-2", "bytes=80-60", "bytes=70"):
        with pytest.raises(ValueError):
            parse_band(bad)


def run(trace, policy=POLICY, interval=1.0):
    """Feed a per-tick bytes-utilisation trace to decide/update like the monitor loop does,
    with nodes appearing at once on add and leaving at once on drain; returns node counts."""
    history: dict = {}
    count, counts, changes = 2, [], 0
    for tick, util in enumerate(trace):
        nodes = [node(i, util * 2 / count) for i in range(count)]  # 2 node-loads × util
        obs = observe(nodes, now=tick * interval, history=history)
        d = decide_scaling(obs, policy)
        update_history(history, obs, policy, d)
        before = count
        for x in d:
            count += x.count if x.action == "add" else -1 if x.action == "drain" else 0
        changes += count != before
        counts.append(count)
    return counts, changes


def test_no_flapping_on_oscillating_load() -> None:
    # load swings between 85% and 55% of two nodes every second for a minute
    counts, changes = run([0.85 if t % 2 else 0.55 for t in range(60)])
    assert changes <= 1  # one scale-out, then the band holds
    assert counts[-1] == 3


def test_follows_a_burst_and_returns_to_minimum() -> None:
    trace = [0.3] * 5 + [2.0] * 10 + [0.05] * 10
    counts, changes = run(trace)
    assert max(counts) >= 5
    assert counts[-1] == 1  # back to the minimum
    assert changes == 3  # in (idle), out (burst), in (after it)


def test_steering_gives_new_nodes_the_larger_weight() -> None:
    from pocket.controller.autoscale import drain_weights, node_headroom, steer_weights
    full, half = node(0, 0.9), node(1, 0.5)
    room = {n.id: node_headroom(n) for n in (full, half)}
    assert room == {"dram-0": pytest.approx(0.1), "dram-1": pytest.approx(0.5)}
    w = steer_weights({"dram-0": 0.5, "dram-1": 0.5}, {"dram-9": 1.0}, room)
    assert sum(w.values()) == pytest.approx(1.0)
    assert w["dram-9"] > w["dram-1"] > w["dram-0"]
    assert w["dram-9"] == pytest.approx(1 / 1.6)
    assert node_headroom(node(2, 1.2)) == pytest.approx(0.02)  # never zero
    assert drain_weights({"a": 0.25, "b": 0.75}, {"b"}, {}) == {"a": 1.0}
    assert drain_weights({"b": 1.0}, {"b"}, {"a": 0.2, "c": 0.6}) == \
        {"a": pytest.approx(0.25), "c": pytest.approx(0.75)}


# -- metadata servers ------------------------------------------------------------------
MD_POLICY = ScalingPolicy(min_nodes={"dram": 1, METADATA: 1}, jobs_per_metadata=4)


def md(i: int, *, cpu: float = 0.0, jobs: int = 0, holds: int | None = None,
       state: str = "active", removable: bool = True, empty_for: float = 0.0
       ) -> MetadataObservation:
    return MetadataObservation(f"md-{i}", cpu, jobs, jobs if holds is None else holds, state,
                               removable, empty_for)


def md_observe(servers, now: float = 100.0, *, can_add: int = 4, starting: int = 0,
               history=None) -> ClusterObservation:
    return ClusterObservation(now, (node(0, 0.7, removable=False),),
                              {METADATA: starting} if starting else {},
                              {"dram": 8, METADATA: can_add}, history or {},
                              metadata=tuple(servers))


def md_actions(decisions) -> list[tuple]:
    return actions([d for d in decisions if d.tier == METADATA])


@pytest.mark.parametrize("kw, resource", [({"cpu": 0.9}, "cpu"), ({"jobs": 4}, "jobs")])
def test_metadata_scale_out_on_cpu_or_jobs(kw, resource) -> None:
    d = [x for x in decide_scaling(md_observe([md(0, removable=False, **kw)]), MD_POLICY)
         if x.tier == METADATA]
    assert md_actions(d) == [("add", 1)] and resource in d[0].reason
    # 10 jobs on 1 server sized for 4: 250%; at the band middle (70%) that is 4 servers
    assert md_actions(decide_scaling(md_observe([md(0, jobs=10)]), MD_POLICY)) == [("add", 3)]


def test_metadata_no_scale_out_within_band_while_starting_or_at_the_cap() -> None:
    assert md_actions(decide_scaling(md_observe([md(0, jobs=3, cpu=0.5)]), MD_POLICY)) == []
    assert md_actions(decide_scaling(md_observe([md(0, jobs=4)], starting=1), MD_POLICY)) == []
    assert md_actions(decide_scaling(md_observe([md(0, jobs=4)], can_add=0), MD_POLICY)) == []


def test_metadata_scale_in_only_an_idle_provider_server_holding_no_namespace() -> None:
    hist = {METADATA: TierHistory(below_since=0.0), "dram": TierHistory()}
    base = md(0, removable=False)
    # holds a deregistered job's persisted objects: never
    assert md_actions(decide_scaling(md_observe([base, md(1, holds=1)], history=hist),
                                     MD_POLICY)) == []
    assert md_actions(decide_scaling(md_observe([base, md(1)], history=hist), MD_POLICY)) == \
        [("drain", "md-1")]
    # not one the provider started, or the last one: never
    assert md_actions(decide_scaling(md_observe([base, md(1, removable=False)], history=hist),
                                     MD_POLICY)) == []
    assert md_actions(decide_scaling(md_observe([md(1)], history=hist), MD_POLICY)) == []
    # not before the delay
    fresh = {METADATA: TierHistory(below_since=99.0)}
    assert md_actions(decide_scaling(md_observe([base, md(1)], history=fresh), MD_POLICY)) == []


def test_metadata_drained_server_removed_when_idle_or_taken_back_under_load() -> None:
    base = md(0, removable=False)
    assert md_actions(decide_scaling(md_observe([base, md(1, state="draining", empty_for=1.0)]),
                                     MD_POLICY)) == [("remove", "md-1")]
    assert md_actions(decide_scaling(md_observe([base, md(1, state="draining", holds=1,
                                                          empty_for=5.0)]), MD_POLICY)) == []
    assert md_actions(decide_scaling(md_observe([md(0, jobs=4, removable=False),
                                                 md(1, state="draining")]), MD_POLICY)) == \
        [("undrain", "md-1")]


def test_metadata_history_no_flapping() -> None:
    history: dict = {}
    added = 0
    for t in range(60):  # one server's jobs swing 5 <-> 2 (125% <-> 50% of 4) every second
        servers = [md(0, jobs=5 if t % 2 else 2, removable=False)] + \
            [md(i + 1, jobs=0) for i in range(added)]
        obs = md_observe(servers, now=float(t), history=history)
        d = decide_scaling(obs, MD_POLICY)
        update_history(history, obs, MD_POLICY, d)
        added += sum(x.count for x in d if x.tier == METADATA and x.action == "add")
        assert not [x for x in d if x.tier == METADATA and x.action == "drain"]
    assert added == 1


def test_default_bands_are_60_80_for_every_resource() -> None:
    policy = ScalingPolicy(min_nodes={"dram": 1})
    for resource in ("cpu", "net", "bytes", "throughput", "capacity"):
        assert policy.band("dram", resource) == Band(0.6, 0.8)
    assert actions(decide_scaling(observe([node(0, alloc=0.85), node(1, alloc=0.85)]),
                                  policy)) == [("add", 1)]


def test_allocation_bands_up_to_100_percent_leave_measured_load_at_80() -> None:
    policy = ScalingPolicy(bands={"throughput": Band(0.6, 1.0), "capacity": Band(0.6, 1.0)},
                           min_nodes={"dram": 1})
    assert decide_scaling(observe([node(0, alloc=0.95), node(1, alloc=0.95)]), policy) == []
    assert actions(decide_scaling(observe([node(0, alloc=1.2), node(1, alloc=1.2)]),
                                  policy)) == [("add", 1)]  # 2.4 node-loads at 0.8 each: 3
    assert actions(decide_scaling(observe([node(0, net=0.9), node(1, net=0.9)]),
                                  policy)) == [("add", 1)]


def test_scale_in_at_once_after_a_job_left() -> None:
    nodes = [node(0, 0.1, removable=False), node(1), node(2)]
    # a node was just added (cool-down) and the tier only now fell below band ...
    hist = {"dram": TierHistory(last_out=95.0, below_since=100.0)}
    assert decide_scaling(observe(nodes, history=hist), POLICY) == []
    # ... but a job left since: its nodes drain now
    hist = {"dram": TierHistory(last_out=95.0, below_since=100.0, job_left=99.0)}
    assert actions(decide_scaling(observe(nodes, history=hist), POLICY)) == \
        [("drain", "dram-1"), ("drain", "dram-2")]
    # measured load still counts at its recent peak: 1.5 node-loads of bytes keep two nodes
    hist = {"dram": TierHistory(last_out=95.0, below_since=100.0, job_left=99.0,
                                recent=[(99.5, {"bytes": 1.5 * 100 * MiB})])}
    assert actions(decide_scaling(observe(nodes, history=hist), POLICY)) == [("drain", "dram-1")]
