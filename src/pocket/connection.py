"""Client connections over the one codec: asyncio and blocking-socket.

Both carry many requests at once (request ids) and can receive a reply's
payload straight into a caller's buffer (``into=``), which is how ``get_into``
fills a numpy array without an extra copy.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Optional

from .errors import PocketError, ProtocolError, Unavailable, error_from_code
from .protocol import (FLAG_ERROR, FLAG_NO_REPLY, Buffer, Frame, FrameReader, Limits,
                       encode_frame)
from .units import parse_address

#: What a client accepts from a server: replies may carry big extents.
CLIENT_LIMITS = Limits(max_header=64 << 20, max_payload=1 << 30)
DEFAULT_TIMEOUT = 30.0


def _raise_if_error(frame: Frame) -> Frame:
    if frame.flags & FLAG_ERROR:
        header = frame.header
        raise error_from_code(header.get("code", 1), str(header.get("msg", "error")))
    return frame


def _next_id(rid: int) -> int:
    rid += 1
    return rid if rid < 0xFFFFFFFF else 1


class AsyncConnection(asyncio.BufferedProtocol):
    """An asyncio client connection; ``await request(...)`` from many tasks at once."""

    def __init__(self, limits: Limits = CLIENT_LIMITS) -> None:
        self.reader = FrameReader(limits, sink=self._sink)
        self.address = "?"
        self.transport: Optional[asyncio.Transport] = None
        self._pending: dict[int, tuple[asyncio.Future, Optional[memoryview]]] = {}
        self._rid = 0
        self._error: Optional[PocketError] = None
        self._writable = asyncio.Event()
        self._writable.set()

    @classmethod
    async def open(cls, address: str, *, timeout: float = 10.0,
                   limits: Limits = CLIENT_LIMITS) -> "AsyncConnection":
        """Connect to ``host:port``; raise :class:`Unavailable` if it cannot."""
        host, port = parse_address(address)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: cls(limits), host, port), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise Unavailable(f"cannot connect to {address}: {exc or 'timed out'}") from None
        conn.address = address
        return conn

    @property
    def closed(self) -> bool:
        return self._error is not None or self.transport is None

    # -- protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._fail(Unavailable(f"connection to {self.address} lost"
                               + (f": {exc}" if exc else "")))
        self.transport = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        reader = self.reader
        try:
            reader.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()
            return
        pending = self._pending
        while reader._frames:
            frame = reader._frames.popleft()
            entry = pending.pop(frame.request_id, None)
            if entry is not None and not entry[0].done():
                entry[0].set_result(frame)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _sink(self, opcode: int, flags: int, rid: int, header: dict, size: int):
        entry = self._pending.get(rid)
        if entry is None or entry[1] is None or flags & FLAG_ERROR or len(entry[1]) != size:
            return None
        return entry[1]

    def _fail(self, exc: PocketError) -> None:
        if self._error is None:
            self._error = exc
        pending, self._pending = self._pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._writable.set()

    # -- requests ------------------------------------------------------------
    async def request(self, opcode: int, header: Optional[dict] = None,
                      payload: Optional[Buffer] = None, *, into: Optional[memoryview] = None,
                      timeout: Optional[float] = DEFAULT_TIMEOUT) -> Frame:
        """Send one request and wait for its reply; error replies raise."""
        if self._error is not None:
            raise type(self._error)(str(self._error))
        if not self._writable.is_set():
            await self._writable.wait()
            if self._error is not None:
                raise type(self._error)(str(self._error))
        self._rid = rid = _next_id(self._rid)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending[rid] = (fut, into)
        parts = encode_frame(opcode, rid, header, payload)
        if len(parts) == 1:
            self.transport.write(parts[0])
        else:
            self.transport.writelines(parts)
        if timeout is None:
            return _raise_if_error(await fut)
        # A timer on the future itself: far cheaper than asyncio.wait_for per request.
        timer = loop.call_later(timeout, self._expire, rid, timeout)
        try:
            frame = await fut
        finally:
            timer.cancel()
        return _raise_if_error(frame)

    def _expire(self, rid: int, timeout: float) -> None:
        entry = self._pending.pop(rid, None)
        if entry is None or entry[0].done():
            return
        entry[0].set_exception(Unavailable(f"{self.address} did not answer within {timeout:.1f}s"))
        # The reply may still arrive into ``into``; this connection can no
        # longer be trusted with that buffer, so close it.
        self.close()

    def send_no_reply(self, opcode: int, header: Optional[dict] = None) -> None:
        """Fire-and-forget: the server does not answer."""
        if self._error is None and self.transport is not None:
            self.transport.writelines(encode_frame(opcode, 0, header, None, FLAG_NO_REPLY))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._fail(Unavailable(f"connection to {self.address} closed"))


class AsyncConnectionCache:
    """One shared :class:`AsyncConnection` per address: opened on first use (concurrent
    callers share the one being opened), reopened once it breaks."""

    def __init__(self, connect_timeout: float = 10.0) -> None:
        self.connect_timeout = connect_timeout
        self._conns: dict[str, asyncio.Future] = {}

    async def get(self, address: str) -> AsyncConnection:
        fut = self._conns.get(address)
        if fut is not None and fut.done():
            if not fut.cancelled() and fut.exception() is None and not fut.result().closed:
                return fut.result()  # the common case: no shield, no await
            fut = None
        if fut is None:
            fut = asyncio.ensure_future(
                AsyncConnection.open(address, timeout=self.connect_timeout))
            self._conns[address] = fut
        return await asyncio.shield(fut)

    def drop(self, address: str) -> None:
        """Close and forget the connection to ``address``, if any."""
        fut = self._conns.pop(address, None)
        if fut is None:
            return
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled() and fut.exception() is None:
            fut.result().close()

    def close(self) -> None:
        """Close every connection."""
        for address in list(self._conns):
            self.drop(address)


class BlockingConnection:
    """A blocking-socket client connection over the same codec (no event loop).

    ``send()`` may be called several times before ``recv()`` (pipelining).
    Any transport failure closes the connection; request errors do not.
    """

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = 10.0, limits: Limits = CLIENT_LIMITS) -> None:
        self.address = address
        host, port = parse_address(address)
        try:
            self.sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as exc:
            raise Unavailable(f"cannot connect to {address}: {exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A blocking socket with kernel timeouts: one syscall per send/recv,
        # where settimeout() would add a poll() before each.
        self.sock.settimeout(None)
        tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self.timeout = timeout
        self.reader = FrameReader(limits, sink=self._sink)
        self._into: dict[int, memoryview] = {}
        self._replies: dict[int, Frame] = {}
        self._rid = 0
        self.closed = False
        self.pid = os.getpid()

    def _sink(self, opcode: int, flags: int, rid: int, header: dict, size: int):
        into = self._into.get(rid)
        if into is None or flags & FLAG_ERROR or len(into) != size:
            return None
        return into

    def send(self, opcode: int, header: Optional[dict] = None,
             payload: Optional[Buffer] = None, *, into: Optional[memoryview] = None,
             flags: int = 0) -> int:
        """Send a request; return its id for :meth:`recv`."""
        if self.closed:
            raise Unavailable(f"connection to {self.address} is closed")
        self._rid = rid = _next_id(self._rid)
        if into is not None:
            self._into[rid] = into
        parts = encode_frame(opcode, rid, header, payload, flags)
        try:
            if len(parts) == 1:
                self.sock.sendall(parts[0])
            else:
                self._send_parts(parts)
        except BlockingIOError:
            self.close()
            raise Unavailable(f"{self.address} did not accept data within {self.timeout:.1f}s") from None
        except OSError as exc:
            self.close()
            raise Unavailable(f"sending to {self.address} failed: {exc}") from None
        return rid

    def _send_parts(self, parts: list) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            sent = self.sock.sendmsg(views)
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def recv(self, rid: int) -> Frame:
        """Wait for the reply to request ``rid``; error replies raise."""
        replies = self._replies
        reader = self.reader
        try:
            while rid not in replies:
                if self.closed:
                    raise Unavailable(f"connection to {self.address} is closed")
                buf = reader.get_buffer()
                n = self.sock.recv_into(buf)
                if n == 0:
                    raise Unavailable(f"{self.address} closed the connection")
                reader.buffer_updated(n)
                while reader._frames:
                    frame = reader._frames.popleft()
                    replies[frame.request_id] = frame
        except (BlockingIOError, socket.timeout):
            self.close()
            raise Unavailable(f"{self.address} did not answer within {self.timeout:.1f}s") from None
        except OSError as exc:
            self.close()
            raise Unavailable(f"receiving from {self.address} failed: {exc}") from None
        except ProtocolError:
            self.close()
            raise
        self._into.pop(rid, None)
        return _raise_if_error(replies.pop(rid))

    def request(self, opcode: int, header: Optional[dict] = None,
                payload: Optional[Buffer] = None, *, into: Optional[memoryview] = None) -> Frame:
        """Send one request and wait for its reply."""
        return self.recv(self.send(opcode, header, payload, into=into))

    def send_no_reply(self, opcode: int, header: Optional[dict] = None) -> None:
        """Fire-and-forget: the server does not answer."""
        self.send(opcode, header, None, flags=FLAG_NO_REPLY)

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


class ConnectionPool:
    """Idle blocking connections per address, safe across threads and forks."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self._idle: dict[str, list[BlockingConnection]] = defaultdict(list)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def acquire(self, address: str) -> BlockingConnection:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's sockets are not ours
                self._idle.clear()
                self._pid = os.getpid()
            idle = self._idle.get(address)
            if idle:
                return idle.pop()
        return BlockingConnection(address, timeout=self.timeout)

    def release(self, conn: BlockingConnection) -> None:
        if conn.closed or conn.pid != os.getpid() or conn._replies or conn._into:
            conn.close()
            return
        with self._lock:
            self._idle[conn.address].append(conn)

    @contextmanager
    def connection(self, address: str) -> Iterator[BlockingConnection]:
        """Borrow a connection; it goes back to the pool unless it broke."""
        conn = self.acquire(address)
        try:
            yield conn
        except PocketError as exc:
            if isinstance(exc, (Unavailable, ProtocolError)):
                conn.close()
            else:
                self.release(conn)
            raise
        except BaseException:
            conn.close()
            raise
        else:
            self.release(conn)

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for conn in conns:
                    conn.close()
            self._idle.clear()
