"""The asyncio client: the same API as :mod:`pocket`, awaitable.

    c = await pocket.aio.connect("127.0.0.1:7070")
    job = await c.register_job("sort", lambdas=8)
    await job.put("a", b"...")
    data = await job.get("a")

One connection per server carries all of a client's requests at once
(request ids), so many tasks can share a job handle.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import weakref
from typing import Any, Optional

from .client import (ObjectInfo, byte_view, default_controller, extent_plan, info_from_header,
                     job_hints, job_options, verify_pieces, writable_view, write_plan)
from .connection import DEFAULT_TIMEOUT, AsyncConnectionCache
from .errors import AccessDenied, InvalidRequest, NotFound, PocketError, ProtocolError
from .protocol import Buffer, Frame, Op
from .replication import CopyReadState, read_requests

__all__ = ["AsyncCluster", "AsyncJob", "attach", "connect", "ObjectInfo"]


class _Connections(AsyncConnectionCache):
    """The client's connections: one per server, requests with the client's timeout."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    async def request(self, address: str, opcode: int, header: dict,
                      payload: Optional[Buffer] = None, into: Optional[memoryview] = None) -> Frame:
        conn = await self.get(address)
        return await conn.request(opcode, header, payload, into=into, timeout=self.timeout)

    async def send_no_reply(self, address: str, opcode: int, header: dict) -> None:
        try:
            (await self.get(address)).send_no_reply(opcode, header)
        except PocketError:
            pass


class AsyncJob:
    """The awaitable twin of :class:`pocket.Job`."""

    def __init__(self, controller: str, reply: dict, conns: _Connections, owns: bool) -> None:
        self.id: str = reply["job"]
        self.token: str = reply["tok"]
        self.name: str = reply.get("name", self.id)
        self.tier: str = reply.get("tier", "dram")
        self.controller = controller
        self.metadata: str = reply["md"]
        self.inline_max: int = reply.get("inline_max", 64 << 10)
        self.weights: dict = reply.get("weights", {})
        #: Copies kept of each large object (``register_job(..., replicas=2)``).
        self.replicas: int = reply.get("replicas", 1)
        #: Which copies replicated gets read (alternating; unreachable servers last).
        self._copy_reads = CopyReadState()
        #: Sent with PUT_BEGIN and GET in replicated jobs (see pocket.client.Job).
        self._copies = {"copies": True} if self.replicas > 1 else {}
        self._conns = conns
        self._owns = owns
        self._auth = {"job": self.id, "tok": self.token}
        self._renewal: Optional[asyncio.Task] = None

    def _start_renewal(self, lease: Optional[float]) -> None:
        """The driver's handle keeps the job's lease while it is open, as the sync one does
        (a task sending JOB_RENEW every third of the lease): an idle driver that waits
        longer than the lease for its lambdas keeps its job; a dead one stops renewing."""
        self._renewal = asyncio.get_running_loop().create_task(self._renew(lease or 60.0))

    async def _renew(self, lease: float) -> None:
        while True:
            try:  # the reply says the lease the metadata server applies
                reply = (await self._md(Op.JOB_RENEW, {})).header
            except (AccessDenied, NotFound):
                return  # the job is gone (deregistered or reclaimed): nothing to renew
            except PocketError:
                pass  # unreachable for now: the job's lapse is the metadata server's call
            else:
                if reply.get("active") is False:
                    return
                applied = reply.get("lease")
                if isinstance(applied, (int, float)) and applied > 0:
                    lease = float(applied)
            await asyncio.sleep(max(lease / 3, 0.05))

    def _stop_renewal(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None

    def __repr__(self) -> str:
        return f"<pocket.aio.AsyncJob {self.id} tier={self.tier} metadata={self.metadata}>"

    async def _md(self, opcode: int, fields: dict, payload: Optional[Buffer] = None) -> Frame:
        return await self._conns.request(self.metadata, opcode, {**self._auth, **fields}, payload)

    async def put(self, name: str, data: Any, persist: bool = False) -> None:
        """Store ``data`` under ``name`` (atomic; replaces an old object).

        With ``replicas=2`` every copy is written before the commit; a failed
        copy fails the put (Unavailable) and frees what it allocated."""
        view = byte_view(data)
        size = view.nbytes
        if size <= self.inline_max:
            await self._md(Op.PUT_INLINE, {"name": name, "persist": bool(persist)}, view)
            return
        h = (await self._md(Op.PUT_BEGIN, {"name": name, "size": size, "persist": bool(persist),
                                           **self._copies})).header
        put_id = h["put"]
        commit: dict = {"put": put_id}
        try:
            plan, crcs = write_plan(h, view)
            if crcs is not None:
                commit["crc"] = crcs
            await asyncio.gather(*(
                self._conns.request(address, Op.EXT_WRITE, {"ext": ext, "off": 0, "cap": cap},
                                    view[offset:offset + length])
                for address, ext, offset, length, cap, _ in plan))
        except BaseException:
            await self._conns.send_no_reply(self.metadata, Op.PUT_ABORT,
                                            {**self._auth, "put": put_id})
            raise
        await self._md(Op.PUT_COMMIT, commit)

    async def _read_extents(self, h: dict, dest: memoryview) -> None:
        if "pieces" in h:
            return await self._read_copies(h, dest)
        try:
            plan = extent_plan(h["ext"])
            frames = await asyncio.gather(*(
                self._conns.request(address, Op.EXT_READ,
                                    {"ext": ext, "off": 0, "len": length, "cap": cap},
                                    into=dest[offset:offset + length])
                for address, ext, offset, length, cap, _ in plan))
            if not all(frame.sunk for frame in frames):
                raise ProtocolError("a storage server answered a read with the wrong size")
            verify_pieces(dest, plan)
        finally:
            await self._conns.send_no_reply(self.metadata, Op.RELEASE,
                                            {**self._auth, "lease": h["lease"]})

    async def _read_copies(self, h: dict, dest: memoryview) -> None:
        """A replicated object: one copy of each piece, the other where one fails."""
        try:
            reads = self._copy_reads.reads(h)
            todo = reads.first()
            while todo:
                outcomes = await asyncio.gather(*(
                    self._conns.request(address, Op.EXT_READ, header, into=into)
                    for address, header, into in read_requests(todo, dest)),
                    return_exceptions=True)
                try:
                    todo = reads.settle(todo, outcomes, dest)
                finally:
                    self._copy_reads.note_down(reads)
        finally:
            await self._conns.send_no_reply(self.metadata, Op.RELEASE,
                                            {**self._auth, "lease": h["lease"]})

    async def get(self, name: str, delete_after_read: bool = False) -> bytes:
        """The object's bytes; :class:`NotFound` if there is none."""
        reply = await self._md(Op.GET, {"name": name, "dar": bool(delete_after_read),
                                        **self._copies})
        h = reply.header
        if "lease" not in h:  # inline: the bytes came with the reply
            return bytes(reply.payload)
        buf = bytearray(h["size"])
        await self._read_extents(h, memoryview(buf))
        return bytes(buf)

    async def get_into(self, name: str, buffer: Any, delete_after_read: bool = False) -> int:
        """Read the object into ``buffer``; return its size (no extra copy)."""
        dest = writable_view(buffer)
        reply = await self._md(Op.GET, {"name": name, "dar": bool(delete_after_read),
                                        "max": dest.nbytes, **self._copies})
        h = reply.header
        size = h["size"]
        if size > dest.nbytes:
            if "lease" in h:
                await self._conns.send_no_reply(self.metadata, Op.RELEASE,
                                                {**self._auth, "lease": h["lease"]})
            raise InvalidRequest(f"object {name!r} has {size} bytes; the buffer holds {dest.nbytes}")
        if "lease" not in h:
            dest[:size] = reply.payload
        else:
            await self._read_extents(h, dest)
        return size

    async def put_file(self, path: str | os.PathLike, name: str, persist: bool = False) -> None:
        """Store a file's contents (memory-mapped)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                await self.put(name, b"", persist)
                return
            with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)
                try:
                    await self.put(name, view, persist)
                finally:
                    view.release()

    async def get_file(self, name: str, path: str | os.PathLike,
                       delete_after_read: bool = False) -> int:
        """Write the object to ``path``; return its size."""
        data = await self.get(name, delete_after_read)
        with open(path, "wb") as f:
            f.write(data)
        return len(data)

    async def lookup(self, name: str) -> Optional[ObjectInfo]:
        """What is known about ``name``, or None."""
        try:
            reply = await self._md(Op.LOOKUP, {"name": name})
        except NotFound:
            return None
        return info_from_header(name, reply.header)

    async def delete(self, name: str) -> None:
        """Delete an object or an empty directory."""
        await self._md(Op.DELETE, {"name": name})

    async def mkdir(self, name: str) -> None:
        """Create a directory."""
        await self._md(Op.MKDIR, {"name": name})

    async def list(self, prefix: str = "") -> list[str]:
        """Sorted names starting with ``prefix``; directories end with ``/``."""
        return (await self._md(Op.LIST, {"prefix": prefix})).header["names"]

    async def deregister(self) -> dict:
        """End the job; everything not persisted is freed."""
        self._stop_renewal()
        reply = await self._conns.request(self.controller, Op.JOB_DEREGISTER, dict(self._auth))
        return reply.header

    async def close(self) -> None:
        """Close this handle's connections (does not deregister; stops lease renewal)."""
        self._stop_renewal()
        if self._owns:
            self._conns.close()

    async def __aenter__(self) -> "AsyncJob":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.deregister()
        finally:
            await self.close()


class AsyncCluster:
    """The awaitable twin of :class:`pocket.Cluster`."""

    def __init__(self, address: str, conns: _Connections) -> None:
        self.address = address
        self._conns = conns
        #: Jobs registered here, whose lease renewal stops when the cluster handle closes.
        self._jobs: "weakref.WeakSet[AsyncJob]" = weakref.WeakSet()

    async def register_job(self, name: str, *, lambdas: Optional[int] = None,
                           capacity: int | str | None = None, throughput: int | str | None = None,
                           latency_sensitive: Optional[bool] = None,
                           tier: Optional[str] = None, checksums: Optional[bool] = None,
                           lease: float | str | None = None,
                           replicas: Optional[int] = None) -> AsyncJob:
        """Register a job; every hint is optional (``checksums``, ``lease`` and ``replicas``
        (1 or 2) as in :meth:`pocket.Cluster.register_job`).  The handle renews the job's
        lease until it is closed or deregistered (or this cluster handle is closed)."""
        header: dict = {"name": name,
                        "hints": job_hints(lambdas, capacity, throughput, latency_sensitive),
                        **job_options(checksums, lease, replicas)}
        if tier is not None:
            header["tier"] = tier
        reply = await self._conns.request(self.address, Op.JOB_REGISTER, header)
        job = AsyncJob(self.address, reply.header, self._conns, owns=False)
        job._start_renewal(reply.header.get("lease"))
        self._jobs.add(job)
        return job

    async def attach(self, job_id: str, token: str) -> AsyncJob:
        """A handle on an existing job."""
        reply = await self._conns.request(self.address, Op.JOB_ATTACH, {"job": job_id, "tok": token})
        return AsyncJob(self.address, reply.header, self._conns, owns=False)

    async def status(self) -> dict:
        """Nodes and jobs as the controller sees them."""
        return (await self._conns.request(self.address, Op.STATUS, {})).header

    async def close(self) -> None:
        for job in list(self._jobs):
            job._stop_renewal()
        self._conns.close()

    async def __aenter__(self) -> "AsyncCluster":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


async def connect(address: Optional[str] = None, *,
                  timeout: float = DEFAULT_TIMEOUT) -> AsyncCluster:
    """Connect to the controller (default ``$POCKET_CONTROLLER`` or 127.0.0.1:7070)."""
    conns = _Connections(timeout)
    address = default_controller(address)
    try:
        await conns.request(address, Op.PING, {})
    except BaseException:
        conns.close()
        raise
    return AsyncCluster(address, conns)


async def attach(job_id: str, token: str, controller: Optional[str] = None, *,
                 timeout: float = DEFAULT_TIMEOUT) -> AsyncJob:
    """Inside an async lambda: a handle on job ``job_id``."""
    conns = _Connections(timeout)
    address = default_controller(controller)
    try:
        reply = await conns.request(address, Op.JOB_ATTACH, {"job": job_id, "tok": token})
    except BaseException:
        conns.close()
        raise
    return AsyncJob(address, reply.header, conns, owns=True)
