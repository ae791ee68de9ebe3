"""Real network partitions between "hosts": network namespaces on a private bridge.

Each test makes a bridge in the root namespace on a private /24 of
10.213.0.0/16 and network namespaces joined to it by veth pairs; storage (or
metadata) servers run inside a namespace (``ip netns exec``), the controller
and the clients in the root namespace.  Servers off loopback need the
cluster secret, so every server gets ``--secret-file``.  A partition is the
namespace's end of its veth going down: packets are dropped without a reset,
so TCP on the other side sees nothing (like a cut cable or a dead switch
port) and only timeouts can tell.  Traffic goes only to addresses these tests
make; a blackhole route for the /24 catches anything while a link is down.

Needs root and iproute2 (``ip``); skipped with the reason where either is
missing or network namespaces are not permitted (e.g. an unprivileged container).
"""

from __future__ import annotations

import itertools
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from typing import Iterator, Optional

import pytest

import pocket
from pocket.process import announced_address, die_with_parent

from helpers import wait_for

BIG = 300_000  # stored as extents on storage servers (above the inline limit)
CLIENT_TIMEOUT = 2.0
_serial = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def _netns_unavailable() -> Optional[str]:
    """Why network-namespace tests cannot run here, or None (probed by trying)."""
    if os.geteuid() != 0:
        return "network-namespace partition tests need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"pkprobe{os.getpid()}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` failed: {exc}"
    if made.returncode != 0:
        return f"network namespaces are not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


_REASON = _netns_unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


class Hosts:
    """A private bridge (10.213.X.1/24, the root namespace) and namespaces joined to it.

    Starts servers in any of them and stops everything in :meth:`close`.
    """

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.tag = f"{os.getpid() % 100000}{next(_serial) % 10}"
        self.bridge = f"pkb{self.tag}"
        used = _ip("-4", "-o", "addr").stdout
        self.net = next(f"10.213.{x}" for x in itertools.chain(
            range(os.getpid() % 250, 250), range(0, 250))
            if f" 10.213.{x}." not in used)
        self.address = f"{self.net}.1"  # the root namespace's address on the bridge
        self.namespaces: dict[str, tuple[str, str]] = {}  # name → (inside device, address)
        self.outside: list[str] = []  # root-namespace ends of the veth pairs
        self.processes: list[subprocess.Popen] = []
        self.secret_file = os.path.join(workdir, "secret")
        with open(self.secret_file, "w") as f:
            f.write(os.urandom(24).hex())
        os.chmod(self.secret_file, 0o600)
        _ip("link", "add", self.bridge, "type", "bridge")
        self.route = f"{self.net}.0/24"
        _ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        # While a link is down nothing for this /24 may leave by the default route.
        _ip("route", "add", "blackhole", self.route, "metric", "4000")

    def add_namespace(self) -> str:
        """A new namespace on the bridge; returns its name (its address: :meth:`ns_address`)."""
        n = len(self.namespaces)
        name = f"pkns{self.tag}{n}"
        outside, inside = f"pk{self.tag}{n}o", f"pk{self.tag}{n}i"
        address = f"{self.net}.{n + 2}"
        _ip("netns", "add", name)
        self.namespaces[name] = (inside, address)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        self.outside.append(outside)
        _ip("link", "set", inside, "netns", name)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("-n", name, "addr", "add", f"{address}/24", "dev", inside)
        _ip("-n", name, "link", "set", inside, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def ns_address(self, name: str) -> str:
        return self.namespaces[name][1]

    def cut(self, name: str) -> None:
        """Partition a namespace: its link goes down; packets to and from it vanish."""
        _ip("-n", name, "link", "set", self.namespaces[name][0], "down")

    def heal(self, name: str) -> None:
        inside, _ = self.namespaces[name]
        _ip("-n", name, "link", "set", inside, "up")

    def start(self, role: str, args: list[str], netns: Optional[str] = None,
              timeout: float = 20.0) -> tuple[subprocess.Popen, str]:
        """Start ``python -m pocket.<role>`` (in ``netns``); returns it and its address."""
        host = self.ns_address(netns) if netns else self.address
        cmd = [sys.executable, "-m", f"pocket.{role}", "--log-level", "WARNING",
               "--listen", f"{host}:0", "--secret-file", self.secret_file, *args]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]  # ip execs: the pid is the server's
        log = open(os.path.join(self.workdir, f"{role}-{len(self.processes)}.log"), "ab")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent)
        log.close()
        self.processes.append(proc)
        line = b""
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n") and proc.poll() is None and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.2)[0]:
                chunk = os.read(proc.stdout.fileno(), 1024)
                if not chunk:
                    break
                line += chunk
        address = announced_address(line.decode(errors="replace"))
        if address is None:
            raise RuntimeError(f"{role} did not start: {line!r}; see {self.workdir}")
        return proc, address

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        for device in self.outside:  # at once (a deleted namespace frees its devices later)
            _ip("link", "del", device, check=False)
        for name in self.namespaces:
            _ip("netns", "del", name, check=False)
        _ip("link", "del", self.bridge, check=False)
        _ip("route", "del", "blackhole", self.route, "metric", "4000", check=False)


@pytest.fixture
def hosts(tmp_path) -> Iterator[Hosts]:
    h = Hosts(str(tmp_path))
    try:
        yield h
    finally:
        h.close()
        leftover = _ip("-o", "link").stdout + _ip("netns", "list").stdout
        assert h.tag not in leftover, "namespaces or links left behind"


def start_cluster(hosts: Hosts, storage_in: list[Optional[str]], controller_args=(),
                  metadata_in: Optional[str] = None) -> dict:
    """Controller (root namespace), a metadata server and storage servers in the given
    namespaces (None: the root one); returns their addresses once all have registered."""
    _, ctl = hosts.start("controller", ["--profile", f"dram:capacity={64 << 20}",
                                        *controller_args])
    _, md = hosts.start("metadata", ["--controller", ctl], netns=metadata_in)
    storage = [hosts.start("storage", ["--controller", ctl, "--tier", "dram",
                                       "--capacity", "64MiB"], netns=ns)[1]
               for ns in storage_in]
    with pocket.connect(ctl) as cl:
        assert wait_for(lambda: len(cl.status()["nodes"]) == 1 + len(storage), 15.0)
    return {"controller": ctl, "metadata": md, "storage": storage}


def node_ids(cl: pocket.Cluster) -> dict:
    return {n["address"]: n["id"] for n in cl.status()["nodes"]}


def put_on(job: pocket.Job, prefix: str, want: set, limit: int = 40) -> dict:
    """Put objects until each storage address in ``want`` holds at least one; name → (data, node)."""
    out: dict = {}
    for i in range(limit):
        data = os.urandom(BIG)
        job.put(f"{prefix}{i}", data)
        (server,) = job.lookup(f"{prefix}{i}").servers
        out[f"{prefix}{i}"] = (data, server)
        if want <= {s for _, s in out.values()}:
            return out
    raise AssertionError(f"objects never landed on all of {want}")


def timed(fn) -> tuple[Optional[BaseException], float]:
    t = time.monotonic()
    try:
        fn()
    except pocket.PocketError as exc:
        return exc, time.monotonic() - t
    return None, time.monotonic() - t


def test_silently_partitioned_storage_node(hosts: Hosts) -> None:
    ns = hosts.add_namespace()
    c = start_cluster(hosts, [ns, None])
    far, near = c["storage"]
    cl = pocket.connect(c["controller"], timeout=CLIENT_TIMEOUT)
    job = cl.register_job("partitioned")
    other = cl.register_job("other")
    objects = put_on(job, "o", {far, near})
    far_id = node_ids(cl)[far]

    hosts.cut(ns)
    cut = time.monotonic()
    on_far = [n for n, (_, s) in objects.items() if s == far]
    on_near = [n for n, (_, s) in objects.items() if s == near]
    # A read from the partitioned node fails within the client's timeout: no hang.
    get_error, failed_in = timed(lambda: job.get(on_far[0]))
    assert isinstance(get_error, pocket.Unavailable), get_error
    assert failed_in < CLIENT_TIMEOUT + 1.5, failed_in
    # The rest of the cluster is unaffected meanwhile.
    for name in on_near:
        assert job.get(name) == objects[name][0]
    other.put("small", b"s" * 1000)
    assert other.get("small") == b"s" * 1000
    # The controller drops the silent node (no reset: only its missed heartbeats tell).
    assert wait_for(lambda: far not in node_ids(cl), 6.0)
    dropped = time.monotonic() - cut
    assert far_id not in next(j for j in cl.status()["jobs"] if j["id"] == job.id)["weight_map"]
    slowest = 0.0
    for i in range(6):  # new puts go to the remaining node; the map there is the new one
        exc, took = timed(lambda: job.put(f"n{i}", b"n" * BIG))
        if exc is not None:  # only a put whose allocation raced the weight-map update
            assert isinstance(exc, pocket.Unavailable), exc
            assert i == 0
            continue
        slowest = max(slowest, took)
        assert list(job.lookup(f"n{i}").servers) == [near]
        assert job.get(f"n{i}") == b"n" * BIG

    hosts.heal(ns)
    healed = time.monotonic()
    # It comes back under its old id; what it stored was never lost (a partition is not a death).
    assert wait_for(lambda: node_ids(cl).get(far) == far_id, 20.0)
    back = time.monotonic() - healed
    assert wait_for(lambda: _reads(job, on_far[0], objects[on_far[0]][0]), 10.0)
    for name in on_far:
        assert job.get(name) == objects[name][0]
    # New jobs use it again.
    fresh = cl.register_job("after")
    assert far_id in fresh.weights
    again = put_on(fresh, "a", {far, near})
    for name, (data, _) in again.items():
        assert fresh.get(name) == data
    print(f"get from the partitioned node: Unavailable in {failed_in:.2f}s ({get_error}); node "
          f"dropped {dropped:.2f}s after the cut; puts on the survivor (slowest {slowest:.3f}s); "
          f"re-registered {back:.2f}s after healing")
    for j in (job, other, fresh):
        j.deregister()
    cl.close()


def _reads(job: pocket.Job, name: str, data: bytes) -> bool:
    try:
        return job.get(name) == data
    except pocket.Unavailable:
        return False


def test_partitioned_storage_node_learns_of_a_dead_metadata_server_after_healing(
        hosts: Hosts) -> None:
    """The metadata server dies while a storage node is cut off: that node cannot be told
    then, and frees the dead server's extents as soon as it is heard from again."""
    ns = hosts.add_namespace()
    c = start_cluster(hosts, [ns], controller_args=["--reclaim-after", "2s"])
    (far,) = c["storage"]
    cl = pocket.connect(c["controller"], timeout=CLIENT_TIMEOUT)
    job = cl.register_job("orphaned")
    for i in range(4):
        job.put(f"x{i}", os.urandom(BIG))
    used = lambda: next((n["used"] for n in cl.status()["nodes"] if n["address"] == far), None)
    assert wait_for(lambda: used() == 4 * -(-BIG // 4096) * 4096, 5.0)
    hosts.cut(ns)
    md = hosts.processes[1]
    os.kill(md.pid, signal.SIGKILL)
    md.wait(5)
    assert wait_for(lambda: used() is None, 6.0)  # dropped: the controller cannot reach it
    time.sleep(3.0)  # well past --reclaim-after: it was dead all along, the node never heard
    hosts.heal(ns)
    healed = time.monotonic()
    assert wait_for(lambda: used() == 0, 20.0), used()
    print(f"extents of the dead metadata server freed {time.monotonic() - healed:.2f}s after "
          f"the storage node's link healed")
    cl.close()


def test_partitioned_metadata_server_keeps_its_data(hosts: Hosts) -> None:
    """A metadata server cut off for longer than --node-timeout (but less than
    --reclaim-after) is dropped, comes back under its id, and has lost nothing."""
    ns = hosts.add_namespace()
    c = start_cluster(hosts, [None], controller_args=["--reclaim-after", "15s"],
                      metadata_in=ns)
    cl = pocket.connect(c["controller"], timeout=CLIENT_TIMEOUT)
    job = cl.register_job("md-partition")
    data = {f"x{i}": os.urandom(BIG) for i in range(3)}
    for name, value in data.items():
        job.put(name, value)
    md_id = node_ids(cl)[c["metadata"]]
    (storage,) = c["storage"]
    used = lambda: next(n["used"] for n in cl.status()["nodes"] if n["address"] == storage)
    assert wait_for(lambda: used() == 3 * -(-BIG // 4096) * 4096, 5.0)
    before = used()
    hosts.cut(ns)
    cut = time.monotonic()
    exc, took = timed(lambda: job.get("x0"))  # its namespace is unreachable: fail fast
    assert isinstance(exc, pocket.Unavailable) and took < CLIENT_TIMEOUT + 5, (exc, took)
    assert wait_for(lambda: c["metadata"] not in node_ids(cl), 6.0)  # dropped
    dropped = time.monotonic() - cut
    with pytest.raises(pocket.Unavailable):  # no metadata server left: said at once
        cl.register_job("while-cut")
    hosts.heal(ns)
    healed = time.monotonic()
    assert wait_for(lambda: node_ids(cl).get(c["metadata"]) == md_id, 20.0)
    back = time.monotonic() - healed
    assert wait_for(lambda: _reads(job, "x0", data["x0"]), 10.0)
    time.sleep(max(0.0, cut + 16 - time.monotonic()))  # past --reclaim-after since the cut
    assert used() == before  # nothing was freed
    attached = cl.attach(job.id, job.token)  # the controller finds its metadata server again
    for name, value in data.items():
        assert attached.get(name) == value
    attached.close()
    print(f"get via the partitioned metadata server: Unavailable in {took:.2f}s; dropped "
          f"{dropped:.2f}s after the cut; back under its id {back:.2f}s after healing; "
          f"storage bytes {before} before and {used()} after --reclaim-after")
    job.deregister()
    cl.close()
