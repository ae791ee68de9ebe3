"""Helpers shared by the benchmarks: a private redis-server, percentiles, formatting.

Nothing here talks to anything but 127.0.0.1, and :class:`RedisServer` only
ever signals the one process it started.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence


class RedisMissing(RuntimeError):
    """redis-server is not installed (or not on PATH)."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def find_redis_server() -> str:
    path = shutil.which("redis-server") or ("/usr/bin/redis-server"
                                           if os.access("/usr/bin/redis-server", os.X_OK) else None)
    if path is None:
        raise RedisMissing(
            "redis-server was not found on PATH. The benchmark compares Pocket with Redis and "
            "starts its own private redis-server; install it first, e.g.\n"
            "    sudo apt-get install redis-server      (Debian/Ubuntu)")
    return path


class RedisServer:
    """A throw-away redis-server on 127.0.0.1: no persistence, in a temp dir.

    Use as a context manager; :meth:`stop` ends only the process it started
    (SIGTERM, then SIGKILL), and the child is also asked to die with us
    (PR_SET_PDEATHSIG) so a killed benchmark leaves nothing behind.
    """

    def __init__(self, executable: Optional[str] = None, host: str = "127.0.0.1",
                 extra_args: Sequence[str] = ()) -> None:
        self.executable = executable or find_redis_server()
        self.host = host
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.dir: Optional[str] = None
        self.extra_args = list(extra_args)
        self.version = ""

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> "RedisServer":
        self.dir = tempfile.mkdtemp(prefix="pocket-bench-redis-")
        try:
            out = subprocess.run([self.executable, "--version"], capture_output=True, text=True,
                                 timeout=10)
            self.version = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            self.version = "?"
        last_error = ""
        for _attempt in range(5):  # a port picked by free_port() can be taken by someone else
            self.port = free_port(self.host)
            log = open(os.path.join(self.dir, "redis.log"), "ab")
            cmd = [self.executable, "--bind", self.host, "--port", str(self.port),
                   "--save", "", "--appendonly", "no", "--dir", self.dir,
                   "--daemonize", "no", "--protected-mode", "yes", "--logfile", "",
                   *self.extra_args]
            # Own session: a Ctrl-C in the terminal reaches us, and we stop it in order.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=self.dir, start_new_session=True,
                                         preexec_fn=_die_with_parent)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if self._ping():
                    return self
                time.sleep(0.05)
            last_error = self._log_tail()
            self.stop()
        raise RuntimeError(f"redis-server did not start on {self.host}: {last_error}")

    def _ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir or ".", "redis.log"), "rb") as f:
                return f.read()[-1500:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def cleanup(self) -> None:
        self.stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# -- statistics and formatting ----------------------------------------------------

def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted values, nearest-rank."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return float(sorted_values[k])


def fmt_num(value: Optional[float], digits: int = 3) -> str:
    """A compact human number: 3 significant digits, thousands separated."""
    if value is None or value != value:  # None or NaN
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits - 1}f}"


def fmt_ratio(value: Optional[float]) -> str:
    if value is None or value != value:
        return "—"
    return f"{value:.2f}×"


def fmt_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def machine_info() -> dict:
    """What the results were measured on."""
    import platform
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
            "kernel": platform.release(), "python": sys.version.split()[0],
            "implementation": platform.python_implementation()}


class Progress:
    """Timestamped progress lines on stderr."""

    def __init__(self, quiet: bool = False) -> None:
        self.t0 = time.monotonic()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)


class LoadMonitor:
    """How much CPU other processes used while we ran (a noisy machine skews results).

    Busy CPU time of the whole machine (user + nice + system, from /proc/stat)
    minus the CPU time of this process and its waited-for children (every
    server, worker and probe the benchmark starts is a direct child).  Call
    :meth:`stop` after every child has been waited for.  Approximate: kernel
    time spent in interrupts is not attributed to anyone.
    """

    def __init__(self) -> None:
        import resource
        self._resource = resource
        self.t0 = time.monotonic()
        self.load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self.sys0 = self._machine()
        self.own0 = self._own()

    @staticmethod
    def _machine() -> tuple[float, float]:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        ticks = os.sysconf("SC_CLK_TCK")
        values = [int(v) / ticks for v in fields]
        busy = values[0] + values[1] + values[2]  # user, nice, system
        steal = values[7] if len(values) > 7 else 0.0
        return busy, steal

    def _own(self) -> float:
        r = self._resource
        a, b = r.getrusage(r.RUSAGE_SELF), r.getrusage(r.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    def stop(self) -> dict:
        try:
            busy1, steal1 = self._machine()
        except (OSError, ValueError):
            return {}
        wall = time.monotonic() - self.t0
        own = self._own() - self.own0
        busy = busy1 - self.sys0[0]
        foreign = max(0.0, busy - own)
        cores = os.cpu_count() or 1
        return {"wall_s": wall, "own_cpu_s": own, "machine_busy_cpu_s": busy,
                "other_cpu_s": foreign, "other_share": foreign / (wall * cores) if wall else 0.0,
                "steal_cpu_s": steal1 - self.sys0[1], "loadavg_before": self.load_before}
