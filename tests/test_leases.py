"""Driver handles keep their job's lease while open (sync and asyncio), and stop when closed."""

from __future__ import annotations

import asyncio
import os
import time

import pocket
import pocket.aio

BIG = 300_000


def job_state(c, job_id: str):
    return next((j["state"] for j in c.status()["jobs"] if j["id"] == job_id), None)


def test_idle_asyncio_driver_keeps_its_job(make_cluster) -> None:
    c = make_cluster(dram=1, capacity="64MiB", metadata_args=("--job-lease", "2s"))

    async def main() -> None:
        cl = await pocket.aio.connect(c.address)
        try:
            idle = await cl.register_job("idle-driver", lease=1.5)
            dropped = await cl.register_job("dropped-driver", lease=1.5)
            data = os.urandom(BIG)
            for job in (idle, dropped):
                await job.put("x", data)
            await dropped.close()  # its handle stops renewing, as a dead driver's would
            t = time.monotonic()
            # Expired (an expired job without persisted objects leaves the status listing).
            while job_state(c, dropped.id) == "active":  # bounded: 4 leases
                assert time.monotonic() - t < 6.0, "a job nobody renews must expire"
                await asyncio.sleep(0.2)
            await asyncio.sleep(max(0.0, t + 4.5 - time.monotonic()))  # 3 leases idle
            assert job_state(c, idle.id) == "active"
            assert await idle.get("x") == data  # the idle driver's job kept its data
            await idle.deregister()
        finally:
            await cl.close()

    asyncio.run(main())


def test_closing_the_sync_cluster_handle_stops_renewal(make_cluster) -> None:
    """``Cluster.close()`` stops the renewal of the jobs it registered: they expire."""
    c = make_cluster(dram=1, capacity="64MiB", metadata_args=("--job-lease", "2s"))
    cl = pocket.connect(c.address)
    job = cl.register_job("closed-driver", lease=1.0)
    job.put("x", os.urandom(BIG))
    cl.close()
    t = time.monotonic()
    with pocket.connect(c.address) as watcher:
        while job_state(watcher, job.id) == "active":  # bounded: 5 leases
            assert time.monotonic() - t < 5.0, "a closed handle must stop renewing"
            time.sleep(0.2)
