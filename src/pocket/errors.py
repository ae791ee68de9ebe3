"""One exception hierarchy for every role, with numeric codes for the wire.

A *request error* (not found, denied, full, bad argument) travels back to the
caller as an error reply and the connection stays open.  A *protocol error*
(a malformed frame) closes the connection: nothing after it can be trusted.
"""

from __future__ import annotations


class PocketError(Exception):
    """Base class of every error Pocket raises. ``code`` is its wire code."""

    code: int = 1
    #: True when retrying the same request later may succeed.
    retriable: bool = False


class NotFound(PocketError):
    """The object, job, extent or node does not exist (or is not yours)."""

    code = 2


class AccessDenied(PocketError):
    """The credential was missing, wrong or expired."""

    code = 3


class CapacityExceeded(PocketError):
    """There is not enough free space for the request; nothing was written."""

    code = 4
    retriable = True


class InvalidRequest(PocketError):
    """The request was well framed but its arguments are wrong."""

    code = 5


class Unavailable(PocketError):
    """A server could not be reached or stopped answering in time."""

    code = 6
    retriable = True


class ProtocolError(PocketError):
    """A frame violated the wire protocol; the connection is closed."""

    code = 7


class IntegrityError(PocketError):
    """An extent's bytes do not match the checksum written with them; nothing is returned."""

    code = 8


_BY_CODE: dict[int, type[PocketError]] = {
    cls.code: cls
    for cls in (PocketError, NotFound, AccessDenied, CapacityExceeded,
                InvalidRequest, Unavailable, ProtocolError, IntegrityError)
}


def error_from_code(code: int, message: str) -> PocketError:
    """Build the exception for a wire error ``code`` (unknown codes → PocketError)."""
    cls = _BY_CODE.get(code, PocketError) if isinstance(code, int) else PocketError
    return cls(message)
