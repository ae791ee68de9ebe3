"""``python -m pocket.storage``: run one storage server."""

from __future__ import annotations

import argparse
import sys

from ..server import common_arguments, env_default, run_server, setup_logging, split_listen
from ..units import parse_duration, parse_size
from .server import TIERS, StorageServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocket.storage",
                                     description="Run a Pocket storage server.")
    common_arguments(parser, "127.0.0.1:0")
    parser.add_argument("--tier", choices=TIERS, default=env_default("tier", "dram"),
                        help="storage technology (default dram; env POCKET_TIER)")
    parser.add_argument("--capacity", default=env_default("capacity", "1GiB"),
                        help="bytes to serve, e.g. 2GiB (default 1GiB; env POCKET_CAPACITY)")
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
    parser.add_argument("--io-threads", type=int, default=int(env_default("io_threads", 4)),
                        help="device I/O threads for flash tiers (default 4)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    host, port = split_listen(args.listen)
    try:
        server = StorageServer(
            host, port, tier=args.tier, capacity=parse_size(args.capacity),
            block_size=parse_size(args.block_size),
            controller=None if args.controller.lower() == "none" else args.controller,
            heartbeat=parse_duration(args.heartbeat), directory=args.dir,
            allow_buffered=args.allow_buffered, io_threads=args.io_threads)
    except ValueError as exc:
        parser.error(str(exc))
    return run_server(server)


if __name__ == "__main__":
    sys.exit(main())
