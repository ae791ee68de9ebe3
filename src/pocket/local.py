"""A cluster of local processes: one controller, metadata and storage servers.

Used by ``pocket up``, the tests and the benchmarks.  Every server is a real
``python -m pocket.<role>`` process on 127.0.0.1; :meth:`LocalCluster.stop`
ends each one it started (SIGTERM, then SIGKILL after a grace period), and
children are asked to die with their parent so nothing is orphaned.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO, Optional

from .connection import BlockingConnection
from .errors import PocketError, Unavailable
from .process import announced_address, die_with_parent, server_environment
from .protocol import Op
from .units import format_size, parse_rate, parse_size


def default_capacity(servers: int) -> int:
    """Per-server DRAM capacity sized to this machine: a quarter of RAM in all, ≤ 4 GiB each."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    each = total // 4 // max(1, servers)
    return max(256 << 20, min(4 << 30, each)) // (1 << 20) * (1 << 20)


def default_flash_capacity(directory: str, servers: int) -> int:
    """Per-server flash capacity: a quarter of the directory's free space shared, 256 MiB–16 GiB."""
    st = os.statvfs(directory)
    each = st.f_bavail * st.f_frsize // 4 // max(1, servers)
    return max(256 << 20, min(16 << 30, each)) // (1 << 20) * (1 << 20)


@dataclass
class ServerProcess:
    """One server process started by a :class:`LocalCluster`."""

    role: str
    process: subprocess.Popen
    address: str
    log_path: Optional[str]

    @property
    def pid(self) -> int:
        return self.process.pid


class LocalCluster:
    """Start and stop a Pocket cluster made of local processes."""

    def __init__(self, *, port: int = 0, host: str = "127.0.0.1", dram: int = 2,
                 capacity: int | str | None = None, metadata: int = 1,
                 log_dir: Optional[str] = None, log_level: str = "INFO",
                 inherit_logs: bool = False, metadata_args: tuple[str, ...] = (),
                 storage_args: tuple[str, ...] = (), controller_args: tuple[str, ...] = (),
                 nvme: int = 0, ssd: int = 0, hdd: int = 0, data_dir: Optional[str] = None,
                 flash_capacity: int | str | None = None, provider: str = "none",
                 max_nodes: int = 8, throughput: int | str | None = None,
                 autoscale: Optional[bool] = None, metrics_port: Optional[int] = None,
                 migrate_on_drain: bool = False) -> None:
        if min(dram, nvme, ssd, hdd) < 0 or metadata < 1:
            raise ValueError("need at least one metadata server and no negative counts")
        if provider not in ("none", "local"):
            raise ValueError(f"unknown node provider {provider!r} (none, local)")
        self.flash = {"nvme": nvme, "ssd": ssd, "hdd": hdd}
        flash_servers = nvme + ssd + hdd
        if flash_servers and not data_dir:
            raise ValueError("flash tiers (nvme, ssd, hdd) need a data directory (--data-dir)")
        self.data_dir = data_dir
        self.flash_capacity = (parse_size(flash_capacity) if flash_capacity is not None else
                               default_flash_capacity(data_dir, flash_servers) if data_dir
                               else 0)
        self.host = host
        self.port = port
        self.dram = dram
        self.metadata_count = metadata
        self.capacity = parse_size(capacity) if capacity is not None else default_capacity(dram)
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="pocket-logs-")
        #: A log directory we made ourselves is removed at stop() unless kept.
        self.keep_logs = bool(log_dir) or bool(os.environ.get("POCKET_KEEP_LOGS"))
        self.log_level = log_level
        self.inherit_logs = inherit_logs
        self.metadata_args = tuple(metadata_args)
        self.storage_args = tuple(storage_args)
        self.controller_args = tuple(controller_args)
        #: ``local``: the controller starts more storage servers (up to ``max_nodes``) when a
        #: job's tier is short; ``none``: it overcommits the servers started here.
        self.provider = provider
        self.max_nodes = max_nodes
        #: Autoscaling on (True), off (False) or the controller's default (None: on iff
        #: there is a provider).
        self.autoscale = autoscale
        #: Data rate each storage server reports (default: its tier's node profile).
        self.throughput = parse_rate(throughput) if throughput is not None else None
        #: Prometheus metrics: the controller on this port (0: a free one), every other
        #: server (and those the provider starts) on a free port; None: off.
        self.metrics_port = metrics_port
        self.migrate_on_drain = migrate_on_drain
        self.processes: list[ServerProcess] = []
        self.address = ""

    # -- processes -----------------------------------------------------------
    def _spawn(self, role: str, args: list[str], timeout: float) -> ServerProcess:
        log_path = None
        stderr: int | IO = subprocess.STDOUT
        if not self.inherit_logs:
            log_path = os.path.join(self.log_dir, f"{role}-{len(self.processes)}.log")
            stderr = open(log_path, "ab")
        else:
            stderr = None  # type: ignore[assignment]
        cmd = [sys.executable, "-m", f"pocket.{role}", "--log-level", self.log_level, *args]
        env = server_environment()
        if self.metrics_port is not None:
            port = self.metrics_port if role == "controller" else 0
            cmd += ["--metrics-port", str(port)]
            env["POCKET_METRICS_PORT"] = "0"  # servers the controller's provider starts too
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                                env=env, preexec_fn=die_with_parent)
        if log_path is not None:
            stderr.close()  # type: ignore[union-attr]
        server = ServerProcess(role, proc, "", log_path)
        self.processes.append(server)
        server.address = self._read_address(server, timeout)
        return server

    def _read_address(self, server: ServerProcess, timeout: float) -> str:
        proc = server.process
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or proc.poll() is not None:
                break
            ready, _, _ = select.select([proc.stdout], [], [], min(remaining, 0.2))
            if ready:
                chunk = os.read(proc.stdout.fileno(), 1024)
                if not chunk:
                    break
                line += chunk
        text = line.decode(errors="replace").strip()
        address = announced_address(text)
        if address is None:
            detail = self._log_tail(server)
            raise Unavailable(f"{server.role} server did not start (exit {proc.poll()}): "
                              f"{text or 'no output'}{detail}")
        return address

    def _log_tail(self, server: ServerProcess) -> str:
        if not server.log_path or not os.path.exists(server.log_path):
            return ""
        with open(server.log_path, "rb") as f:
            tail = f.read()[-2000:].decode(errors="replace")
        return f"\n--- {server.log_path} ---\n{tail}"

    def controller_profile_args(self) -> list[str]:
        """Node profiles for the controller that describe the servers this cluster starts
        (their capacity and rate; prices stay the tier's), and the provider flags."""
        args = []
        rate = f",throughput={int(self.throughput)}" if self.throughput else ""
        args += ["--profile", f"dram:capacity={self.capacity}{rate}"]
        if self.data_dir:
            for tier in self.flash:
                args += ["--profile", f"{tier}:capacity={self.flash_capacity}{rate}"]
        args += ["--provider", self.provider]
        if self.provider == "local":
            args += ["--max-nodes", str(self.max_nodes)]
            if self.data_dir:
                args += ["--node-dir", self.data_dir]
        if self.autoscale is not None:
            args += ["--autoscale", "on" if self.autoscale else "off"]
        if self.migrate_on_drain:
            args += ["--migrate-on-drain"]
        return args

    def start(self, timeout: float = 30.0) -> "LocalCluster":
        """Start every server and wait until all have registered with the controller."""
        try:
            controller = self._spawn("controller", ["--listen", f"{self.host}:{self.port}",
                                                    *self.controller_profile_args(),
                                                    *self.controller_args], timeout)
            self.address = controller.address
            for _ in range(self.metadata_count):
                self.add_metadata(wait=False, timeout=timeout)
            for _ in range(self.dram):
                self.add_storage("dram", wait=False, timeout=timeout)
            for tier, count in self.flash.items():
                for _ in range(count):
                    self.add_storage(tier, wait=False, timeout=timeout)
            self.wait_registered(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def add_metadata(self, *, wait: bool = True, timeout: float = 30.0) -> ServerProcess:
        """Start one more metadata server."""
        server = self._spawn("metadata", ["--listen", f"{self.host}:0", "--controller",
                                          self.address, *self.metadata_args], timeout)
        if wait:
            self.wait_registered(timeout)
        return server

    def add_storage(self, tier: str = "dram", capacity: int | str | None = None, *,
                    wait: bool = True, timeout: float = 30.0, args: tuple[str, ...] = ()
                    ) -> ServerProcess:
        """Start one more storage server of ``tier``."""
        flash = tier != "dram"
        size = (parse_size(capacity) if capacity is not None else
                self.flash_capacity if flash else self.capacity)
        if flash:
            if not self.data_dir:
                raise ValueError("flash tiers need the cluster's data_dir")
            args = ("--dir", self.data_dir, *args)
        if self.throughput:
            args = ("--throughput", str(int(self.throughput)), *args)
        server = self._spawn("storage", ["--listen", f"{self.host}:0", "--controller", self.address,
                                         "--tier", tier, "--capacity", str(size),
                                         *self.storage_args, *args], timeout)
        if wait:
            self.wait_registered(timeout)
        return server

    def status(self) -> dict:
        conn = BlockingConnection(self.address, timeout=10.0)
        try:
            return conn.request(Op.STATUS, {}).header
        finally:
            conn.close()

    def wait_registered(self, timeout: float = 30.0) -> None:
        """Block until every running server appears in the controller's status."""
        expected = {p.address for p in self.processes if p.role != "controller"
                    and p.process.poll() is None}
        deadline = time.monotonic() + timeout
        while True:
            try:
                seen = {n["address"] for n in self.status()["nodes"]}
            except PocketError:
                seen = set()
            if expected <= seen:
                return
            if time.monotonic() > deadline:
                raise Unavailable(f"servers did not register in {timeout}s: {sorted(expected - seen)}")
            time.sleep(0.05)

    def stop_process(self, server: ServerProcess, grace: float = 5.0, kill: bool = False) -> None:
        """Stop one server (SIGTERM; SIGKILL after ``grace`` s, or at once if ``kill``)."""
        proc = server.process
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()

    def stop(self, grace: float = 5.0) -> None:
        """Stop every server this cluster started: storage, metadata, then the controller."""
        order = {"storage": 0, "metadata": 1, "controller": 2}
        running = [p for p in self.processes if p.process.poll() is None]
        for p in running:
            if p.role != "controller":
                p.process.send_signal(signal.SIGTERM)
        for p in sorted(self.processes, key=lambda p: order.get(p.role, 3)):
            self.stop_process(p, grace)
        self.processes = []
        if not self.keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def describe(self) -> str:
        lines = [f"controller {self.address}"]
        for p in self.processes:
            if p.role != "controller":
                lines.append(f"  {p.role:<9} {p.address}  pid {p.pid}")
        lines.append(f"  ({self.dram} DRAM servers of {format_size(self.capacity)} each; "
                     f"logs in {self.log_dir if not self.inherit_logs else 'stderr'})")
        if self.provider == "local":
            lines.append(f"  (the controller may start up to {self.max_nodes} more storage "
                         f"servers when a job's tier is short"
                         f"{'' if self.autoscale is False else ' or its load is above band'})")
        flash = ", ".join(f"{n} {tier}" for tier, n in self.flash.items() if n)
        if flash:
            lines.append(f"  ({flash} servers of {format_size(self.flash_capacity)} each in "
                         f"{self.data_dir})")
        return "\n".join(lines)

    def __enter__(self) -> "LocalCluster":
        return self.start() if not self.processes else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
