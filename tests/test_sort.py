"""The sort workload (bench/sort.py) end to end: small sorts through Pocket and Redis.

The harness runs as a real subprocess (its lambdas are fresh processes that
attach with the job id and token); each run is validated by the harness
itself (globally sorted, same record count and checksum as the input) and we
check its --json report.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SORT = ROOT / "bench" / "sort.py"

requires_redis = pytest.mark.skipif(shutil.which("redis-server") is None,
                                    reason="redis-server is not installed")


def run_sort(tmp_path: Path, *args: str, timeout: float = 150) -> dict:
    out = tmp_path / "sort.json"
    cmd = [sys.executable, str(SORT), "--json", str(out), "--no-progress", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n" \
                                 f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    assert out.exists(), proc.stdout
    return json.loads(out.read_text())


def check_run(report: dict, size: int, lambdas: int) -> None:
    records = size // 100
    assert report["valid"] is True, report.get("problems")
    assert report["records"] == records
    assert report["bytes"] == records * 100
    assert report["lambdas"] == lambdas
    assert report["leftover_shuffle_objects"] == 0  # delete_after_read freed every object
    assert report["shuffle_bytes"] == 2 * records * 100
    assert report["total_s"] > 0 and report["shuffle_s"] > 0
    assert report["shuffle_s"] <= report["total_s"]
    assert report["total_s"] == pytest.approx(report["map_s"] + report["reduce_s"])


@pytest.mark.timeout(180)
def test_sort_through_pocket(tmp_path: Path) -> None:
    """16 MiB on 4 lambda processes, an embedded cluster, input and output in the store."""
    size = 16 << 20
    report = run_sort(tmp_path, "--size", "16MiB", "--lambdas", "4", "--store", "pocket")
    assert report["store"] == "pocket"
    check_run(report, size, 4)
    assert report["peak_store_bytes"] > 0


@pytest.mark.timeout(180)
def test_sort_through_pocket_on_a_given_cluster_with_files(tmp_path: Path, cluster) -> None:
    """--controller (the shared test cluster) and --io files; more reducers than mappers."""
    size = 8 << 20
    report = run_sort(tmp_path, "--size", "8MiB", "--lambdas", "3", "--reducers", "5",
                      "--store", "pocket", "--controller", cluster.address, "--io", "files")
    check_run(report, size, 3)
    assert report["reducers"] == 5
    assert cluster.address in report["setup"]


@requires_redis
@pytest.mark.timeout(180)
def test_sort_through_both_stores(tmp_path: Path) -> None:
    """--store both: a report per store, the ratio, and the harness's own redis-server gone."""
    size = 16 << 20
    report = run_sort(tmp_path, "--size", "16MiB", "--lambdas", "4", "--store", "both")
    assert report["valid"] is True
    assert report["records"] == size // 100
    assert report["stores"] == ["pocket", "redis"]
    for store in ("pocket", "redis"):
        assert report[store]["store"] == store
        check_run(report[store], size, 4)
    assert report["ratio"]["shuffle_s"] == pytest.approx(
        report["pocket"]["shuffle_s"] / report["redis"]["shuffle_s"])
    pid = int(report["redis"]["setup"].split(" pid ")[1].split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# -- the record functions, in process -----------------------------------------

@pytest.fixture(scope="module")
def sort_module():
    spec = importlib.util.spec_from_file_location("pocket_bench_sort", SORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sort_records_handles_ties_and_checksum_is_order_free(sort_module) -> None:
    s = sort_module
    rng = np.random.default_rng(7)
    for n in (0, 1, 2, 1000, 5000):
        recs = s.generate_partition(3, n, n).reshape(n, 100).copy()
        if n > 2:
            recs[:, :8] = recs[rng.integers(0, n // 10 + 1, n), :8]  # ties on 8 bytes
            recs[::3, 8:10] = 0                                      # and on all 10
        flat = recs.reshape(-1)
        out = s.sort_records(flat)
        assert s.is_sorted(out)
        assert s.checksum(out) == s.checksum(flat)
        keys = [bytes(r[:10]) for r in recs]
        assert [bytes(r[:10]) for r in out.reshape(n, 100)] == sorted(keys)
    one = s.generate_partition(1, 0, 10)
    changed = one.copy()
    changed[555] ^= 1
    assert s.checksum(changed) != s.checksum(one)


def test_range_partition_is_monotone(sort_module) -> None:
    s = sort_module
    flat = s.generate_partition(5, 0, 20000)
    grouped, counts = s.partition_records(flat, 7)
    assert counts.sum() == 20000 and counts.min() > 0
    buckets = s.bucket_of(grouped, 20000, 7)
    assert (np.diff(buckets.astype(int)) >= 0).all()
    assert s.checksum(grouped) == s.checksum(flat)
