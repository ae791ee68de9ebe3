"""Controller policy as plain functions over plain data (unit-tested without servers)."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence


def weights_by_free_capacity(free: Mapping[str, int]) -> dict[str, float]:
    """A weight map over nodes proportional to their free bytes (sums to 1).

    Nodes with no free space get no weight; if none has any, all share equally
    (the put will then fail with CapacityExceeded, which is the honest answer).
    """
    if not free:
        return {}
    total = sum(max(0, f) for f in free.values())
    if total <= 0:
        return {node: 1.0 / len(free) for node in free}
    return {node: max(0, f) / total for node, f in free.items() if f > 0}


def least_loaded(candidates: Sequence[str], load: Mapping[str, int]) -> str:
    """The candidate with the smallest load (ties: first in order)."""
    if not candidates:
        raise LookupError("no candidates")
    return min(candidates, key=lambda c: (load.get(c, 0), candidates.index(c)))


def expired(last_seen: Mapping[str, float], now: float, timeout: float) -> list[str]:
    """Nodes not heard from within ``timeout`` seconds."""
    return [node for node, seen in last_seen.items() if now - seen > timeout]


def normalise_hints(hints: Mapping[str, object]) -> dict:
    """Validated job hints with human units parsed (bytes, bytes/s)."""
    from ..units import parse_rate, parse_size
    out: dict = {}
    for key, value in hints.items():
        if value is None:
            continue
        if key == "lambdas":
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError("lambdas must be a positive integer")
            out[key] = value
        elif key == "capacity":
            out[key] = parse_size(value)
        elif key == "throughput":
            out[key] = parse_rate(value)
        elif key == "latency_sensitive":
            out[key] = bool(value)
        else:
            raise ValueError(f"unknown hint {key!r}")
    return out


def job_slug(name: str, allowed: Iterable[str] = "abcdefghijklmnopqrstuvwxyz0123456789-_") -> str:
    """A short id-safe form of a job name."""
    chars = set(allowed)
    slug = "".join(c if c in chars else "-" for c in name.lower())[:32].strip("-")
    return slug or "job"
