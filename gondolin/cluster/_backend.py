"""The sandbox manager's Ray backend: the integrations' ``VMBackend`` protocol on a cluster.

    manager = SandboxManager(config, backend=RayBackend(gondolin.cluster.connect(address)))

The manager, the MCP server and the LangChain/OpenAI/Anthropic tools then run every sandbox
in an actor on the cluster. Checkpoints the manager saves are files on the manager's host;
resuming one sends it to the chosen node through Ray's object store.
"""

from __future__ import annotations

from ..options import VMOptions
from ._client import Cluster, ClusterVM


class RayBackend:
    """Starts the manager's VMs on a Ray cluster (``create`` and ``resume`` of ``VMBackend``)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def create(self, options: VMOptions) -> ClusterVM:
        return await self.cluster.create(options)

    async def resume(self, checkpoint_path: str, options: VMOptions) -> ClusterVM:
        return await self.cluster.resume(checkpoint_path, options)


__all__ = ["RayBackend"]
