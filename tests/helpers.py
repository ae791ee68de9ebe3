"""Small helpers shared by the tests."""

from __future__ import annotations

import shutil
import time
from typing import Callable

import pytest


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def storage_used(status: dict) -> int:
    return sum(n["used"] for n in status["nodes"] if n["role"] == "storage")


requires_redis = pytest.mark.skipif(shutil.which("redis-server") is None,
                                    reason="redis-server is not installed")
