"""Fixtures: real Pocket clusters of local processes on 127.0.0.1 (port 0)."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Iterator

import pytest

import pocket
from pocket.local import LocalCluster
from pocket.storage.flash import (MEMORY_FILESYSTEMS, DirectIOUnsupported, filesystem_type,
                                  probe_direct_io)


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


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[str]:
    """A directory on the real disk (never tmpfs) for flash data files, one per test module.

    Skips the module's flash tests where no O_DIRECT-capable directory exists.
    """
    name = request.module.__name__.rsplit(".", 1)[-1]
    path = str(tmp_path_factory.mktemp(name))
    if filesystem_type(path) in MEMORY_FILESYSTEMS:  # /tmp is tmpfs here: use the checkout
        path = tempfile.mkdtemp(prefix=f".pocket-{name}-", dir=os.getcwd())
    try:
        probe_direct_io(path)
    except DirectIOUnsupported as exc:
        pytest.skip(f"no O_DIRECT-capable directory: {exc}")
    yield path
    shutil.rmtree(path, ignore_errors=True)
