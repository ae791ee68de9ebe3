"""The controller's autoscaling loop: observe, decide (``autoscale.py``), apply.

Every ``interval`` (1 s by default) :class:`AutoscaleMonitor` turns the
controller's node records (heartbeats) and allocation ledger into a
:class:`~.autoscale.ClusterObservation`, asks :func:`~.autoscale.decide_scaling`
what to do and does it:

* **add** — ask the node provider for nodes (in the background, so the loop
  keeps observing); once they register, *steer*: every running job of the
  tier gets a weight map over its nodes and the new ones by headroom, so new
  writes flow to the new nodes.  Existing data is not moved.
* **drain** — the node gets state ``draining``: it is taken out of every
  running job's weight map and spill levels (JOB_UPDATE) and out of packing
  for new jobs.  Reads of what it holds go on as before.
* **remove** — a draining node that has reported zero bytes stored in two
  heartbeats at least ``drain_settle`` apart (both after its drain reached
  the metadata servers) is stopped by the provider; it leaves the controller
  on its way out.  A node holding a live object is never removed.
* **undrain** — load came back: a draining node is active again.
* **migrate** (``--migrate-on-drain``) — every tick while a node drains, each
  metadata server is asked (EXTENTS_MOVE) to move its objects' extents off it
  to the tier's active nodes (weighted by headroom); once all of them answer
  that nothing of theirs is left there (no object, pending put, allocation in
  flight or read lease), the node is removed at its next zero-bytes heartbeat.

Each action is an event (``pocket status --json`` → ``autoscale.events``)
with its reason and the tier's utilisation.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Optional

from ..protocol import Op
from .autoscale import (METADATA, ClusterObservation, Decision, MetadataObservation,
                        NodeObservation, ScalingPolicy, TierHistory, decide_scaling,
                        drain_weights, node_headroom, steer_weights, update_history)

if TYPE_CHECKING:
    from .server import ControllerServer, NodeRecord

log = logging.getLogger("pocket.autoscale")

#: A server's CPU share counts only this long (s) after it registered: before, its
#: heartbeats still include the process's start-up (imports: ~100% of a core).
YOUNG = 2.5

#: ``reserved_for`` of a draining node in the allocation ledger: no job packs into it.
DRAINING = "(draining)"


class AutoscaleMonitor:
    """Runs :func:`decide_scaling` every ``interval`` seconds for one controller."""

    def __init__(self, controller: "ControllerServer", policy: ScalingPolicy,
                 interval: float = 1.0, max_events: int = 500,
                 startup_grace: Optional[float] = None, migrate: bool = False) -> None:
        if interval <= 0:
            raise ValueError("the autoscale interval must be positive")
        self.controller = controller
        self.policy = policy
        self.interval = interval
        self.history: dict[str, TierHistory] = {}
        self.events: collections.deque = collections.deque(maxlen=max_events)
        #: tier → nodes being started for the autoscaler.
        self.starting: dict[str, int] = {}
        #: node → monotonic time its drain reached every metadata server.
        self.drained_at: dict[str, float] = {}
        #: node → receive time of its first zero-bytes heartbeat after ``drained_at``.
        self.empty_since: dict[str, float] = {}
        self.ticks = 0
        #: ``--migrate-on-drain``: move a draining node's objects so it can leave at once.
        self.migrate = migrate
        #: node → the move in progress; node → monotonic time every metadata server
        #: confirmed that nothing of theirs is left on it.
        self.migrating: dict[str, asyncio.Task] = {}
        self.migrated: dict[str, float] = {}
        #: Nodes that exist register within this long of our start (or of a controller
        #: restart): the minimum is not filled before, so they are not doubled.
        self.startup_grace = (startup_grace if startup_grace is not None
                              else controller.node_timeout)
        self.started = time.monotonic()
        self._task: Optional[asyncio.Task] = None
        self._actions: set[asyncio.Task] = set()
        self._tick_lock = asyncio.Lock()
        self._poked: Optional[asyncio.Task] = None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self.started = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        for task in [self._task, self._poked, *self._actions]:
            if task is not None:
                task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must survive a bad tick
                log.exception("autoscale tick failed")

    # -- observe ---------------------------------------------------------------
    def observe(self, now: float) -> ClusterObservation:
        """The storage nodes as plain data (draining ones with how long they have been empty)."""
        c = self.controller
        wall = time.time()
        nodes = []
        for n in c.nodes.values():
            if n.role != "storage" or n.state not in ("active", "draining"):
                continue
            load = c.ledger.nodes.get(n.id)
            if load is None:
                continue
            if load.reserved_for not in (None, DRAINING):
                continue  # a job's registration is packing it right now
            hist = self.history.setdefault(n.tier, TierHistory())
            # a node the provider started lately (ours or for a job's registration) counts as
            # a recent scale-out; nodes started by hand (the cluster's floor) do not
            owned = c.provider.owns(n.address)
            if owned:
                hist.last_out = max(hist.last_out, now - (wall - n.registered))
            empty_for = 0.0
            confirmed = self.migrated.get(n.id)
            confirmed_empty = (n.state == "draining" and confirmed is not None and
                               n.used == 0 and n.last_seen > confirmed)
            if n.state == "draining":
                since = self.drained_at.get(n.id)
                if since is not None and n.used == 0 and n.last_seen > since:
                    first = self.empty_since.setdefault(n.id, n.last_seen)
                    empty_for = n.last_seen - first
                else:
                    self.empty_since.pop(n.id, None)
            young = wall - n.registered < YOUNG  # its CPU still includes its start-up
            nodes.append(NodeObservation(
                n.id, n.tier, n.capacity, load.throughput, used=n.used,
                cpu=0.0 if young else n.cpu,
                net=n.net_in + n.net_out, allocated_throughput=load.allocated_throughput,
                allocated_capacity=load.allocated_capacity, state=n.state,
                removable=owned, empty_for=empty_for,
                confirmed_empty=confirmed_empty))
        tiers = ({o.tier for o in nodes} | set(self.starting) | set(self.policy.min_nodes)) - \
            {METADATA}
        can_add = {t: c.provider.available(t) for t in tiers}
        can_add[METADATA] = c.provider.available_metadata()
        return ClusterObservation(now, tuple(nodes), dict(self.starting), can_add, self.history,
                                  metadata=tuple(self.observe_metadata()))

    def observe_metadata(self) -> list[MetadataObservation]:
        """Metadata servers: CPU, active jobs, namespaces held (controller records, the
        server's own heartbeat, registrations in progress)."""
        c = self.controller
        out = []
        wall = time.time()
        for m in c.nodes.values():
            if m.role != "metadata" or m.state not in ("active", "draining"):
                continue
            jobs = sum(1 for j in c.jobs.values() if j.metadata == m.id and j.state == "active")
            reported = m.info.get("jobs") or {}
            held = sum(1 for info in reported.values() if isinstance(info, dict) and
                       (info.get("active") or info.get("objects")))
            holds = max(jobs, held) + c._md_registering.get(m.id, 0)
            empty_for = 0.0
            since = self.drained_at.get(m.id)
            if m.state == "draining" and since is not None and holds == 0 and \
                    m.last_seen > since:
                empty_for = m.last_seen - self.empty_since.setdefault(m.id, m.last_seen)
            else:
                self.empty_since.pop(m.id, None)
            # Its first heartbeats include the process's start-up (imports): not load.
            young = wall - m.registered < YOUNG
            out.append(MetadataObservation(m.id, 0.0 if young else m.cpu, jobs, holds, m.state,
                                           c.provider.owns(m.address), empty_for))
        return out

    def job_left(self, tier: str) -> None:
        """A job of ``tier`` deregistered (or lapsed): the tier may scale in at once."""
        self.history.setdefault(tier, TierHistory()).job_left = time.monotonic()

    def poke(self) -> None:
        """Decide now rather than at the next tick (a heartbeat crossed a band's top)."""
        if self._poked is None or self._poked.done():
            self._poked = asyncio.get_running_loop().create_task(self._poke())

    async def _poke(self) -> None:
        try:
            await self.tick()
        except Exception:
            log.exception("autoscale tick failed")

    def above_band(self, node: "NodeRecord") -> bool:
        """Whether one storage heartbeat puts its node above a measured band's top."""
        p = self.policy
        rate = node.throughput or 1.0
        return (node.cpu > p.band(node.tier, "cpu").high or
                (node.net_in + node.net_out) / rate > p.band(node.tier, "net").high or
                (node.capacity > 0 and node.used / node.capacity > p.band(node.tier,
                                                                           "bytes").high))

    async def tick(self) -> list[Decision]:
        """One round: observe, decide, apply.  Returns the decisions."""
        async with self._tick_lock:
            return await self._tick()

    async def _tick(self) -> list[Decision]:
        self.ticks += 1
        now = time.monotonic()
        known = set(self.controller.nodes)
        for table in (self.drained_at, self.empty_since, self.migrated):
            for node_id in [k for k in table if k not in known]:
                del table[node_id]
        observed = self.observe(now)
        policy = self.policy
        if now - self.started < self.startup_grace:
            policy = dataclasses.replace(policy, min_nodes={})
        decisions = decide_scaling(observed, policy)
        update_history(self.history, observed, self.policy, decisions)
        drains = []
        for d in decisions:
            if d.tier == METADATA:
                await self._apply_metadata(d)
            elif d.action == "add":
                self._spawn(self._add(d))
            elif d.action == "drain":
                drains.append(d)
            elif d.action == "undrain":
                await self._undrain(d)
            elif d.action == "remove":
                self._spawn(self._remove(d))
        if drains:
            await self._drain(drains)
        if self.migrate:
            for node_id in self.drained_at:
                node = self.controller.nodes.get(node_id)
                if (node is not None and node.role == "storage" and
                        node_id not in self.migrated and node_id not in self.migrating):
                    self._start_migration(node_id)
        return decisions

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)

    def event(self, kind: str, decision: Decision, **extra) -> None:
        entry = {"time": round(time.time(), 3), "event": kind, "tier": decision.tier,
                 "reason": decision.reason,
                 "utilisation": {k: round(v, 4) for k, v in decision.utilisation.items()},
                 **extra}
        self.events.append(entry)
        log.info("autoscale: %s %s %s (%s)", kind, decision.tier,
                 extra.get("node", extra.get("count", "")), decision.reason)

    # -- apply -------------------------------------------------------------------
    async def _apply_metadata(self, d: Decision) -> None:
        """Metadata servers: add (provider), drain (no new jobs), undrain, remove (provider)."""
        c = self.controller
        if d.action == "add":
            self._spawn(self._add_metadata(d))
            return
        node = c.nodes.get(d.node) if d.node else None
        if node is None:
            return
        if d.action == "drain" and node.state == "active":
            node.state = "draining"  # the controller assigns it no new job from now on
            self.drained_at[node.id] = time.monotonic()
            self.event("draining", d, node=node.id)
        elif d.action == "undrain" and node.state == "draining":
            node.state = "active"
            self.drained_at.pop(node.id, None)
            self.empty_since.pop(node.id, None)
            self.event("undrained", d, node=node.id)
        elif d.action == "remove" and node.state == "draining":
            node.state = "removing"
            self.event("removed", d, node=node.id, address=node.address)
            self._spawn(self._remove_metadata(node))

    async def _remove_metadata(self, node: "NodeRecord") -> None:
        try:
            await self.controller.provider.remove(node.address)
        except Exception as exc:
            log.warning("autoscale: could not remove metadata server %s: %s", node.id, exc)
            node.state = "draining"

    async def _add_metadata(self, d: Decision) -> None:
        c = self.controller
        self.starting[METADATA] = self.starting.get(METADATA, 0) + d.count
        self.event("scale_out", d, count=d.count)
        try:
            addresses = await asyncio.wait_for(c.provider.start_metadata(d.count, c.address),
                                               c.provision_timeout)
            new = await self._registered(addresses, time.monotonic() + c.provision_timeout,
                                         role="metadata")
        except Exception as exc:
            log.warning("autoscale: could not add %d metadata servers: %s", d.count, exc)
            self.event("add_failed", d, count=d.count, error=str(exc))
            return
        finally:
            self.starting[METADATA] -= d.count
            if not self.starting[METADATA]:
                del self.starting[METADATA]
        for node in new:
            self.event("added", d, node=node.id, address=node.address)

    async def _add(self, d: Decision) -> None:
        c = self.controller
        self.starting[d.tier] = self.starting.get(d.tier, 0) + d.count
        self.event("scale_out", d, count=d.count)
        try:
            addresses = await asyncio.wait_for(
                c.provider.start(d.tier, d.count, c.profiles[d.tier], c.address),
                c.provision_timeout)
            new = await self._registered(addresses, time.monotonic() + c.provision_timeout)
        except Exception as exc:
            log.warning("autoscale: could not add %d %s nodes: %s", d.count, d.tier, exc)
            self.event("add_failed", d, count=d.count, error=str(exc))
            return
        finally:
            self.starting[d.tier] -= d.count
            if not self.starting[d.tier]:
                del self.starting[d.tier]
        for node in new:
            self.event("added", d, node=node.id, address=node.address)
        await self.steer(d.tier, {n.id: 1.0 for n in new})

    async def _registered(self, addresses: list[str], deadline: float,
                          role: str = "storage") -> list["NodeRecord"]:
        c = self.controller
        while True:
            found = {n.address: n for n in c.nodes.values()
                     if n.role == role and n.address in addresses}
            if len(found) == len(addresses):
                return [found[a] for a in addresses]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if found:
                    return list(found.values())
                raise TimeoutError(f"{len(addresses)} new nodes did not register")
            event = c._joined
            try:
                await asyncio.wait_for(event.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass

    def _headroom(self, tier: str) -> dict[str, float]:
        c = self.controller
        out = {}
        for n in c._active("storage", tier):
            load = c.ledger.nodes.get(n.id)
            out[n.id] = node_headroom(NodeObservation(
                n.id, tier, n.capacity, load.throughput if load else n.throughput, used=n.used,
                net=n.net_in + n.net_out))
        return out

    async def steer(self, tier: str, new: dict[str, float]) -> None:
        """Data steering: give running jobs of ``tier`` the ``new`` nodes, weighted by headroom."""
        c = self.controller
        new = {n: w for n, w in new.items() if n in c.nodes and c.nodes[n].state == "active"}
        if not new:
            return
        room = self._headroom(tier)
        jobs = [j for j in c.jobs.values() if j.state == "active" and j.tier == tier and j.weights]
        for job in jobs:
            job.weights = steer_weights(job.weights, new, room)
        await self._push(jobs, "steer")

    async def _push(self, jobs: list, why: str) -> None:
        c = self.controller
        calls = []
        for job in jobs:
            job.spill = c._spill_levels(job)
            calls.append(c._md_request(job.metadata, Op.JOB_UPDATE, {
                "job": job.id, "tok": job.token, **c._map_header(job)}))
        for job, result in zip(jobs, await asyncio.gather(*calls, return_exceptions=True)):
            if isinstance(result, BaseException):
                log.warning("autoscale: could not %s job %s: %s", why, job.id, result)

    async def _drain(self, decisions: list[Decision]) -> None:
        c = self.controller
        gone = set()
        for d in decisions:
            node = c.nodes.get(d.node)
            if node is None or node.state != "active":
                continue
            node.state = "draining"
            c.ledger.set_reserved(node.id, DRAINING)
            gone.add(node.id)
            self.event("draining", d, node=node.id, used=node.used)
        if not gone:
            return
        jobs = [j for j in c.jobs.values() if j.state == "active" and gone & set(j.weights)]
        for job in jobs:
            job.weights = drain_weights(job.weights, gone, self._headroom(job.tier))
        # Spill levels name other nodes of the tier too: refresh every active job.
        await self._push([j for j in c.jobs.values() if j.state == "active"], "drain")
        now = time.monotonic()
        for node_id in gone:
            if c.nodes.get(node_id) is not None and c.nodes[node_id].state == "draining":
                self.drained_at[node_id] = now
                # A confirmation from an earlier drain (the node left and came back under
                # its id between ticks) must not let it go without a new move.
                self.migrated.pop(node_id, None)
                if self.migrate and node_id not in self.migrating:
                    self._start_migration(node_id)

    def _start_migration(self, node_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._migrate(node_id))
        self.migrating[node_id] = task
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)
        task.add_done_callback(lambda _t: self.migrating.pop(node_id, None))

    async def _migrate(self, node_id: str) -> None:
        """Ask every metadata server to move its extents off draining ``node_id``; record
        when all of them report that nothing of theirs is left there."""
        c = self.controller
        node = c.nodes.get(node_id)
        if node is None or node.state != "draining" or c.key is None:
            return
        targets = {n: w for n, w in self._headroom(node.tier).items() if n != node_id}
        if not targets:
            return
        began = time.monotonic()
        nodes = {n: c.nodes[n].address for n in targets}
        header = {"node": node_id, "targets": targets, "nodes": nodes,
                  "auth": c.key.sign(Op.EXTENTS_MOVE, node_id, targets, nodes)}
        mds = [m.id for m in c.nodes.values() if m.role == "metadata"]
        results = await asyncio.gather(
            *(c._md_request(m, Op.EXTENTS_MOVE, header, timeout=120.0) for m in mds),
            return_exceptions=True)
        moved = nbytes = 0
        clear = True
        for md, result in zip(mds, results):
            if isinstance(result, BaseException):
                log.warning("autoscale: metadata server %s could not move extents off %s: %s",
                            md, node_id, result)
                clear = False
                continue
            h = result.header
            moved += h.get("moved", 0)
            nbytes += h.get("bytes", 0)
            if h.get("busy") or h.get("failed") or any(
                    h.get(k) for k in ("left", "pending", "allocating", "held")):
                clear = False
        node = c.nodes.get(node_id)
        if node is None or node.state != "draining":
            return
        if moved:
            self.event("migrated", Decision("migrate", node.tier, "migrate on drain", {}),
                       node=node_id, objects=moved, bytes=nbytes,
                       seconds=round(time.monotonic() - began, 3))
        if clear:
            self.migrated[node_id] = time.monotonic()

    async def _undrain(self, d: Decision) -> None:
        c = self.controller
        node = c.nodes.get(d.node)
        if node is None or node.state != "draining":
            return
        node.state = "active"
        c.ledger.set_reserved(node.id, None)
        self.drained_at.pop(node.id, None)
        self.empty_since.pop(node.id, None)
        self.migrated.pop(node.id, None)
        self.event("undrained", d, node=node.id)
        await self.steer(d.tier, {node.id: self._headroom(d.tier).get(node.id, 1.0)})

    async def _remove(self, d: Decision) -> None:
        c = self.controller
        node = c.nodes.get(d.node)
        if node is None or node.state != "draining" or node.used != 0:
            return
        node.state = "removing"
        self.event("removed", d, node=node.id, address=node.address)
        try:
            await c.provider.remove(node.address)
        except Exception as exc:
            log.warning("autoscale: could not remove %s: %s", node.id, exc)
            node.state = "draining"

    def describe(self) -> dict:
        """Policy, what is starting, and the event log, for ``pocket status``."""
        return {"enabled": True, "interval": self.interval, "policy": self.policy.describe(),
                "migrate_on_drain": self.migrate,
                "starting": dict(self.starting), "ticks": self.ticks,
                "events": list(self.events)}
