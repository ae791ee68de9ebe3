#!/usr/bin/env python3
"""The sort workload: a MapReduce sort on N lambda processes, shuffled through a store.

    python bench/sort.py                               # pocket and redis, default size
    python bench/sort.py --size 2GiB --lambdas 8 --json /tmp/sort.json
    python bench/sort.py --store pocket --controller 127.0.0.1:7070 --io files

Input: gensort-style 100-byte records (10-byte key, 90-byte value) generated
with numpy from ``--seed``, in ``--lambdas`` partitions.  Every phase runs
as N *lambdas*: fresh processes (``--executor processes``, multiprocessing's
spawn context) or Dask tasks (``--executor dask``) that open the store from a
small picklable *spec* -- for Pocket the job id and token, exactly what a
real lambda gets -- and do one task:

generate  lambda m makes partition m, computes its checksum, writes it as the
          input (``input/{m}``, persisted in the store, or a file: ``--io``).
map       lambda m reads partition m, range-partitions it by key into R
          buckets and puts R intermediate objects ``shuffle/{m}-{r}``.
reduce    lambda r gets its M objects ``shuffle/*-{r}`` with
          delete_after_read, sorts them by key and writes ``output/{r}``.
validate  lambda r reads output r, checks it is sorted, and returns its record
          count, checksum and first and last keys; the harness checks that the
          partitions are in order, that no key is out of place and that count
          and checksum equal the input's.

The checksum is the sum mod 2**64 of a 64-bit hash of every record (order
independent), so a lost, duplicated or corrupted record changes it.

Times (all wall clock, ``time.monotonic``, one clock for every process):

map_s / reduce_s  from the moment the phase's lambdas are released (all
                  started, imported and attached: a warm start) to the moment
                  the last one finishes.  The cold start (spawning the
                  processes) is reported apart as ``startup_s``.
total_s           map_s + reduce_s: the sort itself.
shuffle_s         the time the shuffle is on the wire: the length of the union
                  of the intervals during which at least one map lambda is
                  putting intermediate objects, plus the same for reduce
                  lambdas getting them.
shuffle MB/s      intermediate bytes written + read (2 x the input) / shuffle_s.
peak store bytes  the most the store held, sampled every 0.2 s: for Pocket the
                  sum of the ``used`` bytes the nodes report to the controller
                  (they report once a second, so this lags), for Redis
                  ``INFO memory`` used_memory.  Includes the input and output
                  with ``--io store``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Optional

import numpy as np

import pocket
from pocket.process import die_with_parent
from pocket.units import format_size, parse_size

RECORD = 100            # bytes per record
KEY = 10                # key bytes at the front of a record
MiB = 1 << 20
DEFAULT_SIZE = "1GiB"   # about a minute for both stores on the 2-core reference machine
PHASES = ("generate", "map", "reduce", "validate")


# ----------------------------------------------------------------------------
# Records: generation, hashing, partitioning, sorting (numpy only)
# ----------------------------------------------------------------------------

def partition_counts(records: int, parts: int) -> list[int]:
    """``records`` split into ``parts`` nearly equal counts."""
    base, extra = divmod(records, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def generate_partition(seed: int, m: int, count: int) -> np.ndarray:
    """Partition ``m``: ``count`` random records as a flat uint8 array (deterministic)."""
    words = -(-count * RECORD // 8)
    raw = np.random.Generator(np.random.SFC64([seed, m])).bit_generator.random_raw(words)
    return raw.view(np.uint8)[:count * RECORD]


def _keys(flat: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Big-endian key parts of ``n`` records: bytes 0-7 as uint64, bytes 8-9 as uint16."""
    hi = np.ndarray((n,), ">u8", flat, 0, (RECORD,)).astype(np.uint64)
    lo = np.ndarray((n,), ">u2", flat, 8, (RECORD,)).astype(np.uint16)
    return hi, lo


_HASH_K = (np.arange(1, 13, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
_M1, _M2, _S = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(33)


def checksum(flat: np.ndarray, chunk: int = 1 << 16) -> int:
    """Sum mod 2**64 of a 64-bit hash of each record (order independent).

    A record's hash mixes its twelve 64-bit words and last four bytes
    linearly, then through the murmur3 finaliser.
    """
    n = flat.size // RECORD
    total = 0
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        words = np.ndarray((m, 12), "<u8", flat, start * RECORD, (RECORD, 8))
        h = np.einsum("ij,j->i", words, _HASH_K)
        h += np.ndarray((m,), "<u4", flat, start * RECORD + 96, (RECORD,))
        h ^= h >> _S
        h *= _M1
        h ^= h >> _S
        h *= _M2
        h ^= h >> _S
        total += int(h.sum(dtype=np.uint64))
    return total & 0xFFFFFFFFFFFFFFFF


def bucket_of(flat: np.ndarray, n: int, buckets: int) -> np.ndarray:
    """Range partition: bucket = first 4 key bytes (big-endian) x R / 2**32 (monotone in the key)."""
    prefix = np.ndarray((n,), ">u4", flat, 0, (RECORD,)).astype(np.uint64)
    prefix *= np.uint64(buckets)
    prefix >>= np.uint64(32)
    return prefix.astype(np.uint16 if buckets > 256 else np.uint8)


def gather(flat: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Records of ``flat`` in ``order``, as a new flat array.

    ``np.take`` into a preallocated array with ``mode="clip"`` is several
    times faster than fancy indexing (``recs[order]``) for 100-byte rows.
    """
    n = order.size
    out = np.empty(n * RECORD, np.uint8)
    np.take(flat.reshape(-1, RECORD), order, axis=0, out=out.reshape(n, RECORD), mode="clip")
    return out


def partition_records(flat: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Records grouped by bucket (a new flat array) and the records per bucket."""
    n = flat.size // RECORD
    b = bucket_of(flat, n, buckets)
    counts = np.bincount(b, minlength=buckets)
    order = np.argsort(b, kind="stable")  # radix sort on small ints: O(n)
    del b
    return gather(flat, order), counts


def key_order(flat: np.ndarray) -> np.ndarray:
    """The permutation that sorts the records of ``flat`` by their 10-byte key.

    Fast path: the first 8 key bytes with their low bits replaced by the
    record's index, sorted as plain uint64 (numpy's SIMD sort, several times
    faster than argsort); the few runs that tie on the truncated key are then
    ordered by the full key.  Many ties (skewed keys) fall back to lexsort.
    """
    n = flat.size // RECORD
    hi, lo = _keys(flat, n)
    bits = max(1, (n - 1).bit_length())
    mask = np.uint64((1 << bits) - 1)
    packed = hi & ~mask
    packed |= np.arange(n, dtype=np.uint64)
    packed.sort()
    order = (packed & mask).astype(np.intp)
    packed &= ~mask
    ties = np.flatnonzero(packed[1:] == packed[:-1])
    del packed
    if ties.size > max(64, n // 64):
        return np.lexsort((lo, hi))
    if ties.size:
        # runs of equal truncated keys: [start, end) with start = a tie index not preceded by one
        starts = ties[np.r_[True, ties[1:] != ties[:-1] + 1]]
        ends = ties[np.r_[ties[1:] != ties[:-1] + 1, True]] + 2
        for start, end in zip(starts.tolist(), ends.tolist()):
            run = order[start:end]
            order[start:end] = run[np.lexsort((lo[run], hi[run]))]
    return order


def sort_records(flat: np.ndarray) -> np.ndarray:
    """Records sorted by key, as a new flat array."""
    if flat.size <= RECORD:
        return flat.copy()
    return gather(flat, key_order(flat))


def is_sorted(flat: np.ndarray) -> bool:
    n = flat.size // RECORD
    if n < 2:
        return True
    hi, lo = _keys(flat, n)
    a, b = hi[:-1], hi[1:]
    return bool(np.all((b > a) | ((b == a) & (lo[1:] >= lo[:-1]))))


# ----------------------------------------------------------------------------
# Store clients (inside lambdas): the same put/get/delete for Pocket and Redis
# ----------------------------------------------------------------------------

class PocketClient:
    """A lambda's handle on the Pocket job: attach with the job id and token."""

    def __init__(self, spec: dict) -> None:
        self.job = pocket.attach(spec["job"], spec["token"], controller=spec["controller"])

    def put(self, name: str, data: Any, persist: bool = False) -> None:
        self.job.put(name, data, persist=persist)

    def get_into(self, name: str, buffer: np.ndarray, delete_after_read: bool = False) -> int:
        return self.job.get_into(name, buffer, delete_after_read=delete_after_read)

    def size(self, name: str) -> int:
        info = self.job.lookup(name)
        if info is None:
            raise KeyError(name)
        return info.size

    def delete(self, name: str) -> None:
        self.job.delete(name)

    def close(self) -> None:
        self.job.close()


class RedisClient:
    """The same operations through redis-py (with hiredis when installed).

    ``persist`` means nothing to Redis (everything stays until deleted);
    delete_after_read is GETDEL.  redis-py returns bytes, so a get costs one
    copy into the caller's buffer.
    """

    def __init__(self, spec: dict) -> None:
        import redis
        self.redis = redis.Redis(host=spec["host"], port=spec["port"])

    def put(self, name: str, data: Any, persist: bool = False) -> None:
        self.redis.set(name, memoryview(data).cast("B"))

    def get_into(self, name: str, buffer: np.ndarray, delete_after_read: bool = False) -> int:
        data = self.redis.getdel(name) if delete_after_read else self.redis.get(name)
        if data is None:
            raise KeyError(f"no object {name!r} in redis")
        n = len(data)
        if n > buffer.nbytes:
            raise ValueError(f"object {name!r} has {n} bytes; the buffer holds {buffer.nbytes}")
        memoryview(buffer).cast("B")[:n] = data
        return n

    def size(self, name: str) -> int:
        if not self.redis.exists(name):
            raise KeyError(name)
        return int(self.redis.strlen(name))

    def delete(self, name: str) -> None:
        self.redis.delete(name)

    def close(self) -> None:
        self.redis.close()


def open_store(spec: dict):
    return PocketClient(spec) if spec["kind"] == "pocket" else RedisClient(spec)


# ----------------------------------------------------------------------------
# Input and output: in the store (persisted) or in files standing in for S3
# ----------------------------------------------------------------------------

def _path(cfg: dict, kind: str, i: int) -> str:
    return os.path.join(cfg["dir"], kind, f"part-{i:05d}")


def read_data(store, cfg: dict, kind: str, i: int, nbytes: int) -> np.ndarray:
    buf = np.empty(nbytes, np.uint8)
    if cfg["io"] == "store":
        got = store.get_into(f"{kind}/{i}", buf)
    else:
        with open(_path(cfg, kind, i), "rb", buffering=0) as f:
            got = f.readinto(memoryview(buf)) if nbytes else 0
    if got != nbytes:
        raise RuntimeError(f"{kind}/{i}: read {got} bytes, expected {nbytes}")
    return buf


def write_data(store, cfg: dict, kind: str, i: int, flat: np.ndarray) -> None:
    if cfg["io"] == "store":
        store.put(f"{kind}/{i}", flat, persist=True)
    else:
        with open(_path(cfg, kind, i), "wb", buffering=0) as f:
            view = memoryview(flat).cast("B")
            while len(view):
                view = view[f.write(view):]


def data_size(store, cfg: dict, kind: str, i: int) -> int:
    if cfg["io"] == "store":
        return store.size(f"{kind}/{i}")
    return os.path.getsize(_path(cfg, kind, i))


# ----------------------------------------------------------------------------
# The lambdas' tasks: task(store, cfg, index) -> small dict of results
# ----------------------------------------------------------------------------

def task_generate(store, cfg: dict, m: int) -> dict:
    n = cfg["input_counts"][m]
    t0 = time.monotonic()
    flat = generate_partition(cfg["seed"], m, n)
    digest = checksum(flat)
    t1 = time.monotonic()
    write_data(store, cfg, "input", m, flat)
    t2 = time.monotonic()
    return {"records": n, "checksum": digest, "compute_s": t1 - t0, "write_s": t2 - t1}


def task_map(store, cfg: dict, m: int) -> dict:
    n, buckets = cfg["input_counts"][m], cfg["reducers"]
    t0 = time.monotonic()
    flat = read_data(store, cfg, "input", m, n * RECORD)
    t1 = time.monotonic()
    grouped, counts = partition_records(flat, buckets)
    del flat  # the lambda now holds its buckets only
    t2 = time.monotonic()
    offset = 0
    for r, c in enumerate(counts.tolist()):
        store.put(f"shuffle/{m}-{r}", grouped[offset:offset + c * RECORD])
        offset += c * RECORD
    t3 = time.monotonic()
    return {"bucket_records": counts.tolist(), "read_s": t1 - t0, "compute_s": t2 - t1,
            "shuffle_s": t3 - t2, "shuffle_interval": (t2, t3), "shuffle_bytes": offset}


def task_reduce(store, cfg: dict, r: int) -> dict:
    counts = [row[r] for row in cfg["matrix"]]
    flat = np.empty(sum(counts) * RECORD, np.uint8)
    t0 = time.monotonic()
    offset = 0
    for m, c in enumerate(counts):
        size = c * RECORD
        got = store.get_into(f"shuffle/{m}-{r}", flat[offset:offset + size], delete_after_read=True)
        if got != size:
            raise RuntimeError(f"shuffle/{m}-{r}: {got} bytes, expected {size}")
        offset += size
    t1 = time.monotonic()
    out = sort_records(flat)
    del flat  # the lambda now holds its sorted output only
    t2 = time.monotonic()
    write_data(store, cfg, "output", r, out)
    t3 = time.monotonic()
    return {"records": sum(counts), "shuffle_s": t1 - t0, "shuffle_interval": (t0, t1),
            "shuffle_bytes": offset, "compute_s": t2 - t1, "write_s": t3 - t2}


def task_validate(store, cfg: dict, r: int) -> dict:
    t0 = time.monotonic()
    size = data_size(store, cfg, "output", r)
    if size % RECORD:
        return {"records": size / RECORD, "sorted": False, "checksum": 0, "first": None,
                "last": None, "error": f"output/{r} has {size} bytes, not whole records"}
    flat = read_data(store, cfg, "output", r, size)
    t1 = time.monotonic()
    n = size // RECORD
    result = {"records": n, "sorted": is_sorted(flat), "checksum": checksum(flat),
              "first": flat[:KEY].tobytes().hex() if n else None,
              "last": flat[(n - 1) * RECORD:(n - 1) * RECORD + KEY].tobytes().hex() if n else None}
    result.update(read_s=t1 - t0, compute_s=time.monotonic() - t1)
    return result


TASKS: dict[str, Callable[[Any, dict, int], dict]] = {
    "generate": task_generate, "map": task_map, "reduce": task_reduce, "validate": task_validate}


def run_task(task: str, spec: dict, cfg: dict, index: int) -> dict:
    """A lambda's whole life in one call (the Dask executor's task)."""
    store = open_store(spec)
    try:
        t0 = time.monotonic()
        result = TASKS[task](store, cfg, index)
        result.update(t_start=t0, t_end=time.monotonic())
        return result
    finally:
        store.close()


# ----------------------------------------------------------------------------
# Executors: run one phase as N lambdas
# ----------------------------------------------------------------------------

def _lambda_process(index: int, task: str, spec: dict, cfg: dict, queue, go) -> None:
    """The body of one lambda process (spawned: a fresh interpreter)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and ends us
    store = None
    try:
        store = open_store(spec)  # attach: job id + token, as a real lambda would
        queue.put(("ready", index, time.monotonic()))
        while not go.wait(1.0):
            if os.getppid() == 1:
                return
        t0 = time.monotonic()
        result = TASKS[task](store, cfg, index)
        result.update(t_start=t0, t_end=time.monotonic(), pid=os.getpid())
        queue.put(("done", index, result))
    except BaseException:
        queue.put(("error", index, traceback.format_exc()))
    finally:
        if store is not None:
            try:
                store.close()
            except Exception:
                pass


class LambdaFailed(RuntimeError):
    pass


class ProcessExecutor:
    """Each lambda is a fresh process (multiprocessing, spawn context).

    All N lambdas of a phase are started, import, attach and report ready;
    then they are released together and the phase's clock starts.
    """

    name = "processes"

    def __init__(self, progress: bool) -> None:
        import multiprocessing
        self.ctx = multiprocessing.get_context("spawn")
        self.progress = progress

    def run(self, label: str, task: str, spec: dict, cfg: dict, count: int) -> tuple[list, dict]:
        queue = self.ctx.Queue()
        go = self.ctx.Event()
        procs = [self.ctx.Process(target=_lambda_process, args=(i, task, spec, cfg, queue, go),
                                  name=f"lambda-{task}-{i}", daemon=True) for i in range(count)]
        results: list = [None] * count
        bar = progress_bar(count, label, self.progress)
        t_spawn = time.monotonic()
        try:
            for p in procs:
                p.start()
            ready = self._collect(queue, procs, count, "ready", results=None, bar=None)
            t_go = time.monotonic()
            go.set()
            self._collect(queue, procs, count, "done", results=results, bar=bar)
            t_end = time.monotonic()
            for p in procs:
                p.join(30)
        finally:
            bar.close()
            for p in procs:  # only the processes this phase started
                if p.is_alive():
                    p.terminate()
            for p in procs:
                if p.pid is not None:
                    p.join(5)
                    if p.is_alive():
                        p.kill()
                        p.join(5)
            queue.close()
        return results, {"t_go": t_go, "t_end": t_end, "startup_s": t_go - t_spawn,
                         "ready_spread_s": max(ready) - min(ready) if ready else 0.0}

    @staticmethod
    def _collect(queue, procs, count: int, kind: str, results: Optional[list], bar) -> list:
        import queue as queue_module
        seen: set[int] = set()
        stamps = []
        while len(seen) < count:
            try:
                msg, index, payload = queue.get(timeout=0.5)
            except queue_module.Empty:
                dead = [i for i, p in enumerate(procs)
                        if i not in seen and p.exitcode is not None]
                if dead:
                    # a last message may still be in the pipe
                    try:
                        msg, index, payload = queue.get(timeout=2.0)
                    except queue_module.Empty:
                        raise LambdaFailed(f"lambda {dead[0]} ({procs[dead[0]].name}) exited with "
                                           f"code {procs[dead[0]].exitcode} before it was "
                                           f"{kind}") from None
                else:
                    continue
            if msg == "error":
                raise LambdaFailed(f"lambda {index} ({procs[index].name}) failed:\n{payload}")
            if msg == "ready":
                stamps.append(payload)
            else:
                results[index] = payload
                bar.update(1)
            seen.add(index)
        return stamps


class DaskExecutor:
    """Lambdas as Dask tasks on a Dask cluster (a local one unless ``--dask-scheduler``).

    Dask workers are long-lived processes, so this is a warm start: each task
    attaches to the store afresh from the spec.
    """

    name = "dask"

    def __init__(self, lambdas: int, scheduler: Optional[str], progress: bool) -> None:
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise SystemExit("sort.py: --executor dask needs dask.distributed "
                             "(pip install 'dask[distributed]'); it is not installed") from None
        self.progress = progress
        self.local = None
        if scheduler:
            self.client = Client(scheduler)
        else:
            self.local = LocalCluster(n_workers=lambdas, threads_per_worker=1, processes=True,
                                      memory_limit=0, dashboard_address=None)
            self.client = Client(self.local)
        if __name__ != "__main__":  # imported (tests): ship this module's code by value
            try:
                import cloudpickle
                cloudpickle.register_pickle_by_value(sys.modules[__name__])
            except (ImportError, ValueError):
                pass

    def run(self, label: str, task: str, spec: dict, cfg: dict, count: int) -> tuple[list, dict]:
        from dask.distributed import as_completed
        bar = progress_bar(count, label, self.progress)
        t_go = time.monotonic()
        try:
            futures = [self.client.submit(run_task, task, spec, cfg, i, pure=False)
                       for i in range(count)]
            index = {f.key: i for i, f in enumerate(futures)}
            results: list = [None] * count
            for future in as_completed(futures):
                try:
                    results[index[future.key]] = future.result()
                except Exception as exc:
                    for f in futures:
                        f.cancel()
                    raise LambdaFailed(f"{task} task {index[future.key]} failed: {exc!r}") from exc
                bar.update(1)
        finally:
            bar.close()
        return results, {"t_go": t_go, "t_end": time.monotonic(), "startup_s": 0.0,
                         "ready_spread_s": 0.0}

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.local is not None:
                self.local.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, label: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=f"{label:<16}", unit="lambda", file=sys.stderr, leave=True,
                dynamic_ncols=True)


# ----------------------------------------------------------------------------
# Stores (driver side): start, spec for the lambdas, usage, clean up, stop
# ----------------------------------------------------------------------------

class PocketBackend:
    """An embedded LocalCluster (or ``--controller``) and one registered job."""

    kind = "pocket"

    def __init__(self, args: argparse.Namespace, need: int) -> None:
        self.args = args
        self.need = need
        self.local = None
        self.cluster: Optional[pocket.Cluster] = None
        self.job: Optional[pocket.Job] = None
        self.address = args.controller
        self.flash_dir: Optional[str] = None
        self.note = ""

    def start(self) -> None:
        if not self.address:
            from pocket.local import LocalCluster
            per_server = -(-self.need // 2 // MiB) * MiB
            tier = self.args.tier or "dram"
            if tier == "dram":
                self.local = LocalCluster(dram=2, capacity=per_server, log_level="WARNING")
            else:  # flash: two servers of the tier on data files, no DRAM servers at all
                self.flash_dir = tempfile.mkdtemp(prefix="sort-flash-", dir=self.args.data_dir)
                self.local = LocalCluster(dram=0, **{tier: 2}, data_dir=self.flash_dir,
                                          flash_capacity=per_server, log_level="WARNING")
            self.local.start()
            self.address = self.local.address
            self.note = (f"embedded cluster: 2 {tier.upper()} servers x {format_size(per_server)}"
                         + (f" in {self.flash_dir}" if self.flash_dir else ""))
        else:
            self.note = f"controller {self.address}"
        self.cluster = pocket.connect(self.address)
        free = sum(n["capacity"] - n["used"] for n in self.cluster.status()["nodes"]
                   if n["role"] == "storage" and (not self.args.tier or n["tier"] == self.args.tier))
        if free < self.need:
            print(f"sort.py: warning: the cluster has {format_size(free)} free; this run may "
                  f"need up to {format_size(self.need)}", file=sys.stderr)
        self.job = self.cluster.register_job("sort", lambdas=self.args.lambdas,
                                             capacity=self.need, tier=self.args.tier)
        self.note += f"; job {self.job.id} on tier {self.job.tier}"

    @property
    def started(self) -> bool:
        return self.job is not None

    @property
    def spec(self) -> dict:
        return {"kind": "pocket", "controller": self.address, "job": self.job.id,
                "token": self.job.token}

    def sampler(self) -> Callable[[], dict]:
        cluster = pocket.connect(self.address)  # the monitor's own connection
        job_id = self.job.id

        pids = ([p.pid for p in self.local.processes if p.role == "storage"]
                if self.local is not None else [])

        def sample() -> dict:
            status = cluster.status()
            job = next((j for j in status["jobs"] if j["id"] == job_id), {})
            return {"store": sum(n["used"] for n in status["nodes"]),
                    "job": job.get("bytes", 0), "rss": sum(rss_bytes(p) for p in pids)}
        sample.close = cluster.close  # type: ignore[attr-defined]
        return sample

    def leftover(self, prefix: str) -> int:
        return len(self.job.list(prefix))

    def cost(self) -> Any:
        job = next((j for j in self.cluster.status()["jobs"] if j["id"] == self.job.id), {})
        for key in ("cost", "cost_usd", "dollars"):
            if job.get(key) is not None:
                return job[key]
        return None

    def delete(self, names: list[str]) -> None:
        for name in names:
            try:
                self.job.delete(name)
            except pocket.NotFound:
                pass

    def stop(self) -> Any:
        cost = None
        try:
            if self.job is not None:
                reply = self.job.deregister()
                cost = reply.get("cost") if isinstance(reply, dict) else None
        finally:
            try:
                if self.cluster is not None:
                    self.cluster.close()
            finally:
                try:
                    if self.local is not None:
                        self.local.stop()
                finally:
                    if self.flash_dir:
                        shutil.rmtree(self.flash_dir, ignore_errors=True)
        return cost


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (0 if it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisBackend:
    """A private redis-server on a free 127.0.0.1 port, stopped by its PID."""

    kind = "redis"

    def __init__(self, args: argparse.Namespace, need: int, largest: int) -> None:
        self.args = args
        self.largest = largest
        self.proc: Optional[subprocess.Popen] = None
        self.dir: Optional[str] = None
        self.port = 0
        self.client = None
        self.baseline = 0
        self.note = ""

    def start(self) -> None:
        import redis
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("sort.py: redis-server is not installed (needed for --store redis)")
        self.dir = tempfile.mkdtemp(prefix="sort-redis-")
        bulk = max(512 * MiB, self.largest + MiB)
        for _attempt in range(3):
            self.port = _free_port()
            log = open(os.path.join(self.dir, "redis.log"), "ab")
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                 "--save", "", "--appendonly", "no", "--maxmemory", "0", "--daemonize", "no",
                 "--protected-mode", "no", "--proto-max-bulk-len", str(bulk),
                 "--client-query-buffer-limit", str(max(1 << 30, 2 * bulk))],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent)
            log.close()
            self.client = redis.Redis(host="127.0.0.1", port=self.port)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if self.client.ping():
                        break
                except redis.ConnectionError:
                    time.sleep(0.05)
            else:
                self._stop_process()
                continue  # port taken between probe and bind, or a slow start: try again
            self.baseline = int(self.client.info("memory")["used_memory"])
            version = self.client.info("server")["redis_version"]
            self.note = (f"redis-server {version} pid {self.proc.pid} on 127.0.0.1:{self.port}; "
                         f"redis-py {redis.__version__}, hiredis "
                         f"{'yes' if _hiredis() else 'no'}")
            return
        raise RuntimeError(f"redis-server did not start; see {self.dir}/redis.log")

    @property
    def started(self) -> bool:
        return self.proc is not None and self.client is not None

    @property
    def spec(self) -> dict:
        return {"kind": "redis", "host": "127.0.0.1", "port": self.port}

    def sampler(self) -> Callable[[], dict]:
        import redis
        client = redis.Redis(host="127.0.0.1", port=self.port)

        pid = self.proc.pid

        def sample() -> dict:
            return {"store": int(client.info("memory")["used_memory"]), "job": 0,
                    "rss": rss_bytes(pid)}
        sample.close = client.close  # type: ignore[attr-defined]
        return sample

    def leftover(self, prefix: str) -> int:
        return sum(1 for _ in self.client.scan_iter(match=prefix + "*", count=1000))

    def cost(self) -> Any:
        return None

    def delete(self, names: list[str]) -> None:
        for start in range(0, len(names), 512):
            self.client.delete(*names[start:start + 512])

    def _stop_process(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop(self) -> Any:
        try:
            if self.client is not None:
                self.client.close()
        finally:
            self._stop_process()
            if self.dir:
                shutil.rmtree(self.dir, ignore_errors=True)
        return None


def _hiredis() -> bool:
    try:
        from redis.utils import HIREDIS_AVAILABLE
        return bool(HIREDIS_AVAILABLE)
    except ImportError:
        return False


class PeakMonitor(threading.Thread):
    """Samples the store's bytes every ``interval`` seconds from a background thread."""

    def __init__(self, sample: Callable[[], dict], interval: float = 0.2) -> None:
        super().__init__(name="peak-monitor", daemon=True)
        self.sample = sample
        self.interval = interval
        self.samples: list[tuple[float, int, int, int]] = []
        self.errors = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                s = self.sample()
                self.samples.append((time.monotonic(), s["store"], s["job"], s.get("rss", 0)))
            except Exception:
                self.errors += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        close = getattr(self.sample, "close", None)
        if close is not None:
            close()

    def peak(self, start: float = -math.inf, end: float = math.inf, column: int = 1) -> int:
        values = [s[column] for s in self.samples if start <= s[0] <= end]
        return max(values) if values else 0


# ----------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------

def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by at least one of the intervals."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def store_need(size: int, io: str) -> int:
    """Store bytes to provision: the intermediate data (and input + output with --io store),
    block rounding, and 25% + 256 MiB of headroom."""
    data = size * (3 if io == "store" else 1)
    return int(data * 1.25) + 256 * MiB


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def run_sort(kind: str, args: argparse.Namespace, executor, records: int) -> dict:
    """One complete sort through one store; returns its result dict."""
    size = records * RECORD
    M = args.lambdas
    R = args.reducers or args.lambdas
    input_counts = partition_counts(records, M)
    need = store_need(size, args.io)
    largest = max(input_counts) * RECORD
    backend = PocketBackend(args, need) if kind == "pocket" else RedisBackend(args, need, largest)
    monitor: Optional[PeakMonitor] = None
    files_dir = None
    wall0 = time.monotonic()
    result: dict = {"store": kind, "valid": False, "records": records, "bytes": size,
                    "lambdas": M, "reducers": R, "io": args.io, "executor": executor.name}
    phases: dict = {}
    tasks: dict = {}
    try:
        backend.start()
        result["setup"] = backend.note
        print(f"[{kind}] {backend.note}", file=sys.stderr)
        cfg = {"seed": args.seed, "reducers": R, "io": args.io, "input_counts": input_counts}
        if args.io == "files":
            files_dir = tempfile.mkdtemp(prefix="sort-files-")
            for sub in ("input", "output"):
                os.makedirs(os.path.join(files_dir, sub))
            cfg["dir"] = files_dir
        monitor = PeakMonitor(backend.sampler())
        monitor.start()

        def phase(name: str, count: int, extra: Optional[dict] = None) -> list:
            results, info = executor.run(f"{kind} {name}", name, backend.spec,
                                         {**cfg, **(extra or {})}, count)
            info["wall_s"] = info["t_end"] - info["t_go"]
            phases[name] = info
            tasks[name] = results
            return results

        gen = phase("generate", M)
        input_checksum = sum(g["checksum"] for g in gen) & 0xFFFFFFFFFFFFFFFF
        maps = phase("map", M)
        matrix = [m["bucket_records"] for m in maps]
        reds = phase("reduce", R, {"matrix": matrix})
        result["leftover_shuffle_objects"] = backend.leftover("shuffle/")
        result["cost"] = backend.cost()
        output_counts = [red["records"] for red in reds]
        vals = phase("validate", R, {"output_counts": output_counts})

        # -- validation -------------------------------------------------------
        problems = []
        out_records = sum(v["records"] for v in vals)
        out_checksum = sum(v["checksum"] for v in vals) & 0xFFFFFFFFFFFFFFFF
        if out_records != records:
            problems.append(f"{out_records} records out, {records} in")
        if out_checksum != input_checksum:
            problems.append(f"checksum {out_checksum:#018x} out, {input_checksum:#018x} in")
        for r, v in enumerate(vals):
            if v.get("error"):
                problems.append(v["error"])
            elif not v["sorted"]:
                problems.append(f"output/{r} is not sorted")
        previous = None
        for r, v in enumerate(vals):
            if v["first"] is None:
                continue
            if previous is not None and v["first"] < previous[1]:
                problems.append(f"output/{r} starts with key {v['first']} below the last key "
                                f"{previous[1]} of output/{previous[0]}")
            previous = (r, v["last"])
        result["valid"] = not problems
        result["problems"] = problems
        result["checksum"] = f"{input_checksum:#018x}"

        # -- times ------------------------------------------------------------
        map_s, reduce_s = phases["map"]["wall_s"], phases["reduce"]["wall_s"]
        write_s = union_length([tuple(m["shuffle_interval"]) for m in maps])
        read_s = union_length([tuple(r["shuffle_interval"]) for r in reds])
        shuffle_bytes = sum(m["shuffle_bytes"] for m in maps) + sum(r["shuffle_bytes"] for r in reds)
        shuffle_s = write_s + read_s
        result.update({
            "total_s": map_s + reduce_s, "shuffle_s": shuffle_s, "map_s": map_s,
            "reduce_s": reduce_s, "generate_s": phases["generate"]["wall_s"],
            "validate_s": phases["validate"]["wall_s"],
            "shuffle_write_s": write_s, "shuffle_read_s": read_s,
            "shuffle_bytes": shuffle_bytes,
            "shuffle_mb_s": shuffle_bytes / shuffle_s / 1e6 if shuffle_s > 0 else 0.0,
            "startup_s": {p: phases[p]["startup_s"] for p in PHASES},
            "per_lambda_mean_s": {
                name: {k: mean([t[k] for t in tasks[name] if k in t])
                       for k in ("read_s", "compute_s", "shuffle_s", "write_s")
                       if any(k in t for t in tasks[name])}
                for name in PHASES},
        })
    finally:
        if monitor is not None:
            monitor.stop()
        try:
            if args.io == "store" and backend.started:
                backend.delete([f"input/{m}" for m in range(M)] + [f"output/{r}" for r in range(R)])
        except Exception as exc:  # never let cleanup hide the real error
            print(f"sort.py: cleanup of {kind} objects failed: {exc}", file=sys.stderr)
        try:
            cost = backend.stop()
            if cost is not None and result.get("cost") is None:
                result["cost"] = cost
        finally:
            if files_dir:
                shutil.rmtree(files_dir, ignore_errors=True)
    if monitor is not None:
        result["peak_store_bytes"] = monitor.peak()
        result["peak_store_rss_bytes"] = monitor.peak(column=3)  # 0 for a --controller cluster
        if kind == "pocket":
            result["peak_job_bytes"] = monitor.peak(column=2)
        else:
            result["store_baseline_bytes"] = backend.baseline
        result["peak_by_phase"] = {p: monitor.peak(phases[p]["t_go"], phases[p]["t_end"])
                                   for p in phases}
        result["monitor_samples"] = len(monitor.samples)
    result["wall_s"] = time.monotonic() - wall0
    return result


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------

DEFINITIONS = {
    "total_s": "map_s + reduce_s (lambdas warm: process start-up excluded, see startup_s)",
    "map_s": "map lambdas released -> last map lambda done",
    "reduce_s": "reduce lambdas released -> last reduce lambda done",
    "shuffle_s": "union of the intervals in which >=1 map lambda puts intermediate objects, "
                 "plus the same for reduce lambdas getting them (delete_after_read)",
    "shuffle_mb_s": "intermediate bytes written + read / shuffle_s (MB = 1e6 bytes)",
    "peak_store_bytes": "max sampled store bytes (pocket: sum of nodes' reported used; "
                        "redis: used_memory), every 0.2 s",
    "peak_store_rss_bytes": "max sampled resident memory of the store's processes (embedded "
                            "pocket storage servers; redis-server)",
}


def format_table(results: list[dict]) -> str:
    head = ["store", "total_s", "shuffle_s", "map_s", "reduce_s", "shuffle MB/s",
            "peak store bytes", "valid"]
    rows = [[r["store"], f"{r['total_s']:.2f}", f"{r['shuffle_s']:.2f}", f"{r['map_s']:.2f}",
             f"{r['reduce_s']:.2f}", f"{r['shuffle_mb_s']:.0f}",
             f"{r['peak_store_bytes']} ({format_size(r['peak_store_bytes'])})",
             "yes" if r["valid"] else "NO"] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)


def format_details(r: dict) -> str:
    cost = r.get("cost")
    lines = [f"{r['store']}: generate {r['generate_s']:.2f} s, validate {r['validate_s']:.2f} s, "
             f"shuffle write {r['shuffle_write_s']:.2f} s + read {r['shuffle_read_s']:.2f} s, "
             f"lambda start-up {sum(r['startup_s'].values()):.2f} s over 4 phases, "
             f"wall {r['wall_s']:.1f} s; cost {'n/a' if cost is None else cost}; "
             f"leftover shuffle objects {r['leftover_shuffle_objects']}"]
    per = r["per_lambda_mean_s"]
    lines.append("  per lambda (mean s): map read {read:.2f} partition {compute:.2f} "
                 "put {shuffle:.2f}".format(read=per["map"].get("read_s", 0),
                                            compute=per["map"].get("compute_s", 0),
                                            shuffle=per["map"].get("shuffle_s", 0))
                 + " | reduce get {shuffle:.2f} sort {compute:.2f} write {write:.2f}".format(
                     shuffle=per["reduce"].get("shuffle_s", 0),
                     compute=per["reduce"].get("compute_s", 0),
                     write=per["reduce"].get("write_s", 0)))
    if r["problems"]:
        lines.append("  INVALID: " + "; ".join(r["problems"]))
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; skipping the plot"
    fig, ax = plt.subplots(figsize=(8, 1.8 + 0.8 * len(results)))
    colours = {"generate": "#bbbbbb", "map": "#4c72b0", "reduce": "#55a868", "validate": "#999999"}
    for y, r in enumerate(results):
        left = 0.0
        for p in PHASES:
            width = r[f"{p}_s"]
            ax.barh(y, width, left=left, color=colours[p], label=p if y == 0 else None)
            left += width
        ax.text(left, y, f"  shuffle {r['shuffle_s']:.1f} s", va="center", fontsize=8)
    longest = max(sum(r[f"{p}_s"] for p in PHASES) for r in results)
    ax.set_xlim(0, longest * 1.3)
    ax.set_yticks(range(len(results)), [r["store"] for r in results])
    ax.set_xlabel("seconds (phase wall times; lambda start-up excluded)")
    ax.set_title(f"sort of {format_size(results[0]['bytes'])} on {results[0]['lambdas']} lambdas")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="MapReduce sort of gensort-style records with the shuffle through a store "
                    "(Pocket and/or Redis).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Definitions:\n" + "\n".join(f"  {k}: {v}" for k, v in DEFINITIONS.items()))
    p.add_argument("--size", default=DEFAULT_SIZE,
                   help=f"input size in human units, e.g. 256MiB, 2GiB (default {DEFAULT_SIZE})")
    p.add_argument("--lambdas", type=int, default=8,
                   help="number of lambdas: map tasks, and reducers unless --reducers (default 8)")
    p.add_argument("--reducers", type=int, default=None, help="reduce tasks R (default: --lambdas)")
    p.add_argument("--store", choices=("pocket", "redis", "both"), default=None,
                   help="shuffle store (default: both when redis-server is installed, else pocket)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--controller", metavar="HOST:PORT",
                   help="use this Pocket cluster (default: start an embedded local cluster)")
    p.add_argument("--tier", choices=("dram", "nvme", "ssd", "hdd"), default=None,
                   help="Pocket tier to ask for (default: the controller's choice); the embedded "
                        "cluster is then made of two servers of that tier")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="where the embedded cluster's flash tiers put their data files "
                        "(default: a temporary directory)")
    p.add_argument("--executor", choices=("processes", "dask"), default="processes",
                   help="processes: each lambda a fresh process (default); dask: Dask tasks")
    p.add_argument("--dask-scheduler", metavar="ADDRESS",
                   help="with --executor dask: an existing Dask scheduler (default: a local one)")
    p.add_argument("--io", choices=("store", "files"), default="store",
                   help="input and output as persisted objects in the store (default) or as "
                        "local files standing in for S3")
    p.add_argument("--plot", metavar="PATH", help="PNG of phase times per store (needs matplotlib)")
    p.add_argument("--seed", type=int, default=42, help="input seed (default 42)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        args.size_bytes = parse_size(args.size)
    except ValueError as exc:
        p.error(str(exc))
    if args.lambdas < 1 or (args.reducers is not None and args.reducers < 1):
        p.error("--lambdas and --reducers must be at least 1")
    if args.reducers is not None and args.reducers > 65536:
        p.error("--reducers must be at most 65536")
    if args.size_bytes < RECORD:
        p.error(f"--size must hold at least one {RECORD}-byte record")
    if args.dask_scheduler and args.executor != "dask":
        p.error("--dask-scheduler needs --executor dask")
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # clean up on `kill` as on Ctrl-C
    have_redis = shutil.which("redis-server") is not None
    if args.store is None:
        args.store = "both" if have_redis else "pocket"
        if not have_redis:
            print("sort.py: redis-server not found; running pocket only", file=sys.stderr)
    elif args.store in ("redis", "both") and not have_redis:
        print("sort.py: redis-server is not installed; use --store pocket", file=sys.stderr)
        return 2
    stores = ["pocket", "redis"] if args.store == "both" else [args.store]
    records = args.size_bytes // RECORD
    progress = not args.no_progress
    executor = (DaskExecutor(args.lambdas, args.dask_scheduler, progress)
                if args.executor == "dask" else ProcessExecutor(progress))
    print(f"sort: {records} records ({format_size(records * RECORD)}), {args.lambdas} map + "
          f"{args.reducers or args.lambdas} reduce lambdas, executor {args.executor}, io "
          f"{args.io}, stores {', '.join(stores)}", file=sys.stderr)

    load_before = os.getloadavg()
    results = []
    try:
        for kind in stores:
            results.append(run_sort(kind, args, executor, records))
    except KeyboardInterrupt:
        print("sort.py: interrupted; stopped everything this run started", file=sys.stderr)
        return 130
    except (LambdaFailed, pocket.PocketError) as exc:
        print(f"sort.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if isinstance(executor, DaskExecutor):
            executor.close()

    load = {"before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()]}
    print()
    print(f"sort of {format_size(records * RECORD)} ({records} records), {args.lambdas} lambdas, "
          f"executor {args.executor}, io {args.io}; load average {load['before'][0]:.1f} before, "
          f"{load['after'][0]:.1f} after on {os.cpu_count()} CPUs")
    print(format_table(results))
    for r in results:
        print(format_details(r))
    ratio = None
    if len(results) == 2 and results[1]["shuffle_s"] > 0:
        ratio = {"shuffle_s": results[0]["shuffle_s"] / results[1]["shuffle_s"],
                 "total_s": results[0]["total_s"] / results[1]["total_s"]}
        print(f"pocket/redis shuffle-time ratio: {ratio['shuffle_s']:.2f} "
              f"(total-time ratio {ratio['total_s']:.2f})")
    print("shuffle_s = " + DEFINITIONS["shuffle_s"] + "; total_s = " + DEFINITIONS["total_s"])

    if args.plot:
        note = plot(results, args.plot)
        print(f"sort.py: {note}" if note else f"plot written to {args.plot}", file=sys.stderr)
    if args.json:
        config = {"size": records * RECORD, "records": records, "lambdas": args.lambdas,
                  "reducers": args.reducers or args.lambdas, "io": args.io,
                  "executor": args.executor, "seed": args.seed, "load_average": load,
                  "cpus": os.cpu_count(), "definitions": DEFINITIONS}
        if len(results) == 1:
            doc = {**results[0], "config": config}
        else:
            doc = {r["store"]: r for r in results}
            doc.update(stores=stores, ratio=ratio, valid=all(r["valid"] for r in results),
                       records=records, config=config)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2, default=str)
    return 0 if all(r["valid"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
