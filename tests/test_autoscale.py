"""Autoscaling with real servers: scale out on hints and on measured bytes, steering, drain,
back to the minimum, no lost object, no flapping."""

from __future__ import annotations

import os
import time

import pytest

import pocket

from helpers import wait_for

MiB = 1 << 20


def storage(status: dict) -> list[dict]:
    return [n for n in status["nodes"] if n["role"] == "storage"]


def events(status: dict, kind: str | None = None) -> list[dict]:
    return [e for e in status["autoscale"]["events"] if kind is None or e["event"] == kind]


@pytest.mark.timeout(30)
def test_scale_out_on_hints_then_back_to_minimum_without_flapping(make_cluster) -> None:
    c = make_cluster(dram=1, capacity="64MiB", provider="local", max_nodes=2, autoscale=True)
    with pocket.connect(c.address) as client:
        assert client.status()["autoscale"]["enabled"]
        job = client.register_job("wide", lambdas=64)  # 38.4 Gb/s: more than 3 nodes
        status = client.status()
        assert len(storage(status)) == 3 and len(job.weights) == 3
        data = {f"o{i}": os.urandom(MiB) for i in range(6)}
        for name, value in data.items():
            job.put(name, value)
        assert all(job.get(n) == v for n, v in data.items())
        time.sleep(2.5)  # the job is over band but the provider is at its cap: nothing to do
        assert not events(client.status(), "draining")
        job.deregister()
        left = time.monotonic()
        assert wait_for(lambda: len(storage(client.status())) == 1, timeout=10, interval=0.1)
        back = time.monotonic() - left
        status = client.status()
        assert len(events(status, "draining")) == 2 and len(events(status, "removed")) == 2
        assert all("below band" in e["reason"] for e in events(status, "draining"))
        assert status["provider"]["running"] == 0
        assert back < 8.0, f"back to the minimum after {back:.1f}s"
        # idle at the minimum: nothing more happens
        count = len(events(status))
        time.sleep(3)
        assert len(events(client.status())) == count


@pytest.mark.timeout(30)
def test_scale_out_on_measured_bytes_steers_new_writes(make_cluster) -> None:
    c = make_cluster(dram=1, capacity="64MiB", provider="local", max_nodes=2, autoscale=True)
    with pocket.connect(c.address) as client:
        job = client.register_job("filler", capacity="4MiB", throughput="1MB/s")
        (first,) = storage(client.status())
        for i in range(14):  # 56 MiB of 64: 87%, above the 80% top of the bytes band
            job.put(f"a{i}", os.urandom(4 * MiB))
        crossed = time.monotonic()
        assert wait_for(lambda: len(client.attach(job.id, job.token).weights) == 2,
                        timeout=10, interval=0.05)
        reaction = time.monotonic() - crossed
        status = client.status()
        (out,) = events(status, "scale_out")
        assert "bytes" in out["reason"] and out["utilisation"]["bytes"] > 0.8
        weights = client.attach(job.id, job.token).weights
        (new,) = [n for n in weights if n != first["id"]]
        assert weights[new] > 0.8  # the empty node takes most new writes
        for i in range(6):
            job.put(f"b{i}", os.urandom(MiB))
        time.sleep(1.3)  # a heartbeat
        used = {n["id"]: n["used"] for n in storage(client.status())}
        assert used[new] >= 4 * MiB
        assert all(job.get(f"a{i}") is not None for i in range(14))
        assert reaction < 4.0, f"new node in the weight map {reaction:.1f}s after crossing"
        job.deregister()
        assert wait_for(lambda: len(storage(client.status())) == 1, timeout=10, interval=0.1)


@pytest.mark.timeout(30)
def test_drained_node_keeps_live_objects_until_empty(make_cluster) -> None:
    c = make_cluster(dram=1, capacity="64MiB", provider="local", max_nodes=1, autoscale=True)
    with pocket.connect(c.address) as client:
        job = client.register_job("keeper", capacity="100MiB", throughput="1MB/s")
        assert len(job.weights) == 2  # the provider added a node for the capacity
        data = {f"p{i}": os.urandom(2 * MiB) for i in range(10)}
        for name, value in data.items():
            job.put(name, value, persist=True)
        job.deregister()  # persisted objects stay; the allocation is gone: below band
        added = [n for n in storage(client.status()) if n["id"] in job.weights
                 and n["id"] not in {e.get("node") for e in events(client.status(), "x")}]
        assert wait_for(lambda: events(client.status(), "draining"), timeout=10)
        (drained,) = [n for n in storage(client.status()) if n["state"] == "draining"]
        assert drained["used"] > 0
        time.sleep(3)  # it holds live data: it stays, and every object is intact
        assert any(n["id"] == drained["id"] for n in storage(client.status()))
        assert not events(client.status(), "removed")
        assert all(job.get(n) == v for n, v in data.items())
        for name in data:
            job.delete(name)
        assert wait_for(lambda: len(storage(client.status())) == 1, timeout=10, interval=0.1)
        assert [e["node"] for e in events(client.status(), "removed")] == [drained["id"]]
        assert added
