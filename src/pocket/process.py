"""Starting server processes: what ``LocalCluster`` and the local node provider share."""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Optional

_ANNOUNCE = " listening on "


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when its parent dies (no orphans)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def server_environment() -> dict:
    """The environment for a child server: this one, less what cannot be shared by many
    servers (a fixed listen address; a fixed metrics port becomes "pick a free one")."""
    env = dict(os.environ)
    env.pop("POCKET_LISTEN", None)
    if env.get("POCKET_METRICS_PORT", "0") != "0":
        env["POCKET_METRICS_PORT"] = "0"
    return env


def announced_address(line: str) -> Optional[str]:
    """The ``HOST:PORT`` of a server's ``pocket <role> listening on HOST:PORT`` line, or None."""
    if _ANNOUNCE not in line:
        return None
    return line.rsplit(_ANNOUNCE, 1)[1].split()[0]
