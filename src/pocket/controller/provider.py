"""Node providers: how the controller gets new storage nodes when a job's tier is short.

A provider is small on purpose: how many more nodes of a tier it could start
(:meth:`NodeProvider.available`), start some (:meth:`NodeProvider.start`,
returning the addresses the new servers will register from), and stop what
it started (:meth:`NodeProvider.stop`, on controller shutdown), and remove
one of them (:meth:`NodeProvider.remove`, when autoscaling has drained it).
Metadata servers the same way (:meth:`NodeProvider.available_metadata`,
:meth:`NodeProvider.start_metadata`; removed by :meth:`NodeProvider.remove`
too); only the local provider starts them.
The controller waits for the new nodes to register and then packs them.

* :class:`NoProvider` (``--provider none``, the default): nodes are started
  by hand; a job that does not fit gets the best map over the nodes there are.
* :class:`LocalProvider` (``--provider local``): ``python -m pocket.storage``
  processes on this machine, at most ``--max-nodes`` of them.

* :class:`KubernetesProvider` (``--provider kubernetes``): the pods of a
  StatefulSet, scaled through the official ``kubernetes`` client.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass, field
from typing import Optional, Protocol

from ..errors import Unavailable
from ..process import announced_address, die_with_parent, server_environment
from .planner import NodeProfile

log = logging.getLogger("pocket.provider")

FLASH_TIERS = ("nvme", "ssd", "hdd")


class NodeProvider(Protocol):
    """Starts and stops storage nodes for the controller."""

    name: str

    def available(self, tier: str) -> int:
        """How many more nodes of ``tier`` this provider could start now."""

    async def start(self, tier: str, count: int, profile: NodeProfile,
                    controller: str) -> list[str]:
        """Start ``count`` storage nodes of ``profile`` registering with ``controller``.

        Returns their addresses (host:port) once they listen; raises
        :class:`Unavailable` if any could not be started.
        """

    def available_metadata(self) -> int:
        """How many more metadata servers this provider could start now."""

    async def start_metadata(self, count: int, controller: str) -> list[str]:
        """Start ``count`` metadata servers registering with ``controller``; their addresses.
        Raises :class:`Unavailable` where the provider cannot."""

    async def stop(self) -> None:
        """Stop every node this provider started."""

    def owns(self, address: str) -> bool:
        """Whether this provider started the node at ``address`` and can remove it."""

    async def remove(self, address: str) -> None:
        """Stop one node it started (autoscaling removes a drained, empty node)."""

    def describe(self) -> dict:
        """The provider as plain data for ``pocket status``."""


class NoProvider:
    """No way to add nodes: shortfalls are overcommitted over the existing nodes."""

    name = "none"

    def available(self, tier: str) -> int:
        return 0

    async def start(self, tier: str, count: int, profile: NodeProfile,
                    controller: str) -> list[str]:
        raise Unavailable("no node provider is configured (--provider none)")

    def available_metadata(self) -> int:
        return 0

    async def start_metadata(self, count: int, controller: str) -> list[str]:
        raise Unavailable("no node provider is configured (--provider none)")

    async def stop(self) -> None:
        return None

    def owns(self, address: str) -> bool:
        return False

    async def remove(self, address: str) -> None:
        raise Unavailable("no node provider is configured (--provider none)")

    def describe(self) -> dict:
        return {"name": self.name}


@dataclass(eq=False)
class LocalNode:
    """A storage server process started by :class:`LocalProvider` (``tier`` ``metadata``:
    a metadata server)."""

    tier: str
    process: asyncio.subprocess.Process
    address: str = ""
    drain: Optional[asyncio.Task] = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.process.returncode is None


class LocalProvider:
    """Storage servers as local processes (``python -m pocket.storage``), at most ``max_nodes``;
    metadata servers (``python -m pocket.metadata``), at most ``max_metadata`` more.

    Flash tiers need ``data_dir`` (a directory that supports O_DIRECT); without
    it only DRAM nodes are offered.  Children die with the controller
    (PR_SET_PDEATHSIG) and are stopped by :meth:`stop` on a clean shutdown.
    """

    name = "local"

    def __init__(self, *, max_nodes: int = 8, data_dir: Optional[str] = None,
                 host: str = "127.0.0.1", log_level: str = "INFO",
                 start_timeout: float = 30.0, extra_args: tuple[str, ...] = (),
                 max_metadata: int = 4) -> None:
        if max_nodes < 0 or max_metadata < 0:
            raise ValueError("max_nodes and max_metadata must not be negative")
        self.max_nodes = max_nodes
        self.max_metadata = max_metadata
        self._starting_metadata = 0
        self.data_dir = data_dir
        self.host = host
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.extra_args = tuple(extra_args)
        self.nodes: list[LocalNode] = []
        self._starting = 0

    def running(self) -> int:
        """Storage servers running."""
        return sum(1 for n in self.nodes if n.running and n.tier != "metadata")

    def running_metadata(self) -> int:
        return sum(1 for n in self.nodes if n.running and n.tier == "metadata")

    def available_metadata(self) -> int:
        return max(0, self.max_metadata - self.running_metadata() - self._starting_metadata)

    async def start_metadata(self, count: int, controller: str) -> list[str]:
        if count <= 0:
            return []
        if count > self.available_metadata():
            raise Unavailable(f"the local provider may start {self.available_metadata()} more "
                              f"metadata servers, not {count} (--max-metadata "
                              f"{self.max_metadata})")
        cmd = [sys.executable, "-m", "pocket.metadata", "--listen", f"{self.host}:0",
               "--controller", controller, "--log-level", self.log_level]
        self._starting_metadata += count
        try:
            results = await asyncio.gather(*(self._start_one("metadata", cmd)
                                              for _ in range(count)), return_exceptions=True)
        finally:
            self._starting_metadata -= count
        return await self._started("metadata", results)

    def available(self, tier: str) -> int:
        if tier in FLASH_TIERS and not self.data_dir:
            return 0
        return max(0, self.max_nodes - self.running() - self._starting)

    def command(self, tier: str, profile: NodeProfile, controller: str) -> list[str]:
        cmd = [sys.executable, "-m", "pocket.storage", "--listen", f"{self.host}:0",
               "--controller", controller, "--tier", tier, "--capacity", str(profile.capacity),
               "--throughput", str(int(profile.throughput)), "--log-level", self.log_level]
        if tier in FLASH_TIERS:
            cmd += ["--dir", str(self.data_dir)]
        return cmd + list(self.extra_args)

    async def start(self, tier: str, count: int, profile: NodeProfile,
                    controller: str) -> list[str]:
        if count <= 0:
            return []
        if count > self.available(tier):
            raise Unavailable(f"the local provider may start {self.available(tier)} more "
                              f"{tier} nodes, not {count} (--max-nodes {self.max_nodes})")
        self._starting += count
        cmd = self.command(tier, profile, controller)
        try:
            results = await asyncio.gather(*(self._start_one(tier, cmd) for _ in range(count)),
                                           return_exceptions=True)
        finally:
            self._starting -= count
        return await self._started(tier, results)

    async def _started(self, tier: str, results: list) -> list[str]:
        """The new servers' addresses; if any failed, stop the others and raise why."""
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for r in results:
                if isinstance(r, LocalNode):
                    self.nodes.remove(r)
                    await self._stop_node(r, grace=2.0)
            raise Unavailable(f"the local provider could not start {tier} nodes: {errors[0]}")
        return [r.address for r in results]  # type: ignore[union-attr]

    async def _start_one(self, tier: str, cmd: list[str]) -> LocalNode:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=None, env=server_environment(),
            preexec_fn=die_with_parent)
        node = LocalNode(tier, proc)
        self.nodes.append(node)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(),  # type: ignore[union-attr]
                                          self.start_timeout)
        except asyncio.TimeoutError:
            await self._stop_node(node, grace=1.0)
            raise Unavailable(f"a {tier} storage server did not start in "
                              f"{self.start_timeout:g}s") from None
        text = line.decode(errors="replace").strip()
        address = announced_address(text)
        if address is None:
            await self._stop_node(node, grace=1.0)
            raise Unavailable(f"a {tier} storage server exited ({proc.returncode}) before "
                              f"listening: {text or 'no output'}")
        node.address = address
        node.drain = asyncio.get_running_loop().create_task(self._drain(proc))
        log.info("local provider started %s server %s (pid %d)", tier, node.address, proc.pid)
        return node

    @staticmethod
    async def _drain(proc: asyncio.subprocess.Process) -> None:
        # Servers print one line; keep reading so a chatty child never blocks on a full pipe.
        while await proc.stdout.read(65536):  # type: ignore[union-attr]
            pass

    async def _stop_node(self, node: LocalNode, grace: float) -> None:
        proc = node.process
        if proc.returncode is None:
            try:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), grace)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
            except ProcessLookupError:
                pass
        if node.drain is not None:
            node.drain.cancel()

    async def stop(self, grace: float = 4.0) -> None:
        """SIGTERM every node started here; SIGKILL what is left after ``grace`` seconds."""
        nodes, self.nodes = self.nodes, []
        if nodes:
            log.info("local provider: stopping %d storage servers", sum(n.running for n in nodes))
        await asyncio.gather(*(self._stop_node(n, grace) for n in nodes),
                             return_exceptions=True)

    def owns(self, address: str) -> bool:
        return any(n.address == address and n.running for n in self.nodes)

    async def remove(self, address: str, grace: float = 5.0) -> None:
        """SIGTERM the node at ``address`` (it leaves the controller on its way out)."""
        for node in list(self.nodes):
            if node.address == address:
                self.nodes.remove(node)
                log.info("local provider: stopping %s storage server %s (pid %d)", node.tier,
                         address, node.process.pid)
                await self._stop_node(node, grace)
                return
        raise Unavailable(f"the local provider did not start {address}")

    def describe(self) -> dict:
        return {"name": self.name, "max_nodes": self.max_nodes, "running": self.running(),
                "data_dir": self.data_dir, "max_metadata": self.max_metadata,
                "running_metadata": self.running_metadata()}


def make_provider(name: str, **kwargs) -> NodeProvider:
    """``"none"`` or ``"local"`` → a provider."""
    name = name.strip().lower()
    if name == "none":
        return NoProvider()
    if name == "local":
        return LocalProvider(**kwargs)
    if name in ("kubernetes", "k8s"):
        return KubernetesProvider(**kwargs)
    raise ValueError(f"unknown node provider {name!r} (none, local, kubernetes)")


class KubernetesProvider:
    """Storage servers as the pods of a StatefulSet, scaled through the Kubernetes API.

    ``start`` raises the StatefulSet's replicas (``patch_namespaced_stateful_set_scale``)
    and waits until the new pods (ordinals old..new-1) have an IP; the servers in them
    listen on ``$(POD_IP):port`` (see ``deploy/k8s/storage.yaml``), so that is the
    address they register from.  A StatefulSet removes its highest ordinal first, so
    only that pod is offered for removal (:meth:`owns`); the autoscaler drains it,
    waits until it is empty and then lowers replicas by one.

    The official ``kubernetes`` client is imported lazily (``pip install
    pocket-store[k8s]``); tests pass duck-typed ``apps``/``core`` API objects instead.
    """

    name = "kubernetes"

    def __init__(self, *, statefulset: str = "pocket-storage", namespace: str = "default",
                 tier: str = "dram", max_nodes: int = 8, port: int = 7071,
                 selector: Optional[str] = None, apps=None, core=None,
                 poll: float = 0.5, start_timeout: float = 120.0) -> None:
        if apps is None or core is None:
            try:
                from kubernetes import client, config  # noqa: PLC0415 (optional dependency)
            except ImportError:
                raise ValueError("the kubernetes provider needs the kubernetes client: "
                                 "pip install 'pocket-store[k8s]'") from None
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            apps = apps or client.AppsV1Api()
            core = core or client.CoreV1Api()
        self.apps, self.core = apps, core
        self.statefulset, self.namespace, self.tier = statefulset, namespace, tier
        self.max_nodes, self.port = max_nodes, port
        self.selector = selector or f"app={statefulset}"
        self.poll, self.start_timeout = poll, start_timeout
        self.replicas = self._read_replicas()
        #: ordinal → "ip:port" of the pods seen last.
        self.pods: dict[int, str] = {}

    def _read_replicas(self) -> int:
        scale = self.apps.read_namespaced_stateful_set_scale(self.statefulset, self.namespace)
        return int(scale.spec.replicas or 0)

    def _scale(self, replicas: int) -> None:
        self.apps.patch_namespaced_stateful_set_scale(
            self.statefulset, self.namespace, {"spec": {"replicas": replicas}})
        self.replicas = replicas

    def _list_pods(self) -> dict[int, str]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector)
        found = {}
        prefix = self.statefulset + "-"
        for pod in pods.items:
            name = pod.metadata.name
            if not name.startswith(prefix) or not name[len(prefix):].isdigit():
                continue
            ip = getattr(pod.status, "pod_ip", None)
            if ip and getattr(pod.status, "phase", "Running") == "Running":
                found[int(name[len(prefix):])] = f"{ip}:{self.port}"
        self.pods = found
        return found

    def available(self, tier: str) -> int:
        return max(0, self.max_nodes - self.replicas) if tier == self.tier else 0

    def available_metadata(self) -> int:
        return 0  # metadata servers are a Deployment scaled by hand (deploy/k8s/controller.yaml)

    async def start_metadata(self, count: int, controller: str) -> list[str]:
        raise Unavailable("the kubernetes provider does not start metadata servers; scale "
                          "the metadata Deployment by hand (deploy/k8s/controller.yaml)")

    async def start(self, tier: str, count: int, profile: NodeProfile,
                    controller: str) -> list[str]:
        if count <= 0:
            return []
        if tier != self.tier or count > self.available(tier):
            raise Unavailable(f"the kubernetes provider may add {self.available(tier)} more "
                              f"{tier} nodes, not {count}")
        old = self.replicas
        await asyncio.to_thread(self._scale, old + count)
        log.info("kubernetes: scaled statefulset %s/%s to %d", self.namespace, self.statefulset,
                 old + count)
        deadline = asyncio.get_running_loop().time() + self.start_timeout
        wanted = range(old, old + count)
        while True:
            pods = await asyncio.to_thread(self._list_pods)
            if all(i in pods for i in wanted):
                return [pods[i] for i in wanted]
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable(f"statefulset {self.statefulset}: pods "
                                  f"{[i for i in wanted if i not in pods]} not running after "
                                  f"{self.start_timeout:g}s")
            await asyncio.sleep(self.poll)

    def owns(self, address: str) -> bool:
        top = self.replicas - 1
        return top >= 0 and self.pods.get(top) == address

    async def remove(self, address: str) -> None:
        pods = await asyncio.to_thread(self._list_pods)
        top = self.replicas - 1
        if pods.get(top) != address:
            raise Unavailable(f"{address} is not the highest pod of statefulset "
                              f"{self.statefulset}; a StatefulSet removes only that one")
        await asyncio.to_thread(self._scale, top)
        log.info("kubernetes: scaled statefulset %s/%s down to %d (removed %s)", self.namespace,
                 self.statefulset, top, address)

    async def stop(self) -> None:
        return None  # the StatefulSet outlives the controller

    def describe(self) -> dict:
        return {"name": self.name, "statefulset": self.statefulset,
                "namespace": self.namespace, "tier": self.tier, "replicas": self.replicas,
                "max_nodes": self.max_nodes}
