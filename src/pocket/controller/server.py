"""The controller: registers nodes and jobs, rightsizes them, hands out weight maps, accounts.

Rightsizing is the pure planner (``planner.py``): hints → allocation → packed
slices → weight map.  This module is the shell around it: it keeps the
allocation ledger in step with the nodes that register and leave, asks the
node provider for nodes when a tier is short, tells the job's metadata server
its weight map and spill tiers, and integrates each job's cost.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Optional

from ..connection import AsyncConnectionCache
from ..node import registration_signed
from ..errors import AccessDenied, InvalidRequest, NotFound, PocketError, Unavailable
from ..protocol import Frame, Limits, Op
from ..replication import check_replicas
from ..server import Server, ServerConnection
from ..storage.server import MAX_OWNER_LEN, MAX_REPORTED_OWNERS, TIERS
from ..units import format_size
from .planner import (DEFAULT_CONFIG, DEFAULT_PROFILES, TIER_ORDER, Allocation, AllocationLedger,
                      JobUsage, NodeLoad, NodeProfile, Packing, PlannerConfig, Slice,
                      allocation_rates, format_rate, nodes_needed, pack_allocation,
                      pack_replicated, plan_allocation, spread_allocation, weight_map)
from .policy import expired, job_slug, least_loaded, normalise_hints, weights_by_free_capacity
from .autoscale import ScalingPolicy
from .monitor import AutoscaleMonitor
from .provider import NodeProvider, NoProvider
from .reclaim import DEFAULT_RECLAIM_AFTER, OwnerWatch

log = logging.getLogger("pocket.controller")

#: A node whose heartbeat connection closed is dropped if no heartbeat comes within this.
LINK_GRACE = 1.5
#: Longest node id a re-registering node may ask to keep.
MAX_NODE_ID = 32


@dataclass
class NodeRecord:
    """What the controller knows of one storage or metadata server."""

    id: str
    role: str
    tier: str
    address: str
    capacity: int
    throughput: float = 0.0
    price: float = 0.0
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
    allocation: Optional[Allocation] = None
    #: Fraction of the allocation overcommitted on existing nodes (no provider could help).
    overcommitted: float = 0.0
    usage: JobUsage = field(default_factory=lambda: JobUsage(time.monotonic()))
    spill: list = field(default_factory=list)
    #: Copies of each large object, on distinct storage servers (1 or 2).
    replicas: int = 1


class ControllerServer(Server):
    """The control plane of one Pocket cluster."""

    role = "controller"

    def __init__(self, host: str = "127.0.0.1", port: int = 7070, *,
                 node_timeout: float = 3.0, profiles: Optional[dict[str, NodeProfile]] = None,
                 planner: PlannerConfig = DEFAULT_CONFIG,
                 provider: Optional[NodeProvider] = None,
                 provision_timeout: float = 30.0,
                 autoscale: Optional[ScalingPolicy] = None,
                 autoscale_interval: float = 1.0,
                 reclaim_after: float = DEFAULT_RECLAIM_AFTER,
                 migrate_on_drain: bool = False) -> None:
        super().__init__(host, port, Limits(max_header=1 << 20, max_payload=0))
        self.node_timeout = node_timeout
        self.profiles: dict[str, NodeProfile] = {**DEFAULT_PROFILES, **(profiles or {})}
        self.planner = planner
        self.provider: NodeProvider = provider if provider is not None else NoProvider()
        self.provision_timeout = provision_timeout
        self.nodes: dict[str, NodeRecord] = {}
        self.jobs: dict[str, JobRecord] = {}
        self.ledger = AllocationLedger()
        #: Addresses of nodes a provider is starting for a job → that job.
        self._pending: dict[str, str] = {}
        #: Metadata server → job registrations in progress that chose it (it must not leave).
        self._md_registering: dict[str, int] = {}
        self._joined = asyncio.Event()
        self._spill_refresh: Optional[asyncio.Task] = None
        self._md_conns = AsyncConnectionCache(connect_timeout=5.0)
        #: Dead metadata servers' extents on storage servers (see reclaim.py).
        self.owners = OwnerWatch(reclaim_after, time.monotonic())
        self._storage_conns = AsyncConnectionCache(connect_timeout=5.0)
        self._reclaiming: set[tuple[str, str]] = set()
        self._monitor: Optional[asyncio.Task] = None
        #: Autoscaling (``--autoscale``): None when off.
        self.autoscaler: Optional[AutoscaleMonitor] = (
            AutoscaleMonitor(self, autoscale, autoscale_interval, migrate=migrate_on_drain)
            if autoscale is not None
            else None)
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
        key_fields = self._admit_node(conn, h)
        tier = str(h.get("tier", "metadata" if role == "metadata" else "dram"))
        if role == "storage" and tier not in TIERS:
            raise InvalidRequest(f"unknown tier {tier!r}")
        prefix = "md" if role == "metadata" else tier
        node_id = f"{prefix}-{secrets.token_hex(3)}"
        previous = h.get("node")
        if (isinstance(previous, str) and previous.startswith(prefix + "-") and
                len(previous) <= MAX_NODE_ID and previous not in self.nodes):
            # A node coming back (its link blipped, or this controller restarted) keeps
            # its id, so the jobs whose metadata server it is find it again.
            node_id = previous
        capacity = h.get("capacity", 0)
        if not isinstance(capacity, int) or capacity < 0:
            raise InvalidRequest("capacity must be a non-negative integer")
        throughput = 0.0
        price = 0.0
        if role == "storage":
            # A node's profile: its own capacity and rate (from its flags), its tier's price.
            profile = self.profiles[tier]
            throughput = h.get("throughput", profile.throughput)
            if not isinstance(throughput, (int, float)) or throughput <= 0:
                raise InvalidRequest("throughput must be a positive number")
            price = profile.price
        address = str(h["addr"])
        self.nodes[node_id] = NodeRecord(
            node_id, role, tier, address, capacity, float(throughput), price,
            info={k: v for k, v in h.items()
                  if k not in ("role", "tier", "addr", "capacity", "throughput", "node", "auth")})
        if role == "storage":
            self.ledger.add_node(NodeLoad(node_id, tier, capacity, int(throughput), price,
                                          reserved_for=self._pending.get(address)))
            self._nodes_changed()
        else:  # wake the autoscaler waiting for a metadata server it started
            self._joined.set()
            self._joined = asyncio.Event()
        log.info("%s server %s registered at %s (%s, %d bytes)", role, node_id, address, tier,
                 capacity)
        return {"node": node_id, **key_fields}

    def _admit_node(self, conn: ServerConnection, h: dict) -> dict:
        """Check a registrant may join; a loopback cluster's key goes back with the reply.

        With a configured secret the node must sign its registration with it.
        Without one (the controller made a key; loopback only), the key is
        handed only to a process of this controller's own user, over loopback.
        """
        from ..security import ClusterKey, loopback_peer_uid
        if self.key is None:
            self.key = ClusterKey.generate()
        if not self.key.generated:
            self.key.check(h.get("auth"), Op.NODE_REGISTER, *registration_signed(h))
            return {}
        transport = conn.transport
        peer = transport.get_extra_info("peername") if transport else None
        local = transport.get_extra_info("sockname") if transport else None
        uid = loopback_peer_uid(peer[:2], local[:2]) if peer and local else None
        if uid != os.getuid():
            self.key.deny(f"node registration from {conn.peer}: not a loopback process of "
                          f"this user (configure a cluster secret to admit remote nodes)")
        return {"secret": self.key.secret}

    def handle_heartbeat(self, conn: ServerConnection, frame: Frame) -> None:
        h = frame.header
        node = self.nodes.get(h["node"])
        if node is None:
            raise NotFound("unknown node; register again")
        node.last_seen = time.monotonic()
        conn.node_id = node.id  # type: ignore[attr-defined]  # see connection_closed
        node.used = int(h.get("used", node.used))
        node.capacity = int(h.get("capacity", node.capacity))
        node.cpu = float(h.get("cpu", 0.0))
        node.net_in = float(h.get("net_in", 0.0))
        node.net_out = float(h.get("net_out", 0.0))
        for key in ("jobs", "dev_read", "dev_write", "direct_io", "extents"):
            if key in h:
                node.info[key] = h[key]
        self.ledger.set_capacity(node.id, node.capacity)
        if (self.autoscaler is not None and node.role == "storage" and node.state == "active"
                and time.time() - node.registered > 2.5 and self.autoscaler.above_band(node)):
            self.autoscaler.poke()  # react to a crossing now, not at the next tick
        if node.role == "metadata":
            owner = node.info.get("owner")
            if isinstance(owner, str):
                self.owners.alive((owner,), node.last_seen)
            if isinstance(h.get("jobs"), dict):
                self._end_lapsed_jobs(node.id, h["jobs"])
        elif isinstance(h.get("owners"), list):
            self._reclaim_dead_owners(node, h["owners"])
        return None

    # -- extents of dead metadata servers ------------------------------------------
    def _live_owners(self) -> set[str]:
        """Instance ids of the registered metadata servers."""
        return {n.info["owner"] for n in self.nodes.values()
                if n.role == "metadata" and isinstance(n.info.get("owner"), str)}

    def _reclaim_dead_owners(self, node: NodeRecord, reported: list) -> None:
        """A storage server holds extents of these owners: free those of dead ones."""
        owners = [o for o in reported[:MAX_REPORTED_OWNERS]
                  if isinstance(o, str) and 0 < len(o) <= MAX_OWNER_LEN]
        for owner in self.owners.reclaimable(owners, self._live_owners(), time.monotonic()):
            if (node.id, owner) in self._reclaiming:
                continue
            self._reclaiming.add((node.id, owner))
            task = asyncio.get_running_loop().create_task(self._send_reclaim(node, owner))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send_reclaim(self, node: NodeRecord, owner: str) -> None:
        try:
            if self.key is None:
                return
            conn = await self._storage_conns.get(node.address)
            silent = round(self.owners.silent_for(owner, time.monotonic()), 3)
            reply = await conn.request(Op.EXT_RECLAIM, {
                "owner": owner, "silent": silent,
                "auth": self.key.sign(Op.EXT_RECLAIM, owner, silent)}, timeout=10.0)
            log.warning("metadata server instance %s silent for over %.0fs: storage server %s "
                        "freed its %s extents (%s bytes)", owner, self.owners.grace, node.id,
                        reply.header.get("extents"), reply.header.get("freed"))
        except (PocketError, OSError) as exc:  # tried again at its next heartbeat
            log.warning("could not reclaim the extents of metadata server instance %s on %s: "
                        "%s", owner, node.id, exc)
        except Exception:  # a malformed reply: logged here, tried again at the next heartbeat
            log.exception("reclaiming metadata server instance %s on %s failed", owner, node.id)
        finally:
            self._reclaiming.discard((node.id, owner))

    def _end_lapsed_jobs(self, md_id: str, jobs: dict) -> None:
        """Jobs their metadata server reclaimed (lease expired: the driver died without
        deregistering) end here too: their allocation goes back, their cost stops."""
        for job_id, info in jobs.items():
            job = self.jobs.get(job_id)
            if (job is not None and job.state == "active" and job.metadata == md_id and
                    isinstance(info, dict) and info.get("active") is False):
                self.ledger.release(job.id)
                if self.autoscaler is not None:
                    self.autoscaler.job_left(job.tier)
                job.usage.ended = time.monotonic()
                job.state = "expired"
                job.deregistered = time.time()
                log.warning("job %s: its lease expired on metadata server %s; allocation "
                            "released", job.id, md_id)

    def handle_node_leave(self, conn: ServerConnection, frame: Frame) -> None:
        node = self.nodes.pop(frame.header["node"], None)
        if node is not None:
            log.info("%s server %s left", node.role, node.id)
            self._forget_node(node)
        return None

    def _forget_node(self, node: NodeRecord) -> None:
        self._md_conns.drop(node.address)
        if node.role == "storage":
            self.ledger.remove_node(node.id)
            self._drop_from_weight_maps(node.id)
            self._nodes_changed()

    # -- node death (heartbeat link lost) ------------------------------------------
    def connection_closed(self, conn: ServerConnection) -> None:
        """A node's heartbeat connection closed: if it does not come back within
        LINK_GRACE (its link reconnects within one heartbeat), it is dead (kill -9, crash):
        drop it now rather than after --node-timeout."""
        node_id = getattr(conn, "node_id", None)
        if node_id in self.nodes and not self._stopping:
            lost_at = time.monotonic()
            asyncio.get_running_loop().call_later(LINK_GRACE, self._drop_if_silent, node_id,
                                                  lost_at)

    def _drop_if_silent(self, node_id: str, lost_at: float) -> None:
        node = self.nodes.get(node_id)
        if node is not None and node.last_seen <= lost_at:
            del self.nodes[node_id]
            log.warning("%s server %s: heartbeat link lost and not back within %.1fs; dropped",
                        node.role, node_id, LINK_GRACE)
            self._forget_node(node)

    def _drop_from_weight_maps(self, node_id: str) -> None:
        """Take a dead node out of every active job's weight map (renormalised) and push
        the new maps to the metadata servers (JOB_UPDATE), so puts stop trying it."""
        updates = []
        for job in self.jobs.values():
            if job.state != "active" or node_id not in job.weights:
                continue
            rest = {n: w for n, w in job.weights.items() if n != node_id}
            total = sum(rest.values())
            job.weights = {n: w / total for n, w in rest.items()} if total > 0 else {}
            job.spill = self._spill_levels(job)
            updates.append((job, self._md_request(job.metadata, Op.JOB_UPDATE, {
                "job": job.id, "tok": job.token, **self._map_header(job)})))
        if updates:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            loop.create_task(self._send_map_updates(updates))

    async def _send_map_updates(self, updates: list) -> None:
        results = await asyncio.gather(*(u for _, u in updates), return_exceptions=True)
        for (job, _), result in zip(updates, results):
            if isinstance(result, BaseException):
                log.warning("job %s: could not push its new weight map: %s", job.id, result)

    def _nodes_changed(self) -> None:
        """Storage nodes came or went: wake provisioning waiters, refresh spill maps soon."""
        self._joined.set()
        self._joined = asyncio.Event()
        if self._spill_refresh is None or self._spill_refresh.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._spill_refresh = loop.create_task(self._refresh_spill())

    async def _md_request(self, node_id: str, opcode: int, header: dict,
                          timeout: float = 10.0) -> Frame:
        node = self.nodes.get(node_id)
        if node is None:
            raise Unavailable(f"metadata server {node_id} is gone")
        conn = await self._md_conns.get(node.address)
        if self.key is not None and opcode in (Op.JOB_ADD, Op.JOB_UPDATE):
            header = {**header, "auth": self.key.sign(opcode, header.get("job"))}
        return await conn.request(opcode, header, timeout=timeout)

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
        tier = h.get("tier")
        if tier is not None and tier not in TIERS:
            raise InvalidRequest(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
        replicas = check_replicas(h.get("replicas", 1))
        metadata = self._active("metadata")
        if not metadata:
            raise Unavailable("no metadata server has registered with the controller")
        load = {m.id: sum(1 for j in self.jobs.values() if j.metadata == m.id and j.state == "active")
                for m in metadata}
        md = least_loaded([m.id for m in metadata], load)
        self._md_registering[md] = self._md_registering.get(md, 0) + 1
        try:
            return await self._register_job(h, name, hints, tier, md, replicas)
        finally:
            self._md_registering[md] -= 1
            if not self._md_registering[md]:
                del self._md_registering[md]

    async def _register_job(self, h: dict, name: str, hints: dict, tier: Optional[str],
                            md: str, replicas: int) -> dict:
        job_id = f"{job_slug(name)}-{secrets.token_hex(4)}"
        token = secrets.token_urlsafe(24)
        can_add = {t: self.provider.available(t) for t in TIER_ORDER}
        view = self.ledger.view(self.profiles, can_add)
        allocation = plan_allocation({**hints, "tier": tier, "replicas": replicas}, view,
                                     self.planner)
        slices, overcommitted = await self._place(job_id, allocation, replicas)
        try:
            weights = weight_map(slices, allocation.throughput, allocation.capacity)
            job = JobRecord(job_id, name, token, allocation.tier, md, hints, weights,
                            allocation=allocation, overcommitted=overcommitted,
                            usage=JobUsage(time.monotonic(),
                                           allocation_rates(slices, self.ledger.nodes)),
                            replicas=replicas)
            job.spill = self._spill_levels(job)
            await self._md_request(md, Op.JOB_ADD, {
                "job": job_id, "tok": token, "name": name, **self._map_header(job),
                **self._job_options(h)})
        except BaseException:
            self.ledger.release(job_id)
            raise
        self.jobs[job_id] = job
        log.info("job %s registered: %s %s, metadata %s, weights %s", job_id, allocation.tier,
                 allocation.reason, md, {k: round(v, 3) for k, v in weights.items()})
        return {**self._job_reply(job), **self._job_options(h)}

    @staticmethod
    def _job_options(h: dict) -> dict:
        """Per-job settings the metadata server applies: DRAM checksums, the job's lease,
        copies (``replicas``, validated at registration; sent only when not 1)."""
        options = {}
        if h.get("replicas", 1) != 1:
            options["replicas"] = h["replicas"]
        if isinstance(h.get("checksums"), bool):
            options["checksums"] = h["checksums"]
        lease = h.get("lease")
        if isinstance(lease, (int, float)) and not isinstance(lease, bool) and lease > 0:
            options["lease"] = float(lease)
        return options

    async def _place(self, job_id: str, allocation: Allocation,
                     replicas: int = 1) -> tuple[list[Slice], float]:
        """Pack the allocation into its tier: existing nodes, then new ones, then overcommit.

        A job keeping ``replicas`` copies gets at least that many nodes
        (:func:`pack_replicated`; a provider is asked for the missing ones),
        or Unavailable if the tier cannot have them.
        Returns the slices (already in the ledger) and the overcommitted fraction.
        """
        tier, T, C = allocation.tier, allocation.throughput, allocation.capacity
        packing = pack_replicated(T, C, self.ledger.tier_nodes(tier, job_id), replicas)
        self.ledger.take(job_id, packing.slices)
        slices = list(packing.slices)
        rem_t, rem_c = packing.unmet_throughput, packing.unmet_capacity
        try:
            if rem_t > 0 or rem_c > 0:
                count = min(nodes_needed(rem_t, rem_c, self.profiles[tier]),
                            self.provider.available(tier))
                if count > 0:
                    new = [n for n in await self._provision(job_id, tier, count)
                           if n.id in self.ledger.nodes]  # one may have left already
                    more = pack_allocation(rem_t, rem_c, new) if new else Packing((), rem_t, rem_c)
                    for node in new:
                        self.ledger.set_reserved(node.id, None)
                    self.ledger.take(job_id, more.slices)
                    slices += more.slices
                    rem_t, rem_c = more.unmet_throughput, more.unmet_capacity
            overcommitted = 0.0
            if rem_t > 0 or rem_c > 0:
                nodes = self.ledger.tier_nodes(tier, job_id)
                if not nodes:
                    raise Unavailable(f"no {tier} storage server has registered with the "
                                      f"controller")
                spread = spread_allocation(rem_t, rem_c, nodes)
                self.ledger.take(job_id, spread.slices)
                slices += spread.slices
                overcommitted = max(rem_t / T, rem_c / C)
                why = ("no node provider is configured (--provider none)"
                       if isinstance(self.provider, NoProvider) else
                       f"the {self.provider.name} provider can start no more {tier} nodes")
                log.warning("job %s: the %s tier lacks %.0f%% of its allocation (%s, %s) and %s; "
                            "overcommitting the %d existing %s nodes", job_id, tier,
                            overcommitted * 100, format_rate(T), format_size(C), why, len(nodes),
                            tier)
            spread = len({s.node for s in slices})
            if spread < replicas:
                can = ("no node provider is configured" if isinstance(self.provider, NoProvider)
                       else f"the {self.provider.name} provider can start no more")
                raise Unavailable(f"replicas={replicas} needs {replicas} distinct {tier} storage "
                                  f"servers; the tier has {spread} and {can}")
        except BaseException:
            self.ledger.release(job_id)
            raise
        return slices, overcommitted

    async def _provision(self, job_id: str, tier: str, count: int) -> list[NodeLoad]:
        """Ask the provider for ``count`` nodes of ``tier`` and wait until they register."""
        deadline = time.monotonic() + self.provision_timeout
        log.info("job %s: asking the %s provider for %d %s nodes", job_id, self.provider.name,
                 count, tier)
        try:
            addresses = await asyncio.wait_for(
                self.provider.start(tier, count, self.profiles[tier], self.address),
                self.provision_timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"the {self.provider.name} provider did not start {count} {tier} "
                              f"nodes within {self.provision_timeout:g}s") from None
        for address in addresses:
            self._pending[address] = job_id
        try:
            while True:
                found = {n.address: self.ledger.nodes.get(n.id) for n in self.nodes.values()
                         if n.role == "storage" and n.address in self._pending}
                new = [found.get(a) for a in addresses]
                if all(new):
                    for node in new:  # it may have registered before _pending knew it
                        self.ledger.set_reserved(node.id, job_id)
                    return new  # type: ignore[return-value]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = sum(1 for n in new if n)
                    for node in new:
                        if node is not None:
                            self.ledger.set_reserved(node.id, None)
                    raise Unavailable(
                        f"asked the {self.provider.name} provider for {count} {tier} storage "
                        f"nodes; {got} registered within {self.provision_timeout:g}s "
                        f"(--provision-timeout)")
                event = self._joined
                try:
                    await asyncio.wait_for(event.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
        finally:
            for address in addresses:
                self._pending.pop(address, None)

    def _spill_levels(self, job: JobRecord) -> list[list]:
        """Where writes go when the job's own nodes are full: ``[[tier, weights], ...]``.

        First the job's tier's other nodes, then the slower tiers in order
        (DRAM → NVMe → SSD → HDD), then the faster ones, nearest first; each
        level weighted by free bytes.
        """
        i = TIER_ORDER.index(job.tier) if job.tier in TIER_ORDER else 0
        order = [TIER_ORDER[i], *TIER_ORDER[i + 1:], *reversed(TIER_ORDER[:i])]
        levels = []
        for tier in order:
            free = {n.id: n.capacity - n.used for n in self._active("storage", tier)
                    if n.id not in job.weights and n.capacity > n.used}
            if free:
                levels.append([tier, weights_by_free_capacity(free)])
        return levels

    def _map_header(self, job: JobRecord) -> dict:
        """The weight map, spill levels and node addresses and tiers (JOB_ADD, JOB_UPDATE)."""
        ids = set(job.weights).union(*(level[1] for level in job.spill))
        nodes = {i: self.nodes[i] for i in ids if i in self.nodes}
        return {"tier": job.tier, "weights": job.weights, "spill": job.spill,
                "nodes": {i: n.address for i, n in nodes.items()},
                "tiers": {i: n.tier for i, n in nodes.items()}}

    async def _refresh_spill(self) -> None:
        """Send active jobs whose spill nodes changed their new spill levels (JOB_UPDATE)."""
        await asyncio.sleep(0.2)  # let a burst of registrations settle
        updates = []
        for job in self.jobs.values():
            if job.state != "active":
                continue
            spill = self._spill_levels(job)
            if [[t, sorted(w)] for t, w in spill] == [[t, sorted(w)] for t, w in job.spill]:
                continue
            job.spill = spill
            updates.append(self._md_request(job.metadata, Op.JOB_UPDATE, {
                "job": job.id, "tok": job.token, **self._map_header(job)}))
        for result in await asyncio.gather(*updates, return_exceptions=True):
            if isinstance(result, BaseException):
                log.warning("could not update a job's spill map: %s", result)

    def _job_reply(self, job: JobRecord) -> dict:
        md = self.nodes.get(job.metadata)
        if md is None:
            raise Unavailable(f"the metadata server of job {job.id} is gone")
        reply = {"job": job.id, "tok": job.token, "name": job.name, "md": md.address,
                 "tier": job.tier, "weights": job.weights,
                 "inline_max": md.info.get("inline_max", 64 << 10)}
        if job.replicas != 1:
            reply["replicas"] = job.replicas
        if job.allocation is not None:
            reply["allocation"] = job.allocation.as_dict()
        return reply

    def handle_job_attach(self, conn: ServerConnection, frame: Frame) -> dict:
        return self._job_reply(self._job(frame.header))

    async def handle_job_deregister(self, conn: ServerConnection, frame: Frame) -> dict:
        """End a job: free its objects (metadata server), return its allocation, report its cost."""
        job = self._job(frame.header)
        if job.state != "active":
            return {"freed": 0, "kept": None, **self._cost_fields(job)}
        try:
            reply = await self._md_request(job.metadata, Op.JOB_REMOVE,
                                           {"job": job.id, "tok": job.token})
        except NotFound:
            reply = None
        self.ledger.release(job.id)
        if self.autoscaler is not None:
            self.autoscaler.job_left(job.tier)
        job.usage.ended = time.monotonic()
        job.state = "deregistered"
        job.deregistered = time.time()
        fields = self._cost_fields(job)
        log.info("job %s deregistered after %.1fs: %.4f node-seconds, $%.6f", job.id,
                 fields["usage"]["seconds"], fields["usage"]["node_seconds"], fields["cost"])
        return {**(reply.header if reply is not None else {"freed": 0, "kept": 0}), **fields}

    def _cost_fields(self, job: JobRecord) -> dict:
        usage = job.usage.report(time.monotonic())
        return {"usage": usage, "cost": usage["cost"], "tier": job.tier,
                "allocation": job.allocation.as_dict() if job.allocation else None}

    # -- status --------------------------------------------------------------
    def status(self) -> dict:
        """The cluster as plain data: nodes, jobs (with allocation, weight map, cost), provider."""
        now = time.monotonic()
        nodes = []
        job_bytes: dict[str, dict] = {}
        for n in self.nodes.values():
            entry = {"id": n.id, "role": n.role, "tier": n.tier, "address": n.address,
                     "state": n.state, "capacity": n.capacity, "used": n.used,
                     "cpu": round(n.cpu, 3), "net_in": round(n.net_in),
                     "net_out": round(n.net_out), "age": round(now - n.last_seen, 2),
                     **{k: n.info[k] for k in ("dev_read", "dev_write", "direct_io", "metrics",
                                               "owner")
                        if k in n.info}}
            load = self.ledger.nodes.get(n.id)
            if load is not None:
                entry.update({"throughput": load.throughput, "price": load.price,
                              "allocated_capacity": load.allocated_capacity,
                              "allocated_throughput": load.allocated_throughput})
            nodes.append(entry)
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
                         "overcommitted": round(j.overcommitted, 4),
                         "replicas": j.replicas,
                         "spill": [t for t, _ in j.spill],
                         "objects": usage.get("objects", 0), "bytes": usage.get("bytes", 0),
                         **self._cost_fields(j)})
        return {"controller": self.address, "nodes": nodes, "jobs": jobs,
                **({"metrics": self.metrics_address} if self.metrics_address else {}),
                "provider": self.provider.describe(),
                "autoscale": (self.autoscaler.describe() if self.autoscaler is not None
                              else {"enabled": False}),
                "profiles": {t: {"instance": p.instance, "capacity": p.capacity,
                                 "throughput": p.throughput, "price": p.price}
                             for t, p in self.profiles.items()}}

    def metric_gauges(self) -> list:
        counts: dict[tuple[str, str, str], int] = {}
        used: dict[str, int] = {}
        capacity: dict[str, int] = {}
        for n in list(self.nodes.values()):  # a copy: the event loop may change the dict
            key = (n.role, n.tier, n.state)
            counts[key] = counts.get(key, 0) + 1
            used[n.tier] = used.get(n.tier, 0) + n.used
            capacity[n.tier] = capacity.get(n.tier, 0) + n.capacity
        jobs = sum(1 for j in list(self.jobs.values()) if j.state == "active")
        return [
            ("pocket_controller_nodes", "Registered nodes by role, tier and state",
             ("role", "tier", "state"), [(k, v) for k, v in sorted(counts.items())]),
            ("pocket_controller_used_bytes", "Bytes stored per tier, from heartbeats",
             ("tier",), [((t,), v) for t, v in sorted(used.items())]),
            ("pocket_controller_capacity_bytes", "Capacity per tier, from heartbeats",
             ("tier",), [((t,), v) for t, v in sorted(capacity.items())]),
            ("pocket_controller_jobs", "Active jobs", (), [((), jobs)]),
        ]

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
                self._forget_node(node)
            self.owners.prune(self._live_owners(), time.monotonic())

    async def on_start(self) -> None:
        self._monitor = asyncio.get_running_loop().create_task(self._watch())
        if self.autoscaler is not None:
            self.autoscaler.start()

    async def on_stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        if self.autoscaler is not None:
            await self.autoscaler.stop()
        if self._spill_refresh is not None:
            self._spill_refresh.cancel()
        self._md_conns.close()
        self._storage_conns.close()
        await self.provider.stop()
