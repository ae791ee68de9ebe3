"""Policy as plain functions: allocator, placement, weight maps."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pocket.controller.policy import (expired, job_slug, least_loaded, normalise_hints,
                                      weights_by_free_capacity)
from pocket.errors import CapacityExceeded
from pocket.metadata.placement import WeightedChooser, plan_pieces, split_by_weight
from pocket.storage.allocator import BlockAllocator


def test_allocator_first_fit_and_coalescing() -> None:
    a = BlockAllocator(100)
    r1 = a.allocate(10)
    r2 = a.allocate(20)
    r3 = a.allocate(30)
    assert r1 == [(0, 10)] and r2 == [(10, 20)] and r3 == [(30, 30)]
    assert a.free_blocks == 40
    a.free(10, 20)
    assert a.free_runs == [(10, 20), (60, 40)]
    a.free(0, 10)
    assert a.free_runs == [(0, 30), (60, 40)]
    a.free(30, 30)
    assert a.free_runs == [(0, 100)] and a.free_blocks == 100


def test_allocator_fragmented_request_uses_largest_runs() -> None:
    a = BlockAllocator(10)
    runs = [a.allocate(1)[0] for _ in range(10)]
    for start, n in runs[::2]:
        a.free(start, n)
    got = a.allocate(3)
    assert sum(n for _, n in got) == 3 and len(got) == 3
    assert a.free_blocks == 2


def test_allocator_full_raises_and_takes_nothing() -> None:
    a = BlockAllocator(10)
    a.allocate(8)
    with pytest.raises(CapacityExceeded):
        a.allocate(3)
    assert a.free_blocks == 2


def test_allocator_rejects_double_free_and_out_of_range() -> None:
    a = BlockAllocator(10)
    (start, n), = a.allocate(4)
    a.free(start, n)
    with pytest.raises(ValueError):
        a.free(start, n)
    with pytest.raises(ValueError):
        a.free(8, 5)


def test_allocator_random_sequences_keep_invariants() -> None:
    rng = random.Random(1)
    a = BlockAllocator(1000)
    live = []
    for _ in range(3000):
        if live and rng.random() < 0.45:
            for start, n in live.pop(rng.randrange(len(live))):
                a.free(start, n)
        else:
            try:
                live.append(a.allocate(rng.randint(1, 60)))
            except CapacityExceeded:
                pass
        used = sum(n for runs in live for _, n in runs)
        assert a.used_blocks == used
        free = a.free_runs
        assert all(s1 + n1 < s2 for (s1, n1), (s2, _) in zip(free, free[1:]))  # merged, sorted
    blocks = sorted(b for runs in live for s, n in runs for b in range(s, s + n))
    assert len(blocks) == len(set(blocks))  # no block handed out twice


def test_weighted_chooser_follows_weights() -> None:
    chooser = WeightedChooser({"a": 0.75, "b": 0.25})
    picks = Counter(chooser.choose() for _ in range(1000))
    assert picks == {"a": 750, "b": 250}
    assert chooser.choose(exclude={"a"}) == "b"
    with pytest.raises(LookupError):
        chooser.choose(exclude={"a", "b"})


def test_split_by_weight() -> None:
    pieces = split_by_weight(64 << 20, {"a": 0.5, "b": 0.5}, 4096, 1 << 20)
    assert sum(n for _, n in pieces) == 64 << 20 and {n for n, _ in pieces} == {"a", "b"}
    pieces = split_by_weight(10 << 20, {"a": 0.9, "b": 0.1}, 4096, 4 << 20)
    assert pieces == [("a", 10 << 20)]  # b's share is below the minimum piece


def test_plan_pieces_small_and_large() -> None:
    chooser = WeightedChooser({"a": 1, "b": 1})
    assert [n for n, _ in (plan_pieces(100, chooser)[0] for _ in range(4))] == ["a", "b", "a", "b"]
    large = plan_pieces(32 << 20, chooser, split_size=8 << 20)
    assert len(large) == 2 and sum(n for _, n in large) == 32 << 20
    only_b = plan_pieces(32 << 20, chooser, split_size=8 << 20, exclude={"a"})
    assert only_b == [("b", 32 << 20)]


def test_weights_by_free_capacity() -> None:
    assert weights_by_free_capacity({"a": 300, "b": 100}) == {"a": 0.75, "b": 0.25}
    assert weights_by_free_capacity({"a": 0, "b": 50}) == {"b": 1.0}
    assert weights_by_free_capacity({"a": 0, "b": 0}) == {"a": 0.5, "b": 0.5}
    assert weights_by_free_capacity({}) == {}


def test_small_controller_helpers() -> None:
    assert least_loaded(["m1", "m2"], {"m1": 3, "m2": 1}) == "m2"
    assert least_loaded(["m1", "m2"], {}) == "m1"
    assert expired({"a": 0.0, "b": 9.0}, now=10.0, timeout=5.0) == ["a"]
    assert normalise_hints({"lambdas": 8, "capacity": "1GiB", "throughput": "10Gbps",
                            "latency_sensitive": 1}) == {
        "lambdas": 8, "capacity": 1 << 30, "throughput": 1.25e9, "latency_sensitive": True}
    with pytest.raises(ValueError):
        normalise_hints({"lambdas": 0})
    with pytest.raises(ValueError):
        normalise_hints({"colour": "blue"})
    assert job_slug("My Sort!") == "my-sort"
