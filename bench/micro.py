#!/usr/bin/env python3
"""Pocket's micro-benchmark: Pocket vs Redis vs the raw loopback socket, in one run.

    python bench/micro.py                      # own LocalCluster (2 DRAM servers) + own redis-server
    python bench/micro.py --quick              # a smoke run of a few seconds
    python bench/micro.py --controller 127.0.0.1:7070 --json results.json

Workloads (each against Pocket and a private redis-server through redis-py
with hiredis, in the same run):

1. latency: 1 KiB put and get from one client, p50/p99 in µs, blocks of
   operations interleaved between the stores (Pocket sync, Pocket asyncio,
   redis-py sync, redis-py asyncio, the raw echo) so machine noise hits all;
2. throughput: 64 KiB, 1 MiB and 16 MiB put and get, aggregate MB/s with
   C = procs × tasks concurrent clients (spawned worker processes running
   asyncio tasks; Redis also as threads, and its better client is compared);
3. metadata: lookups/s and creates/s (16-byte puts) on the one metadata server
   with the same C clients, then the server's capacity with cheap pipelined
   load generators (the C clients are client-CPU-bound on a 2-core machine);
   the servers' CPU use (on a CPU + waiting for one) is shown for every cell;
4. the raw limit: a minimal asyncio BufferedProtocol echo/sink on uvloop in its
   own process: 1 KiB round trips, 1 MiB one-way MB/s;
5. memory: client peak RSS growth of a 16 MiB ``get_into`` a numpy buffer, and
   server RSS after storing ``--rss-bytes`` of mixed 1 KiB–1 MiB objects.

Progress goes to stderr; the markdown table and the target check to stdout.
Only 127.0.0.1 is used.  Everything started here (cluster, redis-server, echo
server, workers) is stopped at exit, including on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import multiprocessing as mp
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
import zlib
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, also in spawned children

from _common import (LoadMonitor, Progress, RedisMissing, RedisServer, find_redis_server,  # noqa: E402
                     fmt_num, fmt_ratio, fmt_size, machine_info, percentile)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MB = 1e6
SIZES = (64 * KiB, 1 * MiB, 16 * MiB)
SETUP_TIMEOUT = 120.0  # seconds a worker may take to get ready for a cell


def new_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when available (Pocket's servers run on uvloop too)."""
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a Pocket dependency
        return asyncio.new_event_loop()


def source_state() -> str:
    """The git commit of the Pocket being measured, "+dirty" if src/ has local edits."""
    import subprocess
    import pocket
    root = os.path.dirname(os.path.abspath(pocket.__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=root, text=True,
                               capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + ("+dirty" if dirty else "")


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still pending (e.g. after an error), then close the loop."""
    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
        return "uvloop"
    except ImportError:  # pragma: no cover
        return "asyncio"


def nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


# =================================================================================
# The raw limit: a minimal BufferedProtocol echo and sink on uvloop, own process
# =================================================================================

class _RawProtocol(asyncio.BufferedProtocol):
    """The least a server can be: one preallocated receive buffer, TCP_NODELAY."""

    buffer_size = 256 * KiB

    def __init__(self) -> None:
        self.buf = bytearray(self.buffer_size)
        self.view = memoryview(self.buf)
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            nodelay(sock)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view


class _Echo(_RawProtocol):
    """Sends back whatever arrives."""

    def buffer_updated(self, nbytes: int) -> None:
        self.transport.write(bytes(self.view[:nbytes]))


class _Sink(_RawProtocol):
    """Counts bytes and acks each full MiB with one byte."""

    buffer_size = 1 * MiB

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.acked = 0

    def buffer_updated(self, nbytes: int) -> None:
        self.count += nbytes
        mib = self.count >> 20
        if mib > self.acked:
            self.transport.write(b"A" * (mib - self.acked))
            self.acked = mib


def echo_server_main(conn: Any) -> None:
    """Child process: serve echo and sink on 127.0.0.1 until the pipe says stop or closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us in order
    loop = new_loop()
    asyncio.set_event_loop(loop)

    async def run() -> None:
        echo = await loop.create_server(_Echo, "127.0.0.1", 0)
        sink = await loop.create_server(_Sink, "127.0.0.1", 0)
        conn.send({"echo": echo.sockets[0].getsockname()[1],
                   "sink": sink.sockets[0].getsockname()[1], "loop": type(loop).__module__})
        try:
            await loop.run_in_executor(None, conn.recv)  # "stop", or EOFError when the parent dies
        except (EOFError, OSError):
            pass
        echo.close()
        sink.close()

    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


class RawLimit:
    """The echo/sink server process and its blocking-socket clients."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=echo_server_main, args=(child,), daemon=True,
                                name="bench-echo")
        self.proc.start()
        child.close()
        if not self.parent.poll(60):
            raise RuntimeError("the raw echo server did not start")
        info = self.parent.recv()
        self.echo_port, self.sink_port, self.loop = info["echo"], info["sink"], info["loop"]
        self.sock = socket.create_connection(("127.0.0.1", self.echo_port), timeout=30)
        nodelay(self.sock)
        self.rbuf = bytearray(64 * KiB)

    def rtt_block(self, n: int, payload: bytes) -> list[int]:
        """``n`` round trips of ``payload`` on one blocking socket; ns each."""
        sock, size = self.sock, len(payload)
        view = memoryview(self.rbuf)
        out = [0] * n
        pc = time.perf_counter_ns
        for i in range(n):
            t = pc()
            sock.sendall(payload)
            got = 0
            while got < size:
                r = sock.recv_into(view[got:size])
                if not r:
                    raise ConnectionError("echo server closed the connection")
                got += r
            out[i] = pc() - t
        return out

    def one_way(self, chunk: int, duration: float, max_bytes: int) -> dict:
        """Send ``chunk``-sized ``sendall``s for ``duration`` s; wait for every MiB's ack."""
        data = memoryview(os.urandom(chunk))
        with socket.create_connection(("127.0.0.1", self.sink_port), timeout=60) as sock:
            nodelay(sock)
            sent = 0
            t0 = time.perf_counter()
            deadline = t0 + duration
            while sent < max_bytes:
                sock.sendall(data)
                sent += chunk
                if time.perf_counter() >= deadline:
                    break
            want, acks = sent >> 20, 0
            while acks < want:
                r = sock.recv(4096)
                if not r:
                    raise ConnectionError("sink closed the connection")
                acks += len(r)
            t1 = time.perf_counter()
        return {"bytes": sent, "seconds": t1 - t0, "MBps": sent / (t1 - t0) / MB}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError, BrokenPipeError):
            self.parent.send("stop")
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.parent.close()


# =================================================================================
# Multi-client cells: a pool of spawned worker processes, each running tasks
# =================================================================================

class _PocketAio:
    label = "pocket.aio"

    async def open(self, cell: dict) -> None:
        import pocket.aio
        p = cell["pocket"]
        self.job = await pocket.aio.attach(p["job"], p["token"], p["controller"])

    async def put(self, name: str, data: Any) -> None:
        await self.job.put(name, data)

    async def get(self, name: str) -> Any:
        return await self.job.get(name)

    async def get_into(self, name: str, buf: Any) -> int:
        return await self.job.get_into(name, buf)

    async def lookup(self, name: str) -> int:
        info = await self.job.lookup(name)
        if info is None:
            raise KeyError(name)
        return info.size

    async def close(self) -> None:
        await self.job.close()


class _RedisAio:
    label = "redis.asyncio"

    async def open(self, cell: dict) -> None:
        import redis.asyncio
        r = cell["redis"]
        self.r = redis.asyncio.Redis(host=r["host"], port=r["port"], socket_timeout=120)
        await self.r.ping()

    async def put(self, name: str, data: Any) -> None:
        await self.r.set(name, data)

    async def get(self, name: str) -> Any:
        return await self.r.get(name)

    async def get_into(self, name: str, buf: Any) -> int:
        data = await self.r.get(name)
        buf[:len(data)] = data
        return len(data)

    async def lookup(self, name: str) -> int:
        return await self.r.strlen(name)

    async def close(self) -> None:
        await self.r.aclose()


def _names(cell: dict, index: int, task: int) -> list[str]:
    base = f"{cell['prefix']}/{index}/{task}"
    if cell["op"] == "lookup":
        return [f"{base}/{j}" for j in range(16)]
    return [base]


def _payload(cell: dict) -> bytes:
    size = cell["size"]
    return os.urandom(size) if size else b""


async def _async_setup(store: Any, cell: dict, index: int, payload: bytes) -> list:
    """Warm every task's connection and create what the measured loop reads."""
    op, tasks = cell["op"], cell["tasks"]
    bufs = []

    async def warm(task: int) -> None:
        for name in _names(cell, index, task):
            await store.put(name if op != "create" else name + "/warm", payload)
        if op in ("get", "get_into"):
            data = await store.get(_names(cell, index, task)[0])
            if len(data) != len(payload) or bytes(data[:64]) != payload[:64]:
                raise AssertionError(f"{store.label} returned wrong data in setup")

    await asyncio.gather(*(warm(t) for t in range(tasks)))
    if op == "get_into":
        bufs = [bytearray(cell["size"]) for _ in range(tasks)]
    return bufs


async def _async_measure(store: Any, cell: dict, index: int, payload: bytes, bufs: list) -> dict:
    op, size, max_ops = cell["op"], cell["size"], cell["max_ops"]
    t0 = time.perf_counter()
    deadline = t0 + cell["duration"]
    pc = time.perf_counter

    async def run(task: int) -> tuple[int, int]:
        names = _names(cell, index, task)
        name = names[0]
        n = nbytes = 0
        if op == "put":
            while n < max_ops:
                await store.put(name, payload)
                n += 1
                if pc() >= deadline:
                    break
            nbytes = n * size
        elif op == "get":
            while n < max_ops:
                data = await store.get(name)
                if len(data) != size:
                    raise AssertionError(f"get returned {len(data)} bytes, not {size}")
                nbytes += size
                n += 1
                if pc() >= deadline:
                    break
        elif op == "get_into":
            buf = bufs[task]
            while n < max_ops:
                got = await store.get_into(name, buf)
                if got != size:
                    raise AssertionError(f"get_into returned {got} bytes, not {size}")
                nbytes += size
                n += 1
                if pc() >= deadline:
                    break
        elif op == "lookup":
            k = len(names)
            while n < max_ops:
                await store.lookup(names[n % k])
                n += 1
                if pc() >= deadline:
                    break
        elif op == "create":
            while n < max_ops:
                await store.put(f"{name}/{n}", payload)
                n += 1
                if pc() >= deadline:
                    break
            nbytes = n * size
        else:
            raise ValueError(f"unknown op {op}")
        return n, nbytes

    results = await asyncio.gather(*(run(t) for t in range(cell["tasks"])))
    t1 = time.perf_counter()
    return {"start": t0, "end": t1, "ops": sum(r[0] for r in results),
            "bytes": sum(r[1] for r in results)}


def _run_async_cell(index: int, cell: dict, barrier: Any) -> dict:
    store = _PocketAio() if cell["client"] == "pocket-aio" else _RedisAio()
    payload = _payload(cell)
    loop = new_loop()
    try:
        loop.run_until_complete(store.open(cell))
        bufs = loop.run_until_complete(_async_setup(store, cell, index, payload))
        barrier.wait(SETUP_TIMEOUT)
        result = loop.run_until_complete(_async_measure(store, cell, index, payload, bufs))
        loop.run_until_complete(store.close())
    finally:
        close_loop(loop)
    return result


def _run_threads_cell(index: int, cell: dict, barrier: Any) -> dict:
    """Redis through the blocking redis-py client, one thread per task."""
    import redis
    r = cell["redis"]
    client = redis.Redis(host=r["host"], port=r["port"], socket_timeout=120)
    op, size, tasks, max_ops = cell["op"], cell["size"], cell["tasks"], cell["max_ops"]
    payload = _payload(cell)
    ready = threading.Barrier(tasks + 1, timeout=SETUP_TIMEOUT)
    go = threading.Event()
    shared: dict = {}
    results: list = [None] * tasks
    errors: list = []
    pc = time.perf_counter

    def body(task: int) -> None:
        try:
            names = _names(cell, index, task)
            name = names[0]
            for nm in names:
                client.set(nm if op != "create" else nm + "/warm", payload)
            buf = bytearray(size) if op == "get_into" else None
            ready.wait()
            go.wait()
            deadline = shared["deadline"]
            n = nbytes = 0
            k = len(names)
            while n < max_ops:
                if op == "put":
                    client.set(name, payload)
                    nbytes += size
                elif op == "get":
                    got = len(client.get(name))
                    if got != size:
                        raise AssertionError(f"get returned {got} bytes, not {size}")
                    nbytes += size
                elif op == "get_into":
                    data = client.get(name)
                    buf[:len(data)] = data
                    nbytes += len(data)
                elif op == "lookup":
                    client.strlen(names[n % k])
                elif op == "create":
                    client.set(f"{name}/{n}", payload)
                    nbytes += size
                n += 1
                if pc() >= deadline:
                    break
            results[task] = (n, nbytes)
        except BaseException as exc:  # reported by the main thread
            errors.append(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(threading.BrokenBarrierError):
                ready.abort()

    threads = [threading.Thread(target=body, args=(t,), daemon=True) for t in range(tasks)]
    for th in threads:
        th.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        go.set()
        raise RuntimeError("; ".join(errors) or "a redis thread failed in setup")
    barrier.wait(SETUP_TIMEOUT)
    t0 = pc()
    shared["deadline"] = t0 + cell["duration"]
    go.set()
    for th in threads:
        th.join()
    t1 = pc()
    client.close()
    if errors:
        raise RuntimeError("; ".join(errors))
    return {"start": t0, "end": t1, "ops": sum(r[0] for r in results),
            "bytes": sum(r[1] for r in results)}


def _run_pipe_cell(index: int, cell: dict, barrier: Any) -> dict:
    """Server capacity: one connection per worker, ``depth`` lookups per batch.

    The batch is encoded once and sent with one ``sendall``; the replies are
    decoded and checked one by one.  The client then costs far less per
    request than the server, so the server is what saturates.  Pocket: its
    own codec (``pocket.protocol``) on a blocking socket; Redis: raw RESP
    ``STRLEN`` commands with hiredis parsing the replies.
    """
    depth, max_ops = cell["depth"], cell["max_ops"]
    names = [f"{cell['prefix']}/{index}/{j}" for j in range(16)]
    payload = _payload(cell)
    if cell["client"] == "pocket-pipe":
        import pocket
        from pocket.protocol import FLAG_ERROR, FrameReader, Limits, Op, encode_frame
        p = cell["pocket"]
        job = pocket.attach(p["job"], p["token"], p["controller"])
        for nm in names:
            job.put(nm, payload)
        address = job.metadata
        auth = {"job": job.id, "tok": job.token}
        batch = b"".join(b"".join(bytes(x) for x in encode_frame(Op.LOOKUP, i + 1,
                                                                 {**auth, "name": names[i % 16]}))
                         for i in range(depth))
        reader = FrameReader(Limits(max_header=1 << 20, max_payload=1 << 20))

        def replies(sock: socket.socket) -> None:
            got = 0
            while got < depth:
                buf = reader.get_buffer()
                n = sock.recv_into(buf)
                if not n:
                    raise ConnectionError("metadata server closed the connection")
                reader.buffer_updated(n)
                while True:
                    frame = reader.next_frame()
                    if frame is None:
                        break
                    if frame.flags & FLAG_ERROR:
                        raise RuntimeError(f"lookup failed: {frame.header}")
                    if frame.header.get("size") != len(payload):
                        raise AssertionError("lookup returned the wrong size")
                    got += 1
        closer = job.close
    else:
        import hiredis
        import redis
        r = cell["redis"]
        client = redis.Redis(host=r["host"], port=r["port"], socket_timeout=60)
        for nm in names:
            client.set(nm, payload)
        client.close()
        address = f"{r['host']}:{r['port']}"
        batch = b"".join(b"*2\r\n$6\r\nSTRLEN\r\n$%d\r\n%s\r\n" % (len(nm), nm.encode())
                         for nm in (names[i % 16] for i in range(depth)))
        reader = hiredis.Reader()
        rbuf = bytearray(256 * KiB)

        def replies(sock: socket.socket) -> None:
            got = 0
            while got < depth:
                n = sock.recv_into(rbuf)
                if not n:
                    raise ConnectionError("redis closed the connection")
                reader.feed(rbuf, 0, n)
                while True:
                    v = reader.gets()
                    if v is False:
                        break
                    if v != len(payload):
                        raise AssertionError(f"STRLEN returned {v!r}")
                    got += 1
        closer = None
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    nodelay(sock)
    try:
        sock.sendall(batch)  # warm-up batch
        replies(sock)
        barrier.wait(SETUP_TIMEOUT)
        t0 = time.perf_counter()
        deadline = t0 + cell["duration"]
        n = 0
        while n < max_ops:
            sock.sendall(batch)
            replies(sock)
            n += depth
            if time.perf_counter() >= deadline:
                break
        t1 = time.perf_counter()
    finally:
        sock.close()
        if closer is not None:
            closer()
    return {"start": t0, "end": t1, "ops": n, "bytes": 0}


def worker_main(index: int, conn: Any, barrier: Any) -> None:
    """A worker process: run cells sent by the parent until it says stop (or dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us in order
    import pocket.aio  # noqa: F401  (imports done before the parent starts measuring)
    import redis.asyncio  # noqa: F401
    conn.send("ready")
    while True:
        try:
            cell = conn.recv()
        except (EOFError, OSError):
            return
        if cell is None:
            return
        try:
            if cell["client"] == "redis-threads":
                result = _run_threads_cell(index, cell, barrier)
            elif cell["client"].endswith("-pipe"):
                result = _run_pipe_cell(index, cell, barrier)
            else:
                result = _run_async_cell(index, cell, barrier)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                barrier.abort()
            result = {"error": f"{type(exc).__name__}: {exc}",
                      "trace": traceback.format_exc(limit=8)}
        try:
            conn.send(result)
        except (OSError, BrokenPipeError):
            return


class WorkerPool:
    """``procs`` spawned worker processes that start each cell together (a barrier)."""

    def __init__(self, ctx: Any, procs: int) -> None:
        self.ctx = ctx
        self.n = procs
        self.barrier = ctx.Barrier(procs)
        self.pipes: list = []
        self.procs: list = []
        for i in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(i, child, self.barrier), daemon=True,
                            name=f"bench-worker-{i}")
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)
        for c in self.pipes:  # idle workers do not disturb what is measured meanwhile
            if not c.poll(SETUP_TIMEOUT) or c.recv() != "ready":
                self.close()
                raise RuntimeError("a benchmark worker process did not start")

    def run(self, cell: dict) -> dict:
        """Run one cell on every worker; the aggregate over all of them."""
        for c in self.pipes:
            c.send(cell)
        deadline = time.monotonic() + SETUP_TIMEOUT + cell["duration"] * 3 + 60
        results = []
        for c in self.pipes:
            if not c.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"a worker did not finish cell {cell['name']} in time")
            results.append(c.recv())
        errors = [r for r in results if "error" in r]
        if errors:
            self.barrier.reset()
            first = next((r for r in errors if "BrokenBarrier" not in r["error"]), errors[0])
            return {"error": first["error"], "trace": first.get("trace", "")}
        start = min(r["start"] for r in results)
        end = max(r["end"] for r in results)
        wall = end - start
        ops = sum(r["ops"] for r in results)
        nbytes = sum(r["bytes"] for r in results)
        return {"ops": ops, "bytes": nbytes, "seconds": wall, "ops_per_s": ops / wall,
                "MBps": nbytes / wall / MB, "clients": self.n * cell["tasks"],
                "start": start, "end": end}

    def close(self) -> None:
        for c in self.pipes:
            with contextlib.suppress(OSError, BrokenPipeError):
                c.send(None)
        for p in self.procs:
            p.join(5)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        for c in self.pipes:
            c.close()
        self.pipes, self.procs = [], []


class CpuSampler:
    """Samples how busy some server processes are while a cell runs.

    From ``/proc/PID/task/*/schedstat``: time on a CPU and time runnable but
    waiting for one (a server that is on-CPU + waiting ≈ 100% is saturated;
    the waiting part is CPU contention on this small machine).  Worker
    start/end times are ``perf_counter`` values, which on Linux share one
    monotonic clock across processes, so the share over exactly the measured
    window is computed afterwards.
    """

    def __init__(self, pids: dict[str, list[int]], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: list[tuple[float, dict[str, tuple[float, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-sampler")

    @staticmethod
    def _schedstat(pid: int) -> tuple[float, float]:
        on = wait = 0
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return 0.0, 0.0
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    a, b, _ = f.read().split()
                on += int(a)
                wait += int(b)
            except (OSError, ValueError):
                pass
        return on / 1e9, wait / 1e9

    def _read(self) -> dict[str, tuple[float, float]]:
        out = {}
        for role, pids in self.pids.items():
            on = wait = 0.0
            for pid in pids:
                a, b = self._schedstat(pid)
                on += a
                wait += b
            out[role] = (on, wait)
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self._read()))
            self._stop.wait(self.interval)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def busy(self, start: float, end: float) -> dict[str, dict[str, float]]:
        """Per role over [start, end]: ``cpu`` and ``wait`` in cores (1.0 = one core)."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return {}
        (t0, a), (t1, b) = inside[0], inside[-1]
        return {role: {"cpu": (b[role][0] - a[role][0]) / (t1 - t0),
                       "wait": (b[role][1] - a[role][1]) / (t1 - t0)} for role in a}


# =================================================================================
# Memory probes: a fresh process per measurement, peak RSS via /proc
# =================================================================================

def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_probe_main(conn: Any, params: dict) -> None:
    """Child process: peak RSS growth of one 16 MiB read into a preallocated numpy buffer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import resource

        import numpy as np
        kind, size, name = params["kind"], params["size"], params["name"]
        buf = np.empty(size, dtype=np.uint8)
        buf.fill(0)  # make every page resident before the baseline
        if kind.startswith("pocket"):
            import pocket
            p = params["pocket"]
            job = pocket.attach(p["job"], p["token"], p["controller"])
            job.get_into(params["warm"], buf)  # connections, buffers, imports: not counted
            if kind == "pocket-get_into":
                def op() -> None:
                    job.get_into(name, buf)
            else:
                def op() -> None:
                    data = job.get(name)
                    buf[:] = np.frombuffer(data, dtype=np.uint8)
        else:
            import redis
            r = params["redis"]
            client = redis.Redis(host=r["host"], port=r["port"], socket_timeout=120)
            warm = client.get(params["warm"])
            buf[:len(warm)] = np.frombuffer(warm, dtype=np.uint8)
            del warm

            def op() -> None:
                data = client.get(name)
                buf[:] = np.frombuffer(data, dtype=np.uint8)
        gc.collect()
        base_kib = _proc_status_kib("VmRSS")
        method = "VmHWM after clear_refs"
        if not _reset_peak():
            method = "ru_maxrss (peak could not be reset)"
        before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        op()
        if method.startswith("VmHWM"):
            peak_kib = _proc_status_kib("VmHWM")
        else:
            peak_kib = max(base_kib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                           before_max)
        ok = zlib.crc32(buf) == params["crc"]
        growth = max(0, peak_kib - base_kib) * KiB
        conn.send({"kind": kind, "base_rss": base_kib * KiB, "peak_rss": peak_kib * KiB,
                   "growth": growth, "growth_x": growth / size, "method": method,
                   "byte_exact": ok})
    except BaseException as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})


def run_mem_probe(ctx: Any, params: dict) -> dict:
    parent, child = ctx.Pipe()
    p = ctx.Process(target=mem_probe_main, args=(child, params), daemon=True, name="bench-mem")
    p.start()
    child.close()
    try:
        if not parent.poll(120):
            raise TimeoutError(f"memory probe {params['kind']} did not finish")
        return parent.recv()
    finally:
        p.join(5)
        if p.is_alive():
            p.terminate()
            p.join(5)
        parent.close()


# =================================================================================
# The benchmark
# =================================================================================

class Bench:
    def __init__(self, args: argparse.Namespace, progress: Progress) -> None:
        self.args = args
        self.say = progress
        self.ctx = mp.get_context("spawn")
        self.stack = contextlib.ExitStack()
        self.results: dict = {}
        self.meta: dict = {}
        self.local = None
        self.cell_no = 0

    # -- setup -------------------------------------------------------------------
    def start(self) -> None:
        import pocket
        import redis
        import redis.utils
        args = self.args
        self.redis = RedisServer(find_redis_server())
        self.stack.callback(self.redis.cleanup)
        self.redis.start()
        self.say(f"redis-server {self.redis.address} (pid {self.redis.pid}): {self.redis.version}")
        if args.controller:
            self.controller = args.controller
            self.say(f"using the running Pocket cluster at {self.controller}")
        else:
            from pocket.local import LocalCluster
            self.local = LocalCluster(dram=args.dram, capacity=args.capacity,
                                      log_level="WARNING")
            self.stack.callback(self.local.stop)
            self.local.start()
            self.controller = self.local.address
            self.say("started a local Pocket cluster: "
                     + ", ".join(f"{p.role} {p.address} (pid {p.pid})"
                                 for p in self.local.processes))
        self.cluster = pocket.connect(self.controller)
        self.stack.callback(self.cluster.close)
        self.raw = RawLimit(self.ctx)
        self.stack.callback(self.raw.close)
        self.say(f"raw echo server (BufferedProtocol on {self.raw.loop}) ports "
                 f"{self.raw.echo_port}/{self.raw.sink_port}")
        self.pool = WorkerPool(self.ctx, args.procs)
        self.stack.callback(self.pool.close)
        self.say(f"{args.procs} worker processes (spawn) × {args.tasks} tasks each")
        if not redis.utils.HIREDIS_AVAILABLE:
            self.say("WARNING: hiredis is not installed; redis-py uses its pure-Python parser")
        self.meta = {
            "machine": machine_info(), "argv": sys.argv, "controller": self.controller,
            "own_cluster": self.local is not None, "redis_server": self.redis.version,
            "redis_py": redis.__version__, "hiredis": bool(redis.utils.HIREDIS_AVAILABLE),
            "pocket": getattr(pocket, "__version__", "?"), "loop": loop_name(),
            "procs": args.procs, "tasks": args.tasks, "clients": args.procs * args.tasks,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": source_state(),
            "args": {k: v for k, v in vars(args).items() if k != "json"},
        }

    def close(self) -> None:
        self.stack.close()

    def redis_client(self) -> Any:
        import redis
        return redis.Redis(host=self.redis.host, port=self.redis.port, socket_timeout=120)

    def register(self, name: str) -> Any:
        return self.cluster.register_job(f"bench-{name}")

    # -- 1. latency ----------------------------------------------------------------
    def latency(self) -> None:
        import pocket.aio
        import redis
        import redis.asyncio
        args = self.args
        n_total = args.latency_ops
        block = min(args.block, n_total)
        rounds = max(1, math.ceil(n_total / block))
        data = os.urandom(1 * KiB)
        names = [f"lat/{i}" for i in range(100)]
        job = self.register("latency")
        loop = new_loop()
        r = redis.Redis(host=self.redis.host, port=self.redis.port, socket_timeout=30)
        ra = None
        ajob = None
        try:
            ajob = loop.run_until_complete(pocket.aio.attach(job.id, job.token, self.controller))
            ra = redis.asyncio.Redis(host=self.redis.host, port=self.redis.port, socket_timeout=30)
            pc = time.perf_counter_ns

            def sync_block(fn: Callable, n: int, check: bool) -> list[int]:
                out = [0] * n
                for i in range(n):
                    name = names[i % 100]
                    t = pc()
                    v = fn(name)
                    out[i] = pc() - t
                    if check and len(v) != 1024:
                        raise AssertionError(f"get returned {len(v)} bytes, not 1024")
                return out

            async def async_block(fn: Callable, n: int, check: bool) -> list[int]:
                out = [0] * n
                for i in range(n):
                    name = names[i % 100]
                    t = pc()
                    v = await fn(name)
                    out[i] = pc() - t
                    if check and len(v) != 1024:
                        raise AssertionError(f"get returned {len(v)} bytes, not 1024")
                return out

            clients: dict[str, tuple[Callable, Callable, bool]] = {
                "pocket-sync": (lambda nm: job.put(nm, data), job.get, False),
                "redis-sync": (lambda nm: r.set(nm, data), r.get, False),
                "pocket-aio": (lambda nm: ajob.put(nm, data), ajob.get, True),
                "redis-aio": (lambda nm: ra.set(nm, data), ra.get, True),
            }
            samples: dict[str, list[int]] = {f"{c}/{op}": [] for c in clients for op in ("put", "get")}
            samples["raw/rtt"] = []

            def run_block(client: str, n: int, keep: bool) -> None:
                if client == "raw":
                    s = self.raw.rtt_block(n, data)
                    if keep:
                        samples["raw/rtt"].extend(s)
                    return
                put, get, is_async = clients[client]
                for op, fn in (("put", put), ("get", get)):
                    if is_async:
                        s = loop.run_until_complete(async_block(fn, n, op == "get"))
                    else:
                        s = sync_block(fn, n, op == "get")
                    if keep:
                        samples[f"{client}/{op}"].extend(s)

            order = ["pocket-sync", "redis-sync", "pocket-aio", "redis-aio", "raw"]
            self.say(f"latency: warm-up, then {rounds} rounds of {block} ops × "
                     f"{len(order)} clients (1 KiB put+get)")
            for client in order:
                run_block(client, min(200, block), keep=False)
            done = 0
            step = max(1, rounds // 4)
            for rnd in range(rounds):
                n = min(block, n_total - done)
                rot = rnd % len(order)
                gc.collect()
                for client in order[rot:] + order[:rot]:  # rotate so no store always goes first
                    run_block(client, n, keep=True)
                done += n
                if (rnd + 1) % step == 0 or rnd + 1 == rounds:
                    s = sorted(samples["pocket-sync/get"])
                    q = sorted(samples["redis-sync/get"])
                    self.say(f"latency: {done}/{n_total} ops per client; get p50 so far: pocket "
                             f"{percentile(s, 50) / 1e3:.1f} µs, redis {percentile(q, 50) / 1e3:.1f} µs")
            out = {}
            for key, values in samples.items():
                values.sort()
                out[key] = {"n": len(values), "p50_us": percentile(values, 50) / 1e3,
                            "p99_us": percentile(values, 99) / 1e3,
                            "mean_us": sum(values) / len(values) / 1e3,
                            "ops_per_s": len(values) / (sum(values) / 1e9)}
            out["block"] = block
            self.results["latency"] = out
        finally:
            with contextlib.suppress(Exception):
                if ajob is not None:
                    loop.run_until_complete(ajob.close())
                if ra is not None:
                    loop.run_until_complete(ra.aclose())
            close_loop(loop)
            with contextlib.suppress(Exception):
                r.flushall()
            r.close()
            with contextlib.suppress(Exception):
                job.deregister()

    # -- 2/3. multi-client cells -------------------------------------------------------
    def server_pids(self, client: str) -> dict[str, list[int]]:
        """The server processes a cell of ``client`` loads (only those we started)."""
        if client.startswith("redis"):
            return {"redis": [self.redis.pid]}
        if self.local is None:
            return {}
        roles: dict[str, list[int]] = {}
        for p in self.local.processes:
            if p.role in ("metadata", "storage") and p.process.poll() is None:
                roles.setdefault(p.role, []).append(p.pid)
        return roles

    def redis_clients(self) -> list[str]:
        choice = self.args.redis_client
        if choice == "both":
            return ["redis-aio", "redis-threads"]
        return ["redis-aio" if choice == "asyncio" else "redis-threads"]

    def cell(self, client: str, op: str, size: int, duration: float) -> dict:
        self.cell_no += 1
        cell = {"name": f"{client} {op} {fmt_size(size) if size else '0 B'}", "client": client,
                "op": op, "size": size, "tasks": self.args.tasks, "duration": duration,
                "max_ops": self.args.max_ops, "prefix": f"c{self.cell_no}",
                "redis": {"host": self.redis.host, "port": self.redis.port}}
        if client.endswith("-pipe"):
            cell["depth"] = self.args.pipeline
            cell["name"] += f" pipelined ×{self.args.pipeline}"
        job = None
        if client.startswith("pocket"):
            job = self.register(f"{op}-{size}")
            cell["pocket"] = {"job": job.id, "token": job.token, "controller": self.controller}
        pids = self.server_pids(client)
        sampler = CpuSampler(pids) if pids else contextlib.nullcontext()
        try:
            with sampler:
                result = self.pool.run(cell)
            if pids and "start" in result:
                result["server_cpu"] = sampler.busy(result["start"], result["end"])
        except TimeoutError:
            self.say(f"  {cell['name']}: TIMEOUT; restarting the worker pool")
            self.pool.close()
            self.pool = WorkerPool(self.ctx, self.args.procs)
            result = {"error": "timeout"}
        finally:
            if job is not None:
                with contextlib.suppress(Exception):
                    job.deregister()
            else:
                with contextlib.suppress(Exception):
                    rc = self.redis_client()
                    rc.flushall()
                    rc.close()
        result["client"] = client
        cpu = result.get("server_cpu")
        cpu_text = ("; server on CPU + waiting for one: "
                    + ", ".join(f"{role} {v['cpu']:.0%}+{v['wait']:.0%}" for role, v in cpu.items())
                    if cpu else "")
        if client.endswith("-pipe") and "clients" in result:
            result["clients"] = f"{self.args.procs} conns × {self.args.pipeline} pipelined"
        if "error" in result:
            self.say(f"  {cell['name']}: ERROR {result['error']}")
            if result.get("trace"):
                print(result["trace"], file=sys.stderr)
        elif op in ("lookup", "create"):
            self.say(f"  {cell['name']}: {result['ops_per_s']:,.0f} ops/s "
                     f"(C={result['clients']}, {result['ops']:,} ops in {result['seconds']:.2f} s"
                     f"{cpu_text})")
        else:
            self.say(f"  {cell['name']}: {result['MBps']:,.0f} MB/s, {result['ops_per_s']:,.0f} ops/s "
                     f"(C={result['clients']}, {result['ops']:,} ops in {result['seconds']:.2f} s"
                     f"{cpu_text})")
        return result

    def throughput(self) -> None:
        args = self.args
        out: dict = {}
        self.say(f"throughput: {', '.join(fmt_size(s) for s in SIZES)} put/get, "
                 f"C = {args.procs}×{args.tasks}, {args.duration:g} s per cell")
        for size in SIZES:
            self.raw_limit(f"before {fmt_size(size)}")
            for op in ("put", "get"):
                key = f"{op}/{size}"
                out[key] = {c: self.cell(c, op, size, args.duration)
                            for c in ["pocket-aio", *self.redis_clients()]}
            if size >= 1 * MiB:
                out[f"get_into/{size}"] = {"pocket-aio": self.cell("pocket-aio", "get_into", size,
                                                                   args.duration)}
        self.results["throughput"] = out

    def raw_limit(self, label: str) -> None:
        """One more measurement of the one-way limit; the best run is the limit.

        Called once per throughput size so the limit is sampled across the same
        stretch of time as the cells it bounds (single-stream loopback speed
        varies with how the scheduler places the two ends).
        """
        args = self.args
        if not self.results.get("raw_one_way"):
            self.raw.one_way(1 * MiB, min(0.3, args.duration), args.max_ops * MiB)  # warm-up
        res = self.raw.one_way(1 * MiB, args.duration, args.max_ops * MiB)
        runs = self.results.setdefault("raw_one_way", {"runs": []})["runs"]
        runs.append({**res, "when": label})
        best = max(runs, key=lambda r: r["MBps"])
        self.results["raw_one_way"].update({"MBps": best["MBps"],
                                            "median_MBps": sorted(r["MBps"] for r in runs)[len(runs) // 2]})
        self.say(f"raw limit: 1 MiB one-way on one connection {res['MBps']:,.0f} MB/s "
                 f"({res['bytes'] / MiB:,.0f} MiB in {res['seconds']:.2f} s); best so far "
                 f"{best['MBps']:,.0f} MB/s")

    def metadata(self) -> None:
        args = self.args
        out: dict = {}
        self.say(f"metadata: lookups and 16-byte creates, C = {args.procs}×{args.tasks}")
        for op in ("lookup", "create"):
            out[op] = {c: self.cell(c, op, 16, args.duration)
                       for c in ["pocket-aio", *self.redis_clients()]}
        self.say(f"metadata: server capacity, {args.procs} connections pipelining "
                 f"{args.pipeline} lookups each")
        out["lookup-pipe"] = {c: self.cell(c, "lookup", 16, args.duration)
                              for c in ("pocket-pipe", "redis-pipe")}
        self.results["metadata"] = out

    # -- 5. memory ----------------------------------------------------------------------
    def client_memory(self) -> None:
        size = 16 * MiB
        data = os.urandom(size)
        warm = os.urandom(256 * KiB)
        crc = zlib.crc32(data)
        job = self.register("memory")
        rc = self.redis_client()
        out: dict = {}
        try:
            job.put("obj16", data)
            job.put("warm", warm)
            rc.set("obj16", data)
            rc.set("warm", warm)
            del data
            common = {"size": size, "name": "obj16", "warm": "warm", "crc": crc,
                      "pocket": {"job": job.id, "token": job.token, "controller": self.controller},
                      "redis": {"host": self.redis.host, "port": self.redis.port}}
            for kind in ("pocket-get_into", "pocket-get", "redis-get"):
                res = run_mem_probe(self.ctx, {**common, "kind": kind})
                out[kind] = res
                if "error" in res:
                    self.say(f"memory {kind}: ERROR {res['error']}")
                else:
                    self.say(f"memory: 16 MiB {kind} into a numpy buffer: peak RSS growth "
                             f"{res['growth'] / MiB:.1f} MiB = {res['growth_x']:.2f}× the object "
                             f"({res['method']}; byte-exact {res['byte_exact']})")
        finally:
            with contextlib.suppress(Exception):
                job.deregister()
            rc.flushall()
            rc.close()
        self.results["client_memory"] = out

    def server_memory(self) -> None:
        if self.local is None:
            self.say("server memory: skipped (--controller: the storage processes are not ours)")
            self.results["server_memory"] = {"skipped": "--controller given; storage processes "
                                             "are not local to this benchmark"}
            return
        import psutil
        import pocket.aio
        total = self.args.rss_bytes
        rng = random.Random(1234)
        sizes = []
        stored = 0
        lo, hi = math.log(1 * KiB), math.log(1 * MiB)
        while stored < total:
            s = int(math.exp(rng.uniform(lo, hi)))
            sizes.append(s)
            stored += s
        src = memoryview(os.urandom(1 * MiB))
        offsets = [rng.randrange(0, 1 * MiB - s + 1) for s in sizes]
        servers = {p.pid: p for p in self.local.processes if p.role in ("storage", "metadata")}

        def rss() -> dict[int, int]:
            return {pid: psutil.Process(pid).memory_info().rss for pid in servers}

        before = rss()
        redis_proc = psutil.Process(self.redis.pid)
        redis_before = redis_proc.memory_info().rss
        self.say(f"server memory: storing {len(sizes):,} objects, {stored / MiB:,.0f} MiB, "
                 f"log-uniform 1 KiB–1 MiB, in Pocket and in Redis")
        job = self.register("rss")
        loop = new_loop()
        try:
            async def fill() -> dict[str, int]:
                ajob = await pocket.aio.attach(job.id, job.token, self.controller)
                per_server: dict[str, int] = {}
                inline = 0
                queue = list(range(len(sizes)))

                async def writer() -> None:
                    while queue:
                        i = queue.pop()
                        s, off = sizes[i], offsets[i]
                        await ajob.put(f"rss/{i}", src[off:off + s])

                await asyncio.gather(*(writer() for _ in range(8)))
                queue = list(range(len(sizes)))

                async def looker() -> None:
                    nonlocal inline
                    while queue:
                        i = queue.pop()
                        info = await ajob.lookup(f"rss/{i}")
                        if info is None or info.size != sizes[i]:
                            raise AssertionError(f"rss/{i} missing or wrong size")
                        if not info.servers:
                            inline += info.size
                        for srv in info.servers:  # objects < 8 MiB live on one server
                            per_server[srv] = per_server.get(srv, 0) + info.size // len(info.servers)

                await asyncio.gather(*(looker() for _ in range(8)))
                await ajob.close()
                per_server["(inline in metadata)"] = inline
                return per_server

            t0 = time.perf_counter()
            per_server = loop.run_until_complete(fill())
            t1 = time.perf_counter()
            self.say(f"server memory: stored in Pocket in {t1 - t0:.1f} s "
                     f"({stored / (t1 - t0) / MB:,.0f} MB/s with 8 async tasks)")
            after = rss()
            rc = self.redis_client()
            try:
                pipe = rc.pipeline(transaction=False)
                for i, (s, off) in enumerate(zip(sizes, offsets)):
                    pipe.set(f"rss/{i}", src[off:off + s].tobytes())
                    if i % 64 == 63:
                        pipe.execute()
                pipe.execute()
                info = rc.info("memory")
                redis_after = redis_proc.memory_info().rss
                redis_used = info.get("used_memory", 0)
                rc.flushall()
            finally:
                rc.close()
        finally:
            close_loop(loop)
            with contextlib.suppress(Exception):
                job.deregister()
        time.sleep(1.0)  # frees reach the storage servers asynchronously
        freed = rss()
        by_addr = {p.address: p for p in servers.values()}
        storage_rows = []
        for addr, p in by_addr.items():
            if p.role != "storage":
                continue
            b = per_server.get(addr, 0)
            storage_rows.append({"address": addr, "pid": p.pid, "stored": b,
                                 "rss_before": before[p.pid], "rss": after[p.pid],
                                 "rss_after_free": freed[p.pid],
                                 "limit": 1.1 * b + 64 * MiB,
                                 "ok": after[p.pid] <= 1.1 * b + 64 * MiB})
        md = [p for p in servers.values() if p.role == "metadata"]
        md_rows = [{"address": p.address, "pid": p.pid, "rss_before": before[p.pid],
                    "rss": after[p.pid], "rss_after_free": freed[p.pid]} for p in md]
        storage_rss = sum(r["rss"] for r in storage_rows)
        storage_stored = sum(r["stored"] for r in storage_rows)
        all_rss = storage_rss + sum(r["rss"] for r in md_rows)
        res = {"objects": len(sizes), "stored": stored,
               "inline_stored": per_server.get("(inline in metadata)", 0),
               "storage_stored": storage_stored, "storage": storage_rows, "metadata": md_rows,
               "storage_rss": storage_rss, "all_servers_rss": all_rss,
               "all_rss_per_stored": all_rss / stored,
               "storage_rss_per_stored": storage_rss / max(1, storage_stored),
               "redis_rss_before": redis_before, "redis_rss": redis_after,
               "redis_used_memory": redis_used, "redis_rss_per_stored": redis_after / stored}
        for row in storage_rows:
            self.say(f"server memory: storage {row['address']}: RSS {row['rss'] / MiB:,.0f} MiB for "
                     f"{row['stored'] / MiB:,.0f} MiB stored (limit {row['limit'] / MiB:,.0f} MiB; "
                     f"{row['rss_before'] / MiB:,.0f} MiB before, {row['rss_after_free'] / MiB:,.0f} MiB "
                     f"after freeing)")
        for row in md_rows:
            self.say(f"server memory: metadata {row['address']}: RSS {row['rss'] / MiB:,.0f} MiB "
                     f"({res['inline_stored'] / MiB:,.0f} MiB inline objects; "
                     f"{row['rss_before'] / MiB:,.0f} MiB before)")
        self.say(f"server memory: redis RSS {redis_after / MiB:,.0f} MiB "
                 f"(used_memory {redis_used / MiB:,.0f} MiB) for {stored / MiB:,.0f} MiB")
        self.results["server_memory"] = res

    # -- report -----------------------------------------------------------------------
    def best_redis(self, cells: dict) -> tuple[Optional[float], str, str]:
        """The better Redis client of a cell (the stricter comparison for Pocket)."""
        best, label = None, ""
        key = "ops_per_s"
        for client, res in cells.items():
            if not client.startswith("redis") or "error" in res:
                continue
            value = res.get(key)
            if best is None or value > best[0]:
                best = (value, res)
                label = "threads" if client == "redis-threads" else "asyncio"
        if best is None:
            return None, "", key
        return best[0], label, key

    def rows(self) -> list[dict]:
        R = self.results
        rows: list[dict] = []

        def row(metric: str, better: str, pocket: Optional[float], redis: Optional[float],
                limit: Optional[float] = None, note: str = "", kind: str = "") -> None:
            def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
                return a / b if a is not None and b not in (None, 0) else None
            rows.append({"metric": metric, "better": better, "pocket": pocket, "redis": redis,
                         "limit": limit, "pocket/redis": ratio(pocket, redis),
                         "pocket/limit": ratio(pocket, limit), "note": note, "kind": kind})

        lat = R.get("latency")
        if lat:
            raw = lat["raw/rtt"]
            for api, p, r in (("sync", "pocket-sync", "redis-sync"), ("asyncio", "pocket-aio", "redis-aio")):
                for op in ("put", "get"):
                    for q in ("p50", "p99"):
                        row(f"1 KiB {op} {q} µs, 1 client, {api}", "lower",
                            lat[f"{p}/{op}"][f"{q}_us"], lat[f"{r}/{op}"][f"{q}_us"],
                            raw[f"{q}_us"], kind="us")
            row("1 KiB get ops/s, 1 client, sync", "higher", lat["pocket-sync/get"]["ops_per_s"],
                lat["redis-sync/get"]["ops_per_s"], raw["ops_per_s"], kind="ops")
        limit_mbps = R.get("raw_one_way", {}).get("MBps")
        tp = R.get("throughput")
        if tp:
            for size in SIZES:
                for op in ("put", "get", "get_into"):
                    cells = tp.get(f"{op}/{size}")
                    if not cells:
                        continue
                    pk = cells.get("pocket-aio", {})
                    pv = pk.get("MBps") if "error" not in pk else None
                    rv, label = None, ""
                    for client, res in cells.items():
                        if client.startswith("redis") and "error" not in res:
                            if rv is None or res["MBps"] > rv:
                                rv, label = res["MBps"], ("threads" if client == "redis-threads"
                                                          else "asyncio")
                    if op == "get_into":  # Redis has no get_into: compare with its get
                        g = tp.get(f"get/{size}", {})
                        for client, res in g.items():
                            if client.startswith("redis") and "error" not in res:
                                if rv is None or res["MBps"] > rv:
                                    rv, label = res["MBps"], ("threads" if client == "redis-threads"
                                                              else "asyncio")
                        label += ", its get"
                    row(f"{fmt_size(size)} {op} MB/s, C={self.meta['clients']}", "higher", pv, rv,
                        limit_mbps, note=f"redis: {label}" if label else "", kind="MBps")
        md = R.get("metadata")
        if md:
            for op, what in (("lookup", "lookups/s (redis: STRLEN)"), ("create", "creates/s (16 B puts)")):
                cells = md[op]
                pk = cells.get("pocket-aio", {})
                pv = pk.get("ops_per_s") if "error" not in pk else None
                rv, label, _ = self.best_redis(cells)
                row(f"metadata {what}, C={self.meta['clients']}", "higher", pv, rv,
                    note=f"redis: {label}" if label else "", kind="ops")
            cells = md.get("lookup-pipe")
            if cells:
                pk, rd = cells.get("pocket-pipe", {}), cells.get("redis-pipe", {})
                row(f"metadata lookups/s, server capacity: {self.args.procs} conns × "
                    f"{self.args.pipeline} pipelined", "higher",
                    pk.get("ops_per_s") if "error" not in pk else None,
                    rd.get("ops_per_s") if "error" not in rd else None,
                    note="raw codec clients; redis: STRLEN", kind="ops")
        cm = R.get("client_memory")
        if cm:
            def gx(k: str) -> Optional[float]:
                v = cm.get(k, {})
                return v.get("growth_x") if "error" not in v else None
            row("16 MiB get_into numpy: client peak RSS growth ×object", "lower",
                gx("pocket-get_into"), gx("redis-get"), note="redis: get + copy into the buffer",
                kind="x")
            row("16 MiB get (bytes): client peak RSS growth ×object", "lower",
                gx("pocket-get"), gx("redis-get"), note="both: get + copy into the buffer", kind="x")
        sm = R.get("server_memory")
        if sm and "skipped" not in sm:
            row(f"server RSS ÷ stored, {fmt_size(self.args.rss_bytes)} mixed",
                "lower", sm["all_rss_per_stored"], sm["redis_rss_per_stored"],
                note="pocket: storage + metadata processes", kind="x")
        return rows

    def targets(self) -> list[dict]:
        R = self.results
        out: list[dict] = []

        def target(name: str, value: Optional[float], ok: Optional[bool], detail: str) -> None:
            out.append({"target": name, "value": value,
                        "status": "n/a" if ok is None else ("PASS" if ok else "MISS"),
                        "detail": detail})

        lat = R.get("latency")
        for op in ("get", "put"):
            if lat:
                p, r = lat[f"pocket-sync/{op}"]["p50_us"], lat[f"redis-sync/{op}"]["p50_us"]
                target(f"1 KiB {op} p50 ≤ 1.0× redis-py", p / r, p <= r,
                       f"{p:.1f} µs vs {r:.1f} µs = {p / r:.2f}× (sync clients)")
            else:
                target(f"1 KiB {op} p50 ≤ 1.0× redis-py", None, None, "latency not run")
        tp = R.get("throughput")
        limit = R.get("raw_one_way", {}).get("MBps")
        for op in ("get", "put"):
            cells = (tp or {}).get(f"{op}/{MiB}")
            if not cells or "error" in cells.get("pocket-aio", {"error": 1}):
                target(f"1 MiB {op} ≥ 2× redis-py", None, None, "not measured")
                target(f"1 MiB {op} ≥ 60% of the raw limit", None, None, "not measured")
                continue
            pv = cells["pocket-aio"]["MBps"]
            rv = max((c["MBps"] for k, c in cells.items() if k.startswith("redis") and "error" not in c),
                     default=None)
            if rv:
                target(f"1 MiB {op} ≥ 2× redis-py", pv / rv, pv >= 2 * rv,
                       f"{pv:,.0f} vs {rv:,.0f} MB/s = {pv / rv:.2f}× (best redis client)")
            else:
                target(f"1 MiB {op} ≥ 2× redis-py", None, None, "redis not measured")
            if limit:
                target(f"1 MiB {op} ≥ 60% of the raw limit", pv / limit, pv >= 0.6 * limit,
                       f"{pv:,.0f} vs {limit:,.0f} MB/s = {pv / limit:.0%}")
            else:
                target(f"1 MiB {op} ≥ 60% of the raw limit", None, None, "limit not measured")
        cm = (R.get("client_memory") or {}).get("pocket-get_into")
        if cm and "error" not in cm:
            target("16 MiB get_into: client peak RSS growth ≤ 1.2× object", cm["growth_x"],
                   cm["growth_x"] <= 1.2 and cm["byte_exact"],
                   f"{cm['growth'] / MiB:.1f} MiB = {cm['growth_x']:.2f}× "
                   f"(byte-exact: {cm['byte_exact']})")
        else:
            target("16 MiB get_into: client peak RSS growth ≤ 1.2× object", None, None, "not measured")
        sm = R.get("server_memory")
        if sm and "skipped" not in sm:
            worst = max(sm["storage"], key=lambda r: r["rss"] / r["limit"])
            ok = all(r["ok"] for r in sm["storage"])
            target("storage RSS ≤ 1.1× stored + 64 MiB (each storage server)",
                   worst["rss"] / worst["limit"], ok,
                   "; ".join(f"{r['address']}: {r['rss'] / MiB:,.0f} MiB RSS for "
                             f"{r['stored'] / MiB:,.0f} MiB (limit {r['limit'] / MiB:,.0f})"
                             for r in sm["storage"])
                   + f"; objects ≤ 64 KiB ({sm['inline_stored'] / MiB:,.0f} MiB) live inline in "
                   "the metadata server")
        else:
            target("storage RSS ≤ 1.1× stored + 64 MiB (each storage server)", None, None,
                   "skipped (--controller)" if sm else "not measured")
        md = (R.get("metadata") or {}).get("lookup", {}).get("pocket-aio")
        pipe = (R.get("metadata") or {}).get("lookup-pipe", {}).get("pocket-pipe")
        if md and "error" not in md:
            v = md["ops_per_s"]
            detail = f"{v:,.0f} lookups/s with C={md['clients']} pocket.aio clients"
            cpu = (md.get("server_cpu") or {}).get("metadata")
            if cpu is not None:
                detail += (f" (metadata server {cpu['cpu']:.0%} on CPU, {cpu['wait']:.0%} "
                           "waiting for one)")
            if pipe and "error" not in pipe:
                p = pipe["ops_per_s"]
                detail += f"; server capacity {p:,.0f}/s with pipelined clients"
                cpu = (pipe.get("server_cpu") or {}).get("metadata")
                if cpu is not None:
                    detail += f" ({cpu['cpu']:.0%} on CPU, {cpu['wait']:.0%} waiting)"
                v = max(v, p)
            target("≥ 20,000 metadata lookups/s on one metadata server", v / 20000, v >= 20000,
                   detail)
        else:
            target("≥ 20,000 metadata lookups/s on one metadata server", None, None, "not measured")
        return out

    def markdown(self, rows: list[dict], targets: list[dict]) -> str:
        m = self.meta
        mach = m.get("machine", {})
        cluster = (f"local cluster: 1 controller, 1 metadata, {self.args.dram} DRAM storage processes"
                   if m.get("own_cluster") else f"cluster at {m.get('controller')}")
        lines = [
            "## Pocket micro-benchmark",
            "",
            f"Machine: {mach.get('cpu', '?')}, {mach.get('cores', '?')} cores, "
            f"{mach.get('memory_bytes', 0) / GiB:.0f} GiB RAM, Linux {mach.get('kernel', '?')}, "
            f"Python {mach.get('python', '?')}; {m.get('loop', '?')}.  ",
            f"Pocket {m.get('pocket', '?')} (source {m.get('source', '?')}; {cluster}); "
            f"{m.get('redis_server', 'redis')}; redis-py {m.get('redis_py', '?')} "
            f"with hiredis={m.get('hiredis')}.  ",
            f"Command: `{' '.join(['python', 'bench/micro.py', *sys.argv[1:]])}`"
            + (f"  \nOther processes used {m['other_load']['other_cpu_s']:.0f} CPU-s during the run "
               f"({m['other_load']['other_share']:.0%} of the machine)"
               if m.get("other_load") else ""),
            "",
            "| metric | pocket | redis | limit | pocket/redis | pocket/limit |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            arrow = "↓" if r["better"] == "lower" else "↑"
            note = f" ({r['note']})" if r["note"] else ""
            lines.append(f"| {r['metric']} {arrow}{note} | {fmt_num(r['pocket'])} | "
                         f"{fmt_num(r['redis'])} | {fmt_num(r['limit'])} | "
                         f"{fmt_ratio(r['pocket/redis'])} | {fmt_ratio(r['pocket/limit'])} |")
        lines += [
            "",
            "↓ lower is better, ↑ higher is better. MB = 10⁶ bytes. Latency rows: one client, "
            f"blocks of {self.results.get('latency', {}).get('block', self.args.block)} ops "
            "interleaved between the stores; the limit is a 1 KiB round trip on a raw "
            "blocking socket to a BufferedProtocol echo on uvloop. Throughput rows: "
            f"C = {self.args.procs} processes × {self.args.tasks} tasks (Pocket: pocket.aio; "
            "Redis: the better of redis.asyncio tasks and blocking redis-py threads, named), "
            "aggregate = bytes ÷ wall time from the common start to the slowest worker's end; "
            "the limit is 1 MiB sendall one-way on one raw connection to a BufferedProtocol sink "
            "(best of one run per size).",
            "",
            "### Targets (issue 3)",
            "",
            "| target | measured | status |",
            "|---|---|---|",
        ]
        for t in targets:
            lines.append(f"| {t['target']} | {t['detail']} | {t['status']} |")
        return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/micro.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--controller", metavar="HOST:PORT",
                   help="use a running Pocket cluster instead of starting a local one")
    p.add_argument("--latency-ops", type=int, default=20000,
                   help="1 KiB put and get operations per client in the latency test (default 20000)")
    p.add_argument("--block", type=int, default=1000,
                   help="operations per interleaved latency block (default 1000)")
    p.add_argument("--procs", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--tasks", type=int, default=8, help="client tasks per worker (default 8)")
    p.add_argument("--duration", type=float, default=3.0,
                   help="seconds per throughput/metadata cell (default 3)")
    p.add_argument("--max-ops", type=int, default=200000,
                   help="at most this many operations per task and cell (default 200000)")
    p.add_argument("--pipeline", type=int, default=64,
                   help="lookups per batch in the metadata server-capacity test (default 64)")
    p.add_argument("--redis-client", choices=("asyncio", "threads", "both"), default="both",
                   help="Redis client for multi-client cells: redis.asyncio tasks, blocking "
                        "redis-py threads, or both and compare with the better (default both)")
    p.add_argument("--rss-bytes", default="1GiB",
                   help="bytes of mixed 1 KiB–1 MiB objects stored for the server RSS test "
                        "(default 1GiB)")
    p.add_argument("--dram", type=int, default=2, help="DRAM storage servers of the local cluster")
    p.add_argument("--capacity", default="2GiB",
                   help="capacity of each local storage server (default 2GiB)")
    p.add_argument("--only", default="",
                   help="comma-separated subset of: latency,throughput,metadata,memory")
    p.add_argument("--quick", action="store_true",
                   help="a very short smoke run (few hundred ops, 0.5 s cells, 64 MiB rss-bytes)")
    p.add_argument("--json", metavar="PATH", help="also write all results as JSON to PATH")
    args = p.parse_args(argv)
    from pocket.units import parse_size
    if args.quick:
        args.latency_ops = min(args.latency_ops, 300)
        args.block = min(args.block, 100)
        args.duration = min(args.duration, 0.5)
        args.rss_bytes = "64MiB"
    args.rss_bytes = parse_size(args.rss_bytes)
    if args.latency_ops < 1 or args.block < 1 or args.procs < 1 or args.tasks < 1 or args.pipeline < 1 \
            or args.duration <= 0 or args.max_ops < 1 or args.rss_bytes < MiB:
        p.error("counts and durations must be positive (and --rss-bytes at least 1MiB)")
    known = {"latency", "throughput", "metadata", "memory"}
    args.only = {w.strip() for w in args.only.split(",") if w.strip()} or known
    if args.only - known:
        p.error(f"--only: unknown workload(s) {', '.join(sorted(args.only - known))}")
    return args


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        find_redis_server()
    except RedisMissing as exc:
        print(f"bench/micro.py: error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    say = Progress()
    monitor = LoadMonitor()
    if monitor.load_before is not None and monitor.load_before > 0.5 * (os.cpu_count() or 1):
        say(f"WARNING: the machine is already busy (load average {monitor.load_before:.1f} on "
            f"{os.cpu_count()} cores); results will be noisy")
    bench = Bench(args, say)
    rc = 0
    error = None
    t0 = time.monotonic()
    failed: dict[str, str] = {}

    def workload(name: str, fn: Callable[[], None]) -> None:
        """Run one workload; a failure is reported and the others still run."""
        try:
            fn()
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
            say(f"{name}: FAILED: {failed[name]}")
            traceback.print_exc()

    try:
        bench.start()
        if "latency" in args.only:
            workload("latency", bench.latency)
        if "throughput" in args.only:
            workload("throughput", bench.throughput)
        if "metadata" in args.only:
            workload("metadata", bench.metadata)
        if "memory" in args.only:
            workload("client memory", bench.client_memory)
            workload("server memory", bench.server_memory)
        if failed:
            error = "; ".join(f"{k}: {v}" for k, v in failed.items())
            rc = 1
    except KeyboardInterrupt:
        error = "interrupted"
        say("interrupted; stopping everything this benchmark started")
        rc = 130
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        rc = 1
    finally:
        try:
            bench.close()
        except BaseException as exc:  # never leave without trying every cleanup step
            print(f"cleanup error: {exc}", file=sys.stderr)
    elapsed = time.monotonic() - t0
    load = monitor.stop()
    bench.meta["other_load"] = load
    if load:
        say(f"other processes used {load['other_cpu_s']:.0f} CPU-s during the run "
            f"({load['other_share']:.0%} of the machine); steal {load['steal_cpu_s']:.1f} s"
            + (" (this includes the --controller cluster's servers)" if args.controller else "")
            + ("  <- results disturbed" if load["other_share"] > 0.05 and not args.controller else ""))
    if not bench.results:
        return rc
    rows = bench.rows()
    targets = bench.targets()
    say(f"done in {elapsed:.0f} s")
    sys.stdout.write(bench.markdown(rows, targets))
    sys.stdout.flush()
    if args.json:
        doc = {"meta": {**bench.meta, "elapsed_s": elapsed, "error": error},
               "results": bench.results, "rows": rows, "targets": targets}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2, default=str, ensure_ascii=False)
        say(f"results written to {args.json}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
