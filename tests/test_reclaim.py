"""Extents of a dead metadata server are freed on storage; a live one's never are.

Real processes on 127.0.0.1: a metadata server is killed (kill -9) or frozen
(SIGSTOP, a heartbeat-link blip) and the storage servers' usage is read
from the controller's status (their heartbeats).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

import pocket
from pocket.connection import BlockingConnection
from pocket.local import LocalCluster
from pocket.protocol import Op
from pocket.security import ClusterKey

from helpers import storage_used, wait_for

BIG = 300_000  # above the inline limit: stored as extents on storage servers


def metadata_ids(c) -> dict:
    """Metadata server address → node id, from the controller."""
    return {n["address"]: n["id"] for n in c.status()["nodes"] if n["role"] == "metadata"}


def job_md(c, job_id: str) -> str:
    return next(j["metadata"] for j in c.status()["jobs"] if j["id"] == job_id)


def settled_used(c, timeout: float = 5.0) -> int:
    """Storage bytes once two heartbeats in a row agree."""
    last = [-1]

    def stable() -> bool:
        used = storage_used(c.status())
        same = used == last[0]
        last[0] = used
        return same

    assert wait_for(stable, timeout, interval=1.1)
    return last[0]


def test_dead_metadata_servers_extents_are_reclaimed(make_cluster) -> None:
    c = make_cluster(dram=2, metadata=2, capacity="64MiB",
                     controller_args=("--reclaim-after", "2s"))
    with pocket.connect(c.address, timeout=5.0) as cl:
        doomed, live = cl.register_job("doomed"), cl.register_job("live")
        assert job_md(c, doomed.id) != job_md(c, live.id)  # one job on each metadata server
        assert settled_used(c) == 0
        for i in range(4):
            doomed.put(f"d{i}", os.urandom(BIG))
            doomed.put(f"p{i}", os.urandom(BIG), persist=True)
        kept = {f"l{i}": os.urandom(BIG) for i in range(4)}
        for name, data in kept.items():
            live.put(name, data)
        live_used = 4 * (-(-BIG // 4096) * 4096)
        assert wait_for(lambda: storage_used(c.status()) == 3 * live_used, 5.0, interval=0.2)
        md = next(p for p in c.processes if p.address == job_md(c, doomed.id))
        killed = time.monotonic()
        os.kill(md.pid, signal.SIGKILL)
        md.process.wait(5)
        # Dropped after 1.5 s, reclaimed 2 s later, seen at the next heartbeat: bounded.
        assert wait_for(lambda: storage_used(c.status()) == live_used, 10.0, interval=0.2), \
            storage_used(c.status())
        took = time.monotonic() - killed
        print(f"storage usage {3 * live_used} -> {live_used} bytes {took:.1f}s after kill -9 of the "
              f"metadata server (--reclaim-after 2s)")
        assert took > 2.0  # not before the grace period
        for name, data in kept.items():  # the live metadata server's extents are untouched
            assert live.get(name) == data
        live.deregister()
        assert wait_for(lambda: storage_used(c.status()) == 0, 5.0)


def test_metadata_link_blip_frees_nothing(make_cluster) -> None:
    c = make_cluster(dram=1, capacity="64MiB",
                     controller_args=("--reclaim-after", "8s", "--node-timeout", "2s"))
    with pocket.connect(c.address, timeout=10.0) as cl:
        job = cl.register_job("blip")
        data = {f"x{i}": os.urandom(BIG) for i in range(3)}
        for name, value in data.items():
            job.put(name, value)
        used = settled_used(c)
        (md,) = [p for p in c.processes if p.role == "metadata"]
        md_id = metadata_ids(c)[md.address]
        stopped = time.monotonic()
        os.kill(md.pid, signal.SIGSTOP)  # silent: no heartbeats, the connection stays open
        try:
            assert wait_for(lambda: md.address not in metadata_ids(c), 5.0)  # dropped
        finally:
            os.kill(md.pid, signal.SIGCONT)
        # Back within one heartbeat, under the same node id: its jobs find it again.
        assert wait_for(lambda: metadata_ids(c).get(md.address) == md_id, 5.0)
        assert cl.attach(job.id, job.token).get("x0") == data["x0"]
        time.sleep(max(0.0, stopped + 8 + 2 - time.monotonic()))  # past --reclaim-after
        assert storage_used(c.status()) == used
        for name, value in data.items():
            assert job.get(name) == value
        job.deregister()


def test_metadata_server_dead_while_the_controller_was_down(make_cluster) -> None:
    """A new controller never saw the dead one: owners unknown to it are reclaimed a grace
    period after its start, the live metadata server (which registers again) keeps its data."""
    c = make_cluster(dram=1, metadata=2, capacity="64MiB")
    port = int(c.address.rsplit(":", 1)[1])
    with pocket.connect(c.address, timeout=5.0) as cl:
        doomed, live = cl.register_job("doomed"), cl.register_job("live")
        assert job_md(c, doomed.id) != job_md(c, live.id)
        doomed.put("d", os.urandom(BIG))
        value = os.urandom(BIG)
        live.put("l", value)
        md = next(p for p in c.processes if p.address == job_md(c, doomed.id))
        ctl = c.processes[0]
        for p in (ctl, md):
            os.kill(p.pid, signal.SIGKILL)
            p.process.wait(5)
        started = time.monotonic()
        c.processes[0] = c._spawn("controller", ["--listen", f"127.0.0.1:{port}",
                                                 "--reclaim-after", "3s",
                                                 *c.controller_profile_args()], 10.0)
        one = -(-BIG // 4096) * 4096
        assert wait_for(lambda: storage_used(c.status()) == one, 10.0, interval=0.2)
        assert time.monotonic() - started > 3.0
        assert live.get("l") == value


def test_unsigned_reclaim_is_refused(cluster, job) -> None:
    job.put("x", b"r" * BIG)
    (address,) = job.lookup("x").servers
    conn = BlockingConnection(address, timeout=5.0)
    try:
        for header in ({"owner": "x" * 16}, {"owner": "x" * 16, "auth": b"\0" * 20},
                       {"owner": 7, "auth": 3}, {}):
            with pytest.raises(pocket.AccessDenied):
                conn.request(Op.EXT_RECLAIM, header)
        assert conn.request(Op.PING, {}) is not None  # same connection, server fine
    finally:
        conn.close()
    assert job.get("x") == b"r" * BIG


def test_storage_refuses_to_reclaim_an_owner_it_heard_from(monkeypatch) -> None:
    """EXT_RECLAIM says how long the controller has not heard from the owner; a storage
    server that got an allocation from it more recently refuses (the owner lives: only its
    controller link is cut), and frees its extents only when that is not so."""
    secret = os.urandom(16).hex()
    monkeypatch.setenv("POCKET_SECRET", secret)
    key = ClusterKey(secret.encode())
    with LocalCluster(dram=1, capacity="64MiB", log_level="WARNING") as c, \
            pocket.connect(c.address, timeout=5.0) as cl:
        job = cl.register_job("alive")
        data = os.urandom(BIG)
        job.put("x", data)
        (owner,) = [n["owner"] for n in cl.status()["nodes"] if n["role"] == "metadata"]
        (address,) = job.lookup("x").servers
        conn = BlockingConnection(address, timeout=5.0)
        try:
            def reclaim(silent: float):
                return conn.request(Op.EXT_RECLAIM, {
                    "owner": owner, "silent": silent,
                    "auth": key.sign(Op.EXT_RECLAIM, owner, silent)})

            with pytest.raises(pocket.AccessDenied, match="allocated here"):
                reclaim(60.0)  # "silent for a minute", but it allocated here just now
            assert job.get("x") == data
            with pytest.raises(pocket.AccessDenied):  # the signature covers ``silent``
                conn.request(Op.EXT_RECLAIM, {"owner": owner, "silent": 0.001,
                                              "auth": key.sign(Op.EXT_RECLAIM, owner, 60.0)})
            time.sleep(0.05)
            assert reclaim(0.001).header["extents"] == 1  # silent longer than its last alloc
        finally:
            conn.close()
        with pytest.raises(pocket.PocketError):  # its extent is gone: an error, never bytes
            job.get("x")
