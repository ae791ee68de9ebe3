"""Access control: extent capabilities, signed internal requests, the cluster secret."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import pocket
from pocket.connection import BlockingConnection
from pocket.local import LocalCluster
from pocket.protocol import Op
from pocket.security import ClusterKey, is_loopback, loopback_peer_uid

from helpers import wait_for

BIG = 200_000  # above the inline limit: lives in extents on storage servers


def extents_of(job: pocket.Job, name: str) -> list:
    """The GET reply's extents ``[address, id, length, read capability, checksum]``."""
    h = job._md(Op.GET, {"name": name, "dar": False}).header
    job._md_no_reply(Op.RELEASE, {"lease": h["lease"]})
    return h["ext"]


def read_raw(address: str, ext: int, length: int, cap) -> bytes:
    conn = BlockingConnection(address, timeout=5.0)
    try:
        header = {"ext": ext, "off": 0, "len": length}
        if cap is not None:
            header["cap"] = cap
        return bytes(conn.request(Op.EXT_READ, header).payload)
    finally:
        conn.close()


def test_capability_grants_exactly_its_extent_right_and_job(client: pocket.Cluster) -> None:
    a = client.register_job("cap-a")
    b = client.register_job("cap-b")
    try:
        a.put("x", os.urandom(BIG))
        b.put("y", os.urandom(BIG))
        addr, ext, length, cap, _ = extents_of(a, "x")[0]
        assert read_raw(addr, ext, length, cap) == a.get("x")[:length]
        b_addr, b_ext, b_len, b_cap, _ = extents_of(b, "y")[0]
        forged = cap[:-1] + bytes([cap[-1] ^ 1])
        for bad in (None, b"", b"\0" * 20, forged, b_cap):
            with pytest.raises(pocket.AccessDenied):
                read_raw(addr, ext, length, bad)
        # A read capability does not allow writing, not even over the same extent.
        conn = BlockingConnection(addr, timeout=5.0)
        try:
            with pytest.raises(pocket.AccessDenied):
                conn.request(Op.EXT_WRITE, {"ext": ext, "off": 0, "cap": cap}, b"\xff" * 4096)
            with pytest.raises(pocket.AccessDenied):  # and no write without one
                conn.request(Op.EXT_WRITE, {"ext": ext, "off": 0}, b"\xff" * 100_000)
        finally:
            conn.close()
        data = a.get("x")
        assert len(data) == BIG and a.get("x") == data  # nothing was overwritten
    finally:
        a.deregister()
        b.deregister()


def test_internal_requests_need_the_cluster_key(client: pocket.Cluster, job: pocket.Job) -> None:
    data = os.urandom(BIG)
    job.put("kept", data)
    addr, ext, _, _, _ = extents_of(job, "kept")[0]
    conn = BlockingConnection(addr, timeout=5.0)
    try:
        with pytest.raises(pocket.AccessDenied):
            conn.request(Op.EXT_FREE, {"ext": [ext]})
        with pytest.raises(pocket.AccessDenied):
            conn.request(Op.EXT_FREE, {"ext": [ext], "auth": ClusterKey.generate().sign(
                Op.EXT_FREE, [ext])})
        with pytest.raises(pocket.AccessDenied):
            conn.request(Op.EXT_ALLOC, {"job": job.id, "size": 4096})
    finally:
        conn.close()
    md = BlockingConnection(job.metadata, timeout=5.0)
    try:
        with pytest.raises(pocket.AccessDenied):  # nobody but the controller adds jobs
            md.request(Op.JOB_ADD, {"job": "evil", "tok": "t" * 20, "weights": {},
                                    "nodes": {"dram-x": "10.0.0.1:1"}})
        with pytest.raises(pocket.AccessDenied):  # nor redirects a job's nodes
            md.request(Op.JOB_UPDATE, {"job": job.id, "tok": job.token, "weights": {}})
    finally:
        md.close()
    assert job.get("kept") == data


def test_capabilities_expire(make_cluster) -> None:
    c = make_cluster(dram=1, capacity="64MiB", metadata_args=("--capability-ttl", "1s"))
    with pocket.connect(c.address) as cl:
        job = cl.register_job("ttl")
        job.put("x", os.urandom(BIG))
        addr, ext, length, cap, _ = extents_of(job, "x")[0]
        read_raw(addr, ext, length, cap)
        time.sleep(2.1)
        with pytest.raises(pocket.AccessDenied, match="expired"):
            read_raw(addr, ext, length, cap)
        assert len(job.get("x")) == BIG  # a fresh get gets fresh capabilities
        job.deregister()


def test_deregistration_kills_capabilities_and_writes(client: pocket.Cluster) -> None:
    job = client.register_job("dereg")
    job.put("tmp", os.urandom(BIG))
    job.put("kept", b"k" * BIG, persist=True)
    addr, ext, length, cap, _ = extents_of(job, "tmp")[0]
    token = job.token
    job.deregister()
    assert wait_for(lambda: _not_found(addr, ext, length, cap), 5)  # the extent was freed
    again = pocket.attach(job.id, token, client.address)
    try:
        with pytest.raises(pocket.AccessDenied):
            again.put("new", b"n" * BIG)
        assert again.get("kept") == b"k" * BIG  # persisted objects stay readable
        with pytest.raises(pocket.NotFound):
            again.get("tmp")
    finally:
        again.close()
    with pytest.raises(pocket.AccessDenied):
        pocket.attach(job.id, "wrong-token-" + "x" * 20, client.address)


def _not_found(addr: str, ext: int, length: int, cap) -> bool:
    try:
        read_raw(addr, ext, length, cap)
    except pocket.NotFound:
        return True
    return False


def test_loopback_helpers() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.create_connection(srv.getsockname())
    acc, peer = srv.accept()
    try:
        assert loopback_peer_uid(peer, acc.getsockname()) == os.getuid()
    finally:
        for s in (cli, acc, srv):
            s.close()


def run_role(args: list[str], env: dict | None = None, timeout: float = 10.0):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("role", ["pocket.storage", "pocket.metadata", "pocket.controller"])
def test_non_loopback_listener_requires_a_secret(role: str) -> None:
    result = run_role([role, "--listen", "0.0.0.0:0", "--controller", "none"]
                      if role != "pocket.controller" else [role, "--listen", "0.0.0.0:0"])
    assert result.returncode == 2
    assert "secret is required" in result.stderr and "--secret-file" in result.stderr


def test_cluster_with_a_configured_secret(tmp_path, monkeypatch) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    monkeypatch.setenv("POCKET_SECRET_FILE", str(secret))
    with LocalCluster(dram=1, capacity="64MiB", log_level="WARNING") as c:
        with pocket.connect(c.address) as cl:
            job = cl.register_job("secret")
            data = os.urandom(BIG)
            job.put("x", data)
            assert job.get("x") == data
            job.deregister()
        # A node with another secret cannot join: its registration is refused.
        monkeypatch.setenv("POCKET_SECRET", "another-secret-of-enough-length")
        monkeypatch.delenv("POCKET_SECRET_FILE")
        stranger = c._spawn("storage", ["--listen", "127.0.0.1:0", "--controller", c.address,
                                        "--capacity", "16MiB"], 10.0)
        time.sleep(1.5)
        assert stranger.address not in {n["address"] for n in c.status()["nodes"]}
