"""Prometheus metrics of one server (``--metrics-port``).

The request path only counts into plain Python lists indexed by opcode
(:class:`RequestMetrics`, a handful of list increments and one ``bisect`` per
request, and nothing at all when metrics are off); the Prometheus objects are
built on scrape, in the exporter's thread, by :class:`ServerCollector`.
Reading ints and lists that the event loop thread updates is safe under the
GIL; a scrape may see one request counted in ``requests`` but not yet in its
latency histogram, which Prometheus tolerates.

Exported by every role (labels: ``op`` is a name from
:data:`pocket.protocol.OP_NAMES`):

* ``pocket_requests_total{op}``, ``pocket_request_errors_total{op}`` (error
  replies), ``pocket_request_bytes_total{op}`` (payload bytes received with
  requests), ``pocket_response_bytes_total{op}`` (payload bytes sent in
  replies), ``pocket_request_duration_seconds{op}`` (histogram: from the
  request being decoded to its reply being handed to the transport);
* ``pocket_protocol_errors_total``, ``pocket_connections`` (open),
  ``pocket_network_received_bytes_total``, ``pocket_network_sent_bytes_total``;
* ``pocket_cpu_share`` (CPU seconds per second, over at least the last second),
  ``pocket_network_in_bytes_per_second``, ``pocket_network_out_bytes_per_second``
  (as in heartbeats, :class:`pocket.node.UsageMeter`);
* ``pocket_server_info{role,address}`` (always 1), ``pocket_uptime_seconds``,
  and the ``process_*`` metrics of prometheus-client's process collector;
* whatever the role adds through :meth:`pocket.server.Server.metric_gauges`
  (storage: ``pocket_storage_used_bytes``, ``pocket_storage_capacity_bytes``,
  ...; metadata: ``pocket_metadata_inline_used_bytes``, ...; controller:
  ``pocket_controller_nodes``, ...).
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Iterator, Optional

from .node import UsageMeter
from .protocol import OP_NAMES
from .units import format_address

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("pocket.metrics")

#: Upper bounds (seconds) of the latency histogram buckets; one more bucket is +Inf.
LATENCY_BOUNDS: tuple[float, ...] = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_OPCODES = 256  # the opcode is one byte of the frame header


class RequestMetrics:
    """Per-opcode request counters, plain lists indexed by opcode (the hot path's side)."""

    __slots__ = ("requests", "errors", "bytes_in", "bytes_out", "latency", "latency_sum")

    def __init__(self) -> None:
        self.requests = [0] * _OPCODES
        self.errors = [0] * _OPCODES
        self.bytes_in = [0] * _OPCODES
        self.bytes_out = [0] * _OPCODES
        self.latency_sum = [0.0] * _OPCODES
        #: Per opcode, None until its first request, then one count per bucket (not cumulative).
        self.latency: list[Optional[list[int]]] = [None] * _OPCODES

    def record(self, opcode: int, nbytes: int, seconds: float) -> None:
        """Count one request of ``opcode`` carrying ``nbytes`` of payload that took ``seconds``."""
        self.requests[opcode] += 1
        self.bytes_in[opcode] += nbytes
        self.latency_sum[opcode] += seconds
        buckets = self.latency[opcode]
        if buckets is None:
            buckets = self.latency[opcode] = [0] * (len(LATENCY_BOUNDS) + 1)
        buckets[bisect_left(LATENCY_BOUNDS, seconds)] += 1


def op_name(opcode: int) -> str:
    return OP_NAMES.get(opcode, str(opcode))


class ServerCollector:
    """A prometheus-client collector that reads one :class:`Server`'s counters on scrape."""

    def __init__(self, server: "Server") -> None:
        self.server = server
        self._meter = UsageMeter()
        self._usage = {"cpu": 0.0, "net_in": 0.0, "net_out": 0.0}
        self._usage_at = 0.0
        self._lock = threading.Lock()

    def _utilisation(self) -> dict:
        # Re-read at most once a second, so that several scrapers (or a fast
        # one) see a stable rate instead of resetting each other's interval.
        with self._lock:
            now = time.monotonic()
            if now - self._usage_at >= 1.0:
                self._usage = self._meter.read(self.server.bytes_in, self.server.bytes_out)
                self._usage_at = now
            return self._usage

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        from prometheus_client.utils import floatToGoString
        server = self.server
        m = server.metrics
        info = GaugeMetricFamily("pocket_server_info", "The server's role and address (always 1)",
                                 labels=["role", "address"])
        info.add_metric([server.role, server.address], 1)
        yield info
        yield GaugeMetricFamily("pocket_uptime_seconds", "Seconds since the server started",
                                value=time.monotonic() - server.started_at)
        if m is not None:
            requests, errors = list(m.requests), list(m.errors)
            bytes_in, bytes_out = list(m.bytes_in), list(m.bytes_out)
            sums, latency = list(m.latency_sum), list(m.latency)
            seen = [op for op in range(_OPCODES)
                    if requests[op] or errors[op] or bytes_out[op] or latency[op] is not None]
            families = [
                (CounterMetricFamily("pocket_requests", "Requests handled, by operation",
                                     labels=["op"]), requests),
                (CounterMetricFamily("pocket_request_errors",
                                     "Requests answered with an error, by operation",
                                     labels=["op"]), errors),
                (CounterMetricFamily("pocket_request_bytes",
                                     "Payload bytes received with requests, by operation",
                                     labels=["op"]), bytes_in),
                (CounterMetricFamily("pocket_response_bytes",
                                     "Payload bytes sent in replies, by operation",
                                     labels=["op"]), bytes_out),
            ]
            for family, values in families:
                for op in seen:
                    family.add_metric([op_name(op)], values[op])
                yield family
            hist = HistogramMetricFamily(
                "pocket_request_duration_seconds",
                "Time from a request being decoded to its reply being handed to the transport",
                labels=["op"])
            bounds = [floatToGoString(b) for b in LATENCY_BOUNDS] + ["+Inf"]
            for op in seen:
                counts = latency[op]
                if counts is None:
                    continue
                cumulative, total = [], 0
                for bound, count in zip(bounds, list(counts)):
                    total += count
                    cumulative.append((bound, total))
                hist.add_metric([op_name(op)], cumulative, sum_value=sums[op])
            yield hist
        yield CounterMetricFamily("pocket_protocol_errors",
                                  "Connections closed for a malformed frame",
                                  value=server.protocol_errors)
        yield GaugeMetricFamily("pocket_connections", "Client connections open",
                                value=len(server.connections))
        yield CounterMetricFamily("pocket_network_received_bytes",
                                  "Bytes received on client connections",
                                  value=server.bytes_in)
        yield CounterMetricFamily("pocket_network_sent_bytes", "Bytes sent on client connections",
                                  value=server.bytes_out)
        usage = self._utilisation()
        yield GaugeMetricFamily("pocket_cpu_share",
                                "CPU seconds per second used by this process (1 = one core)",
                                value=usage["cpu"])
        yield GaugeMetricFamily("pocket_network_in_bytes_per_second",
                                "Bytes received per second", value=usage["net_in"])
        yield GaugeMetricFamily("pocket_network_out_bytes_per_second",
                                "Bytes sent per second", value=usage["net_out"])
        try:
            gauges = server.metric_gauges()
        except Exception as exc:  # a scrape must not fail on one role's gauges
            log.warning("%s: metric gauges failed: %s", server.role, exc)
            gauges = []
        for name, doc, labels, samples in gauges:
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            for label_values, value in samples:
                family.add_metric(list(label_values), value)
            yield family


def start_exporter(server: "Server", host: str, port: int) -> tuple[Any, str]:
    """Serve ``server``'s metrics over HTTP on ``host:port`` (0: a free port) from a daemon
    thread; return the HTTP server (for :func:`stop_exporter`) and its ``host:port``."""
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
    registry = CollectorRegistry(auto_describe=False)  # one per server: tests run several
    registry.register(ServerCollector(server))
    ProcessCollector(registry=registry)
    httpd, _thread = start_http_server(port, addr=host, registry=registry)
    bound = httpd.server_address
    return httpd, format_address(host, bound[1])


def stop_exporter(httpd: Any) -> None:
    """Stop an exporter started by :func:`start_exporter` (blocks up to its poll interval)."""
    httpd.shutdown()
    httpd.server_close()
