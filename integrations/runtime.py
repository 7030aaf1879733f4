"""The integrations' bridge to the Gondolin library: VM options from a sandbox's checked
choices, and the backend that starts VMs.

The manager decides *what* a sandbox may have (see :mod:`integrations.manager`); this module
turns those decisions into one :class:`gondolin.VMOptions` value and starts VMs from it, fresh
or from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from gondolin import VM, Checkpoint, GondolinError, VMOptions
from gondolin.http import AuditEvent, HttpHooks, Secret, create_http_hooks
from gondolin.options import RootfsMode
from gondolin.vfs import Provider
from gondolin.vfs.mountspec import MountSpec

from .config import NetworkProfile
from .errors import ToolError
from .models import MountInfo

DEFAULT_CWD = "/workspace"


class VMBackend(Protocol):
    """How the manager starts VMs. :class:`LocalBackend` runs them in this process; tests pass a fake."""

    async def create(self, options: VMOptions) -> VM: ...

    async def resume(self, checkpoint_path: str, options: VMOptions) -> VM: ...


@runtime_checkable
class NamingBackend(VMBackend, Protocol):
    """A backend whose VMs outlive the manager (``gondolin.cluster.RayBackend``): each is started
    under its sandbox id with the manager's record of it (plain data), and a manager started
    later finds it again with :meth:`attach`. The manager uses these methods instead of
    ``create``/``resume`` when its backend has them."""

    async def create_named(self, sandbox_id: str, options: VMOptions, record: Mapping[str, Any]) -> VM: ...

    async def resume_named(self, sandbox_id: str, checkpoint_path: str, options: VMOptions,
                           record: Mapping[str, Any]) -> VM: ...

    async def attach(self, sandbox_id: str) -> tuple[VM, dict[str, Any]] | None: ...


@runtime_checkable
class RemoteNetwork(Protocol):
    """A VM whose network policy runs elsewhere (``gondolin.cluster.ClusterVM``): its audit
    events are fetched with an awaited call instead of read from ``vm.network``."""

    async def network_events(self) -> list[AuditEvent]: ...


async def network_events(vm: VM) -> list[AuditEvent]:
    """A sandbox's recent HTTP audit events, for a local VM or one on a cluster."""
    if isinstance(vm, RemoteNetwork):
        return await vm.network_events()
    network = vm.network
    return network.events() if network is not None else []


class LocalBackend:
    """VMs on this host, started by the library itself."""

    async def create(self, options: VMOptions) -> VM:
        return await VM.create(options)

    async def resume(self, checkpoint_path: str, options: VMOptions) -> VM:
        # The checkpoint keeps its machine shape, image and network mode; the live host objects
        # (policy hooks, mount providers) and the environment come from ``options``.
        return await Checkpoint.load(checkpoint_path).resume(options)


def vm_options(*, image: str, cpus: int, memory_mb: int, env: Mapping[str, str], rootfs: RootfsMode,
               label: str | None, profile: NetworkProfile, secrets: Mapping[str, Secret],
               mounts: Sequence[MountInfo]) -> VMOptions:
    """The options of one sandbox's VM. ``secrets`` maps a name to its value and scope; the
    guest sees placeholders in its environment, the hooks substitute the values."""
    hooks, secret_env = _network(profile, secrets)
    return VMOptions(
        image=image, cpus=cpus, memory=memory_mb, env={**env, **secret_env}, rootfs=rootfs, label=label,
        network=profile.enabled, dns=profile.dns, tcp_hosts=dict(profile.tcp_hosts), http_hooks=hooks,
        mounts=mount_providers(mounts))


def _network(profile: NetworkProfile, secrets: Mapping[str, Secret]) -> tuple[HttpHooks | None, dict[str, str]]:
    if not profile.enabled:
        return None, {}
    hooks, env = create_http_hooks(
        allowed_hosts=profile.hosts(),
        allowed_internal_hosts=profile.allowed_internal_hosts,
        secrets=dict(secrets),
    )
    return hooks, dict(env)


def mount_providers(mounts: Sequence[MountInfo]) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for m in mounts:
        try:
            providers[m.guest_path] = MountSpec(m.host_path, m.guest_path, m.mode).provider()
        except OSError as exc:
            raise ToolError("path_not_found", f"cannot open host directory {m.host_path}: {exc.strerror}") from exc
    return providers


async def default_cwd(vm: VM) -> str | None:
    """``/workspace`` when the guest has it, else None (commands then start in the guest's default)."""
    try:
        st = await vm.fs.stat(DEFAULT_CWD)
    except GondolinError:
        return None
    return DEFAULT_CWD if st.is_dir else None
