"""A storage or metadata server's link to the controller: announce, then heartbeat.

The link keeps trying while the controller is away (it may start later, or
restart), and re-announces itself when the controller no longer knows it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable, Optional

from .connection import AsyncConnection
from .errors import NotFound, PocketError
from .protocol import Op
from .security import ClusterKey

log = logging.getLogger("pocket.node")


class UsageMeter:
    """CPU share and network bytes/s of this process since the last reading."""

    def __init__(self) -> None:
        self._last = (time.monotonic(), self._cpu(), 0, 0)

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system

    def read(self, bytes_in: int, bytes_out: int) -> dict:
        now, cpu = time.monotonic(), self._cpu()
        then, cpu0, in0, out0 = self._last
        self._last = (now, cpu, bytes_in, bytes_out)
        dt = max(now - then, 1e-6)
        return {"cpu": (cpu - cpu0) / dt, "net_in": (bytes_in - in0) / dt,
                "net_out": (bytes_out - out0) / dt}


def registration_signed(fields: dict) -> tuple:
    """The fields of a NODE_REGISTER its signature covers: who the node is, where it
    listens, the id it asks to keep and (metadata) the instance that owns its extents."""
    return fields.get("role"), fields.get("addr"), fields.get("node"), fields.get("owner")


class ControllerLink:
    """Registers a node with the controller and sends heartbeats every ``interval``."""

    def __init__(self, controller: str, registration: Callable[[], dict],
                 heartbeat: Callable[[], dict], interval: float = 1.0,
                 server: Any = None) -> None:
        self.controller = controller
        #: The server whose cluster key signs the registration or is set from the reply.
        self.server = server
        self.registration = registration
        self.heartbeat = heartbeat
        self.interval = interval
        self.node_id: Optional[str] = None
        #: The id this node had before the controller forgot it; asked for again.
        self.previous_id: Optional[str] = None
        self.registered = asyncio.Event()
        self._conn: Optional[AsyncConnection] = None
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _connection(self) -> AsyncConnection:
        if self._conn is None or self._conn.closed:
            self._conn = await AsyncConnection.open(self.controller, timeout=5.0)
        return self._conn

    async def _run(self) -> None:
        warned = False
        while True:
            try:
                conn = await self._connection()
                if self.node_id is None:
                    reply = await conn.request(Op.NODE_REGISTER, self._signed_registration(),
                                               timeout=10.0)
                    self._take_key(reply.header)
                    self.node_id = reply.header["node"]
                    self.registered.set()
                    log.info("registered with controller %s as %s", self.controller, self.node_id)
                    warned = False
                stats = self.heartbeat()
                stats["node"] = self.node_id
                # A short timeout: a heartbeat stuck in a partition must not delay this
                # node's return (and re-registration) long after the link healed.
                await conn.request(Op.NODE_HEARTBEAT, stats, timeout=max(3.0, 3 * self.interval))
            except NotFound:
                log.warning("controller %s forgot this node; registering again", self.controller)
                self.previous_id = self.node_id
                self.node_id = None
                self.registered.clear()
                continue
            except (PocketError, OSError) as exc:
                if not warned:
                    log.warning("controller %s unreachable (%s); retrying", self.controller, exc)
                    warned = True
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            except asyncio.CancelledError:
                raise
            await asyncio.sleep(self.interval)

    def _signed_registration(self) -> dict:
        fields = self.registration()
        if self.previous_id is not None:  # keep our id (and our jobs) if the controller can
            fields["node"] = self.previous_id
        metrics = getattr(self.server, "metrics_address", None)
        if metrics is not None:  # where Prometheus scrapes this node (``pocket status``)
            fields["metrics"] = metrics
        key = getattr(self.server, "key", None)
        if key is not None and not key.generated:  # prove we hold the configured secret
            fields["auth"] = key.sign(Op.NODE_REGISTER, *registration_signed(fields))
        return fields

    def _take_key(self, reply: dict) -> None:
        """A loopback cluster's key comes with the registration reply (see pocket.security)."""
        secret = reply.get("secret")
        if self.server is None or not isinstance(secret, bytes):
            return
        key = self.server.key
        if key is None or (key.generated and key.secret != secret):
            self.server.key = ClusterKey(secret, generated=True)
        elif not key.generated and key.secret != secret:
            log.warning("the controller uses a different cluster secret than this server's")

    async def leave(self) -> None:
        """Tell the controller this node is going away (best effort)."""
        if self._task is not None:
            self._task.cancel()
        if self.node_id is not None:
            try:
                conn = await self._connection()
                await conn.request(Op.NODE_LEAVE, {"node": self.node_id}, timeout=2.0)
            except (PocketError, OSError):
                pass
        if self._conn is not None:
            self._conn.close()
