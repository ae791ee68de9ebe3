"""Rightsizing: the cost table by hint level, and how fast planning is.

    python bench/planner.py                 # both tables
    python bench/planner.py --json out.json

1. **Cost by hint level.**  For three workloads (hint values below and in
   docs/POLICY.md), the $/hour of the allocation our planner gives at four
   hint levels — none; lambdas; + latency_sensitive=False; + capacity and
   peak throughput — normalised to the no-hint allocation, beside the
   numbers of the original Pocket paper (OSDI 2018, Fig. 9).  The cluster
   is the default node profiles (AWS on-demand, docs/POLICY.md) with room
   everywhere, so only the policy decides.
2. **Planning speed.**  ``plan_allocation`` + ``pack_allocation`` calls per
   second against 100 nodes (four tiers) carrying 50 live jobs; once on a
   fixed state, once with churn (each call also takes the allocation into
   the ledger and releases the oldest job's, so 50 stay live).  Pure Python,
   one core; the target is ≥ 10,000 calls/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections import deque

from pocket.controller.planner import (DEFAULT_CONFIG, DEFAULT_PROFILES, GB, AllocationLedger,
                                       NodeLoad, TierView, pack_allocation, plan_allocation)

TIERS = ("dram", "nvme", "ssd", "hdd")

#: Hint values per workload (bytes, bytes/s).  Latency: none of the three needs DRAM latency
#: for its large objects (objects ≤ 64 KiB live in the metadata server whatever the tier).
WORKLOADS = {
    "sort": {"what": "100 GB sort, 250 lambdas, 7.5 GB/s peak shuffle",
             "lambdas": 250, "capacity": 100 * GB, "throughput": 7.5 * GB,
             "paper": (1.0, 0.351, 0.085, 0.050)},
    "video analytics": {"what": "frames of a video pipeline, 360 lambdas, 6 GB, 2.5 GB/s",
                        "lambdas": 360, "capacity": 6 * GB, "throughput": 2.5 * GB,
                        "paper": (1.0, 0.541, 0.117, 0.015)},
    "distributed compile": {"what": "LLVM object files (gg), 535 lambdas, 2 GB, 0.6 GB/s",
                            "lambdas": 535, "capacity": 2 * GB, "throughput": 0.6 * GB,
                            "paper": (1.0, 0.806, 0.194, 0.013)},
}
LEVELS = ("no hints", "+ lambdas", "+ latency_sensitive=False", "+ capacity, throughput")


def level_hints(w: dict) -> list[dict]:
    return [{},
            {"lambdas": w["lambdas"]},
            {"lambdas": w["lambdas"], "latency_sensitive": False},
            {"lambdas": w["lambdas"], "latency_sensitive": False, "capacity": w["capacity"],
             "throughput": w["throughput"]}]


def unbounded_cluster() -> dict[str, TierView]:
    """Every tier of the default profiles with plenty of room."""
    return {t: TierView(p, 10_000, 10_000 * p.throughput, 10_000 * p.capacity)
            for t, p in DEFAULT_PROFILES.items()}


def cost_table() -> list[dict]:
    cluster = unbounded_cluster()
    rows = []
    for name, w in WORKLOADS.items():
        allocs = [plan_allocation(h, cluster) for h in level_hints(w)]
        base = allocs[0].hourly_cost
        rows.append({"workload": name, "what": w["what"],
                     "levels": [{"level": LEVELS[i], "tier": a.tier,
                                 "throughput": a.throughput, "capacity": a.capacity,
                                 "nodes": a.nodes, "dollars_per_hour": a.hourly_cost,
                                 "normalized": a.hourly_cost / base, "paper": w["paper"][i]}
                                for i, a in enumerate(allocs)]})
    return rows


def print_cost_table(rows: list[dict]) -> bool:
    print("Normalized cost ($/hour of the allocation ÷ the no-hint allocation's) by hint level")
    print("profiles: " + "; ".join(f"{t} {p.instance} {p.capacity / GB:g} GB "
                                     f"{p.throughput * 8 / 1e9:g} Gb/s ${p.price}/h"
                                     for t, p in DEFAULT_PROFILES.items()))
    c = DEFAULT_CONFIG
    print(f"planner: {c.lambda_rate * 8 / 1e6:g} Mb/s per lambda; no-hint default "
          f"{c.default_throughput * 8 / 1e9:g} Gb/s; hold time {c.hold_time:g} s\n")
    header = f"{'workload':<20} {'hint level':<27} {'tier':<5} {'nodes':>7} {'$/hour':>8} " \
             f"{'ours':>6} {'paper':>6}"
    print(header)
    print("-" * len(header))
    trend_holds = True
    for row in rows:
        prev = None
        for i, lv in enumerate(row["levels"]):
            print(f"{row['workload'] if i == 0 else '':<20} {lv['level']:<27} {lv['tier']:<5} "
                  f"{lv['nodes']:>7.2f} {lv['dollars_per_hour']:>8.2f} {lv['normalized']:>6.3f} "
                  f"{lv['paper']:>6.3f}")
            if prev is not None and not lv["normalized"] < prev:
                trend_holds = False
            prev = lv["normalized"]
        print(f"{'':<20} ({row['what']})")
    print(f"\ntrend (each added hint cuts cost): {'holds' if trend_holds else 'DOES NOT HOLD'}")
    return trend_holds


# -- planning speed ------------------------------------------------------------------

def speed_cluster(rng: random.Random) -> AllocationLedger:
    ledger = AllocationLedger()
    counts = {"dram": 40, "nvme": 30, "ssd": 20, "hdd": 10}
    for tier, n in counts.items():
        p = DEFAULT_PROFILES[tier]
        for i in range(n):
            ledger.add_node(NodeLoad(f"{tier}-{i:03d}", tier, p.capacity, p.throughput, p.price))
    return ledger


def random_hints(rng: random.Random) -> dict:
    """A mix of hint combinations (every job gives at least one size hint), sized so that
    50 of them mostly fit in the 100 nodes."""
    h: dict = {}
    if rng.random() < 0.7:
        h["lambdas"] = rng.randint(1, 20)
    if rng.random() < 0.7 or not h:
        h["capacity"] = rng.randint(1, 60) * GB
    if rng.random() < 0.5:
        h["throughput"] = rng.randint(1, 20) * 1e8
    if rng.random() < 0.8:
        h["latency_sensitive"] = rng.random() < 0.3
    return h


def plan_and_pack(ledger: AllocationLedger, hints: dict, can_add: dict):
    alloc = plan_allocation(hints, ledger.view(DEFAULT_PROFILES, can_add))
    return alloc, pack_allocation(alloc.throughput, alloc.capacity, ledger.tier_nodes(alloc.tier))


def speed(seconds: float, churn: bool, seed: int = 1) -> dict:
    rng = random.Random(seed)
    ledger = speed_cluster(rng)
    can_add = {t: 0 for t in TIERS}
    live: deque = deque()
    for j in range(50):
        _, packing = plan_and_pack(ledger, random_hints(rng), can_add)
        ledger.take(f"job{j}", packing.slices)
        live.append(f"job{j}")
    pool = [random_hints(rng) for _ in range(1000)]
    calls = 0
    complete = 0
    next_id = 50
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for hints in pool[calls % 1000:] if calls % 1000 else pool:
            alloc, packing = plan_and_pack(ledger, hints, can_add)
            complete += packing.complete
            if churn:
                ledger.take(f"job{next_id}", packing.slices)
                live.append(f"job{next_id}")
                next_id += 1
                ledger.release(live.popleft())
            calls += 1
            if calls % 256 == 0 and time.perf_counter() > deadline:
                break
        else:
            continue
        break
    elapsed = time.perf_counter() - start
    return {"churn": churn, "calls": calls, "seconds": elapsed, "calls_per_s": calls / elapsed,
            "us_per_call": elapsed / calls * 1e6, "complete_fraction": complete / calls,
            "nodes": len(ledger.nodes), "live_jobs": len(live)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per speed run (default 2)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    rows = cost_table()
    trend = print_cost_table(rows)
    print("\nPlanning speed: plan_allocation + pack_allocation, 100 nodes (40 dram, 30 nvme, "
          "20 ssd, 10 hdd), 50 live jobs")
    runs = [speed(args.seconds, churn=False), speed(args.seconds, churn=True)]
    for r in runs:
        mode = "with churn (take + release)" if r["churn"] else "fixed state"
        print(f"  {mode:<28} {r['calls_per_s']:>9,.0f} calls/s  ({r['us_per_call']:.1f} µs/call,"
              f" {r['complete_fraction']:.0%} fit without new nodes)")
    ok = min(r["calls_per_s"] for r in runs) >= 10_000
    print(f"  target ≥ 10,000 calls/s: {'met' if ok else 'NOT MET'}  "
          f"(Python {platform.python_version()}, {platform.machine()})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cost_table": rows, "trend_holds": trend, "speed": runs,
                       "python": platform.python_version()}, f, indent=2)
    return 0 if trend and ok else 1


if __name__ == "__main__":
    sys.exit(main())
