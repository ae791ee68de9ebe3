"""Bad input: random and mutated frames over TCP against each server.

Every server must survive with no crash, no growth of memory or file
descriptors, and no change to the data it stores.  Default: a few thousand
frames per server; ``POCKET_FUZZ_FULL=1`` runs 100,000 per server.
"""

from __future__ import annotations

import os
import socket
import time

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pocket
from pocket.protocol import FIXED, MAGIC, VERSION, Op, encode_frame

FULL = bool(os.environ.get("POCKET_FUZZ_FULL"))
EXAMPLES = int(os.environ.get("POCKET_FUZZ_EXAMPLES", 100_000 if FULL else 2_000))
OPCODES = sorted({v for k, v in vars(Op).items() if isinstance(v, int)})


@pytest.fixture(scope="module")
def fuzz_cluster():
    from pocket.local import LocalCluster
    with LocalCluster(dram=1, capacity="64MiB", log_level="ERROR") as c:
        with pocket.connect(c.address) as cl:
            job = cl.register_job("fuzz-victim")
            objects = {f"o{i}": os.urandom(size) for i, size in
                       enumerate((10, 70_000, 300_000, 1 << 20))}
            for name, data in objects.items():
                job.put(name, data)
            h = job._md(Op.GET, {"name": "o3", "dar": False}).header
            c.fuzz_vocab = {  # real ids and secrets make mutated frames realistic
                "job": job.id, "tok": job.token, "ext": h["ext"][0][1], "cap": h["ext"][0][3]}
            yield c, job, objects
            job.deregister()


class Sender:
    """Sends bytes to one server; reconnects when it closes us, drains replies, rotates."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.target = (host, int(port))
        self.sock = None
        self.sent = 0

    def send(self, data: bytes) -> None:
        if self.sock is None or self.sent >= 50:
            self.close()
            self.sock = socket.create_connection(self.target, timeout=5)
            self.sock.setblocking(False)
            self.sent = 0
        self.sent += 1
        try:
            self._send_all(data)
            self._drain()
        except OSError:
            self.close()

    def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 2
        while view:
            try:
                n = self.sock.send(view)
                view = view[n:]
            except BlockingIOError:
                self._drain()
                if time.monotonic() > deadline:  # server is waiting for a payload we
                    raise OSError("stuck")     # will not send, and reads no more
                time.sleep(0.001)

    def _drain(self) -> None:
        while True:
            try:
                if not self.sock.recv(1 << 20):
                    raise OSError("closed")
            except BlockingIOError:
                return

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.text(max_size=20),
                   st.binary(max_size=40), st.lists(st.integers(0, 2**63), max_size=4),
                   st.sampled_from(["job", "tok", "ext", "cap"]))
KEYS = st.sampled_from(["job", "tok", "ext", "off", "len", "size", "cap", "auth", "name", "put",
                        "lease", "dar", "max", "weights", "nodes", "role", "addr", "node",
                        "crc", "prefix", "persist", "spill", "tiers", "all"])


@st.composite
def frames(draw, vocab: dict) -> bytes:
    kind = draw(st.sampled_from(["random", "header", "frame", "mutated"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=200))
    if kind == "header":  # a fixed header with arbitrary fields and lengths
        return FIXED.pack(MAGIC, draw(st.sampled_from([VERSION, VERSION, 0, 255])),
                          draw(st.integers(0, 255)), draw(st.integers(0, 255)),
                          draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 300)),
                          draw(st.integers(0, 5000))) + draw(st.binary(max_size=300))
    header = draw(st.dictionaries(KEYS, VALUES, max_size=6))
    header = {k: vocab.get(v, v) if isinstance(v, str) else v for k, v in header.items()}
    payload = draw(st.one_of(st.none(), st.binary(max_size=5000)))
    data = b"".join(bytes(p) for p in encode_frame(draw(st.sampled_from(OPCODES)),
                                                   draw(st.integers(0, 2**32 - 1)), header,
                                                   payload, draw(st.sampled_from([0, 0, 1, 4]))))
    if kind == "mutated":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data) - 1))
            op = draw(st.sampled_from(["flip", "cut", "dup"]))
            if op == "flip":
                data[at] ^= 1 << draw(st.integers(0, 7))
            elif op == "cut":
                del data[at:at + draw(st.integers(1, 16))]
                if not data:
                    data = bytearray(b"\xb7")
            else:
                data[at:at] = data[at:at + draw(st.integers(1, 16))]
        data = bytes(data)
    return data


def footprint(pid: int) -> tuple[int, int]:
    proc = psutil.Process(pid)
    return proc.memory_info().rss, len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(3600 if FULL else 300)
@pytest.mark.parametrize("role", ["controller", "metadata", "storage"])
def test_server_survives_fuzzed_frames(fuzz_cluster, role: str) -> None:
    c, job, objects = fuzz_cluster
    (proc,) = [p for p in c.processes if p.role == role]
    sender = Sender(proc.address)
    vocab = c.fuzz_vocab

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not FULL,
              suppress_health_check=list(HealthCheck))
    @given(frames(vocab))
    def run(data: bytes) -> None:
        sender.send(data)

    # Warm up (allocators, caches) with a tenth, then measure over the rest.
    warm = EXAMPLES // 10
    for i in range(warm):
        sender.send(os.urandom(i % 64 + 1))
    sender.close()
    time.sleep(0.3)
    rss0, fds0 = footprint(proc.pid)
    started = time.monotonic()
    run()
    sender.close()
    took = time.monotonic() - started
    time.sleep(0.5)
    assert proc.process.poll() is None, f"{role} crashed"
    rss1, fds1 = footprint(proc.pid)
    print(f"{role}: {EXAMPLES} frames in {took:.1f}s, RSS {rss0 >> 20} -> {rss1 >> 20} MiB, "
          f"fds {fds0} -> {fds1}")
    assert fds1 <= fds0 + 2, f"{role} leaked file descriptors: {fds0} -> {fds1}"
    assert rss1 - rss0 < 32 << 20, f"{role} grew by {(rss1 - rss0) >> 20} MiB"
    for name, data in objects.items():  # stored data unchanged
        assert job.get(name) == data
    assert c.status()["nodes"]  # and still serving
