"""Cluster key, extent capabilities, internal request signatures, extent checksums.

**Cluster key.**  Controller, metadata and storage servers share one secret.
It comes from ``--secret-file`` / ``POCKET_SECRET_FILE`` or ``POCKET_SECRET``
(the secret itself).  Without one, every server must listen on a loopback
address: the controller then makes a random key at start and hands it, in the
``NODE_REGISTER`` reply, only to a registrant that connected over loopback
*from a process of the controller's own user* (checked in ``/proc/net/tcp``);
a non-loopback listener without a configured secret refuses to start.  Two
sub-keys are derived from the secret (HMAC-SHA256 with a label), so a
capability can never be replayed as an internal signature or vice versa.

**Capabilities.**  The metadata server hands the client, with each extent of
a ``PUT_BEGIN`` (rights ``w``) or ``GET`` (rights ``r``) reply, a 20-byte
capability::

    expiry (u32, unix seconds, little-endian) | HMAC-SHA256(cap key, job NUL extent id NUL rights NUL expiry)[:16]

The storage server recomputes the MAC from the job it allocated the extent
to, the extent id, the right the opcode needs and the expiry, with a keyed
HMAC object made once (``copy()`` then ``update``: no key schedule per
request) and compares with :func:`hmac.compare_digest`.  A forged, expired or
other job's capability is refused with :class:`~pocket.errors.AccessDenied`,
and logged (rate-limited).  The job is not sent: it is the one the storage
server recorded when the extent was allocated.

**Internal signatures.**  Requests between servers (``EXT_ALLOC``,
``EXT_FREE``, ``JOB_ADD``, ``JOB_UPDATE``, ``NODE_REGISTER`` with a configured
secret) carry ``auth``: expiry + HMAC(internal key, opcode and the request's
fields), valid for :data:`INTERNAL_TTL` seconds.

**Checksums.**  CRC-32C per extent (:func:`checksum`): hardware accelerated
by the ``crc32c`` package (SSE4.2 / ARMv8 CRC instructions, >10 GB/s);
``zlib.crc32`` when it is missing (a different polynomial, so both ends must
agree: the writer says which in the commit).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import struct
import time
from typing import Any, Optional

from .errors import AccessDenied, IntegrityError

log = logging.getLogger("pocket.security")

#: Default lifetime of a capability (``--capability-ttl`` on the metadata server).
DEFAULT_CAPABILITY_TTL = 300.0
#: Lifetime of an internal signature (a clock skew margin, not a session).
INTERNAL_TTL = 60
MAC_BYTES = 16
_EXPIRY = struct.Struct("<I")
CAP_BYTES = _EXPIRY.size + MAC_BYTES


try:  # the hardware-accelerated CRC-32C; see the module docstring
    from crc32c import crc32c as _crc32c
    CHECKSUM_ALGORITHM = "crc32c"

    def checksum(data: Any) -> int:
        """CRC-32C of a bytes-like object."""
        return _crc32c(data)
except ImportError:  # pragma: no cover - crc32c is a dependency
    import zlib
    CHECKSUM_ALGORITHM = "crc32"

    def checksum(data: Any) -> int:
        """CRC-32 (zlib) of a bytes-like object."""
        return zlib.crc32(data)


def verify_checksum(data: Any, expected: Optional[int], where: str) -> None:
    """Raise IntegrityError if ``data`` does not have checksum ``expected`` (None: unchecked)."""
    if expected is not None and checksum(data) != expected:
        raise IntegrityError(f"{where}: checksum mismatch (stored data is corrupt); "
                             f"no bytes returned")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_secret(secret_file: Optional[str] = None) -> Optional[bytes]:
    """The configured cluster secret: ``secret_file``, ``$POCKET_SECRET_FILE`` or ``$POCKET_SECRET``."""
    path = secret_file or os.environ.get("POCKET_SECRET_FILE")
    if path:
        with open(path, "rb") as f:
            secret = f.read().strip()
        if len(secret) < 16:
            raise ValueError(f"the cluster secret in {path} is shorter than 16 bytes")
        return secret
    text = os.environ.get("POCKET_SECRET")
    if text:
        if len(text) < 16:
            raise ValueError("POCKET_SECRET is shorter than 16 characters")
        return text.encode()
    return None


def require_secret_for(host: str, secret: Optional[bytes], role: str) -> None:
    """Refuse to listen beyond loopback without a configured secret (ValueError says why)."""
    if secret is None and not is_loopback(host):
        raise ValueError(
            f"the {role} would listen on {host}, which is not a loopback address: a cluster "
            f"secret is required there (--secret-file FILE, or POCKET_SECRET / "
            f"POCKET_SECRET_FILE), shared by the controller, metadata and storage servers")


class ClusterKey:
    """The keys derived from the cluster secret, with keyed HMAC objects made once."""

    def __init__(self, secret: bytes, generated: bool = False) -> None:
        if len(secret) < 16:
            raise ValueError("a cluster secret needs at least 16 bytes")
        self.secret = secret
        #: True when the controller made it (loopback clusters); it is then handed to nodes.
        self.generated = generated
        cap = hmac.new(secret, b"pocket capability v1", hashlib.sha256).digest()
        internal = hmac.new(secret, b"pocket internal v1", hashlib.sha256).digest()
        self._cap = hmac.new(cap, digestmod=hashlib.sha256)
        self._internal = hmac.new(internal, digestmod=hashlib.sha256)
        self.denied = 0
        self._last_log = 0.0

    @classmethod
    def generate(cls) -> "ClusterKey":
        return cls(secrets.token_bytes(32), generated=True)

    # -- capabilities ----------------------------------------------------------
    def _cap_mac(self, job: str, ext_id: int, rights: str, expiry: int) -> bytes:
        h = self._cap.copy()
        h.update(f"{job}\0{ext_id}\0{rights}\0{expiry}".encode())
        return h.digest()[:MAC_BYTES]

    def capability(self, job: str, ext_id: int, rights: str, expiry: int) -> bytes:
        """A capability for ``rights`` (``r`` or ``w``) on one extent of ``job`` until ``expiry``."""
        return _EXPIRY.pack(expiry) + self._cap_mac(job, ext_id, rights, expiry)

    def verify(self, cap: Any, job: str, ext_id: int, rights: str) -> None:
        """Raise AccessDenied unless ``cap`` grants ``rights`` on ``ext_id`` of ``job`` now."""
        if not isinstance(cap, bytes) or len(cap) != CAP_BYTES:
            self.deny(f"{rights} extent {ext_id}: missing or malformed capability")
        expiry = _EXPIRY.unpack_from(cap)[0]
        if not hmac.compare_digest(cap[_EXPIRY.size:], self._cap_mac(job, ext_id, rights, expiry)):
            self.deny(f"{rights} extent {ext_id}: capability not valid for this extent, "
                      f"right or job")
        if expiry < time.time():
            self.deny(f"{rights} extent {ext_id}: capability expired")

    def deny(self, why: str) -> None:
        """Count, log (at most once a second, with the count) and raise AccessDenied."""
        self.denied += 1
        now = time.monotonic()
        if now - self._last_log >= 1.0:
            self._last_log = now
            log.warning("access denied (%d so far): %s", self.denied, why)
        raise AccessDenied(why)

    # -- internal requests -----------------------------------------------------
    def _internal_mac(self, opcode: int, fields: tuple, expiry: int) -> bytes:
        h = self._internal.copy()
        h.update(repr((opcode, expiry, fields)).encode())
        return h.digest()[:MAC_BYTES]

    def sign(self, opcode: int, *fields: Any) -> bytes:
        """``auth`` for an internal request: expiry + MAC over the opcode and ``fields``."""
        expiry = int(time.time()) + INTERNAL_TTL
        return _EXPIRY.pack(expiry) + self._internal_mac(opcode, fields, expiry)

    def check(self, auth: Any, opcode: int, *fields: Any) -> None:
        """Raise AccessDenied unless ``auth`` is :meth:`sign` of the same request, unexpired."""
        if not isinstance(auth, bytes) or len(auth) != CAP_BYTES:
            self.deny(f"internal request {opcode} without a signature")
        expiry = _EXPIRY.unpack_from(auth)[0]
        if not hmac.compare_digest(auth[_EXPIRY.size:], self._internal_mac(opcode, fields, expiry)):
            self.deny(f"internal request {opcode} with a bad signature")
        if not time.time() <= expiry <= time.time() + 2 * INTERNAL_TTL:
            self.deny(f"internal request {opcode} with an expired signature")


# -- who is on the other end of a loopback connection -----------------------------

def _proc_net_address(host: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} prints it (host bytes in native 32-bit words)."""
    packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def loopback_peer_uid(peer: tuple, local: tuple) -> Optional[int]:
    """The uid owning the client socket of a loopback connection ``peer`` → ``local``, or None.

    The kernel lists the peer's socket in /proc/net/tcp (or tcp6) with its
    local address = our peer address and its uid.
    """
    if not is_loopback(peer[0]) or not is_loopback(local[0]):
        return None
    want_local = _proc_net_address(peer[0], peer[1])
    want_remote = _proc_net_address(local[0], local[1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[1] == want_local and cols[2] == want_remote:
                        return int(cols[7])
        except (OSError, StopIteration, ValueError, IndexError):
            continue
    return None
