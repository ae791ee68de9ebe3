"""``python -m pocket.storage``: run one storage server."""

from __future__ import annotations

import argparse
import sys

from ..server import (apply_common_arguments, common_arguments, env_default, run_server,
                      setup_logging, split_listen)
from ..units import parse_duration, parse_rate, parse_size
from .server import TIERS, StorageServer


class ProfiledStorageServer(StorageServer):
    """A storage server that also reports its throughput (``--throughput``) when it registers,
    so the controller sizes and prices it as a node of that profile."""

    def __init__(self, *args, throughput: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.throughput = throughput

    async def on_start(self) -> None:
        await super().on_start()
        if self.link is not None:  # the link registers from its own task, after this returns
            base = self.link.registration
            self.link.registration = lambda: {**base(), "throughput": self.throughput}


def default_throughput(tier: str) -> float:
    """The tier's default node rate (bytes/s) from the controller's node profiles."""
    from ..controller.planner import DEFAULT_PROFILES
    return DEFAULT_PROFILES[tier].throughput


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocket.storage",
                                     description="Run a Pocket storage server.")
    common_arguments(parser, "127.0.0.1:0")
    parser.add_argument("--tier", choices=TIERS, default=env_default("tier", "dram"),
                        help="storage technology (default dram; env POCKET_TIER)")
    parser.add_argument("--capacity", default=env_default("capacity", "1GiB"),
                        help="bytes to serve, e.g. 2GiB (default 1GiB; env POCKET_CAPACITY)")
    parser.add_argument("--throughput", default=env_default("throughput", None),
                        help="data rate this node sustains, reported to the controller for "
                             "rightsizing, e.g. 8Gbps or 1GB/s (default: the tier's node profile: "
                             "dram/nvme 8Gbps, ssd 500MB/s, hdd 150MB/s; env POCKET_THROUGHPUT)")
    parser.add_argument("--block-size", default=env_default("block_size", "4KiB"),
                        help="allocation unit (default 4KiB; env POCKET_BLOCK_SIZE)")
    parser.add_argument("--controller", default=env_default("controller", "127.0.0.1:7070"),
                        help="controller HOST:PORT to register with, or 'none' "
                             "(default 127.0.0.1:7070; env POCKET_CONTROLLER)")
    parser.add_argument("--heartbeat", default=env_default("heartbeat", "1s"),
                        help="heartbeat interval (default 1s)")
    parser.add_argument("--dir", default=env_default("dir", None),
                        help="directory for the data file of nvme/ssd/hdd tiers (required there; "
                             "env POCKET_DIR)")
    parser.add_argument("--allow-buffered", action="store_true",
                        default=bool(env_default("allow_buffered", "")),
                        help="run a flash tier even where O_DIRECT is refused or ignored (tmpfs), "
                             "with a warning")
    parser.add_argument("--resident-slack", default=env_default("resident_slack", "64MiB"),
                        help="DRAM: freed pages kept resident for reuse, at most this much "
                             "beyond the stored bytes (default 64MiB)")
    parser.add_argument("--write-buffer", default=env_default("write_buffer", "256MiB"),
                        help="flash: received writes waiting for the device before clients "
                             "are paused (default 256MiB)")
    parser.add_argument("--io-threads", type=int, default=int(env_default("io_threads", 4)),
                        help="device I/O threads for flash tiers (default 4)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    host, port = split_listen(args.listen)
    try:
        throughput = (parse_rate(args.throughput) if args.throughput is not None
                      else default_throughput(args.tier))
        if not throughput or throughput <= 0:
            raise ValueError("--throughput must be positive")
        server = ProfiledStorageServer(
            host, port, throughput=throughput, tier=args.tier, capacity=parse_size(args.capacity),
            block_size=parse_size(args.block_size),
            controller=None if args.controller.lower() == "none" else args.controller,
            heartbeat=parse_duration(args.heartbeat), directory=args.dir,
            allow_buffered=args.allow_buffered, io_threads=args.io_threads,
            resident_slack=parse_size(args.resident_slack),
            write_buffer=parse_size(args.write_buffer))
        apply_common_arguments(server, args)
    except ValueError as exc:
        parser.error(str(exc))
    return run_server(server)


if __name__ == "__main__":
    sys.exit(main())
