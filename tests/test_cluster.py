"""Cluster behaviour with real servers: lambdas, space, isolation, atomicity, capacity, bad input."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading
import time

import numpy as np
import pytest

import pocket
from pocket.connection import BlockingConnection
from pocket.local import LocalCluster
from pocket.protocol import Op

from helpers import storage_used, wait_for


def lambda_task(controller: str, job_id: str, token: str, index: int, count: int,
                errors: "mp.Queue") -> None:
    """What one lambda does: attach by id + token, put and get ``count`` objects."""
    try:
        job = pocket.attach(job_id, token, controller=controller)
        rng = np.random.default_rng(index)
        for i in range(count):
            size = int(rng.choice([10, 1000, 70_000, 300_000]))
            data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            name = f"lambda{index}/{i}"
            job.put(name, data)
            if job.get(name) != data:
                raise AssertionError(f"{name}: wrong bytes")
        job.close()
    except BaseException as exc:  # report, don't hang the parent
        errors.put(f"lambda {index}: {type(exc).__name__}: {exc}")
    else:
        errors.put(None)


@pytest.mark.timeout(300)
def test_eight_lambda_processes(client: pocket.Cluster, cluster: LocalCluster) -> None:
    job = client.register_job("lambdas", lambdas=8)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=lambda_task, args=(cluster.address, job.id, job.token, i, 1000,
                                                   results)) for i in range(8)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert outcomes == [None] * 8
    assert len(job.list()) == 8000
    job.deregister()


def test_delete_and_delete_after_read_free_space(make_cluster) -> None:
    c = make_cluster(dram=2, capacity="256MiB")
    client = pocket.connect(c.address)
    job = client.register_job("space")
    base = storage_used(client.status())
    job.put("a", b"x" * (8 << 20))
    job.put("b", b"y" * (3 << 20))
    assert wait_for(lambda: storage_used(client.status()) >= base + (11 << 20))
    job.delete("a")
    assert wait_for(lambda: storage_used(client.status()) < base + (4 << 20))
    assert job.get("b", delete_after_read=True) == b"y" * (3 << 20)
    assert job.lookup("b") is None
    assert wait_for(lambda: storage_used(client.status()) == base)
    jobs = {j["id"]: j for j in client.status()["jobs"]}
    assert wait_for(lambda: {j["id"]: j for j in client.status()["jobs"]}[job.id]["bytes"] == 0)
    assert jobs[job.id]["weight_map"]


def test_deregistration_keeps_only_persisted(make_cluster) -> None:
    c = make_cluster(dram=2, capacity="256MiB")
    client = pocket.connect(c.address)
    job = client.register_job("persist")
    job.put("keep/big", b"k" * (2 << 20), persist=True)
    job.put("keep/small", b"small", persist=True)
    job.put("tmp/big", b"t" * (5 << 20))
    job.put("tmp/small", b"tiny")
    result = job.deregister()
    assert result["kept"] == 2 and result["freed"] == (5 << 20) + 4
    assert wait_for(lambda: storage_used(client.status()) == 2 << 20)
    again = pocket.attach(job.id, job.token, controller=c.address)
    assert again.get("keep/big") == b"k" * (2 << 20)
    assert again.get("keep/small") == b"small"
    assert again.list() == ["keep/big", "keep/small"]
    with pytest.raises(pocket.NotFound):
        again.get("tmp/big")
    with pytest.raises(pocket.AccessDenied):
        again.put("new", b"no writes after deregistration")
    again.delete("keep/big")
    assert wait_for(lambda: storage_used(client.status()) == 0)


def test_jobs_are_isolated(client: pocket.Cluster, cluster: LocalCluster) -> None:
    a = client.register_job("job-a")
    b = client.register_job("job-b")
    a.put("secret", b"A" * 100)
    a.put("big-secret", b"A" * (1 << 20))
    for name in ("secret", "big-secret"):
        with pytest.raises((pocket.NotFound, pocket.AccessDenied)):
            b.get(name)
        assert b.lookup(name) is None
    assert b.list() == []
    with pytest.raises(pocket.AccessDenied):
        pocket.attach(a.id, "wrong-token", controller=cluster.address)
    with pytest.raises(pocket.AccessDenied):
        pocket.attach(a.id, b.token, controller=cluster.address)
    forged = pocket.attach(b.id, b.token, controller=cluster.address)
    forged._auth = {"job": a.id, "tok": b.token}  # B's token on A's namespace
    with pytest.raises(pocket.AccessDenied):
        forged.get("secret")
    a.deregister()
    b.deregister()


def test_overwrite_is_atomic_under_concurrent_reader(job: pocket.Job) -> None:
    versions = [bytes([v]) * ((1 << 20) + 123 * v) for v in range(1, 9)]
    job.put("hot", versions[0])
    stop = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def reader() -> None:
        r = pocket.attach(job.id, job.token, controller=job.controller)
        try:
            while not stop.is_set():
                data = r.get("hot")
                if data not in versions:
                    raise AssertionError(f"torn object of {len(data)} bytes")
                seen.append(data[:1])
        except BaseException as exc:
            errors.append(exc)
        finally:
            r.close()

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 4
    i = 0
    while time.monotonic() < deadline:
        job.put("hot", versions[i % len(versions)])
        i += 1
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(seen) > 10 and len(set(seen)) > 1  # readers really overlapped writers


def test_put_larger_than_free_space_fails_before_sending(make_cluster) -> None:
    c = make_cluster(dram=2, capacity="32MiB")
    client = pocket.connect(c.address)
    job = client.register_job("full")
    job.put("fits", b"f" * (20 << 20))
    sent_before = sum(n["net_in"] for n in client.status()["nodes"])
    big = np.zeros(50 << 20, dtype=np.uint8)
    t0 = time.monotonic()
    with pytest.raises(pocket.CapacityExceeded):
        job.put("too-big", big)
    assert time.monotonic() - t0 < 2  # refused up front, not after 50 MiB of traffic
    assert job.lookup("too-big") is None
    assert job.list() == ["fits"]
    # nothing partial stays allocated: 20 MiB in use, the rest free again
    assert wait_for(lambda: storage_used(client.status()) == 20 << 20)
    job.put("still-fits", b"s" * (30 << 20))
    assert job.get("still-fits") == b"s" * (30 << 20)
    del sent_before


def test_small_object_space_is_bounded(make_cluster) -> None:
    c = make_cluster(dram=1, capacity="16MiB", metadata_args=("--inline-capacity", "1MiB"))
    job = pocket.connect(c.address).register_job("inline-full")
    for i in range(15):
        job.put(f"s{i}", b"x" * 65536)
    with pytest.raises(pocket.CapacityExceeded):
        for i in range(15, 20):
            job.put(f"s{i}", b"x" * 65536)
    job.delete("s0")
    job.put("again", b"x" * 65536)


@pytest.mark.parametrize("role", ["controller", "metadata", "storage"])
def test_garbage_closes_one_connection_only(cluster: LocalCluster, client: pocket.Cluster,
                                            role: str) -> None:
    server = next(p for p in cluster.processes if p.role == role)
    host, port = server.address.rsplit(":", 1)
    good = BlockingConnection(server.address)
    assert good.request(Op.PING, {}).header["role"] == role
    for junk in (b"GET / HTTP/1.1\r\n\r\n", os.urandom(4096), b"\xb7\x01" + b"\xff" * 30):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(junk)
            s.settimeout(5)
            try:
                assert s.recv(100) == b""  # the server closed this connection
            except ConnectionResetError:
                pass
    assert good.request(Op.PING, {}).header["role"] == role  # others unaffected
    good.close()
    job = client.register_job("after-garbage")
    job.put("x", b"y" * 100_000)
    assert job.get("x") == b"y" * 100_000
    job.deregister()


def test_dram_residency_follows_stored_bytes(make_cluster) -> None:
    import psutil

    c = make_cluster(dram=1, capacity="512MiB", storage_args=("--resident-slack", "16MiB"))
    storage = psutil.Process(next(p.pid for p in c.processes if p.role == "storage"))
    base = storage.memory_info().rss
    job = pocket.connect(c.address).register_job("rss")
    data = b"r" * (4 << 20)
    for i in range(64):  # 256 MiB, overwritten twice: freed space is reused, not re-faulted
        job.put(f"o{i % 32}", data)
    assert storage.memory_info().rss - base < (128 + 16 + 16) << 20
    for i in range(32):
        job.delete(f"o{i}")
    assert wait_for(lambda: storage.memory_info().rss - base < 32 << 20, timeout=10)


def test_peer_stalled_mid_frame_is_cut_off(make_cluster) -> None:
    from pocket.protocol import FIXED, MAGIC, VERSION

    c = make_cluster(dram=1, capacity="16MiB", storage_args=("--frame-timeout", "1s"))
    storage = next(p for p in c.processes if p.role == "storage")
    host, port = storage.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(FIXED.pack(MAGIC, VERSION, Op.PING, 0, 1, 0, 0)[:12])  # half a header
        t0 = time.monotonic()
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass
        assert 0.9 < time.monotonic() - t0 < 5
    with socket.create_connection((host, int(port)), timeout=10) as idle:  # idle between frames
        time.sleep(2)
        idle.sendall(FIXED.pack(MAGIC, VERSION, Op.PING, 0, 1, 0, 0))
        assert len(idle.recv(100)) >= FIXED.size  # still open: only stalled frames are cut
