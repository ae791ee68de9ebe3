"""``python -m pocket.metadata``: run one metadata server."""

from __future__ import annotations

import argparse
import sys

from ..server import (apply_common_arguments, common_arguments, env_default, run_server,
                      setup_logging, split_listen)
from ..units import parse_duration, parse_size
from .placement import DEFAULT_SPLIT_SIZE
from .server import DEFAULT_INLINE_MAX, MetadataServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocket.metadata",
                                     description="Run a Pocket metadata server.")
    common_arguments(parser, "127.0.0.1:0")
    parser.add_argument("--controller", default=env_default("controller", "127.0.0.1:7070"),
                        help="controller HOST:PORT, or 'none' (default 127.0.0.1:7070)")
    parser.add_argument("--inline-max", default=env_default("inline_max", DEFAULT_INLINE_MAX),
                        help="objects up to this size are kept inline here (default 64KiB)")
    parser.add_argument("--inline-capacity", default=env_default("inline_capacity", "1GiB"),
                        help="space for inline objects (default 1GiB)")
    parser.add_argument("--split-size", default=env_default("split_size", DEFAULT_SPLIT_SIZE),
                        help="objects this large are split across servers (default 8MiB)")
    parser.add_argument("--lease-timeout", default=env_default("lease_timeout", "60s"),
                        help="how long a reader may hold a large object (default 60s)")
    parser.add_argument("--heartbeat", default=env_default("heartbeat", "1s"),
                        help="heartbeat interval (default 1s)")
    parser.add_argument("--capability-ttl", default=env_default("capability_ttl", "300s"),
                        help="lifetime of the extent capabilities handed to clients (default 300s)")
    parser.add_argument("--checksums", choices=("flash", "all"),
                        default=env_default("checksums", "flash"),
                        help="checksum the extents of flash tiers (default; DRAM too for jobs "
                             "registered with checksums=True) or of all tiers")
    parser.add_argument("--job-lease", default=env_default("job_lease", "60s"),
                        help="a job with no request and no driver renewal for this long is "
                             "reclaimed as if deregistered, persisted objects kept (default 60s)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    host, port = split_listen(args.listen)
    try:
        server = MetadataServer(
            host, port, controller=None if args.controller.lower() == "none" else args.controller,
            inline_max=parse_size(args.inline_max), inline_capacity=parse_size(args.inline_capacity),
            split_size=parse_size(args.split_size),
            lease_timeout=parse_duration(args.lease_timeout),
            heartbeat=parse_duration(args.heartbeat),
            capability_ttl=parse_duration(args.capability_ttl), checksums=args.checksums,
            job_lease=parse_duration(args.job_lease))
        apply_common_arguments(server, args)
    except ValueError as exc:
        parser.error(str(exc))
    return run_server(server)


if __name__ == "__main__":
    sys.exit(main())
