"""Faults done for real: corrupted data files, killed servers, restarts, stalled and cut links."""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import socket
import threading
import time

import pytest

import pocket
from pocket.protocol import Op

from helpers import wait_for

BIG = 300_000


def get_header(job: pocket.Job, name: str) -> dict:
    h = job._md(Op.GET, {"name": name, "dar": False}).header
    job._md_no_reply(Op.RELEASE, {"lease": h["lease"]})
    return h


# -- integrity ----------------------------------------------------------------------------

def test_corrupted_flash_extent_raises_never_returns_wrong_bytes(make_cluster, data_dir) -> None:
    c = make_cluster(dram=0, nvme=1, data_dir=data_dir, flash_capacity="32MiB", capacity="64MiB")
    with pocket.connect(c.address) as cl:
        job = cl.register_job("corrupt", tier="nvme")
        data = os.urandom(BIG)
        job.put("x", data)
        assert job.get("x") == data
        assert all(e[4] is not None for e in get_header(job, "x")["ext"])  # checksummed
        (path,) = glob.glob(os.path.join(data_dir, "pocket-nvme-*.data"))
        with open(path, "r+b") as f:  # flip one byte of the object on the "device"
            whole = f.read()
            at = whole.find(data[:4096]) + 1234
            assert at > 1233
            f.seek(at)
            f.write(bytes([whole[at] ^ 0x40]))
            f.flush()
            os.fsync(f.fileno())
        del whole
        with pytest.raises(pocket.IntegrityError, match="checksum mismatch"):
            job.get("x")
        buf = bytearray(BIG)
        with pytest.raises(pocket.IntegrityError):
            job.get_into("x", buf)
        job.deregister()


def test_dram_checksums_are_a_job_flag(client: pocket.Cluster) -> None:
    plain = client.register_job("plain")
    summed = client.register_job("summed", checksums=True)
    try:
        for j in (plain, summed):
            j.put("x", b"d" * BIG)
            assert j.get("x") == b"d" * BIG
        assert all(e[4] is None for e in get_header(plain, "x")["ext"])
        assert all(isinstance(e[4], int) for e in get_header(summed, "x")["ext"])
    finally:
        plain.deregister()
        summed.deregister()


# -- killed servers ---------------------------------------------------------------------------

def storage_nodes(c) -> dict:
    return {n["address"]: n["id"] for n in c.status()["nodes"] if n["role"] == "storage"}


def test_kill_storage_mid_put_and_get(make_cluster) -> None:
    c = make_cluster(dram=3, capacity="128MiB")
    cl = pocket.connect(c.address, timeout=5.0)
    victim_job = cl.register_job("victim")
    other = cl.register_job("other")
    other.put("small", b"s" * 1000)
    data = os.urandom(2 << 20)
    for i in range(6):
        victim_job.put(f"g{i}", data)
    errors: list = []
    slowest = [0.0]
    stop = threading.Event()

    def hammer(op) -> None:
        i = 0
        while not stop.is_set():
            t = time.monotonic()
            try:
                op(i)
            except pocket.PocketError as exc:
                errors.append(exc)
            slowest[0] = max(slowest[0], time.monotonic() - t)
            i += 1

    threads = [threading.Thread(target=hammer, args=(lambda i: victim_job.put(f"p{i % 4}", data),)),
               threading.Thread(target=hammer, args=(lambda i: victim_job.get(f"g{i % 6}"),))]
    for t in threads:
        t.start()
    time.sleep(0.5)
    storages = [p for p in c.processes if p.role == "storage"]
    dead = storages[0]
    dead_id = storage_nodes(c)[dead.address]
    killed = time.monotonic()
    os.kill(dead.pid, signal.SIGKILL)
    dead.process.wait(5)
    # The controller drops the node from the cluster and from every weight map within 3 s.
    assert wait_for(lambda: dead_id not in {n["id"] for n in c.status()["nodes"]}, 3.0)
    dropped = time.monotonic() - killed
    jobs = {j["id"]: j for j in c.status()["jobs"]}
    assert dead_id not in jobs[victim_job.id]["weight_map"]
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert slowest[0] < 5.0, f"an operation took {slowest[0]:.1f}s"
    assert all(isinstance(e, pocket.Unavailable) for e in errors), errors[:3]
    # New puts land on the remaining nodes; the other job is unaffected.
    for i in range(8):
        victim_job.put(f"new{i}", data)
        assert dead.address not in victim_job.lookup(f"new{i}").servers
        assert victim_job.get(f"new{i}") == data
    assert other.get("small") == b"s" * 1000
    other.put("big", data)
    assert other.get("big") == data
    print(f"node dropped {dropped:.2f}s after kill -9; {len(errors)} Unavailable errors; "
          f"slowest op {slowest[0]:.2f}s")
    cl.close()


def test_metadata_server_restart(make_cluster) -> None:
    c = make_cluster(dram=1, capacity="64MiB")
    cl = pocket.connect(c.address, timeout=5.0)
    job = cl.register_job("before")
    job.put("x", b"x" * BIG)
    (md,) = [p for p in c.processes if p.role == "metadata"]
    os.kill(md.pid, signal.SIGKILL)
    md.process.wait(5)
    t = time.monotonic()
    with pytest.raises(pocket.Unavailable):
        job.get("x")  # the namespace was in the dead server: lost, and said so quickly
    assert time.monotonic() - t < 5.0
    c.add_metadata()
    # The controller forgets the dead one; new jobs go to the new one.
    assert wait_for(lambda: _registers(cl), 5.0)
    assert wait_for(lambda: _attach_error(cl, job) is not None, 3.0)
    assert "metadata server" in str(_attach_error(cl, job))
    cl.close()


def _attach_error(cl: pocket.Cluster, job: pocket.Job):
    try:
        cl.attach(job.id, job.token)
    except pocket.Unavailable as exc:
        return exc
    return None


def _registers(cl: pocket.Cluster) -> bool:
    try:
        j = cl.register_job("after")
    except pocket.Unavailable:
        return False
    j.put("y", b"y" * BIG)
    ok = j.get("y") == b"y" * BIG
    j.deregister()
    return ok


def test_controller_restart(make_cluster) -> None:
    c = make_cluster(dram=2, capacity="64MiB")
    port = int(c.address.rsplit(":", 1)[1])
    cl = pocket.connect(c.address, timeout=5.0)
    job = cl.register_job("survivor")
    data = os.urandom(BIG)
    job.put("x", data)
    ctl = c.processes[0]
    assert ctl.role == "controller"
    os.kill(ctl.pid, signal.SIGKILL)
    ctl.process.wait(5)
    # The data path does not need the controller.
    assert job.get("x") == data
    with pytest.raises(pocket.Unavailable):
        cl.register_job("nobody-home")
    c.processes[0] = c._spawn("controller", ["--listen", f"127.0.0.1:{port}",
                                             *c.controller_profile_args()], 10.0)
    # Nodes notice, register again and get the new controller's key.
    assert wait_for(lambda: len(c.status()["nodes"]) == 3, 10.0)
    assert wait_for(lambda: _reads(job, "x", data), 5.0)
    job.put("y", data)
    assert job.get("y") == data
    with pytest.raises(pocket.AccessDenied):  # the new controller does not know the old job
        cl.attach(job.id, job.token)
    assert _registers(cl)
    cl.close()


def _reads(job: pocket.Job, name: str, data: bytes) -> bool:
    try:
        return job.get(name) == data
    except (pocket.AccessDenied, pocket.Unavailable):
        return False


# -- a link that stalls or resets mid-frame -------------------------------------------------

class FaultyProxy:
    """A TCP proxy on 127.0.0.1 that forwards ``after`` bytes of replies, then stalls or resets."""

    def __init__(self, target: str, mode: str, after: int) -> None:
        self.target = target
        self.mode = mode
        self.after = after
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _serve(self, cr, cw) -> None:
        host, port = self.target.rsplit(":", 1)
        sr, sw = await asyncio.open_connection(host, int(port))

        async def pipe(r, w, limit) -> None:
            sent = 0
            while True:
                chunk = await r.read(65536)
                if not chunk:
                    w.close()
                    return
                if limit is not None and sent + len(chunk) > limit:
                    w.write(chunk[:limit - sent])
                    await w.drain()
                    if self.mode == "reset":
                        sock = w.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        b"\x01\x00\x00\x00\x00\x00\x00\x00")
                        w.transport.abort()
                        sw.transport.abort()
                    else:
                        await asyncio.sleep(3600)  # stall: hold the connection, send nothing
                    return
                w.write(chunk)
                sent += len(chunk)
                await w.drain()

        await asyncio.gather(pipe(cr, sw, None), pipe(sr, cw, self.after),
                             return_exceptions=True)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.mark.parametrize("mode", ["stall", "reset"])
def test_link_stalls_or_resets_mid_frame(cluster, mode: str) -> None:
    cl = pocket.connect(cluster.address, timeout=1.0)
    job = cl.register_job(f"proxy-{mode}")
    data = os.urandom(60_000)  # inline: the reply frame is ~60 KB
    job.put("x", data)
    proxy = FaultyProxy(job.metadata, mode, after=30_000)
    real = job.metadata
    try:
        job.metadata = proxy.address
        t = time.monotonic()
        with pytest.raises(pocket.Unavailable):
            job.get("x")
        took = time.monotonic() - t
        assert took < (4.0 if mode == "stall" else 2.0), took  # bounded: no hang
    finally:
        job.metadata = real
        proxy.close()
    assert job.get("x") == data  # the server and other connections are fine
    job.deregister()
    cl.close()


# -- job leases and graceful shutdown ---------------------------------------------------------

DRIVER = """
import os, sys, time, pocket
cl = pocket.connect(sys.argv[1])
job = cl.register_job("orphan")
job.put("tmp", b"t" * 300_000)
job.put("kept", b"k" * 300_000, persist=True)
print(job.id, job.token, flush=True)
time.sleep(3600)
"""


def test_job_of_a_dead_driver_is_reclaimed_when_its_lease_expires(make_cluster) -> None:
    import subprocess
    import sys
    c = make_cluster(dram=1, capacity="64MiB", metadata_args=("--job-lease", "2s"))
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, c.address], stdout=subprocess.PIPE,
                              text=True)
    job_id, token = driver.stdout.readline().split()
    with pocket.connect(c.address) as cl:
        live = cl.register_job("live")  # its handle renews the lease while the test idles
        live.put("x", b"x" * 300_000)
        time.sleep(2.5)  # the driver is alive and renewing: nothing is reclaimed
        assert pocket.attach(job_id, token, c.address).get("tmp") == b"t" * 300_000
        driver.kill()  # kill -9: no deregistration
        driver.wait(5)
        t = time.monotonic()
        assert wait_for(lambda: _job_state(c, job_id) == "expired", 6.0)
        print(f"reclaimed {time.monotonic() - t:.1f}s after the driver's death (lease 2s)")
        orphan = pocket.attach(job_id, token, c.address)
        with pytest.raises(pocket.NotFound):
            orphan.get("tmp")  # freed
        assert orphan.get("kept") == b"k" * 300_000  # persisted: kept
        with pytest.raises(pocket.AccessDenied):
            orphan.put("new", b"n")
        orphan.close()
        assert live.get("x") == b"x" * 300_000  # the live job kept its data
        live.deregister()


def _job_state(c, job_id: str):
    for j in c.status()["jobs"]:
        if j["id"] == job_id:
            return j["state"]
    return None


def test_sigterm_finishes_in_flight_requests_and_leaves_the_controller(make_cluster) -> None:
    c = make_cluster(dram=2, capacity="64MiB")
    with pocket.connect(c.address, timeout=10.0) as cl:
        job = cl.register_job("graceful")
        data = os.urandom(4 << 20)
        errors: list = []
        done = threading.Event()

        def writer() -> None:
            i = 0
            while not done.is_set():
                try:
                    job.put(f"w{i % 4}", data)
                except pocket.PocketError as exc:
                    errors.append(exc)
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.3)
        victim = [p for p in c.processes if p.role == "storage"][0]
        victim_id = storage_nodes(c)[victim.address]
        victim.process.send_signal(signal.SIGTERM)
        assert victim.process.wait(10) == 0
        # It said goodbye: gone from the controller at once, not after a timeout.
        assert victim_id not in {n["id"] for n in c.status()["nodes"]}
        time.sleep(0.3)
        done.set()
        t.join(10)
        # Puts in flight on it finished or failed cleanly; later ones used the other node.
        assert all(isinstance(e, pocket.Unavailable) for e in errors), errors[:3]
        job.put("after", data)
        assert job.get("after") == data
        job.deregister()
