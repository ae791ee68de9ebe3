"""Objects through real servers: sizes, both clients, directories, files, errors."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import pocket
import pocket.aio
from pocket.local import LocalCluster

BLOCK = 4096
INLINE = 64 << 10
SIZES = [0, 1, 1024, BLOCK - 1, BLOCK, BLOCK + 1, INLINE - 1, INLINE, INLINE + 1,
         (1 << 20) + 7, 64 << 20]


def payload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed + size).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("size", SIZES)
def test_sync_round_trip_byte_exact(job: pocket.Job, size: int) -> None:
    data = payload(size)
    job.put("obj", data)
    assert job.get("obj") == data
    buf = np.zeros(size + 3, dtype=np.uint8)
    assert job.get_into("obj", buf) == size
    assert buf[:size].tobytes() == data
    info = job.lookup("obj")
    assert info is not None and info.size == size
    assert info.tier == ("metadata" if size <= INLINE else "dram")


def test_async_round_trip_byte_exact(cluster: LocalCluster) -> None:
    async def main() -> None:
        c = await pocket.aio.connect(cluster.address)
        job = await c.register_job("async-sizes")
        try:
            await asyncio.gather(*(job.put(f"o{s}", payload(s, 1)) for s in SIZES))
            for size in SIZES:
                assert await job.get(f"o{size}") == payload(size, 1)
                buf = np.empty(size, dtype=np.uint8)
                assert await job.get_into(f"o{size}", buf) == size
                assert buf.tobytes() == payload(size, 1)
            assert (await job.lookup(f"o{SIZES[-1]}")).size == SIZES[-1]
            assert await job.lookup("missing") is None
            with pytest.raises(pocket.NotFound):
                await job.get("missing")
        finally:
            await job.deregister()
            await c.close()

    asyncio.run(main())


def test_large_object_spans_storage_servers(job: pocket.Job) -> None:
    data = payload(64 << 20, 2)
    job.put("big", data)
    info = job.lookup("big")
    assert len(info.servers) >= 2
    assert job.get("big") == data


def test_numpy_and_memoryview_inputs(job: pocket.Job) -> None:
    arr = np.arange(300_000, dtype=np.int64)
    job.put("arr", arr)
    out = np.empty_like(arr)
    job.get_into("arr", out)
    assert np.array_equal(arr, out)
    job.put("mv", memoryview(bytearray(b"abc" * 100_000))[1:])
    assert job.get("mv") == (b"abc" * 100_000)[1:]
    with pytest.raises(pocket.InvalidRequest):
        job.put("strided", arr[::2])
    with pytest.raises(pocket.InvalidRequest):
        job.put("text", "not bytes")
    with pytest.raises(pocket.InvalidRequest):
        job.get_into("arr", np.empty(10, dtype=np.uint8))


def test_overwrite_replaces(job: pocket.Job) -> None:
    job.put("k", b"small")
    job.put("k", payload(3 << 20))
    assert job.get("k") == payload(3 << 20)
    job.put("k", b"small again")
    assert job.get("k") == b"small again"


def test_directories_and_listing(job: pocket.Job) -> None:
    job.mkdir("shuffle")
    for name in ("shuffle/0-1", "shuffle/0-2", "out/0", "top"):
        job.put(name, name.encode())
    assert job.list() == ["out/0", "shuffle/", "shuffle/0-1", "shuffle/0-2", "top"]
    assert job.list("shuffle/") == ["shuffle/", "shuffle/0-1", "shuffle/0-2"]
    with pytest.raises(pocket.InvalidRequest):
        job.delete("shuffle")  # not empty
    job.delete("shuffle/0-1")
    job.delete("shuffle/0-2")
    job.delete("shuffle")
    assert job.list("shuffle") == []
    with pytest.raises(pocket.NotFound):
        job.delete("shuffle/0-1")


def test_files(job: pocket.Job, tmp_path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(payload(5 << 20, 3))
    job.put_file(src, "f")
    dst = tmp_path / "out.bin"
    assert job.get_file("f", dst) == 5 << 20
    assert dst.read_bytes() == src.read_bytes()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    job.put_file(empty, "e")
    assert job.get_file("e", tmp_path / "e2") == 0 and (tmp_path / "e2").read_bytes() == b""


def test_bad_names_and_missing_objects(job: pocket.Job) -> None:
    with pytest.raises(pocket.InvalidRequest):
        job.put("", b"x")
    with pytest.raises(pocket.InvalidRequest):
        job.put("a\x00b", b"x")
    with pytest.raises(pocket.InvalidRequest):
        job.put("n" * 2000, b"x")
    with pytest.raises(pocket.NotFound):
        job.get("nope")
    assert job.lookup("nope") is None


def test_errors_are_importable_and_ordered() -> None:
    for name in ("NotFound", "AccessDenied", "CapacityExceeded", "InvalidRequest", "Unavailable",
                 "ProtocolError"):
        assert issubclass(getattr(pocket, name), pocket.PocketError)


def test_unreachable_controller_is_unavailable() -> None:
    with pytest.raises(pocket.Unavailable):
        pocket.connect("127.0.0.1:1", timeout=2)


def test_context_managers_deregister(cluster: LocalCluster) -> None:
    with pocket.connect(cluster.address) as c:
        with c.register_job("ctx") as job:
            job.put("x", b"1")
            job_id, token = job.id, job.token
        with pytest.raises(pocket.NotFound):
            pocket.attach(job_id, token, controller=cluster.address).get("x")


@pytest.mark.parametrize("size", [100, 3 << 20])
def test_get_into_too_small_buffer_keeps_the_object(job: pocket.Job, size: int) -> None:
    job.put("keep", payload(size))
    with pytest.raises(pocket.InvalidRequest, match="buffer holds"):
        job.get_into("keep", bytearray(size - 1), delete_after_read=True)
    assert job.lookup("keep") is not None
    assert job.get("keep", delete_after_read=True) == payload(size)
    assert job.lookup("keep") is None
