"""Fixtures: real Pocket clusters of local processes on 127.0.0.1 (port 0)."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

import pocket
from pocket.local import LocalCluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """A shared cluster: controller, one metadata and two DRAM storage servers (512 MiB each)."""
    with LocalCluster(dram=2, capacity="512MiB", log_level="WARNING") as c:
        yield c


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """Start private clusters for tests that need a fresh or special one; all are stopped."""
    started: list[LocalCluster] = []

    def make(**kwargs) -> LocalCluster:
        kwargs.setdefault("log_level", "WARNING")
        c = LocalCluster(**kwargs)
        started.append(c)
        return c.start()

    yield make
    for c in started:
        c.stop()


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[pocket.Cluster]:
    with pocket.connect(cluster.address) as c:
        yield c


@pytest.fixture
def job(client: pocket.Cluster, request: pytest.FixtureRequest) -> Iterator[pocket.Job]:
    """A fresh job on the shared cluster, deregistered afterwards."""
    j = client.register_job(request.node.name[:40])
    yield j
    try:
        j.deregister()
    except pocket.PocketError:
        pass
