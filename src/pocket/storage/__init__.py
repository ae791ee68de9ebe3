"""Storage servers: ``python -m pocket.storage --tier dram --capacity 2GiB``."""

from .allocator import BlockAllocator
from .server import StorageServer

__all__ = ["BlockAllocator", "StorageServer"]
