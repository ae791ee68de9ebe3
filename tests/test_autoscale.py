"""Autoscaling with real servers: scale out on hints and on measured bytes, steering, drain,
back to the minimum, no lost object, no flapping."""

from __future__ import annotations

import os
import threading
import time

import pytest

import pocket
from pocket.connection import BlockingConnection
from pocket.protocol import Op

from helpers import wait_for

MiB = 1 << 20


def storage(status: dict) -> list[dict]:
    return [n for n in status["nodes"] if n["role"] == "storage"]


def events(status: dict, kind: str | None = None, tier: str | None = "dram") -> list[dict]:
    """Autoscale events of ``kind`` (all if None) of ``tier`` (storage: dram; None: all)."""
    return [e for e in status["autoscale"]["events"] if (kind is None or e["event"] == kind)
            and (tier is None or e["tier"] == tier)]


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
        for i in range(12):  # 48 MiB of 64: 75%, inside the band
            job.put(f"a{i}", os.urandom(4 * MiB))
        job.put("a12", os.urandom(8 * MiB))  # 56 MiB: 87%, above the 80% top of the bytes band
        crossed = time.monotonic()
        # Scale-out reaction: from the put that crossed the band to a write landing on a new
        # server (small writes, bounded in count and time, until one lands elsewhere).
        landed = None
        for k in range(400):
            job.put(f"r{k}", os.urandom(80 << 10))  # above the inline limit: on a server
            if job.lookup(f"r{k}").servers != (first["address"],):
                landed = time.monotonic() - crossed
                break
            job.delete(f"r{k}")  # keep the first node where it is (87%), not full
            if time.monotonic() - crossed > 10:
                break
            time.sleep(0.02)
        assert landed is not None, "no write reached a new server within 10 s"
        print(f"scale-out reaction (band crossed -> a write on the new server): {landed:.2f}s")
        assert landed < 8.0, f"a write reached the new server {landed:.1f}s after crossing"
        assert wait_for(lambda: len(client.attach(job.id, job.token).weights) == 2,
                        timeout=10, interval=0.05)
        reaction = time.monotonic() - crossed
        status = client.status()
        (out,) = events(status, "scale_out")
        # bytes crossed; on a busy machine the server's CPU during the 4 MiB puts may cross first
        assert ("bytes" in out["reason"] and out["utilisation"]["bytes"] > 0.8) or \
            "cpu" in out["reason"], out
        weights = client.attach(job.id, job.token).weights
        (new,) = [n for n in weights if n != first["id"]]
        assert weights[new] > 0.8  # the empty node takes most new writes
        for i in range(6):
            job.put(f"b{i}", os.urandom(MiB))
        time.sleep(1.3)  # a heartbeat
        used = {n["id"]: n["used"] for n in storage(client.status())}
        assert used[new] >= 4 * MiB
        assert all(job.get(f"a{i}") is not None for i in range(13))
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
        # Its bytes show in the status at its next heartbeat (the drain can come first).
        assert wait_for(lambda: any(n["id"] == drained["id"] and n["used"] > 0
                                    for n in storage(client.status())), timeout=3)
        time.sleep(3)  # it holds live data: it stays, and every object is intact
        assert any(n["id"] == drained["id"] for n in storage(client.status()))
        assert not events(client.status(), "removed")
        assert all(job.get(n) == v for n, v in data.items())
        for name in data:
            job.delete(name)
        assert wait_for(lambda: len(storage(client.status())) == 1, timeout=10, interval=0.1)
        assert [e["node"] for e in events(client.status(), "removed")] == [drained["id"]]
        assert added


@pytest.mark.timeout(40)
def test_migrate_on_drain_moves_objects_and_the_node_leaves_at_once(make_cluster) -> None:
    c = make_cluster(dram=1, capacity="64MiB", provider="local", max_nodes=1, autoscale=True,
                     controller_args=("--migrate-on-drain",))
    with pocket.connect(c.address) as client:
        assert client.status()["autoscale"]["migrate_on_drain"]
        job = client.register_job("mover", capacity="100MiB", throughput="1MB/s")
        assert len(job.weights) == 2  # the provider added a node for the capacity
        data = {f"p{i}": os.urandom(2 * MiB + i) for i in range(12)}
        data.update({f"s{i}": os.urandom(100) for i in range(3)})  # inline: not on a node
        for name, value in data.items():
            job.put(name, value, persist=True)
        servers = {n: job.lookup(n).servers for n in data}
        # Readers keep reading every object while the node drains and its objects move.
        stop = threading.Event()
        reads, errors = [0], []

        def reader(seed: int) -> None:
            names = sorted(data)
            k = seed
            deadline = time.monotonic() + 25  # bounded: stopped by the test long before
            with pocket.attach(job.id, job.token, controller=c.address) as lam:
                while not stop.is_set() and time.monotonic() < deadline:
                    name = names[k % len(names)]
                    k += 1
                    try:
                        if lam.get(name) != data[name]:
                            errors.append(f"{name}: wrong bytes")
                    except pocket.PocketError as exc:
                        errors.append(f"{name}: {exc!r}")
                    reads[0] += 1
                    time.sleep(0.01)  # light load: heavy reads would (rightly) keep it above band

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        try:
            job.deregister()  # persisted objects stay; the allocation is gone: below band
            assert wait_for(lambda: events(client.status(), "draining"), timeout=15)
            (drained,) = [e["node"] for e in events(client.status(), "draining")]
            drained_at, reads_before = time.monotonic(), reads[0]
            assert wait_for(lambda: all(n["id"] != drained for n in storage(client.status())),
                            timeout=10, interval=0.05)
            left_in = time.monotonic() - drained_at
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert not errors, errors[:5]
        assert reads[0] > reads_before  # reads went on while the objects moved
        status = client.status()
        # Objects being read when a round reached them move in a later round.
        moved = sum(e["objects"] for e in events(status, "migrated") if e["node"] == drained)
        on_drained = [n for n, s in servers.items() if any(
            a == e.get("address") for e in events(status, "removed") for a in s)]
        assert on_drained and moved == len(on_drained)
        assert [e["reason"] for e in events(status, "removed")] == ["drained, objects moved"]
        print(f"drained node left {left_in:.2f}s after its drain; {reads[0] - reads_before} reads during it")
        assert left_in < 15.0, f"the drained node left {left_in:.1f}s after its drain"
        (only,) = storage(status)
        for name, value in data.items():
            assert job.get(name) == value
            assert list(job.lookup(name).servers) in ([], [only["address"]])
        # Nothing stored twice: the one node holds what the objects need (blocks rounded up).
        need = sum(len(v) for n, v in data.items() if n.startswith("p"))
        assert wait_for(lambda: storage(client.status())[0]["used"] <= need + 12 * 4096,
                        timeout=5)


@pytest.mark.timeout(40)
def test_migrate_on_drain_waits_for_a_reader_to_release(make_cluster) -> None:
    """An object a reader holds a lease on is not moved (its extents on other nodes would
    change hands under the reader); it moves once the lease is released."""
    c = make_cluster(dram=1, capacity="64MiB", provider="local", max_nodes=1, autoscale=True,
                     controller_args=("--migrate-on-drain",))
    with pocket.connect(c.address) as client:
        job = client.register_job("held", capacity="100MiB", throughput="1MB/s")
        base = {p.address for p in c.processes if p.role == "storage"}
        data = {f"p{i}": os.urandom(2 * MiB + i) for i in range(8)}
        for name, value in data.items():
            job.put(name, value, persist=True)
        (added,) = [n for n in storage(client.status()) if n["address"] not in base]
        held = next(n for n in data if added["address"] in job.lookup(n).servers)
        # A reader in the middle of a get: it holds a read lease (GET) and has not released.
        reader = BlockingConnection(job.metadata, timeout=5.0)
        try:
            lease = reader.request(Op.GET, {"job": job.id, "tok": job.token,
                                            "name": held}).header["lease"]
            job.deregister()  # persisted objects stay; the allocation is gone: below band
            assert wait_for(lambda: events(client.status(), "draining"), timeout=15)
            time.sleep(3.0)  # several move rounds: the held object stays where it is
            assert any(n["id"] == added["id"] for n in storage(client.status()))
            assert added["address"] in job.lookup(held).servers
            reader.request(Op.RELEASE, {"job": job.id, "tok": job.token, "lease": lease})
        finally:
            reader.close()
        assert wait_for(lambda: all(n["id"] != added["id"] for n in storage(client.status())),
                        timeout=15, interval=0.1), "the node did not leave after the release"
        for name, value in data.items():
            assert job.get(name) == value


def metadata(status: dict) -> list[dict]:
    return [n for n in status["nodes"] if n["role"] == "metadata"]


@pytest.mark.timeout(45)
def test_metadata_servers_scale_out_on_jobs_and_only_an_idle_one_leaves(make_cluster) -> None:
    c = make_cluster(dram=1, capacity="64MiB", provider="local", max_nodes=1, autoscale=True,
                     controller_args=("--metadata-jobs", "2", "--max-metadata", "2"))
    small = {"capacity": "1MiB", "throughput": "1MB/s"}
    with pocket.connect(c.address) as client:
        (first,) = metadata(client.status())
        jobs = [client.register_job(f"j{i}", **small) for i in range(2)]  # 100% of 2 per server
        assert wait_for(lambda: events(client.status(), "added", "metadata"), timeout=10)
        status = client.status()
        assert len(metadata(status)) == 2
        (added,) = events(status, "added", "metadata")
        assert "jobs" in added["reason"]
        assert status["provider"]["running_metadata"] == 1
        late = client.register_job("late", **small)  # the least-loaded server: the new one
        assert late.metadata == added["address"] != first["address"]
        value = os.urandom(3 * MiB)
        late.put("big", value, persist=True)
        late.put("small", b"x" * 100)
        assert late.get("big") == value
        for job in jobs:
            job.deregister()
        late.deregister()  # "big" is persisted: the new server holds the job's namespace
        time.sleep(5)  # below band long enough: it would be drained if it held nothing
        assert len(metadata(client.status())) == 2
        assert not events(client.status(), "draining", "metadata")
        assert late.get("big") == value
        late.delete("big")
        assert wait_for(lambda: len(metadata(client.status())) == 1, timeout=12, interval=0.1)
        status = client.status()
        assert [e["node"] for e in events(status, "removed", "metadata")] == \
            [added["node"]]
        assert metadata(status)[0]["id"] == first["id"]
        assert status["provider"]["running_metadata"] == 0
        # the one left serves new jobs
        with client.register_job("after", **small) as job:
            job.put("o", value)
            assert job.get("o") == value
