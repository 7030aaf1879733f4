"""The sandbox manager's Ray backend: the integrations' ``VMBackend`` protocol on a cluster.

    manager = SandboxManager(config, backend=RayBackend(gondolin.cluster.connect(address)))

The manager, the MCP server and the LangChain/OpenAI/Anthropic tools then run every sandbox
in an actor on the cluster. Checkpoints the manager saves are files on the manager's host;
resuming one sends it to the chosen node through Ray's object store.

Every sandbox the manager starts here is a named, detached sandbox: its actor is called
``<prefix><sandbox id>.<suffix>`` in the cluster's namespace and keeps the manager's record of
it (:meth:`ClusterVM.record`), so a manager started later (an MCP server after a restart)
finds it again by its sandbox id with :meth:`attach`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import Any

from ..options import VMOptions
from ._client import Cluster, ClusterVM
from ._errors import ClusterError

DEFAULT_PREFIX = "mcp-"
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,60}$")


class RayBackend:
    """Starts the manager's VMs on a Ray cluster (``VMBackend``, and ``NamingBackend``: each
    sandbox under its id, found again by a later manager). ``prefix`` keeps the sandboxes of
    one server apart from another's in the same namespace."""

    def __init__(self, cluster: Cluster, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.cluster = cluster
        self.prefix = prefix

    async def create(self, options: VMOptions) -> ClusterVM:
        return await self.cluster.create(options)

    async def resume(self, checkpoint_path: str, options: VMOptions) -> ClusterVM:
        return await self.cluster.resume(checkpoint_path, options)

    # -- named sandboxes ------------------------------------------------------------------------
    def _base(self, sandbox_id: str) -> str:
        return f"{self.prefix}{sandbox_id}."

    async def create_named(self, sandbox_id: str, options: VMOptions, record: Mapping[str, Any]) -> ClusterVM:
        vm = await self.cluster.create(options, name=self._base(sandbox_id) + secrets.token_hex(3))
        return await self._keep(vm, record)

    async def resume_named(self, sandbox_id: str, checkpoint_path: str, options: VMOptions,
                           record: Mapping[str, Any]) -> ClusterVM:
        vm = await self.cluster.resume(checkpoint_path, options, name=self._base(sandbox_id) + secrets.token_hex(3))
        return await self._keep(vm, record)

    async def _keep(self, vm: ClusterVM, record: Mapping[str, Any]) -> ClusterVM:
        try:
            await vm.set_record(record)
        except BaseException:
            await vm.discard()
            raise
        return vm

    async def attach(self, sandbox_id: str) -> tuple[ClusterVM, dict[str, Any]] | None:
        """The live sandbox ``sandbox_id`` and its record, or None. When a restore left two
        actors under one id (the old one not closed yet), the newest record wins."""
        if not _ID_RE.match(sandbox_id):
            return None
        base = self._base(sandbox_id)
        found: list[tuple[ClusterVM, dict[str, Any]]] = []
        for name in self.cluster.names():
            if not name.startswith(base):
                continue
            try:
                vm = await self.cluster.get(name)
                record = await vm.record()
            except ClusterError:
                continue  # gone meanwhile, or lost with its node
            if record is not None:
                found.append((vm, record))
        if not found:
            return None
        found.sort(key=lambda pair: float(pair[1].get("started_at", 0.0)))
        return found[-1]

    def sandbox_ids(self) -> list[str]:
        """Ids of the live named sandboxes of this backend's prefix."""
        ids = {name[len(self.prefix):].rsplit(".", 1)[0] for name in self.cluster.names()
               if name.startswith(self.prefix) and "." in name[len(self.prefix):]}
        return sorted(ids)


__all__ = ["DEFAULT_PREFIX", "RayBackend"]
