"""Where a sandbox runs and what it holds there: Ray actor options from plain data.

Pure: nothing here talks to Ray (the node-affinity strategy is built by the caller from the
:class:`Placement` this module returns), so the rules are unit tested without a cluster.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, Literal

from ..options import VMOptions
from ._errors import ClusterError

VM_RESOURCE = "gondolin_vm"  # custom resource: VM slots a node offers (`ray start --resources`)
NAME_PREFIX = "gondolin-sandbox:"  # named actors of sandboxes, in the cluster's namespace
DEFAULT_NAMESPACE = "gondolin"
MiB = 1 << 20
HOST_OVERHEAD_MB = 256  # QEMU, the network stack and the actor's own Python beside guest RAM
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

Strategy = Literal["SPREAD", "DEFAULT"]


@dataclass(frozen=True)
class Resources:
    """What one sandbox reserves on its node. ``None`` means: from the VM's options
    (``num_cpus`` = its vCPUs, ``memory`` = guest RAM + :data:`HOST_OVERHEAD_MB`)."""

    num_cpus: float | None = None
    memory_mb: int | None = None
    vm_slots: float = 1.0
    extra: tuple[tuple[str, float], ...] = ()  # more custom resources, e.g. (("kvm", 1),)

    def actor_resources(self, options: VMOptions) -> dict[str, Any]:
        cpus = float(options.cpus) if self.num_cpus is None else float(self.num_cpus)
        memory = (options.memory_mb + HOST_OVERHEAD_MB) if self.memory_mb is None else self.memory_mb
        if cpus < 0 or memory <= 0 or self.vm_slots <= 0:
            raise ValueError("num_cpus must be >= 0, memory_mb and vm_slots > 0")
        custom = {VM_RESOURCE: float(self.vm_slots), **{k: float(v) for k, v in self.extra}}
        return {"num_cpus": cpus, "memory": memory * MiB, "resources": custom}


@dataclass(frozen=True)
class Placement:
    """Where a new sandbox goes: ``node`` (a Ray node id, hex) pins it there; otherwise
    ``strategy`` (``"SPREAD"``: across nodes, the default; ``"DEFAULT"``: Ray packs)."""

    node: str | None = None
    strategy: Strategy = "SPREAD"

    def __post_init__(self) -> None:
        if self.strategy not in ("SPREAD", "DEFAULT"):
            raise ValueError(f"strategy must be 'SPREAD' or 'DEFAULT', not {self.strategy!r}")


def actor_name(name: str) -> str:
    """The Ray actor name of the sandbox called ``name``."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"a sandbox name is 1-100 letters, digits, '.', '_' or '-' (starting with a letter "
                         f"or digit), not {name!r}")
    return NAME_PREFIX + name


def sandbox_name(actor: str) -> str | None:
    """The sandbox name of a Ray actor name, or None for actors that are not sandboxes."""
    return actor[len(NAME_PREFIX):] if actor.startswith(NAME_PREFIX) else None


def actor_options(options: VMOptions, resources: Resources, *, name: str | None, namespace: str,
                  detached: bool) -> dict[str, Any]:
    """Keyword arguments of ``SandboxActor.options(...)`` (without the scheduling strategy).

    A sandbox actor is never restarted and its calls are never retried: a restarted actor
    would hold a new, empty VM under the old name."""
    out: dict[str, Any] = {**resources.actor_resources(options), "max_restarts": 0, "max_task_retries": 0,
                           "namespace": namespace}
    if name is not None:
        out["name"] = actor_name(name)
    if detached:
        if name is None:
            raise ValueError("a detached sandbox needs a name (nothing else could find it again)")
        out["lifetime"] = "detached"
    return out


def portable(options: VMOptions) -> VMOptions:
    """``options`` if they can travel to another node, else :class:`ClusterError`.

    Options go to the sandbox's node by pickle, so ``http_hooks`` arrive there as a copy:
    the policy runs on that node, and its audit events live there. ``mounts`` are refused:
    a provider serves files of the host it runs on, which is not the caller's host."""
    if options.mounts:
        raise ClusterError(
            f"mounts ({', '.join(sorted(options.mounts))}) cannot be used on a cluster: a provider serves "
            "files of the host it runs on; copy files in with sandbox.fs.write()/upload() instead",
            code="options_not_portable")
    try:
        import ray.cloudpickle as cloudpickle

        cloudpickle.dump(options, io.BytesIO())
    except Exception as exc:  # noqa: BLE001 - any pickling failure means the same thing
        raise ClusterError(f"these VM options cannot be sent to another node ({type(exc).__name__}: {exc}); "
                           "http_hooks must be picklable (build them with gondolin.http.create_http_hooks)",
                           code="options_not_portable") from exc
    return options


__all__ = ["DEFAULT_NAMESPACE", "NAME_PREFIX", "VM_RESOURCE", "Placement", "Resources", "actor_name",
           "actor_options", "portable", "sandbox_name"]
