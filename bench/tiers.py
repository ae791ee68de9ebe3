#!/usr/bin/env python3
"""Flash tiers against the device's own O_DIRECT throughput (fio), in one run.

For each tier (default: nvme) it starts a local cluster whose storage server
keeps its data file in --data-dir, then measures through Pocket's asyncio
client:

* sequential put and get MB/s of 1 MiB and 16 MiB objects (``--depth``
  requests in flight, like fio's iodepth);
* 4 KiB random get IOPS over many 4 KiB objects (``--concurrency`` in flight);
* the page cache held by the server's data file after the writes (fincore).

and runs fio with ``--direct=1`` on the same directory with the same block
size and depth.  Prints a table with pocket/fio ratios; ``--json PATH`` saves it.

    python bench/tiers.py --data-dir /mnt/nvme/pocket --tiers nvme
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import pocket.aio  # noqa: E402
from pocket.local import LocalCluster  # noqa: E402
from pocket.storage.flash import MEMORY_FILESYSTEMS, filesystem_type  # noqa: E402
from pocket.units import format_size, parse_size  # noqa: E402


def progress(msg: str) -> None:
    print(f"[tiers] {msg}", file=sys.stderr, flush=True)


# -- fio ----------------------------------------------------------------------

def run_fio(directory: str, rw: str, bs: str, size: int, depth: int, runtime: float) -> float:
    """fio's rate for one job: MB/s for sequential, IOPS for random reads."""
    cmd = ["fio", "--name=pocket-cmp", f"--directory={directory}", f"--rw={rw}", f"--bs={bs}",
           f"--size={size}", "--direct=1", "--ioengine=libaio", f"--iodepth={depth}",
           "--numjobs=1", "--group_reporting", "--output-format=json", "--unlink=1",
           f"--runtime={runtime}"]
    if rw == "randread":
        cmd.append("--time_based")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120, check=True)
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = job["read" if "read" in rw else "write"]
    return side["iops"] if rw == "randread" else side["bw_bytes"] / 1e6


# -- pocket --------------------------------------------------------------------

async def seq(job, size: int, total: int, depth: int, op: str) -> float:
    """MB/s of ``total`` bytes of ``size``-byte objects with ``depth`` in flight."""
    count = max(depth, total // size)
    data = os.urandom(size)
    names = [f"seq/{size}/{i}" for i in range(count)]
    sem = asyncio.Semaphore(depth)
    buffers = [bytearray(size) for _ in range(depth)]

    async def one(i: int) -> None:
        async with sem:
            if op == "put":
                await job.put(names[i], data)
            else:
                buf = buffers.pop()
                try:
                    await job.get_into(names[i], buf)
                finally:
                    buffers.append(buf)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return count * size / (time.perf_counter() - t0) / 1e6


async def random_gets(job, count: int, concurrency: int, duration: float) -> float:
    names = [f"rand/{i}" for i in range(count)]
    data = os.urandom(4096)
    sem = asyncio.Semaphore(64)

    async def put(name: str) -> None:
        async with sem:
            await job.put(name, data)

    await asyncio.gather(*(put(n) for n in names))
    done = 0
    deadline = time.perf_counter() + duration
    rng = random.Random(1)

    async def worker() -> None:
        nonlocal done
        buf = bytearray(4096)
        while time.perf_counter() < deadline:
            await job.get_into(names[rng.randrange(count)], buf)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - t0)


def data_file_of(pid: int) -> str | None:
    """The ``.data`` file a storage process has open, if any."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed since the listing
            continue
        if target.endswith(".data"):
            return target
    return None


def page_cache_bytes(path: str) -> int | None:
    """Resident page-cache bytes of ``path`` (util-linux fincore), or None."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else None


async def measure_tier(address: str, tier: str, args: argparse.Namespace) -> dict:
    c = await pocket.aio.connect(address)
    job = await c.register_job(f"tiers-{tier}", tier=tier)
    results: dict = {}
    try:
        for size in (1 << 20, 16 << 20):
            for op in ("put", "get"):
                progress(f"{tier}: {op} {format_size(size)} objects")
                results[f"{op}_{size >> 20}MiB_MBps"] = await seq(job, size, args.bytes, args.depth, op)
        progress(f"{tier}: 4 KiB random gets, {args.concurrency} in flight")
        results["randget_4KiB_iops"] = await random_gets(job, args.random_objects, args.concurrency,
                                                         args.duration)
    finally:
        await job.deregister()
        await c.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None,
                        help="directory on the device under test (default: a temp dir in the "
                             "current directory)")
    parser.add_argument("--tiers", default="nvme", help="comma-separated tiers (default nvme)")
    parser.add_argument("--bytes", default="1GiB", help="bytes per sequential cell (default 1GiB)")
    parser.add_argument("--depth", type=int, default=4, help="requests in flight, sequential (4)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="requests in flight, random 4 KiB gets (16)")
    parser.add_argument("--random-objects", type=int, default=4096, help="4 KiB objects (4096)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of random gets (5)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--json", default=None, help="write results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.bytes, args.random_objects, args.duration = "64MiB", 256, 1.0
    args.bytes = parse_size(args.bytes)
    if not shutil.which("fio"):
        print("bench/tiers.py needs fio (Debian: apt-get install fio) for the comparison",
              file=sys.stderr)
        return 2
    own_dir = args.data_dir is None
    data_dir = args.data_dir or tempfile.mkdtemp(prefix=".pocket-tiers-", dir=os.getcwd())
    if filesystem_type(data_dir) in MEMORY_FILESYSTEMS:
        print(f"{data_dir} is on a memory filesystem; O_DIRECT would be meaningless there",
              file=sys.stderr)
        return 2
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    capacity = max(256 << 20, 2 * args.bytes + (64 << 20))
    table: dict = {"data_dir": data_dir, "depth": args.depth, "concurrency": args.concurrency,
                   "bytes_per_cell": args.bytes, "tiers": {}}
    try:
        for tier in tiers:
            counts = {t: int(t == tier) for t in ("nvme", "ssd", "hdd")}
            with LocalCluster(dram=0, **counts, data_dir=data_dir, flash_capacity=capacity,
                              metadata_args=("--inline-max", "0"), log_level="WARNING") as cl:
                server = next(p for p in cl.processes if p.role == "storage")
                pocket_results = asyncio.run(measure_tier(cl.address, tier, args))
                data_file = data_file_of(server.pid)
                cached = page_cache_bytes(data_file) if data_file else None
            progress(f"{tier}: fio on the same directory")
            fio = {}
            for size, label in ((1 << 20, "1MiB"), (16 << 20, "16MiB")):
                fio[f"put_{label}_MBps"] = run_fio(data_dir, "write", label.replace("iB", ""),
                                                   args.bytes, args.depth, 60)
                fio[f"get_{label}_MBps"] = run_fio(data_dir, "read", label.replace("iB", ""),
                                                   args.bytes, args.depth, 60)
            fio["randget_4KiB_iops"] = run_fio(data_dir, "randread", "4k", 64 << 20,
                                               args.concurrency, args.duration)
            table["tiers"][tier] = {"pocket": pocket_results, "fio": fio,
                                    "page_cache_bytes_after_writes": cached}
    finally:
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)

    print(f"\nFlash tiers vs fio --direct=1 on {data_dir} (depth {args.depth}, "
          f"{format_size(args.bytes)} per sequential cell, random gets at {args.concurrency} in flight)\n")
    print("| tier | metric | pocket | fio | pocket/fio |")
    print("|---|---|---:|---:|---:|")
    for tier, r in table["tiers"].items():
        for key, value in r["pocket"].items():
            ref = r["fio"][key]
            unit = "IOPS" if "iops" in key else "MB/s"
            print(f"| {tier} | {key.rsplit('_', 1)[0]} ({unit}) | {value:,.0f} | {ref:,.0f} | "
                  f"{value / ref:.2f} |")
        cached = r["page_cache_bytes_after_writes"]
        print(f"| {tier} | page cache held by the data file after writes | "
              f"{'n/a' if cached is None else format_size(cached)} | | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
