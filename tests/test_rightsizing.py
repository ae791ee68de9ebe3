"""Rightsizing with real servers: tier choice, weight maps followed, spill, providers, cost."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

import pocket
from pocket.local import LocalCluster

from helpers import wait_for

MiB = 1 << 20


@pytest.fixture(scope="module")
def tiered(data_dir: str):
    """One small DRAM server (32 MiB) and one larger NVMe server (256 MiB): per byte, NVMe is
    the cheaper tier (r4.2xlarge vs i3.2xlarge prices on these capacities)."""
    with LocalCluster(dram=1, capacity="32MiB", nvme=1, data_dir=data_dir,
                      flash_capacity="256MiB", log_level="WARNING") as c, \
            pocket.connect(c.address) as client:
        yield c, client


def node_of(status: dict, tier: str) -> dict:
    (node,) = [n for n in status["nodes"] if n["role"] == "storage" and n["tier"] == tier]
    return node


@pytest.mark.timeout(60)
def test_latency_sensitive_job_on_dram_capacity_heavy_job_on_flash(tiered) -> None:
    _, client = tiered
    fast = client.register_job("fast", latency_sensitive=True, capacity="8MiB")
    big = client.register_job("big", latency_sensitive=False, capacity="200MiB",
                              throughput="20MB/s")
    status = client.status()
    jobs = {j["id"]: j for j in status["jobs"]}
    assert fast.tier == "dram" and jobs[fast.id]["tier"] == "dram"
    assert set(fast.weights) == {node_of(status, "dram")["id"]}
    assert big.tier == "nvme" and set(big.weights) == {node_of(status, "nvme")["id"]}
    assert jobs[big.id]["allocation"]["capacity"] == 200 * MiB
    assert "cheapest" in jobs[big.id]["allocation"]["reason"]
    fast.put("x", os.urandom(MiB))
    big.put("y", os.urandom(3 * MiB))
    assert fast.lookup("x").tier == "dram" and big.lookup("y").tier == "nvme"
    # an insensitive job that did not say how much it stores: capacity is derived, and a
    # missing latency hint is taken as latency-sensitive (conservative): DRAM
    unsure = client.register_job("unsure", capacity="200MiB", throughput="20MB/s")
    assert unsure.tier == "dram"
    for job in (fast, big, unsure):
        job.deregister()
    status = client.status()
    assert all(n["allocated_capacity"] == 0 and n["allocated_throughput"] == 0
               for n in status["nodes"] if n["role"] == "storage")  # returned exactly


@pytest.mark.timeout(60)
def test_full_tier_spills_to_the_next_tier(tiered) -> None:
    _, client = tiered
    job = client.register_job("spill", latency_sensitive=True, capacity="16MiB")
    assert job.tier == "dram"
    data = {f"o{i}": os.urandom(12 * MiB + i) for i in range(4)}  # 48 MiB > the 32 MiB DRAM node
    for name, blob in data.items():
        job.put(name, blob)
    tiers = {name: job.lookup(name).tier for name in data}
    assert tiers["o0"] == "dram" and tiers["o1"] == "dram"
    assert set(tiers.values()) == {"dram", "nvme"}  # the rest went to NVMe instead of failing
    for name, blob in data.items():
        assert job.get(name) == blob
    # freed DRAM is used again
    job.delete("o0")
    job.put("again", os.urandom(12 * MiB))
    assert job.lookup("again").tier == "dram"
    job.deregister()


@pytest.mark.timeout(60)
def test_cost_is_reported_in_status_and_at_deregistration(tiered) -> None:
    cluster, client = tiered
    job = client.register_job("costly", latency_sensitive=False, capacity="100MiB",
                              throughput="50MB/s")
    time.sleep(0.5)
    out = subprocess.run([sys.executable, "-m", "pocket", "status", "--json", "--controller",
                          cluster.address], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    entry = {j["id"]: j for j in json.loads(out)["jobs"]}[job.id]
    assert entry["tier"] == "nvme" and entry["weight_map"] == job.weights
    assert entry["allocation"]["throughput"] == 50_000_000
    assert entry["cost"] > 0 and entry["usage"]["tiers"]["nvme"]["node_seconds"] > 0
    hourly = entry["allocation"]["hourly_cost"]
    time.sleep(0.2)
    final = job.deregister()
    usage = final["usage"]
    assert final["freed"] == 0 and usage["seconds"] >= 0.7
    # $ = the tier's $/hour for this node share × hours; the node is 256 MiB: 100/256 of it
    assert final["cost"] == pytest.approx(0.624 * 100 / 256 * usage["seconds"] / 3600, rel=1e-3)
    assert final["cost"] == pytest.approx(hourly * usage["seconds"] / 3600, rel=0.2)
    nvme = usage["tiers"]["nvme"]
    assert nvme["capacity_seconds"] == pytest.approx(100 * MiB * usage["seconds"])
    assert nvme["throughput_seconds"] == pytest.approx(50e6 * usage["seconds"])
    assert nvme["node_seconds"] == pytest.approx(100 / 256 * usage["seconds"])
    assert job.deregister()["cost"] == final["cost"]  # frozen once deregistered


@pytest.mark.timeout(60)
def test_weight_map_is_followed_three_to_one(make_cluster) -> None:
    """A job sized at 4/3 of a node's rate gets 0.75/0.25 on two empty DRAM nodes (fullest
    first fills one, the rest goes to the other).  Many objects below the split size then
    land 3:1 by count (smooth weighted round robin, ±1) and by bytes within ±10%."""
    c = make_cluster(dram=2, capacity="128MiB")
    client = pocket.connect(c.address)
    job = client.register_job("three-to-one", latency_sensitive=True, throughput=4_000_000_000 // 3,
                              capacity="4MiB")
    (heavy, w_heavy), (light, w_light) = sorted(job.weights.items(), key=lambda kv: -kv[1])
    assert w_heavy == pytest.approx(0.75, abs=1e-6) and w_light == pytest.approx(0.25, abs=1e-6)
    rng = random.Random(3)
    sizes = [rng.randint(65 * 1024, 400 * 1024) for _ in range(400)]
    for i, size in enumerate(sizes):
        job.put(f"o{i}", os.urandom(size))
    addresses = {n["id"]: n["address"] for n in client.status()["nodes"]}
    where = [job.lookup(f"o{i}").servers for i in range(len(sizes))]
    count = {node: sum(1 for s in where if s == (addresses[node],)) for node in (heavy, light)}
    assert count[heavy] + count[light] == 400 and abs(count[heavy] - 300) <= 1
    total = sum(-(-s // 4096) * 4096 for s in sizes)  # storage counts whole 4 KiB blocks

    def used() -> dict:
        return {n["id"]: n["used"] for n in client.status()["nodes"] if n["role"] == "storage"}

    assert wait_for(lambda: sum(used().values()) == total, timeout=10)
    u = used()
    assert 2.7 <= u[heavy] / u[light] <= 3.3, u
    job.deregister()


@pytest.mark.timeout(90)
def test_local_provider_adds_nodes_then_stops_them(make_cluster) -> None:
    c = make_cluster(dram=1, capacity="64MiB", provider="local", max_nodes=2)
    controller_pid = next(p.pid for p in c.processes if p.role == "controller")
    client = pocket.connect(c.address)
    # 2.5 nodes' worth of throughput: the DRAM server there is, plus two new ones
    job = client.register_job("grow", latency_sensitive=True, throughput="2.5GB/s",
                              capacity="8MiB")
    status = client.status()
    dram = [n for n in status["nodes"] if n["role"] == "storage"]
    assert len(dram) == 3 and status["provider"]["running"] == 2
    assert sorted(job.weights.values()) == pytest.approx([0.2, 0.4, 0.4])
    job.put("big", os.urandom(20 * MiB))  # split over the three
    assert len(job.lookup("big").servers) == 3
    # the provider is at its cap: the next job is overcommitted, with a warning, not refused
    more = client.register_job("more", latency_sensitive=True, throughput="2GB/s",
                               capacity="8MiB")
    entry = {j["id"]: j for j in client.status()["jobs"]}[more.id]
    assert entry["overcommitted"] == pytest.approx(0.75, abs=0.01)
    more.put("x", os.urandom(MiB))
    children = [int(p) for p in open(f"/proc/{controller_pid}/task/{controller_pid}/children")
                .read().split()]
    assert len(children) == 2
    c.stop()
    for pid in children:  # the controller stopped what its provider started
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z"


@pytest.mark.timeout(60)
def test_provider_timeout_is_a_clear_error(make_cluster) -> None:
    c = make_cluster(dram=1, capacity="64MiB", provider="local", max_nodes=1,
                     controller_args=("--provision-timeout", "0.01s"))
    client = pocket.connect(c.address)
    with pytest.raises(pocket.Unavailable, match="provider"):
        client.register_job("impatient", latency_sensitive=True, throughput="1.5GB/s",
                            capacity="1MiB")
    (node,) = [n for n in client.status()["nodes"] if n["role"] == "storage"]
    assert node["allocated_throughput"] == 0  # the partial allocation was given back
    # jobs that fit still register
    assert client.register_job("fits", latency_sensitive=True, throughput="100MB/s",
                               capacity="1MiB").tier == "dram"
