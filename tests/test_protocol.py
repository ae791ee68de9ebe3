"""The codec, without sockets: whole frames, byte by byte, every split, trailing data, garbage."""

from __future__ import annotations

import os
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocket.errors import (AccessDenied, CapacityExceeded, InvalidRequest, NotFound, PocketError,
                           ProtocolError, Unavailable, error_from_code)
from pocket.protocol import (FIXED, FIXED_SIZE, FLAG_ERROR, FLAG_REPLY, MAGIC, VERSION, Frame,
                             FrameReader, Limits, Op, encode_error, encode_frame)


def wire(*frames: list) -> bytes:
    return b"".join(bytes(part) for frame in frames for part in frame)


def drain(reader: FrameReader) -> list[Frame]:
    out = []
    while (frame := reader.next_frame()) is not None:
        out.append(frame)
    return out


SAMPLES = [
    encode_frame(Op.PING, 1),
    encode_frame(Op.PUT_INLINE, 2, {"job": "j", "name": "a/b"}, b"x" * 1000),
    encode_frame(Op.GET, 3, {"name": "big"}, os.urandom(200_000)),
    encode_frame(Op.LIST, 4, {"prefix": ""}, b""),
    encode_error(Op.GET, 5, NotFound.code, "no object"),
]


def check(frames: list[Frame]) -> None:
    assert [f.request_id for f in frames] == [1, 2, 3, 4, 5]
    assert frames[0].opcode == Op.PING and frames[0].header == {} and bytes(frames[0].payload) == b""
    assert frames[1].header == {"job": "j", "name": "a/b"} and bytes(frames[1].payload) == b"x" * 1000
    assert bytes(frames[2].payload) == bytes(SAMPLES[2][1])
    assert frames[4].is_reply and frames[4].is_error and frames[4].header["code"] == NotFound.code


def test_whole_stream() -> None:
    reader = FrameReader()
    reader.feed(wire(*SAMPLES))
    check(drain(reader))
    assert reader.buffered == 0


def test_byte_by_byte() -> None:
    reader = FrameReader()
    data = wire(*SAMPLES)
    frames = []
    for i in range(len(data)):
        reader.feed(data[i:i + 1])
        frames.extend(drain(reader))
    check(frames)


def test_split_at_every_offset() -> None:
    data = wire(*SAMPLES[:2], SAMPLES[4])  # small frames: every offset is cheap
    for cut in range(len(data) + 1):
        reader = FrameReader()
        reader.feed(data[:cut])
        frames = drain(reader)
        reader.feed(data[cut:])
        frames.extend(drain(reader))
        assert [f.request_id for f in frames] == [1, 2, 5], cut


def test_split_large_frame_in_chunks() -> None:
    data = wire(*SAMPLES)
    rng = random.Random(7)
    reader = FrameReader()
    frames = []
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 70_000)
        reader.feed(data[pos:pos + step])
        pos += step
        frames.extend(drain(reader))
    check(frames)


def test_trailing_partial_frame_waits() -> None:
    data = wire(*SAMPLES)
    tail = wire(encode_frame(Op.PING, 9, {"k": 1}))
    reader = FrameReader()
    reader.feed(data + tail[:-1])
    check(drain(reader))
    assert reader.next_frame() is None and reader.buffered == len(tail) - 1
    reader.feed(tail[-1:])
    assert reader.next_frame().request_id == 9


def test_sink_receives_payload_in_place() -> None:
    target = bytearray(200_000)
    calls = []

    def sink(op, flags, rid, header, size):
        calls.append((op, rid, size))
        return memoryview(target) if rid == 3 else None

    reader = FrameReader(sink=sink)
    data = wire(*SAMPLES)
    for i in range(0, len(data), 4096):  # the large payload arrives in pieces
        reader.feed(data[i:i + 4096])
    frames = drain(reader)
    check(frames)
    assert frames[2].sunk and frames[2].payload.obj is target
    assert bytes(target) == bytes(SAMPLES[2][1])
    assert (Op.GET, 3, 200_000) in calls


def test_get_buffer_receives_directly_into_sink() -> None:
    payload = os.urandom(300_000)
    target = bytearray(len(payload))
    reader = FrameReader(sink=lambda *a: memoryview(target))
    data = wire(encode_frame(Op.EXT_WRITE, 1, {"ext": 1}, payload))
    pos = 0
    direct = 0
    while pos < len(data):
        buf = reader.get_buffer()
        if buf.obj is target:
            direct += 1
        n = min(len(buf), len(data) - pos, 50_000)
        buf[:n] = data[pos:pos + n]
        reader.buffer_updated(n)
        pos += n
    frame = reader.next_frame()
    assert frame.sunk and bytes(target) == payload
    assert direct > 0  # most of the payload never passed through the reader's own buffer


def test_large_header_grows_buffer() -> None:
    header = {"names": ["n" * 100] * 5000}  # ~500 KB of msgpack, bigger than the buffer
    reader = FrameReader()
    data = wire(encode_frame(Op.LIST, 1, header))
    for i in range(0, len(data), 10_000):
        reader.feed(data[i:i + 10_000])
    assert reader.next_frame().header == header


@pytest.mark.parametrize("bad, message", [
    (FIXED.pack(0x00, VERSION, 1, 0, 1, 0, 0), "magic"),
    (FIXED.pack(MAGIC, 99, 1, 0, 1, 0, 0), "version"),
    (FIXED.pack(MAGIC, VERSION, 1, 0, 1, 2 << 20, 0), "header"),
    (FIXED.pack(MAGIC, VERSION, 1, 0, 1, 0, 2 << 30), "payload"),
    (FIXED.pack(MAGIC, VERSION, 1, 0, 1, 3, 0) + b"\xc1\xc1\xc1", "undecodable"),
    (FIXED.pack(MAGIC, VERSION, 1, 0, 1, 1, 0) + msgpack.packb(5), "not a map"),
])
def test_malformed_frames_raise_protocol_error(bad: bytes, message: str) -> None:
    reader = FrameReader()
    with pytest.raises(ProtocolError, match=message):
        reader.feed(bad)
    with pytest.raises(ProtocolError):  # the reader stays broken
        reader.feed(wire(encode_frame(Op.PING, 1)))


def test_limits_are_checked_before_allocating() -> None:
    reader = FrameReader(Limits(max_header=100, max_payload=1000))
    with pytest.raises(ProtocolError, match="payload"):
        reader.feed(FIXED.pack(MAGIC, VERSION, 1, 0, 1, 0, 1001))
    reader = FrameReader(Limits(max_header=100, max_payload=1000))
    with pytest.raises(ProtocolError, match="header"):
        reader.feed(FIXED.pack(MAGIC, VERSION, 1, 0, 1, 101, 0))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_only_raises_protocol_error(data: bytes) -> None:
    reader = FrameReader(Limits(max_header=4096, max_payload=4096))
    try:
        reader.feed(data)
        drain(reader)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 400), st.binary(min_size=1, max_size=8), st.integers(0, 2))
def test_mutated_frames_only_raise_protocol_error(pos: int, junk: bytes, mode: int) -> None:
    data = bytearray(wire(*SAMPLES[:2], SAMPLES[4]))
    pos = min(pos, len(data) - 1)
    if mode == 0:
        data[pos:pos + len(junk)] = junk
    elif mode == 1:
        data[pos:pos] = junk
    else:
        del data[pos:pos + len(junk)]
    reader = FrameReader(Limits(max_header=4096, max_payload=4096))
    try:
        reader.feed(bytes(data))
        for frame in drain(reader):
            assert isinstance(frame.header, dict)
    except ProtocolError:
        pass


def test_reply_flags_and_join_small_payloads() -> None:
    small = encode_frame(Op.GET, 1, {"a": 1}, b"x" * 100, FLAG_REPLY)
    assert len(small) == 1  # joined: one buffer, one syscall
    big = encode_frame(Op.GET, 1, {"a": 1}, memoryview(b"x" * 100_000), FLAG_REPLY)
    assert len(big) == 2 and isinstance(big[1], memoryview)  # payload not copied
    hdr = FIXED.unpack_from(bytes(big[0]))
    assert hdr[3] == FLAG_REPLY and hdr[6] == 100_000 and len(big[0]) > FIXED_SIZE


def test_error_codes_map_to_one_hierarchy() -> None:
    for cls in (NotFound, AccessDenied, CapacityExceeded, InvalidRequest, Unavailable,
                ProtocolError):
        err = error_from_code(cls.code, "m")
        assert type(err) is cls and isinstance(err, PocketError) and str(err) == "m"
    assert type(error_from_code(999, "x")) is PocketError
    frame = FrameReader()
    frame.feed(wire(encode_error(Op.GET, 4, CapacityExceeded.code, "full")))
    f = frame.next_frame()
    assert f.flags & FLAG_ERROR and f.header == {"code": CapacityExceeded.code, "msg": "full"}
