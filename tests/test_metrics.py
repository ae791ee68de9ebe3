"""Prometheus metrics (``--metrics-port``): real servers, scraped over HTTP from 127.0.0.1."""

from __future__ import annotations

import argparse
import socket
import time
import urllib.request
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

import pocket
from pocket.local import LocalCluster
from pocket.metrics import LATENCY_BOUNDS
from pocket.server import common_arguments, parse_metrics_port

METRICS = ("--metrics-port", "0")
SMALL, LARGE = 1024, 1 << 20


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of one exporter."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def metered() -> Iterator[LocalCluster]:
    with LocalCluster(dram=1, capacity="64MiB", log_level="WARNING", storage_args=METRICS,
                      metadata_args=METRICS, controller_args=METRICS) as c:
        yield c


def node_metrics(cluster: LocalCluster, role: str) -> str:
    nodes = [n for n in cluster.status()["nodes"] if n["role"] == role]
    assert len(nodes) == 1 and nodes[0].get("metrics"), nodes
    host, _, port = nodes[0]["metrics"].rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    return nodes[0]["metrics"]


def test_status_and_announce_line_give_the_metrics_addresses(metered: LocalCluster) -> None:
    status = metered.status()
    assert status["metrics"] and status["metrics"] != status["controller"]
    assert {n["role"] for n in status["nodes"] if n.get("metrics")} == {"metadata", "storage"}
    info = scrape(status["metrics"])
    assert value(info, "pocket_server_info", role="controller", address=status["controller"]) == 1
    assert value(info, "pocket_controller_nodes", role="storage", tier="dram", state="active") == 1
    assert value(info, "pocket_controller_nodes", role="metadata", tier="metadata",
                 state="active") == 1
    assert value(info, "pocket_requests_total", op="NODE_HEARTBEAT") >= 1


def test_requests_bytes_and_stored_bytes(metered: LocalCluster) -> None:
    md, st = node_metrics(metered, "metadata"), node_metrics(metered, "storage")
    md0, st0 = scrape(md), scrape(st)
    with pocket.connect(metered.address) as client:
        job = client.register_job("metrics")
        for i in range(20):
            job.put(f"small-{i}", bytes([i]) * SMALL)
        for i in range(3):
            job.put(f"large-{i}", bytes([i]) * LARGE)
        for i in range(20):
            assert job.get(f"small-{i}") == bytes([i]) * SMALL
        for i in range(3):
            assert job.get(f"large-{i}") == bytes([i]) * LARGE
        with pytest.raises(pocket.NotFound):
            job.get("missing")
        md1, st1 = scrape(md), scrape(st)

        def delta(before: dict, after: dict, name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        # Metadata: inline puts and gets, their payload bytes, the error, bytes stored inline.
        assert delta(md0, md1, "pocket_requests_total", op="PUT_INLINE") == 20
        assert delta(md0, md1, "pocket_request_bytes_total", op="PUT_INLINE") == 20 * SMALL
        assert delta(md0, md1, "pocket_requests_total", op="PUT_BEGIN") == 3
        assert delta(md0, md1, "pocket_requests_total", op="PUT_COMMIT") == 3
        assert delta(md0, md1, "pocket_requests_total", op="GET") == 24
        assert delta(md0, md1, "pocket_response_bytes_total", op="GET") == 20 * SMALL
        assert delta(md0, md1, "pocket_request_errors_total", op="GET") == 1
        assert value(md1, "pocket_metadata_inline_used_bytes") == 20 * SMALL
        assert value(md1, "pocket_metadata_jobs") >= 1
        # Storage: the large objects' payloads in and out, and the bytes it stores.
        assert delta(st0, st1, "pocket_requests_total", op="EXT_WRITE") == 3
        assert delta(st0, st1, "pocket_request_bytes_total", op="EXT_WRITE") == 3 * LARGE
        assert delta(st0, st1, "pocket_requests_total", op="EXT_READ") == 3
        assert delta(st0, st1, "pocket_response_bytes_total", op="EXT_READ") == 3 * LARGE
        assert value(st1, "pocket_storage_used_bytes", tier="dram") == 3 * LARGE
        assert value(st1, "pocket_storage_capacity_bytes", tier="dram") == 64 << 20
        assert value(st1, "pocket_storage_extents", tier="dram") == 3
        assert delta(st0, st1, "pocket_network_received_bytes_total") > 3 * LARGE
        assert delta(st0, st1, "pocket_network_sent_bytes_total") > 3 * LARGE
        for samples in (md1, st1):
            assert value(samples, "pocket_connections") >= 1
            assert value(samples, "pocket_cpu_share") >= 0
            assert value(samples, "pocket_protocol_errors_total") == 0
        # The latency histograms: cumulative, +Inf bucket = count = requests.
        for samples, op in ((md1, "PUT_INLINE"), (md1, "GET"), (st1, "EXT_WRITE"),
                            (st1, "EXT_READ")):
            buckets = {dict(labels)["le"]: v for (name, labels), v in samples.items()
                       if name == "pocket_request_duration_seconds_bucket"
                       and dict(labels)["op"] == op}
            counts = [buckets.pop(le) for le in [repr(b) for b in LATENCY_BOUNDS] + ["+Inf"]]
            assert not buckets
            count = value(samples, "pocket_request_duration_seconds_count", op=op)
            assert counts == sorted(counts) and counts[-1] == count
            assert count == value(samples, "pocket_requests_total", op=op)
            assert 0 < value(samples, "pocket_request_duration_seconds_sum", op=op) < count * 10
        # The controller sees the same bytes in heartbeats.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            node = [n for n in metered.status()["nodes"] if n["role"] == "storage"][0]
            if node["used"] == 3 * LARGE:
                break
            time.sleep(0.2)
        assert node["used"] == value(st1, "pocket_storage_used_bytes", tier="dram")
        job.deregister()


def test_protocol_errors_are_counted(metered: LocalCluster) -> None:
    st = node_metrics(metered, "storage")
    address = [n["address"] for n in metered.status()["nodes"] if n["role"] == "storage"][0]
    before = value(scrape(st), "pocket_protocol_errors_total")
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"this is not a pocket frame at all, not even close")
        assert s.recv(100) == b""  # the server closes it
    assert value(scrape(st), "pocket_protocol_errors_total") == before + 1


def test_metrics_are_off_by_default(cluster: LocalCluster) -> None:
    status = cluster.status()
    assert "metrics" not in status
    assert all("metrics" not in n for n in status["nodes"])


def test_metrics_port_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_metrics_port(None) is None
    assert parse_metrics_port("off") is None and parse_metrics_port("") is None
    assert parse_metrics_port("0") == 0 and parse_metrics_port("9100") == 9100
    for bad in ("x", "-1", "70000"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_metrics_port(bad)

    def parse(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        common_arguments(parser, "127.0.0.1:0")
        return parser.parse_args(list(argv))

    monkeypatch.delenv("POCKET_METRICS_PORT", raising=False)
    assert parse().metrics_port is None
    assert parse("--metrics-port", "9100").metrics_port == 9100
    monkeypatch.setenv("POCKET_METRICS_PORT", "0")
    assert parse().metrics_port == 0
