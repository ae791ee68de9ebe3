"""Hot-path cost of access control and checksums: put/get latency of 1 KiB and 1 MiB objects.

    python bench/reliability.py            # DRAM job (capabilities, no checksums)
    python bench/reliability.py --checksums # DRAM job with checksums=True
    python bench/reliability.py --replicas 2 # two copies of each large object (2 DRAM servers)

To compare with an older commit, run it with ``PYTHONPATH=<worktree>/src``
(the cluster's servers inherit it), interleaving the two several times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import pocket
from pocket.local import LocalCluster


def bench(job: pocket.Job, size: int, n: int) -> tuple[float, float]:
    """Median put and get latency in microseconds."""
    data = os.urandom(size)
    job.put("warm", data)
    job.get("warm")
    put, get = [], []
    for i in range(n):
        t = time.perf_counter()
        job.put(f"o{i % 8}", data)
        put.append(time.perf_counter() - t)
        t = time.perf_counter()
        job.get(f"o{i % 8}")
        get.append(time.perf_counter() - t)
    return statistics.median(put) * 1e6, statistics.median(get) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checksums", action="store_true", help="register with checksums=True")
    parser.add_argument("--replicas", type=int, default=1,
                        help="register with replicas=N (1 or 2; default 1)")
    parser.add_argument("--dram", type=int, default=None,
                        help="DRAM storage servers (default 1, or 2 with --replicas 2)")
    args = parser.parse_args()
    dram = args.dram or (2 if args.replicas > 1 else 1)
    options: dict = {"checksums": True} if args.checksums else {}
    if args.replicas != 1:
        options["replicas"] = args.replicas
    with LocalCluster(dram=dram, capacity="256MiB", log_level="WARNING") as c:
        with pocket.connect(c.address) as cl:
            job = cl.register_job("bench", **options)
            print("| size | put µs | get µs |\n|---|---|---|")
            for size, n in ((1024, 3000), (1 << 20, 400)):
                bench(job, size, n // 4)  # warm-up
                p, g = bench(job, size, n)
                print(f"| {size} | {p:.1f} | {g:.1f} |")
            job.deregister()


if __name__ == "__main__":
    main()
