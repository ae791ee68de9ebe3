"""The ``pocket`` command: ``pocket up`` starts a local cluster, ``pocket status`` shows one."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from typing import Optional

from .client import default_controller
from .connection import BlockingConnection
from .errors import PocketError
from .local import LocalCluster, default_capacity
from .protocol import Op
from .server import parse_metrics_port
from .controller.planner import format_rate
from .units import format_size


def cmd_up(args: argparse.Namespace) -> int:
    try:
        cluster = LocalCluster(port=args.port, host=args.host, dram=args.dram,
                               capacity=args.capacity, metadata=args.metadata,
                               log_level=args.log_level, inherit_logs=not args.log_dir,
                               log_dir=args.log_dir, nvme=args.nvme, ssd=args.ssd, hdd=args.hdd,
                               data_dir=args.data_dir, flash_capacity=args.flash_capacity,
                               provider="local" if args.autoscale else args.provider,
                               max_nodes=args.max_nodes, autoscale=args.autoscale or None,
                               metrics_port=args.metrics_port,
                               migrate_on_drain=args.migrate_on_drain)
    except ValueError as exc:
        print(f"pocket up: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cluster.start()
    except PocketError as exc:
        print(f"pocket up: {exc}", file=sys.stderr)
        return 1
    print(f"Pocket cluster up; controller at {cluster.address}", flush=True)
    print(cluster.describe(), flush=True)
    print(f"export POCKET_CONTROLLER={cluster.address}   # then: pocket status; Ctrl-C stops",
          flush=True)
    try:
        while not stop.wait(0.5):
            dead = [p for p in cluster.processes if p.process.poll() is not None]
            if dead:
                print(f"pocket up: {dead[0].role} server {dead[0].address} exited "
                      f"({dead[0].process.returncode}); stopping", file=sys.stderr)
                break
    finally:
        cluster.stop()
        print("Pocket cluster stopped", flush=True)
    return 0


def fetch_status(address: str) -> dict:
    conn = BlockingConnection(address, timeout=10.0)
    try:
        return conn.request(Op.STATUS, {}).header
    finally:
        conn.close()


def format_status(status: dict, events: int = 10) -> str:
    """``pocket status`` as text: nodes (with state and metrics address), jobs, and the
    autoscaler's last ``events`` events."""
    head = f"controller {status['controller']}"
    if status.get("metrics"):
        head += f"  (metrics on {status['metrics']})"
    lines = [head, "",
             f"{'NODE':<14} {'ROLE':<9} {'TIER':<9} {'ADDRESS':<22} {'STATE':<9} "
             f"{'CAPACITY':>11} {'USED':>11} {'CPU':>5}  METRICS"]
    for n in sorted(status["nodes"], key=lambda n: (n["role"], n["id"])):
        lines.append(f"{n['id']:<14} {n['role']:<9} {n['tier']:<9} {n['address']:<22} "
                     f"{n['state']:<9} {format_size(n['capacity']):>11} "
                     f"{format_size(n['used']):>11} {n['cpu'] * 100:>4.0f}%  "
                     f"{n.get('metrics', '-')}")
    lines += ["", f"{'JOB':<28} {'NAME':<14} {'STATE':<13} {'TIER':<6} {'OBJECTS':>8} "
                  f"{'BYTES':>11} {'ALLOCATED':>22} {'COST $':>10}  WEIGHT MAP"]
    for j in status["jobs"]:
        weights = ", ".join(f"{k}={v:.2f}" for k, v in j["weight_map"].items())
        alloc = j.get("allocation") or {}
        allocated = (f"{format_rate(alloc['throughput'])} {format_size(alloc['capacity'])}"
                     if alloc else "-")
        if j.get("overcommitted"):
            allocated += "!"
        lines.append(f"{j['id']:<28} {j['name'][:14]:<14} {j['state']:<13} {j['tier']:<6} "
                     f"{j['objects']:>8} {format_size(j['bytes']):>11} {allocated:>22} "
                     f"{j.get('cost', 0.0):>10.6f}  {weights}")
    if not status["jobs"]:
        lines.append("(no jobs)")
    elif any(j.get("overcommitted") for j in status["jobs"]):
        lines.append("(! overcommitted: the tier lacked room and no provider could add nodes)")
    lines += ["", *format_autoscale(status.get("autoscale") or {}, events)]
    return "\n".join(lines)


def format_autoscale(autoscale: dict, count: int) -> list[str]:
    """The autoscaler's state and its last ``count`` events, one line each."""
    if not autoscale.get("enabled"):
        return ["autoscaling off"]
    starting = ", ".join(f"{k} {t}" for t, k in autoscale.get("starting", {}).items())
    lines = [f"autoscaling on (every {autoscale.get('interval', 1):g}s"
             f"{', migrate on drain' if autoscale.get('migrate_on_drain') else ''}"
             f"{'; starting ' + starting if starting else ''}); last events:"]
    recent = autoscale.get("events", [])[-count:]
    for e in recent:
        when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
        what = e.get("node") or (f"{e['count']} nodes" if "count" in e else "")
        extra = f" ({e['error']})" if e.get("error") else ""
        if e["event"] == "migrated":
            extra = f" ({e['objects']} objects, {format_size(e['bytes'])} in {e['seconds']}s)"
        lines.append(f"  {when} {e['event']:<10} {e['tier']:<9} {what:<14} {e['reason']}{extra}")
    if not recent:
        lines.append("  (none)")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    address = default_controller(args.controller)
    try:
        status = fetch_status(address)
    except PocketError as exc:
        print(f"pocket status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else format_status(status))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pocket", description="Pocket ephemeral storage.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a local cluster (controller, metadata, DRAM storage)")
    up.add_argument("--port", type=int, default=7070, help="controller port (default 7070; 0 = any)")
    up.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    up.add_argument("--dram", type=int, default=2, help="DRAM storage servers (default 2)")
    up.add_argument("--capacity", default=None,
                    help=f"capacity of each storage server (default {format_size(default_capacity(2))} "
                         f"here: a quarter of RAM shared, at most 4 GiB each)")
    up.add_argument("--metadata", type=int, default=1, help="metadata servers (default 1)")
    up.add_argument("--nvme", type=int, default=0, help="NVMe storage servers (default 0)")
    up.add_argument("--ssd", type=int, default=0, help="SSD storage servers (default 0)")
    up.add_argument("--hdd", type=int, default=0, help="HDD storage servers (default 0)")
    up.add_argument("--data-dir", default=None,
                    help="directory on the flash/disk device for nvme/ssd/hdd data files")
    up.add_argument("--flash-capacity", default=None,
                    help="capacity of each nvme/ssd/hdd server (default: a quarter of the "
                         "data directory's free space shared, 256 MiB to 16 GiB each)")
    up.add_argument("--provider", choices=("none", "local"), default="none",
                    help="local: the controller starts more storage servers (up to --max-nodes) "
                         "when a job's tier is short; none (default): it overcommits the "
                         "servers started here, with a warning")
    up.add_argument("--max-nodes", type=int, default=8,
                    help="most storage servers the local provider runs (default 8)")
    up.add_argument("--autoscale", action="store_true",
                    help="add storage servers when a tier's utilisation is above its band and "
                         "drain and stop them below it (uses the local provider)")
    up.add_argument("--migrate-on-drain", action="store_true",
                    help="with --autoscale: move a draining node's objects to other nodes so "
                         "it leaves at once (default: it leaves when its last object is gone)")
    up.add_argument("--metrics-port", type=parse_metrics_port, default=None,
                    help="serve Prometheus metrics: the controller on this port, every other "
                         "server on a free port (0: all on free ports); addresses in "
                         "`pocket status` (default off)")
    up.add_argument("--log-level", default="INFO", help="server log level (default INFO)")
    up.add_argument("--log-dir", default=None,
                    help="write each server's log to a file here instead of stderr")
    up.set_defaults(func=cmd_up)
    st = sub.add_parser("status", help="show nodes and jobs of a running cluster")
    st.add_argument("--controller", default=None,
                    help="controller HOST:PORT (default $POCKET_CONTROLLER or 127.0.0.1:7070)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_status)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
