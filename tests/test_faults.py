"""Faults done for real: corrupted data files, killed servers, restarts, stalled and cut links."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import signal
import socket
import tempfile
import threading
import time

import pytest

import pocket
from pocket.connection import BlockingConnection
from pocket.protocol import Op
from pocket.storage.flash import MEMORY_FILESYSTEMS, DirectIOUnsupported, filesystem_type, \
    probe_direct_io

from helpers import wait_for

BIG = 300_000


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("faults"))
    if filesystem_type(path) in MEMORY_FILESYSTEMS:
        path = tempfile.mkdtemp(prefix=".pocket-faults-", dir=os.getcwd())
    try:
        probe_direct_io(path)
    except DirectIOUnsupported as exc:
        pytest.skip(f"no O_DIRECT-capable directory: {exc}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


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
