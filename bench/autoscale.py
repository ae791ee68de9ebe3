"""Autoscaling over the original Pocket's three-job trace, with real load from lambda processes.

The trace (Klimovic et al., OSDI'18, the autoscaling figure, ~250 s): a sort
job arrives at ~20 s and leaves at ~60 s, a video-analytics job runs from
~100 s to ~195 s and a second sort from ~145 s to ~185 s; between the jobs
the cluster is back at its minimum.  Here time is compressed by
``--time-scale`` (default 0.5: 250 s → 125 s) and each job is sized in nodes
of this machine (``--node-rate``, ``--node-capacity``).  Each job registers with throughput
and capacity hints and runs lambda processes that put, get and delete 1 MiB
objects at a fixed rate until it leaves.

The cluster starts at its minimum (one DRAM node) with the local provider
and ``--autoscale on``.  Every second the script records the storage nodes
(active, draining), their allocated throughput and bytes stored; it reports
node-seconds against a static cluster sized for the peak in the same run,
the time each registration took (it includes starting new nodes), and the
time from the last job's deregistration back to the minimum.  With
matplotlib installed it plots the timeline to a PNG.

    python bench/autoscale.py --plot docs/autoscale.png --json /tmp/autoscale.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import pocket  # noqa: E402
from pocket.local import LocalCluster  # noqa: E402
from pocket.units import parse_rate, parse_size  # noqa: E402

MiB = 1 << 20

#: name, arrival (s, paper time), duration (s, paper time), nodes of throughput, lambdas
TRACE = [("sort-1", 20, 40, 3, 3), ("video", 100, 95, 4, 4), ("sort-2", 145, 40, 3, 3)]
#: The paper's figure spans this long (s, paper time).
SPAN = 250


def lambda_worker(controller: str, job_id: str, token: str, stop_at: float, rate: float,
                  seed: int, errors: "mp.Queue") -> None:
    """One lambda: put, get and delete 1 MiB objects at ``rate`` objects/s until ``stop_at``."""
    payload = os.urandom(MiB)
    failed = 0
    try:
        job = pocket.attach(job_id, token, controller)
    except pocket.PocketError as exc:
        errors.put(f"attach: {exc}")
        return
    i = 0
    live: list[str] = []
    next_at = time.time()
    while time.time() < stop_at:
        name = f"l{seed}-{i}"
        i += 1
        try:
            job.put(name, payload)
            live.append(name)
            if len(live) > 4:  # keep a few objects live: a small working set per lambda
                old = live.pop(0)
                if job.get(old) != payload:
                    failed += 1
                job.delete(old)
        except pocket.PocketError as exc:
            failed += 1
            errors.put(f"{name}: {exc}")
        next_at += 1.0 / rate
        time.sleep(max(0.0, next_at - time.time()))
    job.close()
    if failed:
        errors.put(f"lambda {seed}: {failed} failed requests")


def sample(client: pocket.Cluster, t0: float) -> dict:
    s = client.status()
    storage = [n for n in s["nodes"] if n["role"] == "storage"]
    starting = {t: k for t, k in s["autoscale"].get("starting", {}).items() if t != "metadata"}
    return {"t": round(time.time() - t0, 2),
            "nodes": sum(1 for n in storage if n["state"] == "active"),
            "draining": sum(1 for n in storage if n["state"] != "active"),
            # processes the autoscaler is starting cost node-seconds too
            "starting": sum(starting.values()),
            "capacity": sum(n.get("throughput", 0) for n in storage if n["state"] == "active"),
            "metadata": sum(1 for n in s["nodes"] if n["role"] == "metadata"),
            "allocated": sum(n.get("allocated_throughput", 0) for n in storage),
            "used": sum(n["used"] for n in storage),
            "net": sum(n["net_in"] + n["net_out"] for n in storage),
            "jobs": sum(1 for j in s["jobs"] if j["state"] == "active")}


def run_job(client: pocket.Cluster, name: str, start: float, duration: float, nodes: int,
            lambdas: int, node_rate: float, t0: float, rate: float, results: dict,
            errors: "mp.Queue") -> None:
    time.sleep(max(0.0, t0 + start - time.time()))
    began = time.monotonic()
    job = client.register_job(name, throughput=int(nodes * node_rate), capacity=f"{8 * lambdas}MiB",
                              latency_sensitive=True)
    registered = time.monotonic() - began
    stop_at = t0 + start + duration
    procs = [mp.Process(target=lambda_worker, args=(client.address if hasattr(client, "address")
                                                    else results["controller"], job.id,
                                                    job.token, stop_at, rate, k, errors))
             for k in range(lambdas)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    job.deregister()
    results[name] = {"registered_in": round(registered, 3), "left": time.time() - t0,
                     "map_nodes": len(job.weights)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-scale", type=float, default=0.5,
                        help="compress the trace's time by this factor (default 0.5)")
    parser.add_argument("--node-rate", default="100MB/s",
                        help="throughput each storage node reports (default 100MB/s)")
    parser.add_argument("--node-capacity", default="64MiB", help="capacity per node (64MiB)")
    parser.add_argument("--max-nodes", type=int, default=8,
                        help="most nodes the local provider starts (default 8)")
    parser.add_argument("--rate", type=float, default=4.0,
                        help="objects per second per lambda (default 4)")
    parser.add_argument("--scale-band", action="append", default=[],
                        help="passed to the controller (e.g. throughput=60-100); repeatable; "
                             "default: the controller's 60-80 for every resource")
    parser.add_argument("--json", default=None, help="write samples and results here")
    parser.add_argument("--plot", default=None, help="write the timeline PNG here")
    args = parser.parse_args(argv)
    node_rate = parse_rate(args.node_rate)
    trace = [(n, a * args.time_scale, d * args.time_scale, k, lam) for n, a, d, k, lam in TRACE]
    end = SPAN * args.time_scale
    errors: mp.Queue = mp.Queue()
    samples: list[dict] = []
    results: dict = {}
    with LocalCluster(dram=1, capacity=parse_size(args.node_capacity), provider="local",
                      max_nodes=args.max_nodes, throughput=args.node_rate, autoscale=True,
                      controller_args=tuple(a for band in args.scale_band
                                            for a in ("--scale-band", band)),
                      log_level="WARNING") as cluster, pocket.connect(cluster.address) as client:
        results["controller"] = cluster.address
        client.address = cluster.address  # type: ignore[attr-defined]
        t0 = time.time()
        threads = [threading.Thread(target=run_job, args=(client, n, a, d, k, lam, node_rate, t0,
                                                          args.rate, results, errors))
                   for n, a, d, k, lam in trace]
        for th in threads:
            th.start()
        while time.time() - t0 < end or any(th.is_alive() for th in threads):
            samples.append(sample(client, t0))
            time.sleep(max(0.0, 0.5 - (time.time() - t0) % 0.5))
        for th in threads:
            th.join()
        last_left = max(results[n]["left"] for n, *_ in trace)
        minimum = samples[0]["nodes"]
        back = next((s["t"] - last_left for s in samples
                     if s["t"] >= last_left and s["nodes"] + s["draining"] <= minimum), None)
        events = client.status()["autoscale"]["events"]
    errs = []
    while not errors.empty():
        errs.append(errors.get())
    # node-seconds: integrate the sampled storage nodes (active + draining + starting)
    node_seconds = sum((b["t"] - a["t"]) * (a["nodes"] + a["draining"] + a["starting"])
                       for a, b in zip(samples, samples[1:]))
    duration = samples[-1]["t"] - samples[0]["t"]
    peak = max(s["nodes"] + s["draining"] + s["starting"] for s in samples)
    static = peak * duration
    print(f"{'job':<8} {'arrives s':>9} {'leaves s':>9} {'registered in s':>16} {'map nodes':>9}")
    for n, a, d, _, _ in trace:
        r = results[n]
        print(f"{n:<8} {a:>9.1f} {r['left']:>9.1f} {r['registered_in']:>16.2f} "
              f"{r['map_nodes']:>9}")
    print()
    print(f"{'run':<28} {'value':>10}")
    print(f"{'duration s':<28} {duration:>10.1f}")
    print(f"{'peak nodes':<28} {peak:>10}")
    print(f"{'node-seconds (autoscaled)':<28} {node_seconds:>10.1f}")
    print(f"{'node-seconds (static peak)':<28} {static:>10.1f}")
    print(f"{'ratio':<28} {node_seconds / static:>10.3f}")
    print(f"{'back to minimum after s':<28} {back if back is not None else float('nan'):>10.1f}")
    print(f"{'failed requests':<28} {len(errs):>10}")
    print(f"{'autoscale events':<28} {len(events):>10}")
    for e in errs[:5]:
        print("  error:", e)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": samples, "results": results, "events": events,
                       "node_seconds": node_seconds, "static": static, "back": back,
                       "errors": errs}, f, indent=1)
    if args.plot:
        plot(samples, trace, results, args.plot, node_rate)
    return 1 if errs else 0


def plot(samples: list[dict], trace: list, results: dict, path: str, node_rate: float) -> None:
    """The timeline like the paper's figure: storage nodes over time (top), throughput
    allocated to jobs, the nodes' rated throughput and the measured traffic (bottom), job
    arrivals and departures marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    t = [s["t"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True,
                                      gridspec_kw={"height_ratios": [1, 1.3]})
    top.step(t, [s["nodes"] + s["draining"] + s["starting"] for s in samples], where="post",
             color="tab:blue", label="storage nodes (incl. draining, starting)")
    top.step(t, [s["nodes"] for s in samples], where="post", color="tab:blue", alpha=0.4,
             linestyle="--", label="active")
    top.set_ylabel("nodes")
    top.set_ylim(0, max(s["nodes"] + s["draining"] + s["starting"] for s in samples) + 1.5)
    mb = 1e6
    bottom.step(t, [s["capacity"] / mb for s in samples], where="post", color="tab:gray",
                label="throughput of active nodes")
    bottom.step(t, [s["allocated"] / mb for s in samples], where="post", color="tab:orange",
                label="allocated to jobs")
    bottom.plot(t, [s["net"] / mb for s in samples], color="tab:green",
                label="used (measured in + out)")
    bottom.set_ylabel("MB/s")
    bottom.set_xlabel("time (s)")
    for name, a, _d, _, _ in trace:
        left = results.get(name, {}).get("left")
        for ax in (top, bottom):
            ax.axvline(a, color="black", linewidth=0.6)
            if left is not None:
                ax.axvline(left, color="black", linewidth=0.6, linestyle=":")
        top.annotate(f"{name} ▶", (a, top.get_ylim()[1]), fontsize=7, ha="left", va="top",
                     xytext=(2, -2), textcoords="offset points")
        if left is not None:
            top.annotate("◀", (left, top.get_ylim()[1]), fontsize=7, ha="right", va="top",
                         xytext=(-2, -2), textcoords="offset points")
    top.legend(fontsize=7, loc="center left")
    bottom.legend(fontsize=7, loc="upper left")
    top.set_title("Autoscaling over the three-job trace (solid: job arrives, dotted: leaves)",
                  fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    print(f"timeline written to {path}")


if __name__ == "__main__":
    sys.exit(main())
