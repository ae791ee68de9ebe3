"""Flash (and disk) tiers: one preallocated data file per server, driven with O_DIRECT.

All device I/O goes through page-aligned anonymous ``mmap`` buffers with
``os.pwritev`` / ``os.preadv`` in a small bounded thread pool, so the event
loop never blocks, the page cache neither copies nor hides the device, and a
payload is received from the network straight into the buffer that is
written to the device.  (aiofiles is not used here: it wraps buffered file
objects and cannot read into a caller's aligned buffer, which O_DIRECT needs;
plain ``os.preadv``/``os.pwritev`` in our own executor does exactly that.)

Sizes that are not a multiple of the sector size are padded with zeros on
write and trimmed on read, so no byte of another object is ever exposed.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

log = logging.getLogger("pocket.storage.flash")

#: Alignment for offsets, lengths and buffer addresses (covers 512 B and 4 KiB sectors).
ALIGN = 4096
#: Filesystems that keep data in memory and accept O_DIRECT without honouring it.
MEMORY_FILESYSTEMS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}


def round_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def round_down(n: int, a: int = ALIGN) -> int:
    return n - n % a


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned, zero-filled anonymous buffer of at least ``size`` bytes."""
    return mmap.mmap(-1, max(round_up(size), ALIGN), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class AlignedBufferPool:
    """Reusable page-aligned buffers in power-of-two size classes.

    A fresh anonymous mapping costs a page fault (and a zeroed page) per
    4 KiB the first time it is touched: for a 16 MiB extent that is 4,096
    faults per request.  Buffers handed back are kept, up to ``limit`` bytes
    in all, and the next request of the same class reuses them warm.
    """

    def __init__(self, limit: int = 128 << 20, smallest: int = 64 << 10) -> None:
        self.limit = limit
        self.smallest = smallest
        self.pooled = 0
        self._free: dict[int, list[mmap.mmap]] = {}

    def size_class(self, size: int) -> int:
        return max(self.smallest, 1 << (max(size, 1) - 1).bit_length())

    def take(self, size: int) -> mmap.mmap:
        """A buffer of at least ``size`` bytes (its contents are arbitrary)."""
        cls = self.size_class(size)
        free = self._free.get(cls)
        if free:
            self.pooled -= cls
            return free.pop()
        return aligned_buffer(cls)

    def give(self, buf: mmap.mmap) -> None:
        """Return a buffer from :meth:`take`; dropped if the pool is full."""
        cls = len(buf)
        if cls != self.size_class(cls) or self.pooled + cls > self.limit:
            return
        self._free.setdefault(cls, []).append(buf)
        self.pooled += cls


def filesystem_type(path: str) -> Optional[int]:
    """The ``f_type`` magic of the filesystem holding ``path`` (Linux statfs), or None."""
    libc_name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
    except OSError:
        return None
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64/arm64
    if libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


class DirectIOUnsupported(ValueError):
    """The directory cannot do O_DIRECT (refused, or silently ignored like tmpfs)."""


def probe_direct_io(directory: str) -> None:
    """Raise :class:`DirectIOUnsupported` unless ``directory`` really does O_DIRECT."""
    fs = filesystem_type(directory)
    if fs in MEMORY_FILESYSTEMS:
        raise DirectIOUnsupported(
            f"{directory} is on {MEMORY_FILESYSTEMS[fs]}, which keeps data in memory and ignores "
            f"O_DIRECT; use a directory on the flash device (or --allow-buffered to run anyway)")
    path = os.path.join(directory, f".pocket-odirect-probe-{os.getpid()}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise DirectIOUnsupported(f"{directory} refuses O_DIRECT ({exc.strerror}); use a "
                                      f"directory on the flash device (or --allow-buffered)") from None
        raise
    try:
        buf = aligned_buffer(ALIGN)
        try:
            os.pwritev(fd, [buf], 0)
            os.preadv(fd, [buf], 0)
        except OSError as exc:
            raise DirectIOUnsupported(f"O_DIRECT I/O fails in {directory}: {exc.strerror}") from None
        finally:
            buf.close()
    finally:
        os.close(fd)
        os.unlink(path)


class FlashDevice:
    """A data file of ``capacity`` bytes in ``directory`` for one storage server.

    The file is locked (one server per file), recreated empty at start-up —
    the data is ephemeral — and preallocated with ``posix_fallocate``.
    """

    def __init__(self, directory: str, capacity: int, *, tier: str,
                 allow_buffered: bool = False, io_threads: int = 4) -> None:
        if not os.path.isdir(directory):
            raise ValueError(f"--dir {directory!r} is not a directory")
        self.directory = os.path.abspath(directory)
        self.capacity = capacity
        self.tier = tier
        self.direct = True
        try:
            probe_direct_io(self.directory)
        except DirectIOUnsupported as exc:
            if not allow_buffered:
                raise
            log.warning("%s; continuing with buffered I/O because of --allow-buffered", exc)
            self.direct = False
        self.fd, self.path = self._open_locked()
        os.ftruncate(self.fd, 0)
        try:
            os.posix_fallocate(self.fd, 0, capacity)
        except OSError as exc:
            os.close(self.fd)
            raise ValueError(f"cannot preallocate {capacity} bytes in {self.directory}: "
                             f"{exc.strerror}") from None
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix=f"pocket-{tier}-io")
        self.buffers = AlignedBufferPool()
        self.bytes_read = 0
        self.bytes_written = 0
        log.info("%s: data file %s (%d bytes, %s) created empty: flash tiers are ephemeral, "
                 "nothing from an earlier run is kept", tier, self.path, capacity,
                 "O_DIRECT" if self.direct else "BUFFERED")

    def _open_locked(self) -> tuple[int, str]:
        flags = os.O_RDWR | os.O_CREAT | (os.O_DIRECT if self.direct else 0)
        for index in range(1024):
            path = os.path.join(self.directory, f"pocket-{self.tier}-{index}.data")
            fd = os.open(path, flags, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd, path
        raise ValueError(f"too many storage servers share {self.directory}")

    # -- I/O -----------------------------------------------------------------
    def _transfer_all(self, io, view: memoryview, offset: int) -> None:
        """Run ``os.pwritev`` or ``os.preadv`` until all of ``view`` is moved."""
        while len(view):
            n = io(self.fd, [view], offset)
            if n <= 0:
                raise OSError(errno.EIO, f"short {io.__name__} on the data file")
            view, offset = view[n:], offset + n

    async def write(self, offset: int, payload: memoryview) -> None:
        """Write ``payload`` (a prefix of an :func:`aligned_buffer`) at ``offset``.

        ``offset`` must be aligned; the tail up to the next sector is zeroed
        and written with it.
        """
        length = len(payload)
        if offset % ALIGN:
            raise ValueError("flash writes start at an aligned offset")
        buf = payload.obj
        padded = round_up(length)
        whole = memoryview(buf)[:padded]
        if padded > length:
            whole[length:padded] = bytes(padded - length)
        await asyncio.get_running_loop().run_in_executor(self._pool, self._transfer_all, os.pwritev,
                                                         whole, offset)
        self.bytes_written += padded

    async def read(self, offset: int, length: int) -> memoryview:
        """Read ``length`` bytes at ``offset`` (any alignment) into an aligned buffer from the pool."""
        start = round_down(offset)
        end = round_up(offset + length)
        buf = self.buffers.take(end - start)
        view = memoryview(buf)
        await asyncio.get_running_loop().run_in_executor(
            self._pool, self._transfer_all, os.preadv, view[:end - start], start)
        self.bytes_read += end - start
        return view[offset - start:offset - start + length]

    def release(self, offset: int, length: int) -> None:
        """Freed space needs nothing on the device (it is overwritten before reuse)."""

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        try:
            os.close(self.fd)
            os.unlink(self.path)
        except OSError:
            pass
