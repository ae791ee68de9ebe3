"""One server base for all three roles: listen, dispatch by opcode, shut down cleanly.

A role subclasses :class:`Server`, fills ``self.handlers`` (opcode → handler)
and may override :meth:`Server.sink` to receive payloads into their final
buffers.  A handler is ``handler(conn, frame)`` and returns ``None``, a header
dict, or ``(header, payload)``; it may also return a coroutine, which then runs
as a task (so fast handlers pay no task overhead).  A request error raised by a
handler becomes an error reply; a malformed frame closes that connection only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from time import perf_counter
from typing import Any, Callable, Optional

from .errors import InvalidRequest, PocketError, ProtocolError
from .protocol import (FLAG_NO_REPLY, FLAG_REPLY, DEFAULT_LIMITS, Frame, FrameReader, Limits,
                       Op, OP_NAMES, encode_error, encode_frame)
from .security import ClusterKey, require_secret_for
from .units import format_address, parse_address, parse_duration

log = logging.getLogger("pocket.server")

Handler = Callable[["ServerConnection", Frame], Any]

#: Returned by an async handler that has already sent its reply itself.
REPLIED = object()


class ServerConnection(asyncio.BufferedProtocol):
    """One accepted connection: feeds the codec, dispatches frames, sends replies."""

    def __init__(self, server: "Server") -> None:
        self.server = server
        self.reader = FrameReader(server.limits, sink=self._sink)
        self.transport: Optional[asyncio.Transport] = None
        self.peer = "?"
        #: Reply parts collected while a batch of pipelined requests is dispatched.
        self._batch: Optional[list] = None
        #: When bytes last arrived (a peer stalled mid-frame is cut off).
        self.last_data = time.monotonic()

    def _sink(self, opcode: int, flags: int, rid: int, header: dict, size: int):
        return self.server.sink(self, opcode, flags, rid, header, size)

    # -- asyncio protocol ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = format_address(*peer[:2]) if peer else "?"
        self.server.connections.add(self)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.server.connections.discard(self)
        self.server.connection_closed(self)
        self.transport = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        server = self.server
        server.bytes_in += nbytes
        self.last_data = time.monotonic()
        reader = self.reader
        try:
            reader.buffer_updated(nbytes)
        except Exception as exc:  # ProtocolError, or a sink refusing the frame
            self._protocol_failure(exc)
            return
        frames = reader._frames
        if not frames:
            return
        if len(frames) == 1:
            server.dispatch(self, frames.popleft())
            return
        # Several requests arrived together (a pipelining client): answer them
        # with one write instead of one syscall per reply.
        self._batch = batch = []
        try:
            while frames:
                server.dispatch(self, frames.popleft())
        finally:
            self._batch = None
        if batch:
            self.send(batch)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        # The peer reads slower than we answer: stop reading its requests
        # until our replies drain, so nothing buffers without bound.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- replies -------------------------------------------------------------
    def send(self, parts: list) -> None:
        if self._batch is not None:
            self._batch.extend(parts)
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if len(parts) == 1:
            transport.write(parts[0])
            self.server.bytes_out += len(parts[0])
        else:
            transport.writelines(parts)
            self.server.bytes_out += sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)

    def reply(self, frame: Frame, result: Any) -> None:
        if frame.flags & FLAG_NO_REPLY:
            return
        if result is None:
            header, payload = None, None
        elif isinstance(result, tuple):
            header, payload = result
            metrics = self.server.metrics
            if metrics is not None and payload is not None:
                metrics.bytes_out[frame.opcode] += len(payload)
        else:
            header, payload = result, None
        self.send(encode_frame(frame.opcode, frame.request_id, header, payload, FLAG_REPLY))

    def reply_error(self, frame: Frame, exc: PocketError) -> None:
        if frame.flags & FLAG_NO_REPLY:
            return
        self.send(encode_error(frame.opcode, frame.request_id, exc.code, str(exc)))

    def _protocol_failure(self, exc: Exception) -> None:
        self.server.protocol_errors += 1
        log.warning("%s: closing connection from %s: %s", self.server.role, self.peer, exc)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Server:
    """The base of the controller, metadata and storage servers."""

    role = "server"

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.host = host
        self.port = port
        self.limits = limits
        self.handlers: dict[int, Handler] = {Op.PING: self.handle_ping}
        self.connections: set[ServerConnection] = set()
        self.tasks: set[asyncio.Task] = set()
        self.bytes_in = 0
        self.bytes_out = 0
        self.requests = 0
        self.protocol_errors = 0
        self.started_at = time.monotonic()
        #: ``--metrics-port``: None (off), 0 (a free port) or a port; set before :meth:`start`.
        self.metrics_port: Optional[int] = None
        #: Request counters (a ``pocket.metrics.RequestMetrics``) while metrics are on, else None.
        self.metrics: Any = None
        #: ``host:port`` of the Prometheus exporter once started.
        self.metrics_address: Optional[str] = None
        self._metrics_http: Any = None
        self._server: Optional[asyncio.base_events.Server] = None
        self._stopping = False
        #: A connection holding part of a frame with no new bytes for this long is closed.
        self.frame_timeout = 60.0
        self._sweeper_task: Optional[asyncio.Task] = None
        #: The cluster key: configured (``use_secret``), made by the controller, or
        #: received from it at registration (loopback clusters); None until then.
        self.key: Optional[ClusterKey] = None

    def use_secret(self, secret: Optional[bytes]) -> None:
        """Use a configured cluster secret (None: loopback only, key from the controller)."""
        self.key = ClusterKey(secret) if secret is not None else None

    @property
    def address(self) -> str:
        """The bound ``host:port`` (valid after :meth:`start`)."""
        return format_address(self.host, self.port)

    # -- overridable ---------------------------------------------------------
    def sink(self, conn: ServerConnection, opcode: int, flags: int, rid: int,
             header: dict, size: int) -> Optional[memoryview]:
        """Return the final buffer for a payload, or None to receive it as bytes."""
        return None

    async def on_start(self) -> None:
        """Called once listening; start background tasks here."""

    def connection_closed(self, conn: ServerConnection) -> None:
        """Called when a client connection is gone."""

    async def on_stop(self) -> None:
        """Called on shutdown, after in-flight requests finished."""

    def handle_ping(self, conn: ServerConnection, frame: Frame) -> dict:
        return {"role": self.role}

    def metric_gauges(self) -> list:
        """The role's own gauges for a Prometheus scrape (runs in the exporter's thread: read
        only ints and ``len()`` of containers here): a list of ``(name, help, label names,
        [(label values, value), ...])``."""
        return []

    # -- dispatch ------------------------------------------------------------
    def dispatch(self, conn: ServerConnection, frame: Frame) -> None:
        self.requests += 1
        metrics = self.metrics  # None unless --metrics-port: then plain list increments only
        started = perf_counter() if metrics is not None else 0.0
        handler = self.handlers.get(frame.opcode)
        if handler is None or frame.flags & FLAG_REPLY:
            conn.reply_error(frame, InvalidRequest(
                f"{self.role} does not handle opcode {frame.opcode}"))
            if metrics is not None:
                metrics.errors[frame.opcode] += 1
                metrics.record(frame.opcode, len(frame.payload), perf_counter() - started)
            return
        try:
            result = handler(conn, frame)
        except Exception as exc:
            conn.reply_error(frame, self._as_request_error(frame, exc))
            if metrics is not None:
                metrics.errors[frame.opcode] += 1
                metrics.record(frame.opcode, len(frame.payload), perf_counter() - started)
            return
        if asyncio.iscoroutine(result):
            task = asyncio.get_running_loop().create_task(
                self._finish(conn, frame, result, started))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            conn.reply(frame, result)
            if metrics is not None:
                metrics.record(frame.opcode, len(frame.payload), perf_counter() - started)

    async def _finish(self, conn: ServerConnection, frame: Frame, coro: Any,
                      started: float = 0.0) -> None:
        failed = False
        try:
            result = await coro
        except Exception as exc:
            failed = True
            conn.reply_error(frame, self._as_request_error(frame, exc))
        else:
            if result is not REPLIED:
                conn.reply(frame, result)
        metrics = self.metrics
        if metrics is not None:
            if failed:
                metrics.errors[frame.opcode] += 1
            metrics.record(frame.opcode, len(frame.payload), perf_counter() - started)

    def _as_request_error(self, frame: Frame, exc: Exception) -> PocketError:
        if isinstance(exc, PocketError) and not isinstance(exc, ProtocolError):
            return exc
        if isinstance(exc, (KeyError, TypeError, ValueError, AttributeError, IndexError)):
            return InvalidRequest(f"bad {OP_NAMES.get(frame.opcode, frame.opcode)} request: "
                                  f"{type(exc).__name__}: {exc}")
        log.exception("%s: internal error in %s", self.role, OP_NAMES.get(frame.opcode))
        return PocketError(f"internal error: {type(exc).__name__}: {exc}")

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        configured = self.key.secret if self.key is not None and not self.key.generated else None
        require_secret_for(self.host, configured, self.role)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ServerConnection(self), self.host, self.port, reuse_address=True)
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = sockname[0], sockname[1]
        if self.metrics_port is not None:
            self._start_metrics()
        self._sweeper_task = loop.create_task(self._cut_stalled_frames())
        await self.on_start()

    def _start_metrics(self) -> None:
        """Start counting requests and serve them to Prometheus on ``metrics_port``."""
        from .metrics import RequestMetrics, start_exporter
        try:
            self._metrics_http, self.metrics_address = start_exporter(
                self, self.host, self.metrics_port or 0)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on "
                          f"{format_address(self.host, self.metrics_port or 0)}: "
                          f"{exc.strerror}") from None
        self.metrics = RequestMetrics()
        log.info("%s: Prometheus metrics on http://%s/metrics", self.role, self.metrics_address)

    def stalled(self, now: float) -> list[ServerConnection]:
        """Connections holding part of a frame with no bytes for ``frame_timeout`` seconds
        (a peer that is paused by our backpressure is not stalled)."""
        return [c for c in self.connections
                if c.reader.buffered and now - c.last_data > self.frame_timeout
                and c.transport is not None and c.transport.is_reading()]

    async def _cut_stalled_frames(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, min(5.0, self.frame_timeout / 4)))
            for conn in self.stalled(time.monotonic()):
                log.warning("%s: closing connection from %s: no bytes for %.0fs in the middle "
                            "of a frame", self.role, conn.peer, self.frame_timeout)
                conn.transport.abort()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (up to ``grace`` s), close."""
        if self._stopping:
            return
        self._stopping = True
        if self._sweeper_task is not None:
            self._sweeper_task.cancel()
        if self._server is not None:
            self._server.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
        try:
            await asyncio.wait_for(self.on_stop(), timeout=grace)
        except Exception as exc:  # shutdown must go on
            log.warning("%s: error during shutdown: %s", self.role, exc)
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), timeout=1.0)
            except (asyncio.TimeoutError, Exception):
                pass
        if self._metrics_http is not None:
            from .metrics import stop_exporter
            httpd, self._metrics_http = self._metrics_http, None
            await asyncio.get_running_loop().run_in_executor(None, stop_exporter, httpd)


# -- command-line plumbing shared by the three roles ---------------------------

def env_default(name: str, default: Any) -> Any:
    """The ``POCKET_<NAME>`` environment variable, else ``default``."""
    return os.environ.get("POCKET_" + name.upper().replace("-", "_"), default)


def common_arguments(parser: argparse.ArgumentParser, default_listen: str) -> None:
    """Flags every role has; each may also be set as ``POCKET_<FLAG>``."""
    parser.add_argument("--listen", default=env_default("listen", default_listen),
                        help=f"address to listen on, HOST:PORT; port 0 picks a free one "
                             f"(default {default_listen}, env POCKET_LISTEN)")
    parser.add_argument("--secret-file", default=None,
                        help="file holding the cluster secret shared by controller, metadata and "
                             "storage servers (env POCKET_SECRET_FILE, or the secret itself in "
                             "POCKET_SECRET); required to listen on a non-loopback address; "
                             "without one, loopback servers get a key from the controller")
    parser.add_argument("--frame-timeout", default=env_default("frame_timeout", "60s"),
                        help="close a connection that stops sending in the middle of a frame "
                             "for this long (default 60s)")
    parser.add_argument("--log-level", default=env_default("log_level", "INFO"),
                        help="DEBUG, INFO, WARNING or ERROR (default INFO, env POCKET_LOG_LEVEL)")
    parser.add_argument("--metrics-port", type=parse_metrics_port,
                        default=env_default("metrics_port", None),
                        help="serve Prometheus metrics over HTTP on this port of the listen "
                             "host, 0 picks a free one (printed with the listening address); "
                             "default off (env POCKET_METRICS_PORT)")


def parse_metrics_port(text: Any) -> Optional[int]:
    """``--metrics-port``: None for off (also ``off``, ``none`` or empty), else 0..65535."""
    if text is None or str(text).strip().lower() in ("", "off", "none"):
        return None
    try:
        port = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def configure_secret(server: Server, secret_file: Optional[str]) -> None:
    """Load the cluster secret (flag or environment) into ``server``; ValueError if it is
    missing where one is required (a non-loopback listener) or unreadable."""
    from .security import load_secret
    try:
        secret = load_secret(secret_file)
    except OSError as exc:
        raise ValueError(f"cannot read the cluster secret: {exc}") from None
    server.use_secret(secret)
    require_secret_for(server.host, secret, server.role)


def apply_common_arguments(server: Server, args: argparse.Namespace) -> None:
    """Apply the flags :func:`common_arguments` added: the cluster secret, the frame timeout
    and the metrics port.  ValueError for a bad value, like the role's own flags."""
    configure_secret(server, args.secret_file)
    server.frame_timeout = parse_duration(args.frame_timeout)
    server.metrics_port = args.metrics_port


def run_server(server: Server, announce: Callable[[Server], str] | None = None) -> int:
    """Run ``server`` until SIGTERM/SIGINT; print the bound address once listening."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # uvloop is a dependency; this only guards odd platforms
        log.warning("uvloop not available; using the default asyncio loop")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        line = announce(server) if announce else f"pocket {server.role} listening on {server.address}"
        if server.metrics_address is not None:
            line += f" (metrics on {server.metrics_address})"
        print(line, flush=True)
        await stop.wait()
        log.info("%s: shutting down", server.role)
        await server.stop()

    asyncio.run(main())
    return 0


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO), stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def split_listen(text: str) -> tuple[str, int]:
    return parse_address(text, default_port=0)
