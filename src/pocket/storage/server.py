"""The storage server: blocks of one tier on one node, moved as extents.

An *extent* is a run of blocks handed out by :meth:`StorageServer.alloc` under
a random 63-bit id.  Writes are received straight into the extent's place in
the arena (the codec's sink); reads are sent from it as memoryviews.  The
metadata server decides what to allocate and free; clients only write and
read extents whose ids the metadata server gave them.

Extents are grouped by *owner*, the instance id of the metadata server that
allocated them (``EXT_ALLOC`` carries it, signed).  Heartbeats report the
owners held here; when the controller has not heard from an owner for its
``--reclaim-after`` (the metadata server died or restarted: its namespaces,
and so every way to reach or free these extents, are gone), it sends a
signed ``EXT_RECLAIM`` and all of that owner's extents are freed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import mmap
import secrets
import time
from dataclasses import dataclass
from typing import Optional, Union

from ..errors import AccessDenied, InvalidRequest, NotFound
from ..node import ControllerLink, UsageMeter
from ..protocol import Frame, Limits, Op
from ..server import REPLIED, Server, ServerConnection
from .allocator import BlockAllocator
from .flash import ALIGN, FlashDevice

log = logging.getLogger("pocket.storage")

#: The largest single extent; bigger requests get several extents.
MAX_EXTENT = 64 << 20
TIERS = ("dram", "nvme", "ssd", "hdd")
FLASH_TIERS = ("nvme", "ssd", "hdd")
#: Flash writes received but not yet on the device; above this, stop reading.
FLASH_INFLIGHT_LIMIT = 256 << 20
#: Longest owner (metadata server instance) id accepted in EXT_ALLOC / EXT_RECLAIM.
MAX_OWNER_LEN = 64
#: Most owners listed in one heartbeat (there are a handful of metadata servers).
MAX_REPORTED_OWNERS = 256


@dataclass
class Extent:
    """A run of blocks owned by one job."""

    block: int
    nblocks: int
    length: int  # bytes the owner asked for (≤ nblocks * block_size)
    job: str
    #: The metadata server instance that allocated it (None: never reclaimed by owner).
    owner: Optional[str] = None


def check_owner(owner: object, required: bool = False) -> Optional[str]:
    """A well-formed owner id (or None when not ``required``), else InvalidRequest."""
    if owner is None and not required:
        return None
    if not isinstance(owner, str) or not 0 < len(owner) <= MAX_OWNER_LEN:
        raise InvalidRequest(f"owner must be a string of 1 to {MAX_OWNER_LEN} characters")
    return owner


def resident_bytes() -> int:
    """This process's resident set size (from /proc/self/statm)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


class DramArena:
    """A preallocated anonymous mapping; pages become resident only when written.

    Freed space stays resident so the next write into it does not fault and
    zero fresh pages (that churn costs more than the copy itself); :meth:`trim`
    returns free pages to the OS once the process holds more than the stored
    bytes plus a slack.
    """

    direct = False

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._map = mmap.mmap(-1, max(capacity, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._map)
        self.baseline = resident_bytes()

    def release(self, offset: int, length: int) -> None:
        """Freed space is kept resident for reuse; see :meth:`trim`."""

    def trim(self, free_runs: list[tuple[int, int]], block_size: int, used: int,
             slack: int) -> int:
        """If resident memory exceeds ``used + slack``, drop the pages of free runs.

        Returns the bytes of free space advised away (0 when within budget).
        """
        if resident_bytes() - self.baseline <= used + slack:
            return 0
        released = 0
        for start, nblocks in free_runs:
            offset, length = start * block_size, nblocks * block_size
            head = -offset % mmap.PAGESIZE
            length = (length - head) // mmap.PAGESIZE * mmap.PAGESIZE
            if length > 0:
                self._map.madvise(mmap.MADV_DONTNEED, offset + head, length)
                released += length
        return released


class StorageServer(Server):
    """Serves EXT_ALLOC / EXT_WRITE / EXT_READ / EXT_FREE for one tier."""

    role = "storage"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, tier: str = "dram",
                 capacity: int = 1 << 30, block_size: int = 4096,
                 controller: Optional[str] = None, heartbeat: float = 1.0,
                 directory: Optional[str] = None, allow_buffered: bool = False,
                 io_threads: int = 4, resident_slack: int = 64 << 20,
                 write_buffer: int = FLASH_INFLIGHT_LIMIT) -> None:
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError("block size must be a power of two ≥ 512")
        if tier in FLASH_TIERS and block_size < ALIGN:
            raise ValueError(f"flash tiers need a block size of at least {ALIGN}")
        if capacity < block_size:
            raise ValueError("capacity must hold at least one block")
        super().__init__(host, port, Limits(max_header=64 << 10, max_payload=MAX_EXTENT))
        self.tier = tier
        self.block_size = block_size
        self.capacity = capacity - capacity % block_size
        self.device: Union[DramArena, FlashDevice]
        if tier == "dram":
            self.device = DramArena(self.capacity)
        else:
            if not directory:
                raise ValueError(f"--dir is required for the {tier} tier")
            self.device = FlashDevice(directory, self.capacity, tier=tier,
                                      allow_buffered=allow_buffered, io_threads=io_threads)
        self.flash = tier in FLASH_TIERS
        self.resident_slack = resident_slack
        self._trimmer: Optional[asyncio.Task] = None
        self.allocator = BlockAllocator(self.capacity // block_size)
        self.extents: dict[int, Extent] = {}
        #: Owner (metadata server instance) → ids of its extents here.
        self.owners: dict[str, set[int]] = {}
        #: Owner → when it last allocated here (monotonic); kept while it owns extents.
        self._last_alloc: dict[str, float] = {}
        self.controller = controller
        self.heartbeat_interval = heartbeat
        self.link: Optional[ControllerLink] = None
        self._meter = UsageMeter()
        self._dev_meter = UsageMeter()
        self.flash_inflight = 0
        self.write_buffer = write_buffer
        self._paused: set[ServerConnection] = set()
        self.handlers.update({
            Op.EXT_ALLOC: self.handle_alloc,
            Op.EXT_WRITE: self.handle_write,
            Op.EXT_READ: self.handle_read,
            Op.EXT_FREE: self.handle_free,
            Op.EXT_RECLAIM: self.handle_reclaim,
        })

    @property
    def used(self) -> int:
        return self.allocator.used_blocks * self.block_size

    # -- space ---------------------------------------------------------------
    def alloc(self, job: str, size: int, owner: Optional[str] = None) -> list[tuple[int, int]]:
        """Allocate ``size`` bytes for ``job`` on behalf of metadata server ``owner``;
        return ``[(extent id, length)]``."""
        if not isinstance(size, int) or size <= 0:
            raise InvalidRequest("allocation size must be a positive integer")
        bs = self.block_size
        runs = self.allocator.allocate(-(-size // bs))
        out = []
        remaining = size
        for block, nblocks in runs:
            # Cut long runs so that no extent exceeds MAX_EXTENT.
            while nblocks:
                take = min(nblocks, MAX_EXTENT // bs)
                length = min(take * bs, remaining)
                ext_id = self._new_id()
                self.extents[ext_id] = Extent(block, take, length, job, owner)
                if owner is not None:
                    self.owners.setdefault(owner, set()).add(ext_id)
                out.append((ext_id, length))
                remaining -= length
                block += take
                nblocks -= take
        return out

    def _new_id(self) -> int:
        while True:
            ext_id = secrets.randbits(63)
            if ext_id and ext_id not in self.extents:
                return ext_id

    def free(self, ext_id: int) -> int:
        ext = self.extents.pop(ext_id, None)
        if ext is None:
            return 0
        if ext.owner is not None:
            owned = self.owners.get(ext.owner)
            if owned is not None:
                owned.discard(ext_id)
                if not owned:
                    del self.owners[ext.owner]
                    self._last_alloc.pop(ext.owner, None)
        self.allocator.free(ext.block, ext.nblocks)
        self.device.release(ext.block * self.block_size, ext.nblocks * self.block_size)
        return ext.nblocks * self.block_size

    def _authorized(self, header: dict, rights: str) -> Extent:
        """The extent ``header['ext']`` if ``header['cap']`` grants ``rights`` on it (else raise)."""
        ext_id = header["ext"]
        ext = self.extents.get(ext_id)
        if ext is None:
            raise NotFound("no such extent")
        key = self.key
        if key is None:
            raise AccessDenied("this storage server has no cluster key yet (not registered)")
        key.verify(header.get("cap"), ext.job, ext_id, rights)
        return ext

    def _internal(self, header: dict, opcode: int, *fields) -> None:
        """Requests only the metadata server may make carry its signature."""
        if self.key is None:
            raise AccessDenied("this storage server has no cluster key yet (not registered)")
        self.key.check(header.get("auth"), opcode, *fields)

    def _extent_offset(self, header: dict, size: int, rights: str = "r") -> int:
        """The device offset of ``size`` bytes at ``header['off']`` in extent ``header['ext']``,
        if the request's capability grants ``rights`` on it."""
        ext = self._authorized(header, rights)
        off = header.get("off", 0)
        if not isinstance(off, int) or not isinstance(size, int) or off < 0 or size < 0 \
                or off + size > ext.length:
            raise InvalidRequest(f"range {off}+{size} outside extent of {ext.length} bytes")
        return ext.block * self.block_size + off

    def _extent_view(self, header: dict, size: int, rights: str = "r") -> memoryview:
        start = self._extent_offset(header, size, rights)
        return self.device.view[start:start + size]

    # -- handlers ------------------------------------------------------------
    def sink(self, conn: ServerConnection, opcode: int, flags: int, rid: int,
             header: dict, size: int) -> Optional[memoryview]:
        if opcode == Op.EXT_WRITE:
            try:
                if not self.flash:
                    return self._extent_view(header, size, "w")  # received into its block
                if self._extent_offset(header, size, "w") % ALIGN:
                    return None
            except Exception:
                return None  # received into a scratch buffer; the handler reports why
            # Flash: receive into a page-aligned buffer that goes to the device as is.
            return memoryview(self.device.buffers.take(size))[:size]
        if size > 0:
            raise InvalidRequest("only EXT_WRITE carries a payload")
        return None

    def handle_alloc(self, conn: ServerConnection, frame: Frame) -> dict:
        h = frame.header
        self._internal(h, Op.EXT_ALLOC, h["job"], h["size"], h.get("owner"))
        owner = check_owner(h.get("owner"))
        if owner is not None:  # EXT_RECLAIM will not free the extents of an owner heard here
            self._last_alloc[owner] = time.monotonic()
        return {"ext": self.alloc(str(h["job"]), h["size"], owner)}

    def handle_write(self, conn: ServerConnection, frame: Frame):
        if not frame.sunk:
            start = self._extent_offset(frame.header, len(frame.payload), "w")  # raises why
            if self.flash and start % ALIGN:
                raise InvalidRequest(f"flash writes must start at a multiple of {ALIGN} bytes")
            raise InvalidRequest("write was not received into its extent")
        if self.flash:
            # Count only whole frames waiting for the device, and pause a
            # connection between frames: every counted write completes, so
            # the count always falls and paused connections always resume.
            self.flash_inflight += len(frame.payload)
            if self.flash_inflight > self.write_buffer and conn.transport is not None:
                conn.transport.pause_reading()
                self._paused.add(conn)
            return self._write_flash(frame)
        return None

    async def _write_flash(self, frame: Frame) -> None:
        size = len(frame.payload)
        try:
            # Look the extent up again: it may have been freed while the payload arrived.
            start = self._extent_offset(frame.header, size, "w")
            await self.device.write(start, frame.payload)
        finally:
            self.device.buffers.give(frame.payload.obj)
            self.flash_inflight -= size
            if self._paused and self.flash_inflight <= self.write_buffer:
                for conn in self._paused:
                    if conn.transport is not None and not conn.transport.is_closing():
                        conn.transport.resume_reading()
                self._paused.clear()

    def connection_closed(self, conn: ServerConnection) -> None:
        self._paused.discard(conn)

    def handle_read(self, conn: ServerConnection, frame: Frame):
        h = frame.header
        if self.flash:
            return self._read_flash(conn, frame)
        return None, self._extent_view(h, h["len"])

    async def _read_flash(self, conn: ServerConnection, frame: Frame):
        h = frame.header
        start = self._extent_offset(h, h["len"])
        view = await self.device.read(start, h["len"])
        conn.reply(frame, (None, view))
        # The transport may still hold the buffer; hand it back to the pool
        # once everything written on this connection has left (FIFO).
        self._recycle_when_sent(conn, view.obj, 0)
        return REPLIED

    def _recycle_when_sent(self, conn: ServerConnection, buf, tries: int) -> None:
        transport = conn.transport
        if transport is None or transport.is_closing() or tries > 200:
            return  # left to the garbage collector
        if transport.get_write_buffer_size() == 0:
            self.device.buffers.give(buf)
        else:
            asyncio.get_running_loop().call_later(0.002, self._recycle_when_sent, conn, buf,
                                                  tries + 1)

    def handle_free(self, conn: ServerConnection, frame: Frame) -> dict:
        ids = frame.header["ext"]
        if not isinstance(ids, list):
            raise InvalidRequest("ext must be a list of extent ids")
        self._internal(frame.header, Op.EXT_FREE, ids)
        return {"freed": sum(self.free(i) for i in ids)}

    def reclaim(self, owner: str) -> tuple[int, int]:
        """Free every extent ``owner`` allocated; returns (extents, bytes) freed."""
        ids = list(self.owners.get(owner, ()))
        return len(ids), sum(self.free(i) for i in ids)

    def handle_reclaim(self, conn: ServerConnection, frame: Frame) -> dict:
        """The controller says metadata server ``owner`` is dead: its extents are unreachable."""
        owner, silent = frame.header.get("owner"), frame.header.get("silent")
        self._internal(frame.header, Op.EXT_RECLAIM, owner, silent)
        owner = check_owner(owner, required=True)
        if not isinstance(silent, (int, float)) or silent <= 0:
            raise InvalidRequest("silent must be a positive number of seconds")
        last = self._last_alloc.get(owner)
        if last is not None and time.monotonic() - last < silent:
            # The controller has not heard from this owner for ``silent`` seconds, but this
            # server has: the owner lives (its controller link is cut, or it just came back).
            raise AccessDenied(f"metadata server instance {owner} allocated here "
                               f"{time.monotonic() - last:.1f}s ago; not reclaiming its extents")
        count, freed = self.reclaim(owner)
        if count:
            log.warning("reclaimed %d extents (%d bytes) of metadata server instance %s, "
                        "which the controller declared dead", count, freed, owner)
        return {"extents": count, "freed": freed}

    def metric_gauges(self) -> list:
        gauges = [
            ("pocket_storage_used_bytes", "Bytes stored (allocated blocks)", self.used),
            ("pocket_storage_capacity_bytes", "Bytes this server serves", self.capacity),
            ("pocket_storage_extents", "Extents allocated", len(self.extents)),
        ]
        if self.flash:
            gauges += [("pocket_storage_device_read_bytes", "Bytes read from the device",
                        self.device.bytes_read),
                       ("pocket_storage_device_written_bytes", "Bytes written to the device",
                        self.device.bytes_written)]
        return [(name, doc, ("tier",), [((self.tier,), value)]) for name, doc, value in gauges]

    # -- lifecycle -----------------------------------------------------------
    def stats(self) -> dict:
        usage = self._meter.read(self.bytes_in, self.bytes_out)
        usage.update({"tier": self.tier, "capacity": self.capacity, "used": self.used,
                      "extents": len(self.extents),
                      "owners": list(itertools.islice(self.owners, MAX_REPORTED_OWNERS))})
        if self.flash:
            dev = self._dev_meter.read(self.device.bytes_read, self.device.bytes_written)
            usage.update({"dev_read": dev["net_in"], "dev_write": dev["net_out"],
                          "direct_io": self.device.direct})
        return usage

    async def _trim_loop(self) -> None:
        """Keep DRAM residency within stored bytes + slack (checked twice a second)."""
        while True:
            await asyncio.sleep(0.5)
            released = self.device.trim(self.allocator.free_runs, self.block_size, self.used,
                                        self.resident_slack)
            if released:
                log.debug("trimmed %d bytes of free arena pages", released)

    async def on_start(self) -> None:
        log.info("storage: tier %s, %d bytes in %d-byte blocks", self.tier, self.capacity,
                 self.block_size)
        if not self.flash:
            self._trimmer = asyncio.get_running_loop().create_task(self._trim_loop())
        if self.controller:
            self.link = ControllerLink(
                self.controller,
                lambda: {"role": "storage", "tier": self.tier, "addr": self.address,
                         "capacity": self.capacity, "block_size": self.block_size},
                self.stats, self.heartbeat_interval, server=self)
            self.link.start()

    async def on_stop(self) -> None:
        if self._trimmer is not None:
            self._trimmer.cancel()
        if self.link is not None:
            await self.link.leave()
        if self.flash:
            self.device.close()
