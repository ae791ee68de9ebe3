"""``pocket up`` and ``pocket status`` as a user runs them."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

import pocket


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 30.0) -> re.Match:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            out += chunk
            match = re.search(pattern, out.decode())
            if match:
                return match
    raise AssertionError(f"{pattern!r} not seen in output: {out.decode()!r}")


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


@pytest.mark.timeout(120)
def test_pocket_up_status_and_clean_stop(tmp_path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pocket", "up", "--port", "0", "--dram", "2",
                             "--capacity", "64MiB", "--log-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        match = read_until(proc, r"controller at (\S+)")
        address = match.group(1)
        servers = children_of(proc.pid)
        assert len(servers) == 4  # controller, metadata, 2 storage
        with pocket.connect(address) as c:
            job = c.register_job("cli")
            job.put("x", b"1" * 100_000)
            out = subprocess.run([sys.executable, "-m", "pocket", "status", "--json",
                                  "--controller", address], capture_output=True, text=True,
                                 timeout=30, check=True).stdout
            status = json.loads(out)
            roles = sorted(n["role"] for n in status["nodes"])
            assert roles == ["metadata", "storage", "storage"]
            assert all(re.fullmatch(r"127\.0\.0\.1:\d+", n["address"]) for n in status["nodes"])
            (j,) = status["jobs"]
            assert j["id"] == job.id and j["tier"] == "dram" and len(j["weight_map"]) == 2
            table = subprocess.run([sys.executable, "-m", "pocket", "status", "--controller",
                                    address], capture_output=True, text=True, timeout=30,
                                   check=True).stdout
            assert "storage" in table and job.id in table
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    for pid in servers:  # no orphans
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_status_without_cluster_fails_clearly() -> None:
    r = subprocess.run([sys.executable, "-m", "pocket", "status", "--controller", "127.0.0.1:1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot connect" in r.stderr


def test_server_flags_are_checked() -> None:
    r = subprocess.run([sys.executable, "-m", "pocket.storage", "--capacity", "lots"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "capacity" in r.stderr


@pytest.mark.timeout(90)
def test_pocket_up_autoscale_metrics_and_plain_status_shows_states_and_events(tmp_path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pocket", "up", "--port", "0", "--dram", "1",
                             "--capacity", "64MiB", "--autoscale", "--max-nodes", "1",
                             "--metrics-port", "0", "--migrate-on-drain",
                             "--log-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def table() -> str:
        return subprocess.run([sys.executable, "-m", "pocket", "status", "--controller",
                               address], capture_output=True, text=True, timeout=30,
                              check=True).stdout

    try:
        address = read_until(proc, r"controller at (\S+)").group(1)
        with pocket.connect(address) as c:
            job = c.register_job("cli", capacity="100MiB", throughput="1MB/s")  # adds a node
            job.put("kept", b"1" * 200_000, persist=True)
            status = c.status()
            assert status["metrics"] and all(n.get("metrics") for n in status["nodes"])
            assert len(status["nodes"]) == 3  # the provider's node has metrics too
            job.deregister()
            deadline = time.monotonic() + 30
            while "removed" not in (text := table()) and time.monotonic() < deadline:
                time.sleep(0.5)
        assert "autoscaling on" in text and "migrate on drain" in text
        assert "draining" in text and "removed" in text and "below band" in text
        assert f"(metrics on {status['metrics']})" in text
        for n in status["nodes"]:
            if n["address"] in text:
                assert n["metrics"] in text
        assert re.search(r"\bactive\b", text)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
