"""Sandboxes on a Ray cluster, with the shape of the local API (the ``ray`` extra).

    import gondolin.cluster

    cluster = gondolin.cluster.connect("auto")
    async with cluster:
        sandbox = await cluster.create(memory="1G")       # instead of gondolin.VM.create(...)
        result = await sandbox.exec("python3 -c 'print(6 * 7)'")

One actor per sandbox (CPU, memory and a ``gondolin_vm`` slot on its node), SPREAD across
nodes by default; named sandboxes are found again from any process; checkpoints move between
nodes through the object store. See docs/cluster.md.
"""

try:
    import ray  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("gondolin.cluster needs Ray, which is not installed: pip install 'gondolin[ray]'") from exc

from ._backend import RayBackend
from ._client import (
    Cluster,
    ClusterCheckpoint,
    ClusterFS,
    ClusterProcess,
    ClusterVM,
    Node,
    NodeReady,
    connect,
)
from ._errors import ClusterError, SandboxLostError
from ._placement import VM_RESOURCE, Placement, Resources

__all__ = [
    "VM_RESOURCE",
    "Cluster",
    "ClusterCheckpoint",
    "ClusterError",
    "ClusterFS",
    "ClusterProcess",
    "ClusterVM",
    "Node",
    "NodeReady",
    "Placement",
    "RayBackend",
    "Resources",
    "SandboxLostError",
    "connect",
]
