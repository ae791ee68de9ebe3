"""Optional replication (``register_job(..., replicas=2)``): placement, fallback reads, node death.

Pure functions first (placement, packing, the copy-reading state machine), then real clusters
on 127.0.0.1 with storage servers killed by SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
import signal
import time

import pytest

import pocket
import pocket.aio
from pocket.controller.planner import (DEFAULT_PROFILES, NodeLoad, TierView, pack_allocation,
                                      pack_replicated, plan_allocation)
from pocket.errors import IntegrityError, InvalidRequest, ProtocolError, Unavailable
from pocket.metadata.placement import WeightedChooser, plan_replicated
from pocket.protocol import Op
from pocket.replication import CopyReads, check_replicas, piece_plan
from pocket.security import checksum

from helpers import storage_used, wait_for

MiB = 1 << 20
#: Sizes across the paths: inline (metadata), one extent, a few MiB, and split at 8 MiB.
SIZES = (100, 70_000, MiB, 3 * MiB + 5, 20 * MiB)


# -- the job option ---------------------------------------------------------------------------

@pytest.mark.timeout(10)
@pytest.mark.parametrize("bad", [0, 3, -1, "2", 2.0, True, None])
def test_check_replicas_refuses_all_but_1_and_2(bad) -> None:
    assert check_replicas(1) == 1 and check_replicas(2) == 2
    with pytest.raises(InvalidRequest, match="replicas must be 1"):
        check_replicas(bad)


# -- placement (pure) -------------------------------------------------------------------------

@pytest.mark.timeout(10)
def test_plan_replicated_puts_copies_on_distinct_nodes() -> None:
    for weights, expected in (({"a": 1, "b": 1, "c": 1}, {"a": 40, "b": 40, "c": 40}),
                              ({"a": 2, "b": 1, "c": 1, "d": 1}, {"a": 48, "b": 24, "c": 24,
                                                                   "d": 24}),
                              # a can hold at most one copy of each: it is in every pair
                              ({"a": 3, "b": 1, "c": 1}, {"a": 60, "b": 30, "c": 30})):
        chooser = WeightedChooser(weights)
        counts: Counter = Counter()
        for _ in range(60):  # small objects: one piece, two copies, by weight
            (piece,) = plan_replicated(100_000, [chooser], 2)
            nodes = [n for n, _ in piece]
            assert len(set(nodes)) == 2 and all(nbytes == 100_000 for _, nbytes in piece)
            counts.update(nodes)
        assert counts == expected, weights
    # Large: cut by weight, each piece's copy on the next piece's node (chained).
    large = plan_replicated(24 << 20, [WeightedChooser({"a": 1, "b": 1, "c": 1})], 2,
                            split_size=8 << 20)
    assert [[n for n, _ in piece] for piece in large] == [["a", "b"], ["b", "c"], ["c", "a"]]
    assert sum(p[0][1] for p in large) == 24 << 20 and all(p[0][1] == p[1][1] for p in large)


@pytest.mark.timeout(10)
def test_choose_many_is_choose_for_one_node() -> None:
    one, many = WeightedChooser({"a": 3, "b": 2, "c": 1}), WeightedChooser({"a": 3, "b": 2, "c": 1})
    assert [one.choose() for _ in range(12)] == [many.choose_many(1)[0] for _ in range(12)]
    with pytest.raises(LookupError):
        many.choose_many(2, exclude={"a", "b"})


@pytest.mark.timeout(10)
def test_plan_replicated_uses_spill_levels_and_exclusions() -> None:
    own = WeightedChooser({"a": 1})
    spill = WeightedChooser({"b": 1, "c": 1})
    for _ in range(4):  # the job's map has one node: the second copy goes to the spill level
        (piece,) = plan_replicated(1 << 20, [own, spill], 2)
        assert piece[0][0] == "a" and piece[1][0] in ("b", "c")
    (piece,) = plan_replicated(1 << 20, [own, spill], 2, exclude={"a"})
    assert {n for n, _ in piece} == {"b", "c"}
    with pytest.raises(LookupError, match="2 copies need 2 distinct storage servers; 1 available"):
        plan_replicated(1 << 20, [own, spill], 2, exclude={"b", "c"})
    with pytest.raises(LookupError, match="1 available"):
        plan_replicated(1 << 20, [WeightedChooser({"a": 1})], 2)
    with pytest.raises(LookupError, match="0 available"):
        plan_replicated(1 << 20, [], 2)


@pytest.mark.timeout(10)
def test_pack_replicated_spreads_a_small_job_over_two_nodes() -> None:
    def nodes():
        return [NodeLoad("n1", "dram", 100, 100, allocated_capacity=50, allocated_throughput=50),
                NodeLoad("n2", "dram", 100, 100), NodeLoad("n3", "dram", 100, 100)]

    alone = pack_allocation(10, 20, nodes())
    assert [s.node for s in alone.slices] == ["n1"]  # fullest first: one node
    packed = pack_replicated(10, 20, nodes(), 2)
    assert packed.complete and len({s.node for s in packed.slices}) == 2
    assert sum(s.throughput for s in packed.slices) == 10
    assert sum(s.capacity for s in packed.slices) == 20
    assert pack_replicated(10, 20, nodes(), 1) == alone
    single = pack_replicated(10, 20, nodes()[:1], 2)  # one node: half stays unmet
    assert [s.node for s in single.slices] == ["n1"]
    assert (single.unmet_throughput, single.unmet_capacity) == (5, 10)


@pytest.mark.timeout(10)
def test_a_replicated_allocation_holds_every_copy() -> None:
    cluster = {"dram": TierView(DEFAULT_PROFILES["dram"], nodes=4, spare_throughput=4e9,
                                spare_capacity=200 * 10**9)}
    one = plan_allocation({"capacity": 10 * MiB, "throughput": 1e8}, cluster)
    two = plan_allocation({"capacity": 10 * MiB, "throughput": 1e8, "replicas": 2}, cluster)
    assert two.capacity == 2 * one.capacity and two.throughput == one.throughput


# -- reading copies (sans-IO) -----------------------------------------------------------------

def _sunk() -> object:
    class Sunk:  # what a storage reply looks like once received into its buffer
        sunk = True
    return Sunk()


def _pieces(data: bytes) -> list:
    half = len(data) // 2
    return [[checksum(data[:half]), [[["A", 1, half, b"c"]], [["B", 2, half, b"c"]]]],
            [checksum(data[half:]), [[["B", 3, len(data) - half, b"c"]],
                                     [["A", 4, len(data) - half, b"c"]]]]]


@pytest.mark.timeout(10)
def test_copy_reads_fall_back_to_the_other_copy() -> None:
    data = os.urandom(1000)
    dest = memoryview(bytearray(data))
    reads = CopyReads(piece_plan(_pieces(data), 1000, with_checksums=True), start=0)
    first = reads.first()
    assert [copy[0][0] for _, copy in first] == ["A", "B"]  # copy 0 of each: 2 nodes
    # A is down: its piece is read again from B; the other piece was fine.
    again = reads.settle(first, [Unavailable("A refused"), _sunk()], dest)
    assert [(i, copy[0][0]) for i, copy in again] == [(0, "B")]
    assert reads.settle(again, [_sunk()], dest) == []
    # Reads spread: the next get starts at the other copy.
    assert [c[0][0] for _, c in CopyReads(reads.pieces, start=1).first()] == ["B", "A"]
    assert [c[0][0] for _, c in CopyReads(reads.pieces, start=2).first()] == ["A", "B"]
    # Recently unreachable servers are read last.
    assert [c[0][0] for _, c in CopyReads(reads.pieces, 0, {"A"}).first()] == ["B", "B"]


@pytest.mark.timeout(10)
def test_copy_reads_fall_back_on_a_bad_checksum_and_fail_when_all_copies_fail() -> None:
    data = os.urandom(1000)
    buf = bytearray(data)
    buf[10] ^= 1  # the first read of piece 0 brought wrong bytes
    dest = memoryview(buf)
    reads = CopyReads(piece_plan(_pieces(data), 1000, with_checksums=True), start=0)
    first = reads.first()
    again = reads.settle(first, [_sunk(), _sunk()], dest)
    assert [(i, copy[0][0]) for i, copy in again] == [(0, "B")]
    with pytest.raises(IntegrityError, match="all 2 copies failed"):
        reads.settle(again, [_sunk()], dest)  # still wrong: no copy left
    reads = CopyReads(piece_plan(_pieces(data), 1000, with_checksums=True), start=0)
    first = reads.first()
    with pytest.raises(Unavailable, match="all 2 copies failed"):  # A and B both down
        reads.settle(reads.settle(first, [Unavailable("A"), Unavailable("B")], dest),
                     [Unavailable("B")], dest)


@pytest.mark.timeout(10)
def test_piece_plan_refuses_malformed_replies() -> None:
    good = [[["A", 1, 10, b"c"]], [["B", 2, 10, b"c"]]]
    assert len(piece_plan([good], 10, with_checksums=False)[0].copies) == 2
    for bad, size in (([good], 11),  # pieces do not cover the object
                      ([[[["A", 1, 10, b"c"]], [["B", 2, 9, b"c"]]]], 10),  # copies differ
                      ([[good[0]] * 3], 10),  # more copies than MAX_REPLICAS
                      ([[]], 10), ([[[]]], 10), ("x", 10),
                      ([[[["A", 1, -5, b"c"]]]], -5)):
        with pytest.raises(ProtocolError):
            piece_plan(bad, size, with_checksums=False)


# -- real clusters ----------------------------------------------------------------------------

def pieces_of(job: pocket.Job, name: str) -> list:
    """The GET reply's pieces of a replicated object (read lease released)."""
    h = job._md(Op.GET, {"name": name, "dar": False, "copies": True}).header
    job._md_no_reply(Op.RELEASE, {"lease": h["lease"]})
    return h["pieces"]


@pytest.mark.timeout(60)
def test_bad_replicas_values_are_refused(client: pocket.Cluster) -> None:
    for bad in (0, 3, "2", True, 1.5):
        with pytest.raises(InvalidRequest, match="replicas"):
            client.register_job("bad", replicas=bad)
        with pytest.raises(InvalidRequest, match="replicas"):  # a client that skips the check
            client._controller(Op.JOB_REGISTER, {"name": "bad", "hints": {}, "replicas": bad})

    async def aio() -> None:
        async with await pocket.aio.connect(client.address) as c:
            with pytest.raises(InvalidRequest, match="replicas"):
                await c.register_job("bad", replicas=3)
    asyncio.run(aio())


@pytest.mark.timeout(60)
def test_replicas_on_a_single_node_cluster_is_a_clear_error(make_cluster) -> None:
    c = make_cluster(dram=1, capacity="64MiB")
    with pocket.connect(c.address) as cl:
        with pytest.raises(Unavailable, match="replicas=2 needs 2 distinct dram storage servers"):
            cl.register_job("lonely", replicas=2, capacity="1MiB")
        job = cl.register_job("plain")  # nothing was leaked: the node is whole for others
        assert c.status()["jobs"][0]["id"] == job.id
        job.put("x", b"x" * 200_000)
        assert job.get("x") == b"x" * 200_000
        job.deregister()


@pytest.mark.timeout(90)
def test_replicas_on_one_node_asks_the_provider_for_a_second(make_cluster) -> None:
    c = make_cluster(dram=1, capacity="64MiB", provider="local", max_nodes=2)
    with pocket.connect(c.address) as cl:
        job = cl.register_job("grow", replicas=2, capacity="1MiB")  # fits the one node
        assert len(job.weights) == 2
        assert sum(1 for n in cl.status()["nodes"] if n["role"] == "storage") == 2
        data = os.urandom(MiB)
        job.put("x", data)
        assert len(job.lookup("x").servers) == 2 and job.get("x") == data
        job.deregister()


@pytest.mark.timeout(120)
def test_replicated_objects_land_on_two_nodes_and_delete_frees_both(make_cluster) -> None:
    c = make_cluster(dram=3, capacity="128MiB")
    with pocket.connect(c.address) as cl:
        # A small capacity hint would fit one node; replicas=2 spreads it over two.
        job = cl.register_job("copies", replicas=2, capacity="16MiB", checksums=True)
        assert job.replicas == 2 and len(job.weights) == 2
        base = {n["address"]: n["used"] for n in c.status()["nodes"] if n["role"] == "storage"}
        objects = {f"o{size}": os.urandom(size) for size in SIZES}
        for name, data in objects.items():
            job.put(name, data)
        for name, data in objects.items():
            assert job.get(name) == data
            buf = bytearray(len(data))
            assert job.get_into(name, buf) == len(data) and buf == data
            info = job.lookup(name)
            if len(data) <= job.inline_max:
                assert info.tier == "metadata" and info.servers == ()
                continue
            assert len(info.servers) == 2
            for crc, copies in pieces_of(job, name):
                assert isinstance(crc, int) and len(copies) == 2
                assert copies[0][0][0] != copies[1][0][0]  # each piece on 2 distinct nodes
        assert len(pieces_of(job, f"o{20 * MiB}")) == 2  # split at 8 MiB: two pieces
        stored = sum(len(d) for d in objects.values() if len(d) > job.inline_max)

        def grown() -> dict:
            return {n["address"]: n["used"] - base.get(n["address"], 0)
                    for n in c.status()["nodes"] if n["role"] == "storage"}
        # Two copies: every byte is stored twice (block rounding aside), on two nodes.
        assert wait_for(lambda: sum(grown().values()) >= 2 * stored, 5.0), grown()
        assert sum(1 for g in grown().values() if g > 0) == 2
        job.put(f"o{MiB}", os.urandom(MiB))  # an overwrite frees the old copies
        for name in objects:
            job.delete(name)
        assert wait_for(lambda: all(g == 0 for g in grown().values()), 5.0), grown()
        job.put("left", os.urandom(2 * MiB))
        job.deregister()  # deregistration frees both copies too
        assert wait_for(lambda: storage_used(c.status()) == sum(base.values()), 5.0)


@pytest.mark.timeout(120)
def test_a_bad_copy_is_read_from_the_other_one(make_cluster) -> None:
    c = make_cluster(dram=2, capacity="64MiB")
    with pocket.connect(c.address) as cl:
        job = cl.register_job("corrupt", replicas=2, checksums=True)
        data = os.urandom(300_000)
        # A put by hand that writes wrong bytes to the first copy only (as a bad disk would).
        h = job._md(Op.PUT_BEGIN, {"name": "x", "size": len(data), "persist": False,
                                   "copies": True}).header
        (piece,) = piece_plan(h["pieces"], len(data), with_checksums=False)
        wrong = bytearray(data)
        wrong[1234] ^= 0x40
        for copy, payload in zip(piece.copies, (wrong, data)):
            for address, ext, offset, length, cap, _ in copy:
                with job._pool.connection(address) as conn:
                    conn.request(Op.EXT_WRITE, {"ext": ext, "off": 0, "cap": cap},
                                 memoryview(payload)[offset:offset + length])
        job._md(Op.PUT_COMMIT, {"put": h["put"], "crc": [checksum(data)]})
        for _ in range(4):  # whichever copy a get starts with, it returns the right bytes
            assert job.get("x") == data
        # A client that does not know replication is refused, never handed a reply it misreads.
        with pytest.raises(InvalidRequest, match="does not know replication"):
            job._md(Op.GET, {"name": "x", "dar": False})
        with pytest.raises(InvalidRequest, match="does not know replication"):
            job._md(Op.PUT_BEGIN, {"name": "y", "size": len(data), "persist": False})

        async def aio() -> None:
            ajob = await pocket.aio.attach(job.id, job.token, c.address)
            try:
                for _ in range(4):
                    assert await ajob.get("x") == data
            finally:
                await ajob.close()
        asyncio.run(aio())
        job.deregister()


@pytest.mark.timeout(120)
def test_kill_storage_replicated_objects_survive(make_cluster) -> None:
    c = make_cluster(dram=2, capacity="128MiB")
    cl = pocket.connect(c.address, timeout=5.0)
    rep = cl.register_job("replicated", replicas=2)
    plain = cl.register_job("plain")  # the same two nodes, one copy
    objects = {f"o{size}-{i}": os.urandom(size) for size in SIZES for i in range(2)}
    for name, data in objects.items():
        rep.put(name, data)
    lost = {f"p{i}": os.urandom(MiB) for i in range(4)}
    for name, data in lost.items():
        plain.put(name, data)
    dead = [p for p in c.processes if p.role == "storage"][0]
    assert any(dead.address in (plain.lookup(n).servers) for n in lost)
    os.kill(dead.pid, signal.SIGKILL)
    dead.process.wait(5)

    def read_all() -> float:
        """Every replicated object byte-exact; returns the slowest get (seconds)."""
        slowest = 0.0
        for name, data in objects.items():
            t = time.monotonic()
            assert rep.get(name) == data, name
            slowest = max(slowest, time.monotonic() - t)
        return slowest

    started = time.monotonic()
    slowest = max(read_all(), read_all())  # both copies tried first: spread reads
    took = time.monotonic() - started
    assert slowest < 10.0, f"a get took {slowest:.2f}s"

    async def aio_read_all() -> None:
        ajob = await pocket.aio.attach(rep.id, rep.token, c.address, timeout=5.0)
        try:
            for _ in range(2):
                for name, data in objects.items():
                    assert await asyncio.wait_for(ajob.get(name), 10.0) == data, name
                buf = bytearray(20 * MiB)
                assert await ajob.get_into(f"o{20 * MiB}-0", buf) == 20 * MiB
                assert buf == objects[f"o{20 * MiB}-0"]
        finally:
            await ajob.close()
    asyncio.run(aio_read_all())
    # The unreplicated job loses what was on the dead node, and says so.
    for name, data in lost.items():
        if dead.address in plain.lookup(name).servers:
            t = time.monotonic()
            with pytest.raises(Unavailable):
                plain.get(name)
            assert time.monotonic() - t < 8.0
        else:
            assert plain.get(name) == data
    # One node left: a new replicated large put cannot keep two copies and says so (nothing
    # written); small objects (inline in the metadata server) are unaffected.
    assert wait_for(lambda: dead.address not in {n["address"] for n in c.status()["nodes"]}, 5.0)
    with pytest.raises(Unavailable, match="2 copies need 2 distinct storage servers"):
        rep.put("new", os.urandom(MiB))
    assert rep.lookup("new") is None
    rep.put("tiny", b"t" * 100)
    assert rep.get("tiny") == b"t" * 100
    assert read_all() < 3.0
    print(f"kill -9: {len(objects)} replicated objects read twice in {took:.2f}s "
          f"(slowest get {slowest:.3f}s)")
    cl.close()


@pytest.mark.timeout(45)
def test_migrate_on_drain_keeps_copies_on_distinct_nodes(make_cluster) -> None:
    """--migrate-on-drain moves a replicated object's copy off the draining node to a node
    without the other copy: every piece keeps 2 copies on 2 nodes, byte-exact."""
    c = make_cluster(dram=2, capacity="64MiB", provider="local", max_nodes=1, autoscale=True,
                     controller_args=("--migrate-on-drain",))
    with pocket.connect(c.address) as client:
        base = {p.address for p in c.processes if p.role == "storage"}
        # 2 × 70 MiB of copies do not fit the two 64 MiB base nodes: the provider adds one.
        job = client.register_job("copies", capacity="70MiB", throughput="1MB/s", replicas=2)
        assert len(job.weights) == 3
        data = {f"r{i}": os.urandom(2 * MiB + i) for i in range(12)}
        for name, value in data.items():
            job.put(name, value, persist=True)
        added = next(n for n in client.status()["nodes"]
                     if n["role"] == "storage" and n["address"] not in base)
        assert any(added["address"] in job.lookup(n).servers for n in data)
        job.deregister()  # persisted objects stay; the allocation is gone: below band
        assert wait_for(lambda: all(n["id"] != added["id"] for n in client.status()["nodes"]),
                        timeout=20, interval=0.1), "the drained node did not leave"
        for name, value in data.items():
            servers = job.lookup(name).servers
            assert len(servers) == 2 and added["address"] not in servers, (name, servers)
            assert job.get(name) == value
