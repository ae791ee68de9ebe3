"""The Kubernetes provider against a fake API (no cluster runs here): the requests it sends."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace as NS

import pytest

from pocket.controller.planner import DEFAULT_PROFILES
from pocket.controller.provider import KubernetesProvider, make_provider
from pocket.errors import Unavailable


class FakeCluster:
    """Duck-typed AppsV1Api + CoreV1Api: records calls; pods get an IP when scaled up."""

    def __init__(self, replicas: int = 1) -> None:
        self.replicas = replicas
        self.calls: list[tuple] = []

    def read_namespaced_stateful_set_scale(self, name, namespace):
        self.calls.append(("read_scale", name, namespace))
        return NS(spec=NS(replicas=self.replicas))

    def patch_namespaced_stateful_set_scale(self, name, namespace, body):
        self.calls.append(("patch_scale", name, namespace, body))
        self.replicas = body["spec"]["replicas"]

    def list_namespaced_pod(self, namespace, label_selector):
        self.calls.append(("list_pods", namespace, label_selector))
        return NS(items=[NS(metadata=NS(name=f"pocket-storage-{i}"),
                            status=NS(pod_ip=f"10.0.0.{10 + i}", phase="Running"))
                         for i in range(self.replicas)])


def provider(fake: FakeCluster, **kw) -> KubernetesProvider:
    return KubernetesProvider(namespace="pocket", apps=fake, core=fake, poll=0.01,
                              max_nodes=4, **kw)


def test_start_scales_the_statefulset_and_returns_pod_addresses() -> None:
    fake = FakeCluster(replicas=1)
    p = provider(fake)
    assert p.available("dram") == 3 and p.available("nvme") == 0
    addresses = asyncio.run(p.start("dram", 2, DEFAULT_PROFILES["dram"], "ctl:7070"))
    assert addresses == ["10.0.0.11:7071", "10.0.0.12:7071"]
    assert ("patch_scale", "pocket-storage", "pocket", {"spec": {"replicas": 3}}) in fake.calls
    assert ("list_pods", "pocket", "app=pocket-storage") in fake.calls
    assert p.available("dram") == 1
    with pytest.raises(Unavailable):
        asyncio.run(p.start("dram", 2, DEFAULT_PROFILES["dram"], "ctl:7070"))


def test_only_the_highest_pod_is_removed_and_by_scaling_down() -> None:
    fake = FakeCluster(replicas=3)
    p = provider(fake)
    p._list_pods()
    assert p.owns("10.0.0.12:7071") and not p.owns("10.0.0.11:7071")
    with pytest.raises(Unavailable, match="highest"):
        asyncio.run(p.remove("10.0.0.10:7071"))
    asyncio.run(p.remove("10.0.0.12:7071"))
    assert fake.calls[-1] == ("patch_scale", "pocket-storage", "pocket", {"spec": {"replicas": 2}})
    assert p.describe()["replicas"] == 2


def test_missing_client_is_a_clear_error(monkeypatch) -> None:
    import builtins
    real = builtins.__import__

    def no_kubernetes(name, *a, **kw):
        if name.startswith("kubernetes"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_kubernetes)
    with pytest.raises(ValueError, match=r"pocket-store\[k8s\]"):
        make_provider("kubernetes")
