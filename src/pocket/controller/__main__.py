"""``python -m pocket.controller``: run the controller."""

from __future__ import annotations

import argparse
import sys

from ..server import common_arguments, env_default, run_server, setup_logging, split_listen
from ..units import parse_duration
from .server import ControllerServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocket.controller",
                                     description="Run the Pocket controller.")
    common_arguments(parser, "127.0.0.1:7070")
    parser.add_argument("--node-timeout", default=env_default("node_timeout", "5s"),
                        help="drop a node after this long without heartbeats (default 5s)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    host, port = split_listen(args.listen)
    server = ControllerServer(host, port, node_timeout=parse_duration(args.node_timeout))
    return run_server(server)


if __name__ == "__main__":
    sys.exit(main())
