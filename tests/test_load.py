"""Load: 1,000 concurrent client connections on one storage server; backpressure.

Default: 1,000 connections (4 processes x 250 asyncio clients), each doing a
put and three gets of a 100 KB object through the normal API.
``POCKET_LOAD_FULL=1`` makes each client do 20 rounds.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

import pocket
from pocket.protocol import FIXED, Op, encode_frame

PROCESSES = 4
CLIENTS = 250  # per process: 1,000 connections to the storage server in all
ROUNDS = 20 if os.environ.get("POCKET_LOAD_FULL") else 1

CLIENT = """
import asyncio, os, sys, time
import pocket.aio

async def one(i, job_id, token, controller, rounds, stored, ready):
    job = await pocket.aio.attach(job_id, token, controller, timeout=60)
    data = os.urandom(100_000) + i.to_bytes(4, "little")
    try:
        for r in range(rounds):
            name = f"{os.getpid()}-{i}"
            await job.put(name, data)
            if r == 0:  # hold the connections open until every process's clients are in
                stored.append(i)
                await ready.wait()
            for _ in range(3):
                if await job.get(name) != data:
                    raise AssertionError("wrong bytes")
        return 0
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        await job.close()

async def barrier(clients, stored, ready, directory, processes):
    deadline = time.monotonic() + 120
    while len(stored) < clients and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    open(os.path.join(directory, str(os.getpid())), "w").close()
    while len(os.listdir(directory)) < processes and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # the parent samples the connection count meanwhile
    ready.set()

async def main(controller, job_id, token, clients, rounds, directory, processes):
    t = time.monotonic()
    stored, ready = [], asyncio.Event()
    tasks = [one(i, job_id, token, controller, rounds, stored, ready) for i in range(clients)]
    results = await asyncio.gather(barrier(clients, stored, ready, directory, processes), *tasks)
    print(sum(results[1:]), round(time.monotonic() - t, 2), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
                 sys.argv[6], int(sys.argv[7])))
"""


@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if want < 4096:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 1,000 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))  # servers inherit it
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.timeout(300)
def test_thousand_connections_on_one_storage_server(make_cluster, many_files) -> None:
    c = make_cluster(dram=1, capacity="512MiB")
    (storage,) = [p for p in c.processes if p.role == "storage"]
    with pocket.connect(c.address) as cl:
        job = cl.register_job("load")
        rss0 = psutil.Process(storage.pid).memory_info().rss
        t = time.monotonic()
        barrier_dir = tempfile.mkdtemp(prefix="pocket-load-")
        procs = [subprocess.Popen([sys.executable, "-c", CLIENT, c.address, job.id, job.token,
                                   str(CLIENTS), str(ROUNDS), barrier_dir, str(PROCESSES)],
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(PROCESSES)]
        peak_conns = 0
        while any(p.poll() is None for p in procs) and time.monotonic() - t < 240:
            try:
                peak_conns = max(peak_conns, len(psutil.Process(storage.pid).net_connections()))
            except psutil.Error:
                pass
            time.sleep(0.2)
        results = [p.communicate(timeout=30) for p in procs]
        shutil.rmtree(barrier_dir, ignore_errors=True)
        took = time.monotonic() - t
        rss1 = psutil.Process(storage.pid).memory_info().rss
        errors = sum(int(out.split()[0]) for out, _ in results)
        assert errors == 0, [err[-500:] for _, err in results]
        ops = PROCESSES * CLIENTS * ROUNDS * 4
        print(f"{PROCESSES * CLIENTS} clients, {ops} ops in {took:.1f}s, peak {peak_conns} "
              f"storage connections, storage RSS {rss0 >> 20} -> {rss1 >> 20} MiB")
        assert peak_conns >= 900  # they really were concurrent
        stored = PROCESSES * CLIENTS * 100_004
        # The data, a receive buffer per connection (96 KiB) and the freed-page slack: bounded.
        assert rss1 - rss0 < stored + PROCESSES * CLIENTS * (320 << 10) + (128 << 20)
        job.deregister()


def test_slow_reader_pauses_its_writer(cluster) -> None:
    """A client that sends reads but does not read the replies: the server stops reading
    its requests instead of buffering replies without bound, and resumes when it reads."""
    with pocket.connect(cluster.address) as cl:
        job = cl.register_job("slow-reader")
        job.put("big", os.urandom(1 << 20))
        h = job._md(Op.GET, {"name": "big", "dar": False}).header
        addr, ext, length, cap, _ = h["ext"][0]
        host, port = addr.rsplit(":", 1)
        pid = _pid_listening(int(port))
        rss0 = psutil.Process(pid).memory_info().rss
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.setblocking(False)
        request = b"".join(encode_frame(Op.EXT_READ, 1, {"ext": ext, "off": 0, "len": length,
                                                         "cap": cap}))
        sent = 0
        deadline = time.monotonic() + 3
        while sent < 2000 and time.monotonic() < deadline:  # 2 GB of replies if unbounded
            try:
                sock.send(request)
                sent += 1
            except BlockingIOError:
                time.sleep(0.01)
        time.sleep(1.0)
        rss1 = psutil.Process(pid).memory_info().rss
        # Not all of them are even accepted, and the server did not buffer what it did read.
        assert rss1 - rss0 < 128 << 20, (rss0 >> 20, rss1 >> 20)
        sock.setblocking(True)
        sock.settimeout(30)
        got = 0
        need = sent * (length + FIXED.size)
        buf = bytearray(1 << 20)
        while got < need - 1000:
            n = sock.recv_into(buf)
            assert n, "server closed"
            got += n
        sock.close()
        print(f"sent {sent} 1 MiB reads without reading; server RSS {rss0 >> 20} -> "
              f"{rss1 >> 20} MiB; then read {got >> 20} MiB of replies")
        job.deregister()


def _pid_listening(port: int) -> int:
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return conn.pid
    raise LookupError(port)
