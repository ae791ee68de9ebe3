"""Client connections against peers that misbehave: silence, closing, wrong answers."""

from __future__ import annotations

import socket
import threading
import time

import pytest

import pocket
from pocket.connection import BlockingConnection, ConnectionPool
from pocket.protocol import Op


@pytest.fixture
def silent_server():
    """Accepts connections and reads, but never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()
    conns = []

    def run() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                conns.append(conn)
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield "127.0.0.1:%d" % listener.getsockname()[1]
    stop.set()
    t.join(2)
    for c in conns:
        c.close()
    listener.close()


def test_silent_server_times_out_as_unavailable(silent_server: str) -> None:
    conn = BlockingConnection(silent_server, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(pocket.Unavailable, match="did not answer"):
        conn.request(Op.PING, {})
    assert 0.4 < time.monotonic() - t0 < 3
    assert conn.closed


def test_refused_connection_is_unavailable() -> None:
    with pytest.raises(pocket.Unavailable, match="cannot connect"):
        BlockingConnection("127.0.0.1:1", timeout=1)


def test_pool_drops_broken_connections(silent_server: str, cluster) -> None:
    pool = ConnectionPool(timeout=0.3)
    with pytest.raises(pocket.Unavailable):
        with pool.connection(silent_server) as conn:
            conn.request(Op.PING, {})
    assert conn.closed and not pool._idle.get(silent_server)
    with pool.connection(cluster.address) as good:
        good.request(Op.PING, {})
    with pool.connection(cluster.address) as again:
        assert again is good  # reused
    pool.close()


def test_pipelined_requests_on_one_connection(cluster) -> None:
    conn = BlockingConnection(cluster.address)
    ids = [conn.send(Op.PING, {}) for _ in range(50)]
    for rid in reversed(ids):  # replies can be collected in any order
        assert conn.recv(rid).header["role"] == "controller"
    conn.close()


def test_async_request_times_out_and_fails_pending(silent_server: str) -> None:
    import asyncio

    from pocket.connection import AsyncConnection

    async def main() -> None:
        conn = await AsyncConnection.open(silent_server)
        t0 = time.monotonic()
        results = await asyncio.gather(conn.request(Op.PING, {}, timeout=0.3),
                                       conn.request(Op.PING, {}, timeout=5.0),
                                       return_exceptions=True)
        assert all(isinstance(r, pocket.Unavailable) for r in results), results
        assert time.monotonic() - t0 < 2  # the second failed with the first: connection closed
        assert conn.closed

    asyncio.run(main())
