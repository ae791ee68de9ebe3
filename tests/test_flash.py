"""Flash tiers on the real disk: O_DIRECT data files, odd sizes, full devices, restarts."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import pocket
from pocket.local import LocalCluster
from pocket.storage.flash import (MEMORY_FILESYSTEMS, filesystem_type)

from helpers import storage_used, wait_for

ODD_SIZES = [65_537, 100_003, (1 << 20) + 7, 4096 * 33 + 1, (9 << 20) + 511]


@pytest.fixture(scope="module")
def flash_cluster(data_dir: str):
    with LocalCluster(dram=1, capacity="64MiB", nvme=1, ssd=1, hdd=1, data_dir=data_dir,
                      flash_capacity="64MiB", log_level="WARNING") as c:
        yield c


def payload(size: int) -> bytes:
    return np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("tier", ["nvme", "ssd", "hdd"])
def test_odd_sizes_round_trip_on_each_tier(flash_cluster: LocalCluster, tier: str) -> None:
    with pocket.connect(flash_cluster.address) as c:
        job = c.register_job(f"flash-{tier}", tier=tier)
        assert job.tier == tier
        for size in ODD_SIZES:
            data = payload(size)
            job.put(f"o{size}", data)
            assert job.get(f"o{size}") == data
            buf = np.empty(size, dtype=np.uint8)
            assert job.get_into(f"o{size}", buf) == size and buf.tobytes() == data
            assert job.lookup(f"o{size}").tier == tier
        status = c.status()
        nodes = [n for n in status["nodes"] if n["tier"] == tier]
        assert len(nodes) == 1 and nodes[0]["role"] == "storage"
        job.deregister()


def test_data_file_is_opened_with_o_direct(flash_cluster: LocalCluster) -> None:
    for proc in flash_cluster.processes:
        if proc.role != "storage" or "--tier" not in proc.process.args:
            continue
        tier = proc.process.args[proc.process.args.index("--tier") + 1]
        if tier == "dram":
            continue
        found = False
        for fd in os.listdir(f"/proc/{proc.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
            except FileNotFoundError:  # a socket closed since the listing
                continue
            if target.endswith(".data"):
                with open(f"/proc/{proc.pid}/fdinfo/{fd}") as f:
                    flags = int(next(l for l in f if l.startswith("flags:")).split()[1], 8)
                assert flags & os.O_DIRECT, f"{tier}: {target} lacks O_DIRECT"
                found = True
        assert found, f"no data file open in the {tier} server"


def test_full_device_then_freed_space_is_reused(data_dir: str) -> None:
    with LocalCluster(dram=0, nvme=1, data_dir=data_dir, flash_capacity="16MiB",
                      log_level="WARNING") as cl, pocket.connect(cl.address) as c:
        job = c.register_job("fill", tier="nvme")
        job.put("a", payload(10 << 20))
        with pytest.raises(pocket.CapacityExceeded):
            job.put("b", payload(10 << 20))
        assert job.lookup("b") is None
        assert wait_for(lambda: storage_used(c.status()) == 10 << 20)
        job.delete("a")
        assert wait_for(lambda: storage_used(c.status()) == 0)
        job.put("b", payload((15 << 20) + 3))  # the freed space, reused
        assert job.get("b") == payload((15 << 20) + 3)


def test_tmpfs_is_refused_unless_allowed(tmp_path) -> None:
    shm = "/dev/shm"
    if not os.path.isdir(shm) or filesystem_type(shm) not in MEMORY_FILESYSTEMS:
        pytest.skip("no tmpfs at /dev/shm")
    cmd = [sys.executable, "-m", "pocket.storage", "--tier", "nvme", "--dir", shm,
           "--capacity", "8MiB", "--controller", "none"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "tmpfs" in r.stderr and "O_DIRECT" in r.stderr
    proc = subprocess.Popen(cmd + ["--allow-buffered", "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on" in proc.stdout.readline()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "BUFFERED" in err and "allow-buffered" in err
    assert not [f for f in os.listdir(shm) if f.startswith("pocket-nvme-")]  # cleaned up


def test_restarted_flash_server_starts_empty(data_dir: str) -> None:
    with LocalCluster(dram=0, nvme=1, data_dir=data_dir, flash_capacity="16MiB",
                      log_level="INFO") as cl, pocket.connect(cl.address) as c:
        job = c.register_job("restart", tier="nvme")
        job.put("x", payload(1 << 20))
        server = next(p for p in cl.processes if p.role == "storage")
        cl.stop_process(server, kill=True)
        cl.processes.remove(server)
        cl.add_storage("nvme")
        log = open(cl.processes[-1].log_path).read()
        assert "created empty" in log
        assert wait_for(lambda: sum(1 for n in c.status()["nodes"] if n["tier"] == "nvme") == 1,
                        timeout=15)
        fresh = c.register_job("after-restart", tier="nvme")
        assert storage_used(c.status()) == 0
        fresh.put("y", payload(2 << 20))
        assert fresh.get("y") == payload(2 << 20)


def test_flash_tier_needs_a_directory() -> None:
    r = subprocess.run([sys.executable, "-m", "pocket.storage", "--tier", "ssd", "--controller",
                        "none"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--dir is required" in r.stderr


def test_concurrent_writes_beyond_the_write_buffer_all_complete(data_dir: str) -> None:
    """Backpressure pauses writers between frames and always resumes them (no deadlock)."""
    import threading

    with LocalCluster(dram=0, nvme=2, data_dir=data_dir, flash_capacity="160MiB",
                      storage_args=("--write-buffer", "8MiB"), log_level="WARNING") as cl, \
            pocket.connect(cl.address) as c:
        job = c.register_job("pressure", tier="nvme")
        errors: list = []

        def writer(i: int) -> None:
            try:
                lam = pocket.attach(job.id, job.token, controller=cl.address, timeout=20)
                lam.put(f"w{i}", np.full(24 << 20, i, dtype=np.uint8))
                lam.close()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        for i in range(6):
            assert job.get(f"w{i}") == bytes([i]) * (24 << 20)


def test_aligned_buffer_pool_reuses_and_bounds() -> None:
    from pocket.storage.flash import AlignedBufferPool

    pool = AlignedBufferPool(limit=3 << 20, smallest=64 << 10)
    a = pool.take(1_000_000)
    assert len(a) == 1 << 20 and pool.size_class(1) == 64 << 10
    pool.give(a)
    assert pool.take(600_000) is a  # same class, reused warm
    bufs = [pool.take(1 << 20) for _ in range(5)]
    for b in bufs:
        pool.give(b)
    assert pool.pooled == 3 << 20  # the rest were dropped
