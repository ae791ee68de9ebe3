"""Pocket: elastic, distributed storage for the ephemeral data of serverless analytics.

    import pocket
    cluster = pocket.connect("127.0.0.1:7070")
    job = cluster.register_job("sort", lambdas=8)
    job.put("shuffle/0-1", data)
    ...
    job = pocket.attach(job_id, token)      # inside a lambda

The asyncio client is :mod:`pocket.aio`.
"""

from .client import Cluster, Job, ObjectInfo, attach, connect
from .errors import (AccessDenied, CapacityExceeded, IntegrityError, InvalidRequest, NotFound,
                     PocketError, ProtocolError, Unavailable)

__version__ = "0.1.0"

__all__ = [
    "AccessDenied", "CapacityExceeded", "Cluster", "IntegrityError", "InvalidRequest", "Job", "NotFound",
    "ObjectInfo", "PocketError", "ProtocolError", "Unavailable", "attach", "connect",
]


def __getattr__(name: str):  # ``pocket.aio`` without importing asyncio machinery up front
    if name == "aio":
        import importlib
        return importlib.import_module(".aio", __name__)
    raise AttributeError(f"module 'pocket' has no attribute {name!r}")
