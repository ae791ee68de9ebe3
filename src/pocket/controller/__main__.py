"""``python -m pocket.controller``: run the controller."""

from __future__ import annotations

import argparse
import os
import sys

from ..server import (apply_common_arguments, common_arguments, env_default, run_server,
                      setup_logging, split_listen)
from ..units import parse_duration, parse_rate
from .autoscale import DEFAULT_BANDS, METADATA, Band, ScalingPolicy, parse_band, parse_tier_nodes
from .planner import DEFAULT_PROFILES, PlannerConfig, format_rate, parse_profile
from .provider import make_provider
from .server import ControllerServer


def profile_help() -> str:
    rows = "; ".join(f"{t} {p.instance} {p.capacity / 1e9:g}GB {format_rate(p.throughput)} "
                     f"${p.price}/h" for t, p in DEFAULT_PROFILES.items())
    return ("node profile of a tier, TIER:key=value,... with keys capacity, throughput, price "
            "($/hour), instance; repeatable; env POCKET_PROFILE, several separated by ';' "
            f"(defaults: {rows})")


def add_autoscale_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--autoscale", choices=("auto", "on", "off"),
                        default=env_default("autoscale", "auto"),
                        help="keep each tier's utilisation inside its band by adding and "
                             "draining nodes: on, off, or auto (default: on when --provider is "
                             "not none)")
    parser.add_argument("--autoscale-interval", default=env_default("autoscale_interval", "1s"),
                        help="how often the autoscaler looks at heartbeats (default 1s)")
    parser.add_argument("--scale-band", action="append", default=None,
                        help="target utilisation band, RESOURCE=LOW-HIGH or TIER:RESOURCE=LOW-HIGH "
                             "in percent, resources cpu, net, bytes, throughput (allocated), "
                             "capacity (allocated); repeatable (default 60-80 for all; env "
                             "POCKET_SCALE_BAND, several separated by ';')")
    parser.add_argument("--tier-nodes", action="append", default=None,
                        help="autoscaling limits of a tier, TIER=MIN:MAX (e.g. dram=1:8; "
                             "metadata=1:3 for metadata servers); repeatable (default dram=1: "
                             "and metadata=1:, no maximum but the provider's)")
    parser.add_argument("--scale-cooldown", default=env_default("scale_cooldown", "2s"),
                        help="least time between two scale-outs of a tier (default 2s)")
    parser.add_argument("--scale-in-delay", default=env_default("scale_in_delay", "2s"),
                        help="how long a tier stays below its band before nodes are drained; "
                             "also the least time after any change (+1s) (default 2s)")
    parser.add_argument("--metadata-jobs", type=int,
                        default=int(env_default("metadata_jobs", 16)),
                        help="active jobs one metadata server is sized for: the metadata:jobs "
                             "band applies to active jobs / (servers x this) (default 16)")
    parser.add_argument("--max-metadata", type=int, default=int(env_default("max_metadata", 4)),
                        help="most metadata servers the local provider starts (default 4)")
    parser.add_argument("--migrate-on-drain", action="store_true",
                        default=env_default("migrate_on_drain", "") not in ("", "0", "off",
                                                                           "false", "no"),
                        help="move a draining node's remaining objects to the tier's other "
                             "active nodes so it can leave at once (default off: it leaves "
                             "when its last object is deleted)")


def autoscale_policy(args: argparse.Namespace) -> ScalingPolicy | None:
    """The scaling policy the flags ask for, or None when autoscaling is off."""
    if args.autoscale == "off" or (args.autoscale == "auto" and args.provider == "none"):
        return None
    texts = args.scale_band if args.scale_band is not None else \
        [t for t in os.environ.get("POCKET_SCALE_BAND", "").split(";") if t.strip()]
    bands: dict[str, Band] = {**DEFAULT_BANDS, **dict(parse_band(t) for t in texts)}
    min_nodes, max_nodes = {"dram": 1, METADATA: 1}, {}
    for text in args.tier_nodes or ():
        tier, low, high = parse_tier_nodes(text)
        if tier not in DEFAULT_PROFILES and tier != METADATA:
            raise ValueError(f"unknown tier {tier!r} in --tier-nodes")
        min_nodes[tier] = low
        if high is not None:
            max_nodes[tier] = high
    delay = parse_duration(args.scale_in_delay)
    return ScalingPolicy(bands=bands, min_nodes=min_nodes, max_nodes=max_nodes,
                         cooldown_out=parse_duration(args.scale_cooldown),
                         cooldown_in=delay + 1.0, scale_in_delay=delay,
                         jobs_per_metadata=args.metadata_jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocket.controller",
                                     description="Run the Pocket controller.")
    common_arguments(parser, "127.0.0.1:7070")
    parser.add_argument("--node-timeout", default=env_default("node_timeout", "3s"),
                        help="drop a node after this long without heartbeats (default 3s; a "
                             "node whose heartbeat connection closes is dropped after 1.5s)")
    parser.add_argument("--reclaim-after", default=env_default("reclaim_after", "30s"),
                        help="free the extents a metadata server allocated on storage servers "
                             "once it has been gone this long (it died or restarted: its "
                             "namespaces are lost) (default 30s; keep it well above "
                             "--node-timeout so a brief link blip never frees live data)")
    parser.add_argument("--profile", action="append", default=None, help=profile_help())
    parser.add_argument("--lambda-rate", default=env_default("lambda_rate", "600Mbps"),
                        help="throughput per lambda for the `lambdas` hint (default 600Mbps)")
    parser.add_argument("--default-throughput", default=env_default("default_throughput",
                                                                     "400Gbps"),
                        help="throughput of a job that gives no size hint (default 400Gbps: "
                             "50 nodes of 8 Gb/s)")
    parser.add_argument("--hold-time", default=env_default("hold_time", "111s"),
                        help="a missing capacity hint is throughput x this; a missing "
                             "throughput hint is capacity / this (default 111s)")
    parser.add_argument("--provider", default=env_default("provider", "none"),
                        choices=("none", "local", "kubernetes"),
                        help="who starts storage nodes when a job's tier is short: none "
                             "(default: overcommit the existing nodes, with a warning) or local "
                             "(python -m pocket.storage processes on this machine)")
    parser.add_argument("--k8s-statefulset", default=env_default("k8s_statefulset",
                                                                 "pocket-storage"),
                        help="kubernetes provider: the StatefulSet of storage servers to scale "
                             "(default pocket-storage; see deploy/k8s/)")
    parser.add_argument("--k8s-namespace", default=env_default("k8s_namespace", "default"),
                        help="kubernetes provider: its namespace (default default)")
    parser.add_argument("--max-nodes", type=int, default=int(env_default("max_nodes", 8)),
                        help="most storage servers the local provider runs at once (default 8)")
    parser.add_argument("--node-dir", default=env_default("node_dir", None),
                        help="data directory for nvme/ssd/hdd servers the local provider "
                             "starts (without it, it starts DRAM servers only)")
    parser.add_argument("--provision-timeout", default=env_default("provision_timeout", "30s"),
                        help="how long a job registration waits for new nodes (default 30s)")
    add_autoscale_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    host, port = split_listen(args.listen)
    try:
        texts = args.profile if args.profile is not None else \
            [t for t in os.environ.get("POCKET_PROFILE", "").split(";") if t.strip()]
        profiles = dict(DEFAULT_PROFILES)
        for text in texts:
            profile = parse_profile(text, profiles)
            profiles[profile.tier] = profile
        planner = PlannerConfig(lambda_rate=parse_rate(args.lambda_rate),
                                default_throughput=parse_rate(args.default_throughput),
                                hold_time=parse_duration(args.hold_time))
        if min(planner.lambda_rate, planner.default_throughput, planner.hold_time) <= 0:
            raise ValueError("--lambda-rate, --default-throughput and --hold-time must be "
                             "positive")
        provider = make_provider(args.provider, **(
            {"max_nodes": args.max_nodes, "data_dir": args.node_dir, "host": host if host not in
             ("0.0.0.0", "::", "") else "127.0.0.1", "log_level": args.log_level,
             "max_metadata": args.max_metadata}
            if args.provider == "local" else
            {"statefulset": args.k8s_statefulset, "namespace": args.k8s_namespace,
             "max_nodes": args.max_nodes} if args.provider == "kubernetes" else {}))
        server = ControllerServer(host, port, node_timeout=parse_duration(args.node_timeout),
                                  profiles=profiles, planner=planner, provider=provider,
                                  provision_timeout=parse_duration(args.provision_timeout),
                                  autoscale=autoscale_policy(args),
                                  autoscale_interval=parse_duration(args.autoscale_interval),
                                  reclaim_after=parse_duration(args.reclaim_after),
                                  migrate_on_drain=args.migrate_on_drain)
        apply_common_arguments(server, args)
    except ValueError as exc:
        parser.error(str(exc))
    return run_server(server)


if __name__ == "__main__":
    sys.exit(main())
