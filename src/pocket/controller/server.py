"""The controller: registers nodes and jobs, hands out weight maps, watches heartbeats."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..connection import AsyncConnection
from ..errors import AccessDenied, InvalidRequest, NotFound, PocketError, Unavailable
from ..protocol import Frame, Limits, Op
from ..server import Server, ServerConnection
from ..storage.server import TIERS
from .policy import expired, job_slug, least_loaded, normalise_hints, weights_by_free_capacity

log = logging.getLogger("pocket.controller")


@dataclass
class NodeRecord:
    """What the controller knows of one storage or metadata server."""

    id: str
    role: str
    tier: str
    address: str
    capacity: int
    used: int = 0
    cpu: float = 0.0
    net_in: float = 0.0
    net_out: float = 0.0
    state: str = "active"
    registered: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    info: dict = field(default_factory=dict)


@dataclass
class JobRecord:
    """A registered job (kept after deregistration while persisted objects remain)."""

    id: str
    name: str
    token: str
    tier: str
    metadata: str
    hints: dict
    weights: dict
    state: str = "active"
    registered: float = field(default_factory=time.time)
    deregistered: Optional[float] = None


class ControllerServer(Server):
    """The control plane of one Pocket cluster."""

    role = "controller"

    def __init__(self, host: str = "127.0.0.1", port: int = 7070, *,
                 node_timeout: float = 5.0) -> None:
        super().__init__(host, port, Limits(max_header=1 << 20, max_payload=0))
        self.node_timeout = node_timeout
        self.nodes: dict[str, NodeRecord] = {}
        self.jobs: dict[str, JobRecord] = {}
        self._md_conns: dict[str, AsyncConnection] = {}
        self._monitor: Optional[asyncio.Task] = None
        self.handlers.update({
            Op.NODE_REGISTER: self.handle_node_register,
            Op.NODE_HEARTBEAT: self.handle_heartbeat,
            Op.NODE_LEAVE: self.handle_node_leave,
            Op.JOB_REGISTER: self.handle_job_register,
            Op.JOB_DEREGISTER: self.handle_job_deregister,
            Op.JOB_ATTACH: self.handle_job_attach,
            Op.STATUS: self.handle_status,
        })

    # -- nodes ---------------------------------------------------------------
    def handle_node_register(self, conn: ServerConnection, frame: Frame) -> dict:
        h = frame.header
        role = h["role"]
        if role not in ("storage", "metadata"):
            raise InvalidRequest(f"unknown role {role!r}")
        tier = str(h.get("tier", "metadata" if role == "metadata" else "dram"))
        prefix = "md" if role == "metadata" else tier
        node_id = f"{prefix}-{secrets.token_hex(3)}"
        capacity = h.get("capacity", 0)
        if not isinstance(capacity, int) or capacity < 0:
            raise InvalidRequest("capacity must be a non-negative integer")
        self.nodes[node_id] = NodeRecord(
            node_id, role, tier, str(h["addr"]), capacity,
            info={k: v for k, v in h.items() if k not in ("role", "tier", "addr", "capacity")})
        log.info("%s server %s registered at %s (%s, %d bytes)", role, node_id, h["addr"], tier,
                 capacity)
        return {"node": node_id}

    def handle_heartbeat(self, conn: ServerConnection, frame: Frame) -> None:
        h = frame.header
        node = self.nodes.get(h["node"])
        if node is None:
            raise NotFound("unknown node; register again")
        node.last_seen = time.monotonic()
        node.used = int(h.get("used", node.used))
        node.capacity = int(h.get("capacity", node.capacity))
        node.cpu = float(h.get("cpu", 0.0))
        node.net_in = float(h.get("net_in", 0.0))
        node.net_out = float(h.get("net_out", 0.0))
        for key in ("jobs", "dev_read", "dev_write", "direct_io", "extents"):
            if key in h:
                node.info[key] = h[key]
        return None

    def handle_node_leave(self, conn: ServerConnection, frame: Frame) -> None:
        node = self.nodes.pop(frame.header["node"], None)
        if node is not None:
            log.info("%s server %s left", node.role, node.id)
            self._drop_md_conn(node.id)
        return None

    def _drop_md_conn(self, node_id: str) -> None:
        conn = self._md_conns.pop(node_id, None)
        if conn is not None:
            conn.close()

    async def _md_request(self, node_id: str, opcode: int, header: dict) -> Frame:
        node = self.nodes.get(node_id)
        if node is None:
            raise Unavailable(f"metadata server {node_id} is gone")
        conn = self._md_conns.get(node_id)
        if conn is None or conn.closed:
            conn = await AsyncConnection.open(node.address, timeout=5.0)
            self._md_conns[node_id] = conn
        return await conn.request(opcode, header, timeout=10.0)

    # -- jobs ----------------------------------------------------------------
    def _job(self, header: dict) -> JobRecord:
        job = self.jobs.get(header.get("job"))
        token = header.get("tok")
        if job is None or not isinstance(token, str) or not hmac.compare_digest(job.token, token):
            raise AccessDenied("unknown job or wrong token")
        return job

    def _active(self, role: str, tier: Optional[str] = None) -> list[NodeRecord]:
        return [n for n in self.nodes.values()
                if n.role == role and n.state == "active" and (tier is None or n.tier == tier)]

    async def handle_job_register(self, conn: ServerConnection, frame: Frame) -> dict:
        h = frame.header
        name = h.get("name")
        if not isinstance(name, str) or not name or len(name) > 128:
            raise InvalidRequest("a job needs a name of 1 to 128 characters")
        try:
            hints = normalise_hints(h.get("hints") or {})
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        tier = h.get("tier") or "dram"
        if tier not in TIERS:
            raise InvalidRequest(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
        metadata = self._active("metadata")
        if not metadata:
            raise Unavailable("no metadata server has registered with the controller")
        load = {m.id: sum(1 for j in self.jobs.values() if j.metadata == m.id and j.state == "active")
                for m in metadata}
        md = least_loaded([m.id for m in metadata], load)
        storage = self._active("storage", tier)
        if not storage:
            raise Unavailable(f"no {tier} storage server has registered with the controller")
        weights = weights_by_free_capacity({n.id: n.capacity - n.used for n in storage})
        job_id = f"{job_slug(name)}-{secrets.token_hex(4)}"
        token = secrets.token_urlsafe(24)
        await self._md_request(md, Op.JOB_ADD, {
            "job": job_id, "tok": token, "name": name, "tier": tier, "weights": weights,
            "nodes": {n.id: n.address for n in storage}})
        self.jobs[job_id] = JobRecord(job_id, name, token, tier, md, hints, weights)
        log.info("job %s registered: tier %s, metadata %s, weights %s", job_id, tier, md, weights)
        return self._job_reply(self.jobs[job_id])

    def _job_reply(self, job: JobRecord) -> dict:
        md = self.nodes.get(job.metadata)
        if md is None:
            raise Unavailable(f"the metadata server of job {job.id} is gone")
        return {"job": job.id, "tok": job.token, "name": job.name, "md": md.address,
                "tier": job.tier, "weights": job.weights,
                "inline_max": md.info.get("inline_max", 64 << 10)}

    def handle_job_attach(self, conn: ServerConnection, frame: Frame) -> dict:
        return self._job_reply(self._job(frame.header))

    async def handle_job_deregister(self, conn: ServerConnection, frame: Frame) -> dict:
        job = self._job(frame.header)
        if job.state != "active":
            return {"freed": 0, "kept": None}
        try:
            reply = await self._md_request(job.metadata, Op.JOB_REMOVE, {"job": job.id})
        except NotFound:
            reply = None
        job.state = "deregistered"
        job.deregistered = time.time()
        log.info("job %s deregistered", job.id)
        return reply.header if reply is not None else {"freed": 0, "kept": 0}

    # -- status --------------------------------------------------------------
    def status(self) -> dict:
        """The cluster as plain data: nodes and jobs."""
        now = time.monotonic()
        nodes = []
        job_bytes: dict[str, dict] = {}
        for n in self.nodes.values():
            nodes.append({"id": n.id, "role": n.role, "tier": n.tier, "address": n.address,
                          "state": n.state, "capacity": n.capacity, "used": n.used,
                          "cpu": round(n.cpu, 3), "net_in": round(n.net_in),
                          "net_out": round(n.net_out), "age": round(now - n.last_seen, 2),
                          **{k: n.info[k] for k in ("dev_read", "dev_write", "direct_io")
                             if k in n.info}})
            job_bytes.update(n.info.get("jobs", {}))
        jobs = []
        for j in self.jobs.values():
            usage = job_bytes.get(j.id, {})
            if j.state != "active" and not usage.get("objects"):
                continue
            md = self.nodes.get(j.metadata)
            jobs.append({"id": j.id, "name": j.name, "state": j.state, "tier": j.tier,
                         "metadata": md.address if md else None, "metadata_id": j.metadata,
                         "weight_map": j.weights, "hints": j.hints,
                         "objects": usage.get("objects", 0), "bytes": usage.get("bytes", 0)})
        return {"controller": self.address, "nodes": nodes, "jobs": jobs}

    def handle_status(self, conn: ServerConnection, frame: Frame) -> dict:
        return self.status()

    async def _watch(self) -> None:
        """Forget nodes that stopped sending heartbeats."""
        while True:
            await asyncio.sleep(min(1.0, self.node_timeout / 3))
            seen = {n.id: n.last_seen for n in self.nodes.values()}
            for node_id in expired(seen, time.monotonic(), self.node_timeout):
                node = self.nodes.pop(node_id)
                log.warning("%s server %s missed heartbeats for %.1fs; dropped", node.role,
                            node_id, self.node_timeout)
                self._drop_md_conn(node_id)

    async def on_start(self) -> None:
        self._monitor = asyncio.get_running_loop().create_task(self._watch())

    async def on_stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        for conn in self._md_conns.values():
            conn.close()
