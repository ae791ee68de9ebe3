"""The blocking client: ``pocket.connect()``, ``Cluster.register_job()``, ``pocket.attach()``.

No event loop is involved: each call borrows pooled blocking sockets, sends
its frames (pipelined where one call needs several) and reads the replies.
Payloads are sent from the caller's buffer and received into their
destination, so ``put`` of a numpy array and ``get_into`` a numpy array copy
nothing in Python.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

from .connection import DEFAULT_TIMEOUT, BlockingConnection, ConnectionPool
from .errors import AccessDenied, InvalidRequest, NotFound, PocketError, ProtocolError, Unavailable
from .protocol import Buffer, Frame, Op
from .replication import CopyReadState, check_replicas, extent_plan, piece_plan, read_requests
from .security import checksum, verify_checksum

DEFAULT_CONTROLLER = "127.0.0.1:7070"


def default_controller(address: Optional[str] = None) -> str:
    """``address``, else ``$POCKET_CONTROLLER``, else ``127.0.0.1:7070``."""
    return address or os.environ.get("POCKET_CONTROLLER") or DEFAULT_CONTROLLER


@dataclass(frozen=True)
class ObjectInfo:
    """What :meth:`Job.lookup` knows about an object."""

    name: str
    size: int
    persist: bool
    #: Where the bytes are: ``"metadata"`` for small inline objects, else the tier.
    tier: str
    #: Storage servers (host:port) holding the object's extents.
    servers: tuple[str, ...] = ()


def byte_view(data: Any) -> memoryview:
    """A flat byte view of bytes, bytearray, memoryview or a contiguous numpy array."""
    try:
        view = memoryview(data)
    except TypeError:
        raise InvalidRequest(f"cannot store a {type(data).__name__}; pass bytes-like data") from None
    if not view.contiguous:
        raise InvalidRequest("data must be contiguous (numpy: np.ascontiguousarray)")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def writable_view(buffer: Any) -> memoryview:
    """A flat writable byte view of ``buffer`` (bytearray, numpy array, mmap ...)."""
    view = byte_view(buffer)
    if view.readonly:
        raise InvalidRequest("the destination buffer is read-only")
    return view


def job_hints(lambdas: Any, capacity: Any, throughput: Any, latency_sensitive: Any) -> dict:
    hints = {"lambdas": lambdas, "capacity": capacity, "throughput": throughput,
             "latency_sensitive": latency_sensitive}
    return {k: v for k, v in hints.items() if v is not None}


def info_from_header(name: str, h: dict) -> ObjectInfo:
    return ObjectInfo(name, h["size"], bool(h.get("persist")), h.get("tier", "?"),
                      tuple(h.get("servers", ())))


def piece_checksums(view: memoryview, plan: list) -> list[int]:
    """The writer's checksum of each extent's piece of the object."""
    return [checksum(view[offset:offset + length]) for _, _, offset, length, _, _ in plan]


def write_plan(h: dict, view: memoryview) -> tuple[list, Optional[list[int]]]:
    """From a PUT_BEGIN reply: every extent to write, ``(address, extent id, offset, length,
    capability, _)`` (for a replicated object, every copy of every piece), and the checksums
    PUT_COMMIT carries (one per extent, or per piece when replicated; None if not asked)."""
    summed = bool(h.get("sum"))  # checksumming costs a pass over the bytes: only if asked
    if "pieces" in h:  # replicated: every copy of every piece
        pieces = piece_plan(h["pieces"], view.nbytes, with_checksums=False)
        plan = [e for piece in pieces for copy in piece.copies for e in copy]
        crcs = [checksum(view[p.offset:p.offset + p.length]) for p in pieces] if summed else None
    else:
        plan = extent_plan(h["ext"])
        crcs = piece_checksums(view, plan) if summed else None
    return plan, crcs


def verify_pieces(dest: memoryview, plan: list) -> None:
    """Raise IntegrityError if any extent read into ``dest`` does not match its checksum."""
    for address, ext_id, offset, length, _, crc in plan:
        verify_checksum(dest[offset:offset + length], crc, f"extent {ext_id} on {address}")


def job_options(checksums: Optional[bool], lease: Any, replicas: Optional[int] = None) -> dict:
    """Per-job settings beside the hints: DRAM checksums, the job's lease (seconds) and its
    copies of each large object (``replicas``: 1 or 2; InvalidRequest otherwise)."""
    options: dict = {}
    if replicas is not None and check_replicas(replicas) != 1:
        options["replicas"] = replicas
    if checksums is not None:
        options["checksums"] = bool(checksums)
    if lease is not None:
        from .units import parse_duration
        options["lease"] = parse_duration(lease) if isinstance(lease, str) else float(lease)
        if options["lease"] <= 0:
            raise InvalidRequest("a job lease must be positive")
    return options


class Job:
    """A job's handle: put and get objects in its namespace.

    Made by :meth:`Cluster.register_job` (the driver) or :func:`attach` (a
    lambda, given ``job.id`` and ``job.token``).  Safe to share between threads.
    """

    def __init__(self, controller: str, reply: dict, pool: ConnectionPool,
                 owns_pool: bool) -> None:
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
        #: Sent with PUT_BEGIN and GET in replicated jobs: this client writes every copy and
        #: reads ``pieces`` (the metadata server refuses clients that do not say so).
        self._copies = {"copies": True} if self.replicas > 1 else {}
        self._pool = pool
        self._owns_pool = owns_pool
        self._auth = {"job": self.id, "tok": self.token}
        self._threads: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()
        self._renewing: Optional[threading.Event] = None

    def _start_renewal(self, lease: Optional[float]) -> None:
        """The driver's handle keeps the job's lease while it is open (a daemon thread that
        sends JOB_RENEW every third of the lease); if the driver dies, renewals stop."""
        stop = self._renewing = threading.Event()

        def renew() -> None:
            interval = (lease or 60.0) / 3
            while True:
                try:  # the reply says the lease the metadata server applies
                    reply = self._md(Op.JOB_RENEW, {}).header
                except (AccessDenied, NotFound):
                    return  # the job is gone (deregistered or reclaimed): nothing to renew
                except PocketError:
                    pass  # unreachable for now: the job's lapse is the metadata server's call
                else:
                    if reply.get("active") is False:
                        return
                    interval = reply.get("lease", 60.0) / 3
                if stop.wait(interval):
                    return

        threading.Thread(target=renew, name=f"pocket-renew-{self.id}", daemon=True).start()

    def _stop_renewal(self) -> None:
        if self._renewing is not None:
            self._renewing.set()

    def __repr__(self) -> str:
        return f"<pocket.Job {self.id} tier={self.tier} metadata={self.metadata}>"

    # -- plumbing ------------------------------------------------------------
    def _md(self, opcode: int, fields: dict, payload: Optional[Buffer] = None) -> Frame:
        # The hot path of every small operation: no context-manager machinery.
        pool = self._pool
        conn = pool.acquire(self.metadata)
        try:
            fields.update(self._auth)
            frame = conn.recv(conn.send(opcode, fields, payload))
        except (Unavailable, ProtocolError):
            conn.close()
            raise
        except PocketError:
            pool.release(conn)
            raise
        except BaseException:
            conn.close()
            raise
        pool.release(conn)
        return frame

    def _md_no_reply(self, opcode: int, fields: dict) -> None:
        try:
            with self._pool.connection(self.metadata) as conn:
                conn.send_no_reply(opcode, {**self._auth, **fields})
        except PocketError:
            pass  # best effort: the server expires leases and puts on its own

    def _exchange(self, requests: list[tuple[str, int, dict, Optional[Buffer], Optional[memoryview]]]
                  ) -> list[Frame]:
        """Send all ``(address, opcode, header, payload, into)`` and collect the replies.

        Requests to one address are pipelined on one connection; different
        addresses are served by parallel threads (blocking socket calls
        release the GIL), so one slow server does not hold up the others.
        The first error is raised after every reply has been read.
        """
        by_address: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_address.setdefault(request[0], []).append(index)
        if len(by_address) == 1:
            return self._exchange_one(requests)
        if self._threads is None:
            with self._lock:
                if self._threads is None:
                    self._threads = ThreadPoolExecutor(max_workers=8,
                                                       thread_name_prefix="pocket-io")
        futures = [(indices, self._threads.submit(self._exchange_one,
                                                  [requests[i] for i in indices]))
                   for indices in by_address.values()]
        frames: list = [None] * len(requests)
        error: Optional[BaseException] = None
        for indices, future in futures:
            try:
                for index, frame in zip(indices, future.result()):
                    frames[index] = frame
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error
        return frames

    def _exchange_settled(self, requests: list) -> list:
        """Like :meth:`_exchange`, but a reply or the PocketError for every request: a server
        that fails fails all of its requests, the others' replies are kept."""
        by_address: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_address.setdefault(request[0], []).append(index)
        outcomes: list = [None] * len(requests)

        def one(indices: list[int]) -> None:
            try:
                frames: list = self._exchange_one([requests[i] for i in indices])
            except PocketError as exc:
                frames = [exc] * len(indices)
            for index, frame in zip(indices, frames):
                outcomes[index] = frame

        groups = list(by_address.values())
        if len(groups) == 1:
            one(groups[0])
            return outcomes
        if self._threads is None:
            with self._lock:
                if self._threads is None:
                    self._threads = ThreadPoolExecutor(max_workers=8,
                                                       thread_name_prefix="pocket-io")
        for future in [self._threads.submit(one, indices) for indices in groups]:
            future.result()
        return outcomes

    def _exchange_one(self, requests: list) -> list[Frame]:
        conns: dict[str, BlockingConnection] = {}
        sent: list[tuple[BlockingConnection, int]] = []
        frames: list[Frame] = []
        error: Optional[BaseException] = None
        try:
            for address, opcode, header, payload, into in requests:
                conn = conns.get(address)
                if conn is None:
                    conn = conns[address] = self._pool.acquire(address)
                sent.append((conn, conn.send(opcode, header, payload, into=into)))
            for conn, rid in sent:
                try:
                    frames.append(conn.recv(rid))
                except PocketError as exc:
                    error = error or exc
                    if isinstance(exc, (Unavailable, ProtocolError)):
                        conn.close()
        except BaseException:
            for conn in conns.values():
                conn.close()
            raise
        finally:
            for conn in conns.values():
                self._pool.release(conn)
        if error is not None:
            raise error
        return frames

    # -- objects -------------------------------------------------------------
    def put(self, name: str, data: Any, persist: bool = False) -> None:
        """Store ``data`` (bytes-like or numpy) under ``name``; replaces any old object.

        The object becomes visible only when all of it is written.  In a job
        with ``replicas=2`` every copy is written (in parallel) before the
        commit; if any copy's server fails, the put raises (Unavailable) and
        frees everything it allocated — nothing is half-replicated.
        """
        view = byte_view(data)
        size = view.nbytes
        if size <= self.inline_max:
            self._md(Op.PUT_INLINE, {"name": name, "persist": bool(persist)}, view)
            return
        h = self._md(Op.PUT_BEGIN, {"name": name, "size": size, "persist": bool(persist),
                                    **self._copies}).header
        put_id = h["put"]
        commit: dict = {"put": put_id}
        try:
            plan, crcs = write_plan(h, view)
            if crcs is not None:
                commit["crc"] = crcs
            self._exchange([(address, Op.EXT_WRITE, {"ext": ext, "off": 0, "cap": cap},
                             view[offset:offset + length], None)
                            for address, ext, offset, length, cap, _ in plan])
        except BaseException:
            self._md_no_reply(Op.PUT_ABORT, {"put": put_id})
            raise
        self._md(Op.PUT_COMMIT, commit)

    def _locate(self, name: str, delete_after_read: bool, limit: Optional[int] = None) -> Frame:
        fields = {"name": name, "dar": bool(delete_after_read), **self._copies}
        if limit is not None:
            fields["max"] = limit  # refused (and nothing deleted) if the object is larger
        return self._md(Op.GET, fields)

    def _read_extents(self, h: dict, dest: memoryview) -> None:
        """Receive an object's extents into ``dest``, then release the read lease."""
        if "pieces" in h:
            return self._read_copies(h, dest)
        try:
            plan = extent_plan(h["ext"])
            frames = self._exchange([(address, Op.EXT_READ,
                                      {"ext": ext, "off": 0, "len": length, "cap": cap},
                                      None, dest[offset:offset + length])
                                     for address, ext, offset, length, cap, _ in plan])
            for frame in frames:
                if not frame.sunk:
                    raise ProtocolError("a storage server answered a read with the wrong size")
            verify_pieces(dest, plan)
        finally:
            self._md_no_reply(Op.RELEASE, {"lease": h["lease"]})

    def _read_copies(self, h: dict, dest: memoryview) -> None:
        """A replicated object: one copy of each piece, the other where one fails."""
        try:
            reads = self._copy_reads.reads(h)
            todo = reads.first()
            while todo:
                outcomes = self._exchange_settled([(address, Op.EXT_READ, header, None, into)
                                                   for address, header, into
                                                   in read_requests(todo, dest)])
                try:
                    todo = reads.settle(todo, outcomes, dest)
                finally:
                    self._copy_reads.note_down(reads)
        finally:
            self._md_no_reply(Op.RELEASE, {"lease": h["lease"]})

    def _release(self, h: dict) -> None:
        if "lease" in h:
            self._md_no_reply(Op.RELEASE, {"lease": h["lease"]})

    def get(self, name: str, delete_after_read: bool = False) -> bytes:
        """The object's bytes. Raises :class:`NotFound` if there is none.

        ``delete_after_read=True`` frees the object as it is read.  For large
        objects, :meth:`get_into` avoids the final copy into ``bytes``.
        """
        reply = self._locate(name, delete_after_read)
        h = reply.header
        if "lease" not in h:  # inline: the bytes came with the reply
            return bytes(reply.payload)
        buf = bytearray(h["size"])
        self._read_extents(h, memoryview(buf))
        return bytes(buf)

    def get_into(self, name: str, buffer: Any, delete_after_read: bool = False) -> int:
        """Read the object into ``buffer`` (e.g. a numpy array); return its size.

        Large objects are received straight into ``buffer``: no extra copy.
        """
        dest = writable_view(buffer)
        reply = self._locate(name, delete_after_read, dest.nbytes)
        h = reply.header
        size = h["size"]
        if size > dest.nbytes:
            self._release(h)
            raise InvalidRequest(f"object {name!r} has {size} bytes; the buffer holds {dest.nbytes}")
        if "lease" not in h:
            dest[:size] = reply.payload
        else:
            self._read_extents(h, dest)
        return size

    def put_file(self, path: str | os.PathLike, name: str, persist: bool = False) -> None:
        """Store a file's contents (memory-mapped, not read into a copy)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                self.put(name, b"", persist)
                return
            with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)
                try:
                    self.put(name, view, persist)
                finally:
                    view.release()

    def get_file(self, name: str, path: str | os.PathLike,
                 delete_after_read: bool = False) -> int:
        """Write the object to ``path`` (received into a mapping of the file); return its size."""
        reply = self._locate(name, delete_after_read)
        h = reply.header
        size = h["size"]
        try:
            with open(path, "wb+") as f:
                if "lease" not in h:
                    f.write(reply.payload)
                    return size
                f.truncate(size)
                with mmap.mmap(f.fileno(), size) as m:
                    view = memoryview(m)
                    try:
                        self._read_extents(h, view)
                        h = {}
                    finally:
                        view.release()
        finally:
            self._release(h)
        return size

    def lookup(self, name: str) -> Optional[ObjectInfo]:
        """What is known about ``name``, or None if there is no such object."""
        try:
            reply = self._md(Op.LOOKUP, {"name": name})
        except NotFound:
            return None
        return info_from_header(name, reply.header)

    def delete(self, name: str) -> None:
        """Delete an object (or an empty directory); its space is freed at once."""
        self._md(Op.DELETE, {"name": name})

    def mkdir(self, name: str) -> None:
        """Create a directory (names may contain ``/`` with or without one)."""
        self._md(Op.MKDIR, {"name": name})

    def list(self, prefix: str = "") -> list[str]:
        """Sorted names starting with ``prefix``; directories end with ``/``."""
        return self._md(Op.LIST, {"prefix": prefix}).header["names"]

    def deregister(self) -> dict:
        """End the job: everything not persisted is freed. Returns what was freed."""
        self._stop_renewal()
        with self._pool.connection(self.controller) as conn:
            reply = conn.request(Op.JOB_DEREGISTER, dict(self._auth))
        return reply.header

    def close(self) -> None:
        """Close this handle's connections (does not deregister; stops lease renewal)."""
        self._stop_renewal()
        if self._threads is not None:
            self._threads.shutdown(wait=False)
            self._threads = None
        if self._owns_pool:
            self._pool.close()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.deregister()
        finally:
            self.close()


class Cluster:
    """A connection to a Pocket cluster's controller."""

    def __init__(self, address: Optional[str] = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = default_controller(address)
        self._pool = ConnectionPool(timeout)
        #: Jobs registered here, whose lease renewal stops when this handle closes.
        self._jobs: "weakref.WeakSet[Job]" = weakref.WeakSet()
        self._controller(Op.PING, {})  # fail fast if nobody is there

    def _controller(self, opcode: int, header: dict) -> Frame:
        with self._pool.connection(self.address) as conn:
            return conn.request(opcode, header)

    def register_job(self, name: str, *, lambdas: Optional[int] = None,
                     capacity: int | str | None = None, throughput: int | str | None = None,
                     latency_sensitive: Optional[bool] = None,
                     tier: Optional[str] = None, checksums: Optional[bool] = None,
                     lease: float | str | None = None, replicas: Optional[int] = None) -> Job:
        """Register a job; every hint is optional (ints or human units: ``"4GiB"``, ``"1GB/s"``).

        ``checksums=True`` checksums DRAM extents too (flash ones always are).
        ``lease``: the job is reclaimed (as if deregistered; persisted objects
        kept) once nobody has used it for this long (default: the metadata
        server's ``--job-lease``, 60 s); this handle renews it while open.
        ``replicas=2`` keeps two copies of each large object on two distinct
        storage servers, so a get survives one server's death (twice the
        space and write traffic; small inline objects live in the metadata
        server and are unaffected; lost copies are not re-made).  The
        default is 1; any other value raises InvalidRequest.  ``replicas=2``
        raises Unavailable when the job's tier has fewer than two storage
        servers and no node provider can add one.
        """
        header: dict = {"name": name,
                        "hints": job_hints(lambdas, capacity, throughput, latency_sensitive),
                        **job_options(checksums, lease, replicas)}
        if tier is not None:
            header["tier"] = tier
        reply = self._controller(Op.JOB_REGISTER, header)
        job = Job(self.address, reply.header, self._pool, owns_pool=False)
        job._start_renewal(reply.header.get("lease"))
        self._jobs.add(job)
        return job

    def attach(self, job_id: str, token: str) -> Job:
        """A handle on an existing job (as a lambda would get)."""
        reply = self._controller(Op.JOB_ATTACH, {"job": job_id, "tok": token})
        return Job(self.address, reply.header, self._pool, owns_pool=False)

    def status(self) -> dict:
        """Nodes and jobs as the controller sees them (what ``pocket status --json`` prints)."""
        return self._controller(Op.STATUS, {}).header

    def close(self) -> None:
        """Close the connections; jobs registered through this handle stop renewing their
        leases (they expire unless deregistered or renewed by another handle)."""
        for job in list(self._jobs):
            job._stop_renewal()
        self._pool.close()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(address: Optional[str] = None, *, timeout: float = DEFAULT_TIMEOUT) -> Cluster:
    """Connect to the controller at ``address`` (default ``$POCKET_CONTROLLER`` or 127.0.0.1:7070)."""
    return Cluster(address, timeout=timeout)


def attach(job_id: str, token: str, controller: Optional[str] = None, *,
           timeout: float = DEFAULT_TIMEOUT) -> Job:
    """Inside a lambda: a handle on job ``job_id`` given its ``token``."""
    address = default_controller(controller)
    pool = ConnectionPool(timeout)
    try:
        with pool.connection(address) as conn:
            reply = conn.request(Op.JOB_ATTACH, {"job": job_id, "tok": token})
    except BaseException:
        pool.close()
        raise
    return Job(address, reply.header, pool, owns_pool=True)
