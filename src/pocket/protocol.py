"""Pocket's wire protocol: one sans-IO codec for every server and client.

A frame is::

    +-------+---------+--------+-------+------------+------------+-------------+
    | magic | version | opcode | flags | request id | header len | payload len |
    |  u8   |   u8    |   u8   |  u8   |    u32     |    u32     |     u64     |
    +-------+---------+--------+-------+------------+------------+-------------+
    | msgpack header (a map, ``header len`` bytes)                             |
    | raw payload (``payload len`` bytes, never touched by msgpack)            |
    +--------------------------------------------------------------------------+

All integers are little-endian; the fixed part is :data:`FIXED_SIZE` (20)
bytes.  A reply carries the request's opcode and id with :data:`FLAG_REPLY`
set; an error reply also sets :data:`FLAG_ERROR` and its header is
``{"code": int, "msg": str}``.  :data:`FLAG_NO_REPLY` asks the peer not to
answer (fire-and-forget releases).

:class:`FrameReader` is the decoder.  It does no I/O: bytes are fed either by
``feed(data)`` or, for zero-copy receive, by asking ``get_buffer()`` for a
buffer, filling it (``recv_into``, ``BufferedProtocol``) and calling
``buffer_updated(n)``.  When a frame's header is decoded, an optional *sink*
may return the frame's final destination (an arena block, a user's numpy
buffer) and the payload is then received straight into it.  Every length is
checked against :class:`Limits` before anything is allocated; any violation
raises :class:`~pocket.errors.ProtocolError` and the reader stays broken.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import msgpack

from .errors import ProtocolError

MAGIC = 0xB7
VERSION = 1
FIXED = struct.Struct("<BBBBIIQ")
FIXED_SIZE = FIXED.size  # 20

FLAG_REPLY = 0x01
FLAG_ERROR = 0x02
FLAG_NO_REPLY = 0x04

#: How much a reader asks for while waiting for the next frame's header.
IDLE_WINDOW = 64 * 1024

#: Payloads up to this size are joined with their prefix into one buffer on
#: send; larger ones go as a separate memoryview (no copy).
JOIN_LIMIT = 16 * 1024

Buffer = Union[bytes, bytearray, memoryview]


class Op:
    """Opcodes. One numbering for all roles keeps traces readable."""

    PING = 1
    # controller
    NODE_REGISTER = 10
    NODE_HEARTBEAT = 11
    NODE_LEAVE = 12
    JOB_REGISTER = 13
    JOB_DEREGISTER = 14
    JOB_ATTACH = 15
    STATUS = 16
    # metadata: client requests
    PUT_INLINE = 30
    PUT_BEGIN = 31
    PUT_COMMIT = 32
    PUT_ABORT = 33
    GET = 34
    RELEASE = 35
    LOOKUP = 36
    DELETE = 37
    MKDIR = 38
    LIST = 39
    JOB_RENEW = 40
    # metadata: from the controller
    JOB_ADD = 50
    JOB_UPDATE = 51
    JOB_REMOVE = 52
    #: move every extent on one storage node to other nodes (``--migrate-on-drain``)
    EXTENTS_MOVE = 56
    # storage
    EXT_ALLOC = 70
    EXT_WRITE = 71
    EXT_READ = 72
    EXT_FREE = 73
    EXT_RECLAIM = 74


OP_NAMES = {v: k for k, v in vars(Op).items() if isinstance(v, int)}


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what a peer may send; checked before allocating."""

    max_header: int = 1 << 20
    max_payload: int = 1 << 30

    def __post_init__(self) -> None:
        if self.max_header < 0 or self.max_payload < 0:
            raise ValueError("limits must be non-negative")


DEFAULT_LIMITS = Limits()


class Frame:
    """One decoded frame. ``payload`` is bytes-like (or the sink's buffer)."""

    __slots__ = ("opcode", "flags", "request_id", "header", "payload", "sunk")

    def __init__(self, opcode: int, flags: int, request_id: int,
                 header: dict, payload: Buffer, sunk: bool = False) -> None:
        self.opcode = opcode
        self.flags = flags
        self.request_id = request_id
        self.header = header
        self.payload = payload
        #: True when the payload was received into the sink's buffer.
        self.sunk = sunk

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    def __repr__(self) -> str:
        return (f"Frame({OP_NAMES.get(self.opcode, self.opcode)}, flags={self.flags:#x}, "
                f"id={self.request_id}, header={self.header!r}, "
                f"payload={len(self.payload)} bytes)")


#: ``sink(opcode, flags, request_id, header, payload_len)`` returns a writable
#: buffer of exactly ``payload_len`` bytes to receive the payload into, or None.
Sink = Callable[[int, int, int, dict, int], Optional[memoryview]]


def encode_prefix(opcode: int, request_id: int, header: Optional[dict],
                  payload_len: int = 0, flags: int = 0) -> bytes:
    """Encode the fixed header and the msgpack header of a frame."""
    packed = msgpack.packb(header, use_bin_type=True) if header else b""
    return FIXED.pack(MAGIC, VERSION, opcode, flags, request_id,
                      len(packed), payload_len) + packed


def encode_frame(opcode: int, request_id: int, header: Optional[dict] = None,
                 payload: Optional[Buffer] = None, flags: int = 0) -> list:
    """A frame as a list of buffers for ``writelines``/``sendmsg``.

    Small payloads are joined with the prefix (one buffer, one syscall);
    large ones stay a separate zero-copy memoryview.
    """
    if payload is None:
        return [encode_prefix(opcode, request_id, header, 0, flags)]
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    prefix = encode_prefix(opcode, request_id, header, size, flags)
    if size <= JOIN_LIMIT:
        return [prefix + payload] if size else [prefix]
    return [prefix, payload]


def encode_error(opcode: int, request_id: int, code: int, message: str) -> list:
    """An error reply frame."""
    return encode_frame(opcode, request_id, {"code": code, "msg": message},
                        None, FLAG_REPLY | FLAG_ERROR)


def _decode_header(data: memoryview, limits: Limits) -> dict:
    if not len(data):
        return {}
    try:
        header = msgpack.unpackb(
            data, raw=False, strict_map_key=False, use_list=True,
            max_str_len=limits.max_header, max_bin_len=limits.max_header,
            max_array_len=limits.max_header, max_map_len=limits.max_header,
            max_ext_len=0)
    except Exception as exc:  # msgpack raises many types for bad input
        raise ProtocolError(f"undecodable frame header: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not a map")
    return header


class FrameReader:
    """Incremental, sans-IO frame decoder.

    Small frames are parsed out of an internal buffer; a large payload (or any
    payload claimed by the sink) is received directly into its destination,
    so ``get_buffer()`` hands out that destination until it is full.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS, sink: Optional[Sink] = None,
                 buffer_size: int = 96 * 1024, direct_threshold: int = 64 * 1024) -> None:
        if buffer_size < FIXED_SIZE + direct_threshold:
            raise ValueError("buffer_size must hold a fixed header plus direct_threshold")
        self.limits = limits
        self.sink = sink
        self._direct_threshold = direct_threshold
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._frames: deque[Frame] = deque()
        # The frame whose payload is being received, once its header is known.
        self._cur: Optional[tuple[int, int, int, dict, int]] = None
        self._dst: Optional[memoryview] = None
        self._dst_owner: Any = None
        self._dst_sunk = False
        self._filled = 0
        self._broken: Optional[ProtocolError] = None

    # -- feeding -------------------------------------------------------------
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable buffer for the next incoming bytes (never empty)."""
        if self._broken is not None:
            raise self._broken
        if self._dst is not None:
            return self._dst[self._filled:]
        if self._end == len(self._buf):
            self._compact()
        if self._cur is None and self._end - self._start < FIXED_SIZE:
            # Between frames: read a bounded window, so that the start of a
            # large payload is not read here only to be copied to its sink.
            return self._view[self._end:self._end + IDLE_WINDOW]
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        """Account ``nbytes`` written into the last ``get_buffer()`` result."""
        if self._broken is not None:
            raise self._broken
        if nbytes <= 0:
            return
        if self._dst is not None:
            self._filled += nbytes
            if self._filled >= len(self._dst):
                self._finish_direct()
                self._parse()
            return
        self._end += nbytes
        self._parse()

    def feed(self, data: Buffer) -> None:
        """Feed bytes that were read elsewhere (copies them in)."""
        src = memoryview(data).cast("B")
        while len(src):
            buf = self.get_buffer(len(src))
            n = min(len(buf), len(src))
            buf[:n] = src[:n]
            src = src[n:]
            self.buffer_updated(n)

    def next_frame(self) -> Optional[Frame]:
        """The next complete frame, or None if more bytes are needed."""
        if self._frames:
            return self._frames.popleft()
        if self._broken is not None:
            raise self._broken
        return None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return (self._end - self._start) + self._filled

    # -- internals -----------------------------------------------------------
    def _fail(self, message: str) -> None:
        self._broken = ProtocolError(message)
        raise self._broken

    def _compact(self) -> None:
        start, end = self._start, self._end
        if start:
            self._buf[:end - start] = self._view[start:end]
            self._start, self._end = 0, end - start

    def _ensure_room(self, needed: int) -> None:
        """Make sure ``needed`` bytes from ``_start`` fit in the buffer."""
        if self._start + needed > len(self._buf):
            self._compact()
        if needed > len(self._buf):  # only for a large msgpack header
            grown = bytearray(needed)
            grown[:self._end - self._start] = self._view[self._start:self._end]
            self._buf, self._view = grown, memoryview(grown)
            self._end -= self._start
            self._start = 0

    def _parse(self) -> None:
        while True:
            avail = self._end - self._start
            if self._cur is None:
                if avail < FIXED_SIZE:
                    if self._start == self._end:
                        self._start = self._end = 0
                    elif self._buf[self._start] != MAGIC:  # fail fast on junk
                        self._fail(f"bad magic byte {self._buf[self._start]:#x}")
                    return
                magic, version, opcode, flags, rid, hlen, plen = FIXED.unpack_from(
                    self._buf, self._start)
                if magic != MAGIC:
                    self._fail(f"bad magic byte {magic:#x}")
                if version != VERSION:
                    self._fail(f"unsupported protocol version {version}")
                if hlen > self.limits.max_header:
                    self._fail(f"header of {hlen} bytes exceeds limit {self.limits.max_header}")
                if plen > self.limits.max_payload:
                    self._fail(f"payload of {plen} bytes exceeds limit {self.limits.max_payload}")
                if avail < FIXED_SIZE + hlen:
                    self._ensure_room(FIXED_SIZE + hlen)
                    return
                hstart = self._start + FIXED_SIZE
                header = _decode_header(self._view[hstart:hstart + hlen], self.limits)
                self._start = hstart + hlen
                self._cur = (opcode, flags, rid, header, plen)
                avail = self._end - self._start
                if plen:
                    dst = self.sink(opcode, flags, rid, header, plen) if self.sink else None
                    if dst is not None:
                        if len(dst) != plen:
                            raise ValueError("sink returned a buffer of the wrong size")
                        if self._start_direct(dst, dst, True):
                            continue
                        return
                    if plen > self._direct_threshold:
                        owner = bytearray(plen)
                        if self._start_direct(memoryview(owner), owner, False):
                            continue
                        return
            opcode, flags, rid, header, plen = self._cur
            if avail < plen:
                self._ensure_room(plen)
                return
            payload = bytes(self._view[self._start:self._start + plen]) if plen else b""
            self._start += plen
            self._cur = None
            self._frames.append(Frame(opcode, flags, rid, header, payload))

    def _start_direct(self, dst: memoryview, owner: Any, sunk: bool) -> bool:
        # Whatever of the payload already sits in the internal buffer is
        # copied over; the rest will be received straight into ``dst``.
        take = min(self._end - self._start, len(dst))
        if take:
            dst[:take] = self._view[self._start:self._start + take]
            self._start += take
        if self._start == self._end:
            self._start = self._end = 0
        self._dst, self._dst_owner, self._dst_sunk, self._filled = dst, owner, sunk, take
        if take == len(dst):
            self._finish_direct()
            return True
        return False

    def _finish_direct(self) -> None:
        opcode, flags, rid, header, _plen = self._cur
        owner = self._dst_owner
        frame = Frame(opcode, flags, rid, header, owner, self._dst_sunk)
        self._cur = None
        self._dst = self._dst_owner = None
        self._filled = 0
        self._frames.append(frame)
