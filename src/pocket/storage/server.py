"""The storage server: blocks of one tier on one node, moved as extents.

An *extent* is a run of blocks handed out by :meth:`StorageServer.alloc` under
a random 63-bit id.  Writes are received straight into the extent's place in
the arena (the codec's sink); reads are sent from it as memoryviews.  The
metadata server decides what to allocate and free; clients only write and
read extents whose ids the metadata server gave them.
"""

from __future__ import annotations

import logging
import mmap
import secrets
from dataclasses import dataclass
from typing import Optional

from ..errors import CapacityExceeded, InvalidRequest, NotFound
from ..node import ControllerLink, UsageMeter
from ..protocol import Frame, Limits, Op
from ..server import Server, ServerConnection
from .allocator import BlockAllocator

log = logging.getLogger("pocket.storage")

#: The largest single extent; bigger requests get several extents.
MAX_EXTENT = 64 << 20
TIERS = ("dram", "nvme", "ssd", "hdd")


@dataclass
class Extent:
    """A run of blocks owned by one job."""

    block: int
    nblocks: int
    length: int  # bytes the owner asked for (≤ nblocks * block_size)
    job: str


class DramArena:
    """A preallocated anonymous mapping; pages become resident only when written."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._map = mmap.mmap(-1, max(capacity, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._map)

    def release(self, offset: int, length: int) -> None:
        """Give freed pages back to the OS (they read as zeros afterwards)."""
        if length >= mmap.PAGESIZE and offset % mmap.PAGESIZE == 0:
            self._map.madvise(mmap.MADV_DONTNEED, offset, length - length % mmap.PAGESIZE)


class StorageServer(Server):
    """Serves EXT_ALLOC / EXT_WRITE / EXT_READ / EXT_FREE for one tier."""

    role = "storage"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, tier: str = "dram",
                 capacity: int = 1 << 30, block_size: int = 4096,
                 controller: Optional[str] = None, heartbeat: float = 1.0) -> None:
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
        if tier != "dram":
            raise ValueError(f"tier {tier!r} is not available yet; use --tier dram")
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError("block size must be a power of two ≥ 512")
        if capacity < block_size:
            raise ValueError("capacity must hold at least one block")
        super().__init__(host, port, Limits(max_header=64 << 10, max_payload=MAX_EXTENT))
        self.tier = tier
        self.block_size = block_size
        self.capacity = capacity - capacity % block_size
        self.arena = DramArena(self.capacity)
        self.allocator = BlockAllocator(self.capacity // block_size)
        self.extents: dict[int, Extent] = {}
        self.controller = controller
        self.heartbeat_interval = heartbeat
        self.link: Optional[ControllerLink] = None
        self._meter = UsageMeter()
        self.handlers.update({
            Op.EXT_ALLOC: self.handle_alloc,
            Op.EXT_WRITE: self.handle_write,
            Op.EXT_READ: self.handle_read,
            Op.EXT_FREE: self.handle_free,
        })

    @property
    def used(self) -> int:
        return self.allocator.used_blocks * self.block_size

    # -- space ---------------------------------------------------------------
    def alloc(self, job: str, size: int) -> list[tuple[int, int]]:
        """Allocate ``size`` bytes for ``job``; return ``[(extent id, length)]``."""
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
                self.extents[ext_id] = Extent(block, take, length, job)
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
        self.allocator.free(ext.block, ext.nblocks)
        self.arena.release(ext.block * self.block_size, ext.nblocks * self.block_size)
        return ext.nblocks * self.block_size

    def _extent_view(self, header: dict, size: int) -> memoryview:
        ext = self.extents.get(header["ext"])
        if ext is None:
            raise NotFound("no such extent")
        off = header.get("off", 0)
        if not isinstance(off, int) or off < 0 or off + size > ext.length:
            raise InvalidRequest(f"range {off}+{size} outside extent of {ext.length} bytes")
        start = ext.block * self.block_size + off
        return self.arena.view[start:start + size]

    # -- handlers ------------------------------------------------------------
    def sink(self, conn: ServerConnection, opcode: int, flags: int, rid: int,
             header: dict, size: int) -> Optional[memoryview]:
        if opcode == Op.EXT_WRITE:
            try:
                return self._extent_view(header, size)
            except Exception:
                return None  # received into a scratch buffer; the handler reports why
        if size > 0:
            raise InvalidRequest("only EXT_WRITE carries a payload")
        return None

    def handle_alloc(self, conn: ServerConnection, frame: Frame) -> dict:
        h = frame.header
        return {"ext": self.alloc(str(h["job"]), h["size"])}

    def handle_write(self, conn: ServerConnection, frame: Frame) -> None:
        if not frame.sunk:
            self._extent_view(frame.header, len(frame.payload))  # raises the reason
            raise InvalidRequest("write was not received into its extent")
        return None

    def handle_read(self, conn: ServerConnection, frame: Frame):
        h = frame.header
        return None, self._extent_view(h, h["len"])

    def handle_free(self, conn: ServerConnection, frame: Frame) -> dict:
        ids = frame.header["ext"]
        if not isinstance(ids, list):
            raise InvalidRequest("ext must be a list of extent ids")
        return {"freed": sum(self.free(i) for i in ids)}

    # -- lifecycle -----------------------------------------------------------
    def stats(self) -> dict:
        usage = self._meter.read(self.bytes_in, self.bytes_out)
        usage.update({"tier": self.tier, "capacity": self.capacity, "used": self.used,
                      "extents": len(self.extents)})
        return usage

    async def on_start(self) -> None:
        log.info("storage: tier %s, %d bytes in %d-byte blocks", self.tier, self.capacity,
                 self.block_size)
        if self.controller:
            self.link = ControllerLink(
                self.controller,
                lambda: {"role": "storage", "tier": self.tier, "addr": self.address,
                         "capacity": self.capacity, "block_size": self.block_size},
                self.stats, self.heartbeat_interval)
            self.link.start()

    async def on_stop(self) -> None:
        if self.link is not None:
            await self.link.leave()
