"""The metadata server: job namespaces, object → extents, placement, atomic puts.

Small objects (≤ ``inline_max``) live here, inline with their metadata, so a
small put or get is one round trip.  Larger objects are placed on storage
servers by the job's weight map: ``PUT_BEGIN`` allocates extents, the client
writes them, ``PUT_COMMIT`` makes the object visible (an overwrite replaces
the old object in one step).  A get of a large object takes a *read lease* so
the object's extents are not freed (by a delete or overwrite) while a reader
is still fetching them; the client releases the lease when done.

Every extent is allocated under this process's *instance* id (``owner``), made
at start and sent with the registration: storage servers group extents by it,
so that the extents of a metadata server that died or restarted (its
namespaces, held only in memory, are gone) are freed when the controller says
so (``EXT_RECLAIM``; see ``pocket.controller.reclaim``).

A job registered with ``replicas=2`` has each piece of its large objects
allocated on two distinct storage servers (:func:`plan_replicated`); its
``PUT_BEGIN`` and ``GET`` replies carry ``pieces`` (every copy of every
piece) instead of ``ext``, and its ``PUT_COMMIT`` one checksum per piece.
Its clients say they know this (``copies: true`` in ``PUT_BEGIN`` and
``GET``); an older client is refused rather than handed a reply it would
misread.  Unreplicated jobs see exactly the format they always did.

``EXTENTS_MOVE`` (the controller's ``--migrate-on-drain``) copies every extent
this server's objects have on one storage node to other nodes and swaps each
object's entry in one step; see :meth:`MetadataServer.handle_extents_move`.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Optional

from ..connection import AsyncConnection, AsyncConnectionCache
from ..errors import AccessDenied, CapacityExceeded, InvalidRequest, NotFound, PocketError, Unavailable
from ..node import ControllerLink, UsageMeter
from ..protocol import Frame, Limits, Op
from ..replication import check_replicas
from ..server import Server, ServerConnection
from ..security import DEFAULT_CAPABILITY_TTL, checksum, verify_checksum
from ..storage.server import FLASH_TIERS, TIERS
from .placement import DEFAULT_SPLIT_SIZE, WeightedChooser, plan_pieces, plan_replicated

log = logging.getLogger("pocket.metadata")

DEFAULT_INLINE_MAX = 64 << 10
#: A job nobody has used for this long (no request, no driver renewal) is reclaimed.
DEFAULT_JOB_LEASE = 60.0
MAX_NAME_BYTES = 1024


def check_name(name: object) -> str:
    """A valid object or directory name, or InvalidRequest."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest("a name must be a non-empty string")
    if "\x00" in name or len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidRequest(f"a name must have no NUL and at most {MAX_NAME_BYTES} bytes")
    return name


@dataclass(eq=False)
class StoredObject:
    """One object: inline bytes or extents ``(node, extent id, length, checksum or None)``.

    A replicated object also has ``pieces``: ``[(length, checksum or None, copies)]`` in
    object order, each copy ``[(node, extent id, length), ...]`` on one node; its
    ``extents`` then list every copy's extents (what a delete frees), without checksums.
    """

    size: int
    persist: bool
    inline: Optional[bytes] = None
    extents: list = field(default_factory=list)
    pieces: Optional[list] = None
    created: float = field(default_factory=time.time)
    readers: int = 0
    dead: bool = False


@dataclass(eq=False)
class JobNamespace:
    """A job's names, credential and weight map."""

    job_id: str
    token: str
    name: str
    weights: dict
    chooser: WeightedChooser
    tier: str = "dram"
    active: bool = True
    objects: dict = field(default_factory=dict)
    dirs: set = field(default_factory=set)
    #: Where writes go when the job's own nodes are full: ``[(tier, chooser), ...]`` in order.
    spill: list = field(default_factory=list)
    #: Storage node → its tier, for the nodes of the weight map and the spill levels.
    node_tiers: dict = field(default_factory=dict)
    #: Checksum extents on DRAM too (flash extents always are).
    checksums: bool = False
    #: Reclaimed (as if deregistered) after this many seconds without a request.
    lease: float = DEFAULT_JOB_LEASE
    last_active: float = field(default_factory=time.monotonic)
    #: Copies of each piece of a large object, on distinct storage servers (1 or 2).
    replicas: int = 1

    def bytes_stored(self) -> int:
        return sum(o.size for o in self.objects.values())


@dataclass(eq=False)
class PendingPut:
    job: JobNamespace
    name: str
    size: int
    persist: bool
    extents: list
    deadline: float
    checksummed: bool = False
    #: Replicated puts: ``[[copy, ...] per piece]``, each copy ``[(node, extent id, length)]``.
    pieces: Optional[list] = None


def object_tier(job: JobNamespace, nodes: list) -> str:
    """Where an object's extents are: a tier, or tiers joined by ``+`` (fastest first)
    when a spilled object straddles them."""
    tiers = {job.node_tiers.get(n, job.tier) for n in nodes} or {job.tier}
    if len(tiers) == 1:
        return tiers.pop()
    order = {t: i for i, t in enumerate(TIERS)}
    return "+".join(sorted(tiers, key=lambda t: (order.get(t, len(order)), t)))


class MetadataServer(Server):
    """Owns job namespaces; allocates space on storage servers by weight map."""

    role = "metadata"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 controller: Optional[str] = None, inline_max: int = DEFAULT_INLINE_MAX,
                 inline_capacity: int = 1 << 30, split_size: int = DEFAULT_SPLIT_SIZE,
                 lease_timeout: float = 60.0, put_timeout: float = 600.0,
                 heartbeat: float = 1.0, capability_ttl: float = DEFAULT_CAPABILITY_TTL,
                 checksums: str = "flash", job_lease: float = DEFAULT_JOB_LEASE) -> None:
        super().__init__(host, port, Limits(max_header=1 << 20, max_payload=inline_max))
        self.controller = controller
        self.inline_max = inline_max
        self.inline_capacity = inline_capacity
        self.inline_used = 0
        self.split_size = split_size
        self.lease_timeout = lease_timeout
        self.put_timeout = put_timeout
        self.heartbeat_interval = heartbeat
        self.capability_ttl = capability_ttl
        if checksums not in ("flash", "all"):
            raise ValueError("checksums must be 'flash' or 'all'")
        #: ``flash``: checksum extents on flash tiers (and DRAM for jobs that ask); ``all``: all.
        self.checksums = checksums
        self.job_lease = job_lease
        #: Owner of the extents this process allocates; new at every start (see above).
        self.instance = secrets.token_hex(8)
        self.jobs: dict[str, JobNamespace] = {}
        self.node_addresses: dict[str, str] = {}
        self.puts: dict[int, PendingPut] = {}
        self.leases: dict[int, tuple[JobNamespace, StoredObject, float]] = {}
        self._ids = itertools.count(1)
        self._storage = AsyncConnectionCache(connect_timeout=5.0)
        self.link: Optional[ControllerLink] = None
        self._meter = UsageMeter()
        self._sweeper: Optional[asyncio.Task] = None
        #: Storage nodes whose extents an EXTENTS_MOVE is moving right now.
        self._moving: set[str] = set()
        #: Storage node → EXT_ALLOC requests in flight to it (not yet in ``puts``).
        self._allocating: dict[str, int] = {}
        self.handlers.update({
            Op.PUT_INLINE: self.handle_put_inline,
            Op.PUT_BEGIN: self.handle_put_begin,
            Op.PUT_COMMIT: self.handle_put_commit,
            Op.PUT_ABORT: self.handle_put_abort,
            Op.GET: self.handle_get,
            Op.RELEASE: self.handle_release,
            Op.LOOKUP: self.handle_lookup,
            Op.DELETE: self.handle_delete,
            Op.MKDIR: self.handle_mkdir,
            Op.LIST: self.handle_list,
            Op.JOB_ADD: self.handle_job_add,
            Op.JOB_UPDATE: self.handle_job_update,
            Op.JOB_REMOVE: self.handle_job_remove,
            Op.JOB_RENEW: self.handle_job_renew,
            Op.EXTENTS_MOVE: self.handle_extents_move,
        })

    # -- helpers -------------------------------------------------------------
    def _job(self, header: dict, *, write: bool = False) -> JobNamespace:
        job = self.jobs.get(header.get("job"))
        token = header.get("tok")
        if job is None or not isinstance(token, str) or not hmac.compare_digest(job.token, token):
            raise AccessDenied("unknown job or wrong token")
        if write and not job.active:
            raise AccessDenied(f"job {job.job_id} is deregistered; only reads and deletes remain")
        job.last_active = time.monotonic()
        return job

    def _capabilities(self, job: JobNamespace, ext_ids: list, rights: str) -> list:
        """Capabilities for the client to present to storage servers (see pocket.security)."""
        key = self.key
        if key is None:
            raise Unavailable("the metadata server has no cluster key yet (not registered)")
        expiry = int(time.time() + self.capability_ttl)
        return [key.capability(job.job_id, e, rights, expiry) for e in ext_ids]

    async def _storage_conn(self, node: str) -> AsyncConnection:
        address = self.node_addresses.get(node)
        if address is None:
            raise Unavailable(f"storage server {node} is unknown")
        return await self._storage.get(address)

    def _retire(self, obj: StoredObject) -> None:
        """The object is gone from its namespace; free it once nobody reads it."""
        obj.dead = True
        if obj.readers == 0:
            self._free(obj)

    def _free(self, obj: StoredObject) -> None:
        if obj.inline is not None:
            self.inline_used -= obj.size
            obj.inline = None
        elif obj.extents:
            self._free_extents(obj.extents)
            obj.extents = []
            obj.pieces = None

    def _free_extents(self, extents: list) -> None:
        by_node: dict[str, list[int]] = {}
        for node, ext_id, *_rest in extents:
            by_node.setdefault(node, []).append(ext_id)
        for node, ids in by_node.items():
            task = asyncio.get_running_loop().create_task(self._send_free(node, ids))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send_free(self, node: str, ids: list[int]) -> None:
        try:
            conn = await self._storage_conn(node)
            await conn.request(Op.EXT_FREE, {"ext": ids, "auth": self._sign(Op.EXT_FREE, ids)},
                               timeout=10.0)
        except PocketError as exc:  # the node is gone: its space went with it
            log.warning("could not free %d extents on %s: %s", len(ids), node, exc)

    def _install(self, job: JobNamespace, name: str, obj: StoredObject) -> None:
        old = job.objects.get(name)
        job.objects[name] = obj
        if old is not None:
            self._retire(old)

    def _sign(self, opcode: int, *fields) -> bytes:
        if self.key is None:
            raise Unavailable("the metadata server has no cluster key yet (not registered)")
        return self.key.sign(opcode, *fields)

    def _extent_list(self, job: JobNamespace, obj: StoredObject) -> list:
        """``[[address, extent id, length, read capability, checksum or None], ...]``."""
        caps = self._capabilities(job, [e for _, e, _, _ in obj.extents], "r")
        return [[self.node_addresses.get(n, "?"), e, length, cap, crc]
                for (n, e, length, crc), cap in zip(obj.extents, caps)]

    def _piece_list(self, job: JobNamespace, obj: StoredObject) -> list:
        """A replicated object for GET: ``[[checksum or None, [copy, ...]], ...]`` per piece,
        each copy ``[[address, extent id, length, read capability], ...]``."""
        caps = iter(self._capabilities(job, [e for _, e, *_ in obj.extents], "r"))
        address = self.node_addresses.get
        return [[crc, [[[address(n, "?"), e, length, next(caps)] for n, e, length in copy]
                       for copy in copies]]
                for _length, crc, copies in obj.pieces or ()]

    # -- client handlers -----------------------------------------------------
    def handle_put_inline(self, conn: ServerConnection, frame: Frame) -> None:
        h = frame.header
        job = self._job(h, write=True)
        name = check_name(h["name"])
        data = bytes(frame.payload)
        if len(data) > self.inline_max:
            raise InvalidRequest(f"inline objects are at most {self.inline_max} bytes")
        if self.inline_used + len(data) > self.inline_capacity:
            raise CapacityExceeded("the metadata server's small-object space is full")
        self.inline_used += len(data)
        self._install(job, name, StoredObject(len(data), bool(h.get("persist")), inline=data))
        return None

    async def handle_put_begin(self, conn: ServerConnection, frame: Frame) -> dict:
        h = frame.header
        job = self._job(h, write=True)
        name = check_name(h["name"])
        size = h["size"]
        if not isinstance(size, int) or size <= 0:
            raise InvalidRequest("size must be a positive integer")
        if job.replicas > 1:
            if not h.get("copies"):  # an older client would misread the reply
                raise InvalidRequest(f"job {job.job_id} keeps {job.replicas} copies; this "
                                     f"client does not know replication (update it)")
            return await self._put_begin_replicated(job, name, size, bool(h.get("persist")))
        extents = await self._allocate(job, size)
        put_id = next(self._ids)
        try:
            caps = self._capabilities(job, [e for _, e, _ in extents], "w")
        except BaseException:
            self._free_extents(extents)
            raise
        checksummed = (self.checksums == "all" or job.checksums or
                       any(job.node_tiers.get(n, job.tier) in FLASH_TIERS for n, _, _ in extents))
        self.puts[put_id] = PendingPut(job, name, size, bool(h.get("persist")), extents,
                                       time.monotonic() + self.put_timeout, checksummed)
        return {"put": put_id, "sum": checksummed,
                "ext": [[self.node_addresses[n], e, length, cap]
                        for (n, e, length), cap in zip(extents, caps)]}

    async def _put_begin_replicated(self, job: JobNamespace, name: str, size: int,
                                    persist: bool) -> dict:
        pieces = await self._allocate_replicated(job, size)
        extents = [x for piece in pieces for copy in piece for x in copy]
        put_id = next(self._ids)
        try:
            caps = iter(self._capabilities(job, [e for _, e, _ in extents], "w"))
        except BaseException:
            self._free_extents(extents)
            raise
        checksummed = (self.checksums == "all" or job.checksums or
                       any(job.node_tiers.get(n, job.tier) in FLASH_TIERS for n, _, _ in extents))
        self.puts[put_id] = PendingPut(job, name, size, persist, extents,
                                       time.monotonic() + self.put_timeout, checksummed, pieces)
        address = self.node_addresses.get
        return {"put": put_id, "sum": checksummed,
                "pieces": [[[[address(n, "?"), e, length, next(caps)] for n, e, length in copy]
                            for copy in piece] for piece in pieces]}

    async def _allocate_replicated(self, job: JobNamespace, size: int) -> list:
        """``job.replicas`` copies of each piece, on distinct nodes; all or nothing.

        Returns ``[[copy, ...] per piece]``, each copy ``[(node, extent id, length)]``.
        A node that is full or unreachable is left out and the whole object
        planned again (each retry excludes one more node, so this ends).
        """
        failed: set[str] = set()
        failure: type = Unavailable
        levels = [job.chooser, *(chooser for _tier, chooser in job.spill)]
        while True:
            try:
                plan = plan_replicated(size, levels, job.replicas, split_size=self.split_size,
                                       exclude=failed)
            except LookupError as exc:
                why = f"; {len(failed)} more full or unreachable" if failed else ""
                raise failure(f"job {job.job_id} keeps {job.replicas} copies of each piece on "
                              f"distinct storage servers: {exc}{why}") from None
            wanted = [(node, nbytes) for piece in plan for node, nbytes in piece]
            results = await asyncio.gather(*(self._alloc_on(job, node, nbytes)
                                             for node, nbytes in wanted), return_exceptions=True)
            copies: list = []
            error: Optional[BaseException] = None
            for (node, _nbytes), result in zip(wanted, results):
                if isinstance(result, (CapacityExceeded, Unavailable)):
                    failed.add(node)
                    if isinstance(result, CapacityExceeded):
                        failure = CapacityExceeded
                elif isinstance(result, BaseException):
                    error = error or result
                else:
                    copies.append([(node, e, length) for e, length in result])
            if len(copies) == len(wanted):
                it = iter(copies)
                return [[next(it) for _ in piece] for piece in plan]
            self._free_extents([x for copy in copies for x in copy])
            if error is not None:
                raise error

    async def _allocate(self, job: JobNamespace, size: int) -> list:
        """Extents for ``size`` bytes by the job's weight map; all or nothing."""
        failed: set[str] = set()
        todo = None
        got: list = []
        try:
            while True:
                try:
                    if todo is None:
                        todo = self._plan_spill(job, size, failed)
                except LookupError:
                    raise CapacityExceeded(
                        f"no storage server of job {job.job_id} has room for {size} bytes") from None
                if len(todo) == 1:  # the common case: no gather, no extra task
                    try:
                        results = [await self._alloc_on(job, *todo[0])]
                    except (CapacityExceeded, Unavailable) as exc:
                        results = [exc]
                else:
                    results = await asyncio.gather(
                        *(self._alloc_on(job, node, nbytes) for node, nbytes in todo),
                        return_exceptions=True)
                retry = []
                for (node, nbytes), result in zip(todo, results):
                    if isinstance(result, BaseException):
                        if not isinstance(result, (CapacityExceeded, Unavailable)):
                            raise result
                        failed.add(node)
                        retry.append(nbytes)
                    else:
                        got.extend((node, e, length) for e, length in result)
                if not retry:
                    return got
                todo = []
                for nbytes in retry:
                    try:
                        todo.extend(self._plan_spill(job, nbytes, failed))
                    except LookupError:
                        raise CapacityExceeded(
                            f"not enough free space for {size} bytes on the job's storage "
                            f"servers") from None
        except BaseException:
            if got:
                self._free_extents(got)
            raise

    def _plan_spill(self, job: JobNamespace, nbytes: int, failed: set) -> list:
        """Pieces on the job's own nodes; when none is left (all full or gone), on the first
        spill level that still has a node — the next tier with room.  LookupError if none."""
        try:
            return plan_pieces(nbytes, job.chooser, split_size=self.split_size, exclude=failed)
        except LookupError:
            if not job.spill:
                raise
        for _tier, chooser in job.spill:
            try:
                return plan_pieces(nbytes, chooser, split_size=self.split_size, exclude=failed)
            except LookupError:
                continue
        raise LookupError("no storage server left")

    async def _alloc_on(self, job: JobNamespace, node: str, nbytes: int) -> list:
        self._allocating[node] = self._allocating.get(node, 0) + 1
        try:
            conn = await self._storage_conn(node)
            reply = await conn.request(Op.EXT_ALLOC, {
                "job": job.job_id, "size": nbytes, "owner": self.instance,
                "auth": self._sign(Op.EXT_ALLOC, job.job_id, nbytes, self.instance)},
                timeout=10.0)
        finally:
            self._allocating[node] -= 1
            if not self._allocating[node]:
                del self._allocating[node]
        return reply.header["ext"]

    def handle_put_commit(self, conn: ServerConnection, frame: Frame) -> None:
        h = frame.header
        job = self._job(h)
        put = self.puts.get(h["put"])
        if put is None or put.job is not job:
            raise NotFound("no such pending put (it may have timed out)")
        sums = h.get("crc")
        # A replicated put has one checksum per piece (its copies hold the same bytes).
        count = len(put.pieces) if put.pieces is not None else len(put.extents)
        if sums is None and not put.checksummed:
            sums = [None] * count
        if not (isinstance(sums, list) and len(sums) == count and
                all(isinstance(c, int) or (c is None and not put.checksummed) for c in sums)):
            what = "piece" if put.pieces is not None else "extent"
            raise InvalidRequest(f"this put needs one checksum per {what} ({count})")
        del self.puts[h["put"]]
        if not job.active:
            self._free_extents(put.extents)
            raise AccessDenied(f"job {job.job_id} was deregistered during the put")
        if put.pieces is not None:
            obj = StoredObject(put.size, put.persist,
                               extents=[(n, e, length, None) for n, e, length in put.extents],
                               pieces=[(sum(length for _, _, length in piece[0]), crc, piece)
                                       for piece, crc in zip(put.pieces, sums)])
        else:
            obj = StoredObject(put.size, put.persist, extents=[
                (n, e, length, crc) for (n, e, length), crc in zip(put.extents, sums)])
        self._install(job, put.name, obj)
        return None

    def handle_put_abort(self, conn: ServerConnection, frame: Frame) -> None:
        h = frame.header
        job = self._job(h)
        put = self.puts.get(h["put"])
        if put is not None and put.job is job:
            del self.puts[h["put"]]
            self._free_extents(put.extents)
        return None

    def handle_get(self, conn: ServerConnection, frame: Frame):
        h = frame.header
        job = self._job(h)
        name = check_name(h["name"])
        obj = job.objects.get(name)
        if obj is None:
            raise NotFound(f"no object {name!r}")
        if obj.pieces is not None and not h.get("copies"):
            # An older client would take a reply without ``ext`` for an inline object.
            raise InvalidRequest(f"object {name!r} is replicated; this client does not know "
                                 f"replication (update it)")
        limit = h.get("max")
        if limit is not None and obj.size > limit:  # checked before delete_after_read
            raise InvalidRequest(f"object {name!r} has {obj.size} bytes; the buffer holds {limit}")
        if h.get("dar"):
            del job.objects[name]
            obj.dead = True
        if obj.inline is not None:
            data = obj.inline
            if obj.dead and obj.readers == 0:
                self._free(obj)
            return {"size": obj.size}, data
        obj.readers += 1
        lease = next(self._ids)
        self.leases[lease] = (job, obj, time.monotonic() + self.lease_timeout)
        if obj.pieces is not None:
            return {"size": obj.size, "pieces": self._piece_list(job, obj), "lease": lease}
        return {"size": obj.size, "ext": self._extent_list(job, obj), "lease": lease}

    def handle_release(self, conn: ServerConnection, frame: Frame) -> None:
        h = frame.header
        job = self._job(h)
        entry = self.leases.get(h["lease"])
        if entry is not None and entry[0] is job:
            del self.leases[h["lease"]]
            self._release(entry[1])
        return None

    def _release(self, obj: StoredObject) -> None:
        obj.readers -= 1
        if obj.dead and obj.readers == 0:
            self._free(obj)

    def handle_lookup(self, conn: ServerConnection, frame: Frame) -> dict:
        h = frame.header
        job = self._job(h)
        name = check_name(h["name"])
        obj = job.objects.get(name)
        if obj is None:
            raise NotFound(f"no object {name!r}")
        nodes = sorted({n for n, *_ in obj.extents})
        return {"size": obj.size, "persist": obj.persist, "inline": obj.inline is not None,
                "servers": [self.node_addresses.get(n, n) for n in nodes],
                "tier": object_tier(job, nodes) if obj.extents else "metadata",
                "created": obj.created}

    def handle_delete(self, conn: ServerConnection, frame: Frame) -> None:
        h = frame.header
        job = self._job(h)
        name = check_name(h["name"])
        obj = job.objects.pop(name, None)
        if obj is not None:
            self._retire(obj)
            return None
        dirname = name.rstrip("/")
        if dirname in job.dirs:
            prefix = dirname + "/"
            if any(n.startswith(prefix) for n in job.objects) or \
                    any(d.startswith(prefix) for d in job.dirs):
                raise InvalidRequest(f"directory {dirname!r} is not empty")
            job.dirs.discard(dirname)
            return None
        raise NotFound(f"no object {name!r}")

    def handle_mkdir(self, conn: ServerConnection, frame: Frame) -> None:
        h = frame.header
        job = self._job(h, write=True)
        name = check_name(h["name"]).rstrip("/")
        if not name:
            raise InvalidRequest("a directory needs a name")
        if name in job.objects:
            raise InvalidRequest(f"{name!r} is an object")
        job.dirs.add(name)
        return None

    def handle_list(self, conn: ServerConnection, frame: Frame) -> dict:
        h = frame.header
        job = self._job(h)
        prefix = h.get("prefix", "")
        if not isinstance(prefix, str):
            raise InvalidRequest("prefix must be a string")
        names = [n for n in job.objects if n.startswith(prefix)]
        names.extend(d + "/" for d in job.dirs if (d + "/").startswith(prefix))
        names.sort()
        return {"names": names}

    # -- controller handlers -------------------------------------------------
    def _set_weights(self, job: JobNamespace, h: dict) -> None:
        """Install a weight map, its spill levels ``[[tier, {node: weight}], ...]`` and the
        addresses (``nodes``) and tiers (``tiers``) of the nodes they name."""
        nodes = h.get("nodes", {})
        weights = h["weights"]
        spill = h.get("spill", [])
        tiers = h.get("tiers", {})
        if not isinstance(weights, dict) or not isinstance(nodes, dict) or \
                not isinstance(tiers, dict) or not isinstance(spill, list):
            raise InvalidRequest("weights, nodes and tiers must be maps, spill a list")
        levels = []
        for level in spill:
            if not (isinstance(level, (list, tuple)) and len(level) == 2 and
                    isinstance(level[1], dict)):
                raise InvalidRequest("a spill level is [tier, {node: weight}]")
            levels.append((str(level[0]), WeightedChooser(
                {str(k): float(v) for k, v in level[1].items()})))
        self.node_addresses.update({str(k): str(v) for k, v in nodes.items()})
        job.weights = {str(k): float(v) for k, v in weights.items()}
        job.chooser = WeightedChooser(job.weights)
        job.spill = levels
        job.node_tiers = {str(k): str(v) for k, v in tiers.items()}
        job.tier = str(h.get("tier", job.tier))

    def _controlled_job(self, h: dict) -> JobNamespace:
        """The job a JOB_UPDATE/JOB_REMOVE names; the controller proves it with the job's token."""
        job = self.jobs.get(h.get("job"))
        if job is None:
            raise NotFound("no such job")
        token = h.get("tok")
        if not isinstance(token, str) or not hmac.compare_digest(job.token, token):
            raise AccessDenied("wrong token for this job")
        return job

    def handle_job_add(self, conn: ServerConnection, frame: Frame) -> None:
        h = frame.header
        job_id, token = str(h["job"]), str(h["tok"])
        self._controller_signed(h, Op.JOB_ADD)
        if job_id in self.jobs:
            raise InvalidRequest(f"job {job_id} exists")
        job = JobNamespace(job_id, token, str(h.get("name", job_id)), {}, WeightedChooser({}),
                           checksums=bool(h.get("checksums")),
                           lease=float(h.get("lease") or self.job_lease),
                           replicas=check_replicas(h.get("replicas", 1)))
        self._set_weights(job, h)
        self.jobs[job_id] = job
        log.info("job %s added with weights %s", job_id, job.weights)
        return None

    def _controller_signed(self, h: dict, opcode: int) -> None:
        """Only the controller (holding the cluster key) adds jobs and changes weight maps."""
        if self.key is None:
            raise AccessDenied("the metadata server has no cluster key yet (not registered)")
        self.key.check(h.get("auth"), opcode, h.get("job"))

    def handle_job_update(self, conn: ServerConnection, frame: Frame) -> None:
        self._controller_signed(frame.header, Op.JOB_UPDATE)
        job = self._controlled_job(frame.header)
        self._set_weights(job, frame.header)
        return None

    def handle_job_remove(self, conn: ServerConnection, frame: Frame) -> dict:
        """Deregistration: free everything not persisted (or everything, ``all``)."""
        return self._remove_job(self._controlled_job(frame.header), bool(frame.header.get("all")))

    def handle_job_renew(self, conn: ServerConnection, frame: Frame) -> dict:
        """A live driver keeps its job's lease (any request of the job does too)."""
        job = self._job(frame.header)
        return {"lease": job.lease, "active": job.active}

    def _remove_job(self, job: JobNamespace, everything: bool = False) -> dict:
        h = {"all": everything}
        freed = 0
        for name, obj in list(job.objects.items()):
            if h.get("all") or not obj.persist:
                del job.objects[name]
                freed += obj.size
                self._retire(obj)
        for put_id, put in list(self.puts.items()):
            if put.job is job:
                del self.puts[put_id]
                self._free_extents(put.extents)
        job.active = False
        kept = len(job.objects)
        if not kept:
            job.dirs.clear()
        log.info("job %s deregistered: %d bytes freed, %d persisted objects kept",
                 job.job_id, freed, kept)
        if h.get("all"):
            del self.jobs[job.job_id]
        return {"freed": freed, "kept": kept}

    # -- moving extents off a draining node (--migrate-on-drain) ------------------
    async def handle_extents_move(self, conn: ServerConnection, frame: Frame) -> dict:
        """Move every live extent on storage node ``node`` to the ``targets`` (node → weight).

        Per object: copy each of its extents on ``node`` (EXT_READ with a read
        capability this server mints, EXT_ALLOC + EXT_WRITE on a target), then,
        only if the object is still the one under its name, swap in a new
        object whose extent list names the copies — one step, like an
        overwrite.  The old extents on ``node`` are freed once no reader holds
        a lease on the old object (readers that looked it up before the swap
        read the old extents, which stay until they release).  A failed copy
        frees its new extents and leaves the object where it was.

        Idempotent; the controller repeats it until ``left``, ``pending``,
        ``allocating`` and ``held`` are all 0: then nothing of this server's is
        on ``node`` or about to be.
        """
        h = frame.header
        node = h.get("node")
        if not isinstance(node, str):
            raise InvalidRequest("node must be a storage node id")
        if self.key is None:
            raise AccessDenied("the metadata server has no cluster key yet (not registered)")
        targets, addresses = h.get("targets"), h.get("nodes", {})
        # The whole request is signed: a replayed frame cannot redirect node addresses.
        self.key.check(h.get("auth"), Op.EXTENTS_MOVE, node, targets, addresses)
        if not (isinstance(targets, dict) and isinstance(addresses, dict) and
                all(isinstance(v, (int, float)) for v in targets.values())):
            raise InvalidRequest("targets must map nodes to weights, nodes to addresses")
        self.node_addresses.update({str(k): str(v) for k, v in addresses.items()
                                    if k in targets})
        weights = {str(k): float(v) for k, v in targets.items() if k != node and v > 0}
        if node in self._moving:
            return {"busy": True, **self._left_on(node)}
        self._moving.add(node)
        moved = moved_bytes = failed = 0
        try:
            chooser = WeightedChooser(weights)
            for job in list(self.jobs.values()):
                for name, obj in list(job.objects.items()):
                    if obj.dead or obj.readers or not any(e[0] == node for e in obj.extents):
                        continue  # one being read is moved in a later round
                    try:
                        nbytes = await self._move_object(job, name, obj, node, chooser)
                    except (PocketError, LookupError) as exc:
                        failed += 1
                        log.warning("could not move %r of job %s off %s: %s", name, job.job_id,
                                    node, exc)
                        continue
                    if nbytes:
                        moved += 1
                        moved_bytes += nbytes
        finally:
            self._moving.discard(node)
        if moved:
            log.info("moved %d objects (%d bytes) off storage node %s", moved, moved_bytes, node)
        return {"moved": moved, "bytes": moved_bytes, "failed": failed, **self._left_on(node)}

    def _left_on(self, node: str) -> dict:
        """What this server still has on ``node``: live objects, pending puts, allocations in
        flight, and retired objects a reader still holds a lease on."""
        live = sum(1 for job in self.jobs.values() for o in job.objects.values()
                   if any(e[0] == node for e in o.extents))
        pending = sum(1 for p in self.puts.values() if any(e[0] == node for e in p.extents))
        held = sum(1 for _, o, _ in self.leases.values()
                   if o.dead and any(e[0] == node for e in o.extents))
        return {"left": live, "pending": pending, "allocating": self._allocating.get(node, 0),
                "held": held}

    async def _move_object(self, job: JobNamespace, name: str, obj: StoredObject, node: str,
                           chooser: WeightedChooser) -> int:
        """Copy ``obj``'s extents on ``node`` elsewhere and swap the object; bytes moved
        (0 if the object changed meanwhile: the copies are freed, nothing else changes)."""
        copies: list = []  # (node, extent id, length) allocated for the copies
        copy = self._copy_replicated if obj.pieces is not None else self._copy_extents
        try:
            moved_to = await copy(job, name, obj, node, chooser, copies)
        except BaseException:
            if copies:
                self._free_extents(copies)
            raise
        if not self._still_movable(job, name, obj):
            self._free_extents(copies)
            return 0
        job.objects[name] = moved_to
        # The old object keeps only its extents on ``node`` and is retired (freed in the
        # background; the copies took the place of those, the rest moved with the name).
        moved = [e for e in obj.extents if e[0] == node]
        obj.extents = moved
        obj.pieces = None
        self._retire(obj)
        return sum(e[2] for e in moved)

    @staticmethod
    def _still_movable(job: JobNamespace, name: str, obj: StoredObject) -> bool:
        """Whether the copy just made may replace ``obj``: it is still the object under
        ``name`` and nobody reads it.  A reader's lease covers all of the old object's
        extents, but after the swap only those on the draining node stay with it (the
        others belong to the new object and go with its next delete), so an object
        being read is left for the next round (the controller repeats the move)."""
        return job.objects.get(name) is obj and not obj.dead and obj.readers == 0

    async def _copy_extents(self, job: JobNamespace, name: str, obj: StoredObject, node: str,
                            chooser: WeightedChooser, copies: list) -> StoredObject:
        """The object with each of its extents on ``node`` copied to a target (new
        checksums where the old extent had one); new extents are appended to ``copies``."""
        extents: list = []
        for entry in obj.extents:
            src, ext_id, length, crc = entry
            if src != node:
                extents.append(entry)
                continue
            data = await self._read_extent(job, src, ext_id, length)
            verify_checksum(data, crc, f"extent {ext_id} on {src}")
            offset = 0
            for dst, new_id, piece in await self._alloc_elsewhere(job, length, chooser,
                                                                   node, copies):
                view = memoryview(data)[offset:offset + piece]
                await self._write_extent(job, dst, new_id, view)
                extents.append((dst, new_id, piece, checksum(view) if crc is not None
                                else None))
                offset += piece
        return StoredObject(obj.size, obj.persist, extents=extents, created=obj.created)

    async def _copy_replicated(self, job: JobNamespace, name: str, obj: StoredObject,
                               node: str, chooser: WeightedChooser,
                               copies: list) -> StoredObject:
        """:meth:`_copy_extents` for a replicated object: each copy on ``node`` (a copy is on
        one node) is read whole, checked against its piece's checksum, and written to a
        node holding no other copy of that piece, so the copies stay on distinct nodes."""
        pieces: list = []
        for length, crc, piece_copies in obj.pieces or ():
            kept = []
            for copy in piece_copies:
                if all(n != node for n, _, _ in copy):
                    kept.append(copy)
                    continue
                data = bytearray()
                for src, ext_id, ext_len in copy:
                    data += await self._read_extent(job, src, ext_id, ext_len)
                verify_checksum(data, crc, f"a copy of {name!r} on {node}")
                others = {n for c in piece_copies if c is not copy for n, _, _ in c}
                got = await self._alloc_elsewhere(job, len(data), chooser, node, copies,
                                                  avoid=others)
                offset = 0
                for dst, new_id, piece in got:
                    await self._write_extent(job, dst, new_id,
                                             memoryview(data)[offset:offset + piece])
                    offset += piece
                kept.append(list(got))
            pieces.append((length, crc, kept))
        extents = [(n, e, length, None) for _, _, kept in pieces for copy in kept
                   for n, e, length in copy]
        return StoredObject(obj.size, obj.persist, extents=extents, pieces=pieces,
                            created=obj.created)

    async def _read_extent(self, job: JobNamespace, node: str, ext_id: int,
                           length: int) -> bytearray:
        buf = bytearray(length)
        conn = await self._storage_conn(node)
        (cap,) = self._capabilities(job, [ext_id], "r")
        frame = await conn.request(Op.EXT_READ, {"ext": ext_id, "off": 0, "len": length,
                                                 "cap": cap}, into=memoryview(buf), timeout=30.0)
        if not frame.sunk:
            raise Unavailable(f"storage node {node} answered a read with the wrong size")
        return buf

    async def _write_extent(self, job: JobNamespace, node: str, ext_id: int,
                            data: memoryview) -> None:
        conn = await self._storage_conn(node)
        (cap,) = self._capabilities(job, [ext_id], "w")
        await conn.request(Op.EXT_WRITE, {"ext": ext_id, "off": 0, "cap": cap}, data,
                           timeout=30.0)

    async def _alloc_elsewhere(self, job: JobNamespace, size: int, chooser: WeightedChooser,
                               node: str, copies: list, avoid: frozenset | set = frozenset()
                               ) -> list:
        """``size`` bytes on one target (the next by weight that has room, not one of
        ``avoid``), as ``[(node, extent id, length)]``; also appended to ``copies``."""
        failed = {node, *avoid}
        while True:
            target = chooser.choose(exclude=failed)  # LookupError: no target has room
            try:
                got = [(target, e, length) for e, length in await self._alloc_on(job, target,
                                                                                 size)]
            except (CapacityExceeded, Unavailable):
                failed.add(target)
                continue
            copies.extend(got)
            return got

    # -- background ----------------------------------------------------------
    async def _sweep(self) -> None:
        """Expire forgotten leases, abandoned puts and jobs whose lease ran out."""
        while True:
            await asyncio.sleep(min(5.0, self.lease_timeout / 2, self.job_lease / 4))
            now = time.monotonic()
            self._reclaim_idle_jobs(now)
            for lease, (_job, obj, deadline) in list(self.leases.items()):
                if deadline < now:
                    del self.leases[lease]
                    self._release(obj)
            for put_id, put in list(self.puts.items()):
                if put.deadline < now:
                    del self.puts[put_id]
                    self._free_extents(put.extents)
                    log.warning("put of %r in job %s timed out; space freed", put.name,
                                put.job.job_id)

    def _reclaim_idle_jobs(self, now: float) -> None:
        """A job whose driver died without deregistering: nobody renewed its lease, so its
        objects are freed as at deregistration (persisted ones are kept)."""
        for job in list(self.jobs.values()):
            if job.active and now - job.last_active > job.lease:
                log.warning("job %s: lease of %.0fs expired without renewal; reclaiming it",
                            job.job_id, job.lease)
                self._remove_job(job)

    def metric_gauges(self) -> list:
        return [(name, doc, (), [((), value)]) for name, doc, value in (
            ("pocket_metadata_inline_used_bytes", "Bytes of inline (small) objects stored here",
             self.inline_used),
            ("pocket_metadata_inline_capacity_bytes", "Space for inline objects",
             self.inline_capacity),
            ("pocket_metadata_jobs", "Jobs whose namespaces this server holds", len(self.jobs)),
            ("pocket_metadata_pending_puts", "Large puts begun and not yet committed",
             len(self.puts)),
            ("pocket_metadata_read_leases", "Read leases held on large objects",
             len(self.leases)))]

    def stats(self) -> dict:
        usage = self._meter.read(self.bytes_in, self.bytes_out)
        usage.update({
            "capacity": self.inline_capacity, "used": self.inline_used,
            "jobs": {job_id: {"objects": len(j.objects), "bytes": j.bytes_stored(),
                              "active": j.active}
                     for job_id, j in self.jobs.items()},
            "pending_puts": len(self.puts), "leases": len(self.leases),
        })
        return usage

    async def on_start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        if self.controller:
            self.link = ControllerLink(
                self.controller,
                lambda: {"role": "metadata", "tier": "metadata", "addr": self.address,
                         "capacity": self.inline_capacity, "inline_max": self.inline_max,
                         "owner": self.instance},
                self.stats, self.heartbeat_interval, server=self)
            self.link.start()

    async def on_stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.link is not None:
            await self.link.leave()
        self._storage.close()
