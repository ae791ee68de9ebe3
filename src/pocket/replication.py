"""Copies of large objects (``register_job(..., replicas=2)``): the job option, the wire form
of a replicated object's pieces, and which copy a reader tries (sans-IO: the sync and the
asyncio clients drive the same :class:`CopyReads`).

Where the copies go is decided by the metadata server (``metadata/placement.py``:
:func:`~pocket.metadata.placement.plan_replicated`).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Optional

from .errors import InvalidRequest, PocketError, ProtocolError, Unavailable
from .security import verify_checksum

#: The most copies a job may ask for; also bounds the copies of a piece in a reply.
MAX_REPLICAS = 2
#: How long a reader tries an address last after finding it unreachable (seconds).
SUSPECT_FOR = 10.0


def check_replicas(value: object) -> int:
    """A valid ``replicas`` job option (an int, 1 or 2), or InvalidRequest."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_REPLICAS:
        raise InvalidRequest(f"replicas must be 1 (the default) or {MAX_REPLICAS}, "
                             f"not {value!r}")
    return value


def extent_plan(extents: Any) -> list[tuple]:
    """``[(address, extent id, offset in object, length, capability, checksum or None)]`` from
    a metadata reply (``[address, extent id, length, capability(, checksum)]`` each)."""
    plan, offset = [], 0
    for address, ext_id, length, cap, *crc in extents:
        plan.append((address, ext_id, offset, length, cap, crc[0] if crc else None))
        offset += length
    return plan


@dataclass(frozen=True)
class Piece:
    """One piece of a replicated object: its place in the object, its checksum (the same
    for every copy) and its copies, each a list of :func:`extent_plan` entries."""

    offset: int
    length: int
    crc: Optional[int]
    copies: tuple[list, ...]


def piece_plan(pieces: Any, size: int, *, with_checksums: bool) -> list[Piece]:
    """Validated pieces of a replicated object from a metadata reply.

    ``PUT_BEGIN``: ``[[copy, ...], ...]``; ``GET`` (``with_checksums``):
    ``[[checksum or None, [copy, ...]], ...]``; each copy
    ``[[address, extent id, length, capability], ...]``.  The copies of a
    piece must have the same length and the pieces must add up to ``size``
    (else ProtocolError: nothing is written or read out of place).
    """
    if not isinstance(pieces, list):
        raise ProtocolError("a replicated object's pieces must be a list")
    out, offset = [], 0
    for piece in pieces:
        crc = None
        if with_checksums:
            if not (isinstance(piece, list) and len(piece) == 2):
                raise ProtocolError("a piece must be [checksum, copies]")
            crc, piece = piece
            if crc is not None and not isinstance(crc, int):
                raise ProtocolError("a piece's checksum must be an integer")
        if not (isinstance(piece, list) and 1 <= len(piece) <= MAX_REPLICAS):
            raise ProtocolError(f"a piece must have 1 to {MAX_REPLICAS} copies")
        copies, length = [], None
        for copy in piece:
            if not (isinstance(copy, list) and copy and
                    all(isinstance(e, list) and len(e) == 4 and isinstance(e[2], int) and
                        e[2] > 0 for e in copy)):
                raise ProtocolError("a copy must be a list of [address, extent, length, cap]")
            plan = extent_plan(copy)
            total = sum(e[3] for e in plan)
            if length is None:
                length = total
            elif total != length:
                raise ProtocolError("the copies of a piece differ in length")
            copies.append([(a, e, offset + o, n, cap, None) for a, e, o, n, cap, _ in plan])
        out.append(Piece(offset, length, crc, tuple(copies)))  # type: ignore[arg-type]
        offset += length  # type: ignore[operator]
    if offset != size:
        raise ProtocolError(f"the pieces cover {offset} bytes of a {size}-byte object")
    return out


class CopyReads:
    """Which copy of each piece of a replicated object to read, and what to do when one fails.

    Sans-IO: the sync and asyncio clients send the reads :meth:`first` and
    :meth:`settle` return and hand back each read's reply or exception.
    Every piece starts at copy ``start % copies``: successive gets pass
    successive ``start`` values, so reads alternate between the copies, and
    within one get the pieces of a large object (chained over the nodes,
    see :func:`~pocket.metadata.placement.plan_replicated`) are read from
    distinct nodes.  Copies on ``suspect`` addresses (recently unreachable)
    are tried last.
    A copy fails on any error from its server (unreachable, timed out,
    refused), a short reply or a checksum mismatch; the piece is then read
    from its next copy, skipping copies on servers found unreachable during
    this get.  Only when every copy of a piece failed is the last error raised.
    """

    def __init__(self, pieces: list[Piece], start: int, suspect: Any = ()) -> None:
        self.pieces = pieces
        self.down: set[str] = set()
        self._order: list[list[list]] = []
        for piece in pieces:
            n = len(piece.copies)
            order = [piece.copies[(start + k) % n] for k in range(n)]
            if suspect:
                order.sort(key=lambda copy: any(e[0] in suspect for e in copy))
            self._order.append(order)
        self._errors: list[Optional[PocketError]] = [None] * len(pieces)

    def first(self) -> list[tuple[int, list]]:
        """``[(piece index, copy)]``: the first read of every piece."""
        return [self._next(i) for i in range(len(self.pieces))]

    def _next(self, i: int) -> tuple[int, list]:
        order = self._order[i]
        while order:
            copy = order.pop(0)
            if not any(e[0] in self.down for e in copy):
                return i, copy
        piece = self.pieces[i]
        error = self._errors[i] or Unavailable(f"every copy of bytes {piece.offset}–"
                                               f"{piece.offset + piece.length} is unreachable")
        raise type(error)(f"all {len(piece.copies)} copies failed; last: {error}")

    def settle(self, reads: list[tuple[int, list]], outcomes: list, dest: memoryview
               ) -> list[tuple[int, list]]:
        """Check the ``reads`` given their ``outcomes`` (a Frame or an exception per extent,
        in order); return the reads to make next (empty: every piece is in ``dest``)."""
        retry = []
        at = 0
        for i, copy in reads:
            results = outcomes[at:at + len(copy)]
            at += len(copy)
            error: Optional[PocketError] = None
            for (address, *_rest), result in zip(copy, results):
                if isinstance(result, PocketError):
                    error = error or result
                    if isinstance(result, Unavailable):
                        self.down.add(address)
                elif isinstance(result, BaseException):
                    raise result
                elif not result.sunk and error is None:
                    error = ProtocolError(f"{address} answered a read with the wrong size")
            if error is None:
                try:
                    piece = self.pieces[i]
                    if piece.crc is not None:
                        verify_checksum(dest[piece.offset:piece.offset + piece.length], piece.crc,
                                        f"bytes {piece.offset}–{piece.offset + piece.length} "
                                        f"from {copy[0][0]}")
                except PocketError as exc:
                    error = exc
            if error is not None:
                self._errors[i] = error
                retry.append(self._next(i))
        return retry


def read_requests(reads: list[tuple[int, list]], dest: memoryview) -> list[tuple]:
    """``(address, header, destination)`` of every EXT_READ the ``reads`` need."""
    return [(address, {"ext": ext, "off": 0, "len": length, "cap": cap},
             dest[offset:offset + length])
            for _i, copy in reads for address, ext, offset, length, cap, _ in copy]


class CopyReadState:
    """What a client remembers between gets of replicated objects: how many it started
    (successive gets start at successive copies) and which storage servers it found
    unreachable lately (their copies are tried last for :data:`SUSPECT_FOR` seconds)."""

    def __init__(self) -> None:
        self._gets = itertools.count()
        self._down_at: dict[str, float] = {}

    def reads(self, h: dict) -> CopyReads:
        """The :class:`CopyReads` of the GET reply ``h`` of a replicated object."""
        now = time.monotonic()
        suspect = {a for a, t in self._down_at.items() if now - t < SUSPECT_FOR}
        return CopyReads(piece_plan(h["pieces"], h["size"], with_checksums=True),
                         next(self._gets), suspect)

    def note_down(self, reads: CopyReads) -> None:
        """Remember the servers ``reads`` found unreachable."""
        now = time.monotonic()
        for address in reads.down:
            self._down_at[address] = now
