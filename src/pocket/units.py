"""Human units for sizes, rates and durations: ``4GiB``, ``1GB/s``, ``10Gbps``, ``30s``."""

from __future__ import annotations

import re
from typing import Union

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
    "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/]*)\s*$")


def _split(text: str, what: str) -> tuple[float, str]:
    match = _NUMBER.match(text)
    if not match:
        raise ValueError(f"cannot parse {what} {text!r}")
    return float(match.group(1)), match.group(2).lower()


def parse_size(value: Union[int, float, str, None]) -> int | None:
    """Bytes from an int or a string like ``512MiB``, ``4GiB``, ``2GB``, ``100``."""
    if value is None or isinstance(value, bool):
        if isinstance(value, bool):
            raise ValueError("a size cannot be a bool")
        return None
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"size must be non-negative, got {value}")
        return int(value)
    number, unit = _split(str(value), "size")
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit {unit!r} in {value!r} (use B, KiB, MiB, GiB, KB, MB, GB)")
    return int(number * _SIZE_UNITS[unit])


def parse_rate(value: Union[int, float, str, None]) -> float | None:
    """Bytes per second from an int or ``1GB/s``, ``500MiB/s``, ``10Gbps``, ``600Mb/s``.

    A lower-case ``b`` (``bps``, ``Mb/s``) means bits; an upper-case ``B`` bytes.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("a rate cannot be a bool")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"rate must be non-negative, got {value}")
        return float(value)
    number, unit = _split_keep_case(str(value), "rate")
    if unit.endswith("/s"):
        unit = unit[:-2]
    elif unit.lower().endswith("ps"):
        unit = unit[:-2]
    if not unit:
        return number
    bits = unit.endswith("b") or unit.lower().endswith("bit")
    if unit.lower().endswith("bit"):
        unit = unit[:-3] + "b"
    key = unit.lower()
    if key not in _SIZE_UNITS:
        raise ValueError(f"unknown rate unit in {value!r} (use B/s, MB/s, GB/s, Mbps, Gbps)")
    rate = number * _SIZE_UNITS[key]
    return rate / 8 if bits else rate


def _split_keep_case(text: str, what: str) -> tuple[float, str]:
    match = _NUMBER.match(text)
    if not match:
        raise ValueError(f"cannot parse {what} {text!r}")
    return float(match.group(1)), match.group(2)


def parse_duration(value: Union[int, float, str, None]) -> float | None:
    """Seconds from a number or ``500ms``, ``30s``, ``5m``, ``1h``."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    number, unit = _split(str(value), "duration")
    scale = {"": 1, "s": 1, "ms": 1e-3, "us": 1e-6, "m": 60, "min": 60, "h": 3600}.get(unit)
    if scale is None:
        raise ValueError(f"unknown duration unit in {value!r} (use ms, s, m, h)")
    return number * scale


def format_size(nbytes: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def parse_address(text: str, default_port: int = 7070) -> tuple[str, int]:
    """``host:port`` (or ``host``, ``:port``) → ``(host, port)``."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):  # [::1]:7070
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, str(default_port)
    try:
        port_number = int(port)
    except ValueError:
        raise ValueError(f"bad port in address {text!r}") from None
    if not 0 <= port_number <= 65535:
        raise ValueError(f"port out of range in address {text!r}")
    return host or "127.0.0.1", port_number


def format_address(host: str, port: int) -> str:
    """``(host, port)`` → ``host:port``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
