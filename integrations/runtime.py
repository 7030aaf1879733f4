"""The one place that talks to the Gondolin runtime's optional features.

Network policy, mounts and checkpoints are looked up when a tool needs them: a runtime without
a feature gives the model a ``not_supported`` tool error, never fake behaviour.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gondolin.errors import GondolinError

from .config import NetworkProfile
from .errors import ToolError, translate
from .models import MountInfo

DEFAULT_CWD = "/workspace"


def accepts(fn: Callable[..., Any], name: str) -> bool:
    """Does ``fn`` take a keyword argument called ``name``?"""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _not_supported(feature: str) -> ToolError:
    return ToolError("not_supported", f"{feature} is not supported by this runtime yet",
                     "Continue without it, or ask the operator to upgrade Gondolin.")


async def vm_create(**options: Any) -> Any:
    from gondolin import VM

    for key in ("http_hooks", "mounts", "network", "tcp_hosts", "dns"):
        if key in options and not accepts(VM.create, key):
            raise _not_supported({"mounts": "mounting host directories"}.get(key, "network policy"))
    return await VM.create(**options)


def network_options(profile: NetworkProfile, secrets: Mapping[str, tuple[str, Sequence[str]]]
                    ) -> tuple[dict[str, Any], Any, dict[str, str]]:
    """VM options, the HTTP hooks (whose event log feeds network_events) and the guest env
    (secret placeholders) for a profile."""
    if not profile.enabled:
        return {"network": False}, None, {}
    from gondolin.http import Secret, create_http_hooks

    hooks, env = create_http_hooks(
        allowed_hosts=profile.allowed_hosts,
        allowed_internal_hosts=profile.allowed_internal_hosts,
        secrets={name: Secret(value, hosts=tuple(hosts)) for name, (value, hosts) in secrets.items()},
    )
    options: dict[str, Any] = {"network": True, "http_hooks": hooks, "dns": profile.dns}
    if profile.tcp_hosts:
        options["tcp_hosts"] = dict(profile.tcp_hosts)
    return options, hooks, dict(env)


def mount_providers(mounts: Sequence[MountInfo]) -> dict[str, Any]:
    from gondolin.vfs import CopyOnWriteProvider, ReadonlyProvider, RealFSProvider

    providers: dict[str, Any] = {}
    for m in mounts:
        try:
            if m.mode == "rw":
                providers[m.guest_path] = RealFSProvider(m.host_path)
            elif m.mode == "cow":
                providers[m.guest_path] = CopyOnWriteProvider(m.host_path)
            else:
                providers[m.guest_path] = ReadonlyProvider(RealFSProvider(m.host_path))
        except OSError as exc:
            raise ToolError("path_not_found", f"cannot open host directory {m.host_path}: {exc.strerror}") from exc
    return providers


async def default_cwd(vm: Any) -> str | None:
    try:
        st = await vm.fs.stat(DEFAULT_CWD)
    except GondolinError:
        return None
    return DEFAULT_CWD if st.is_dir else None


def network_events(vm: Any, hooks: Any) -> list[Any]:
    network = getattr(vm, "network", None)
    if network is not None and hasattr(network, "events"):
        return list(network.events())
    if hooks is not None:
        return list(hooks.events.events())
    return []


# -- checkpoints ---------------------------------------------------------------------------------
def _checkpoint_class() -> Any:
    import importlib

    import gondolin

    found = getattr(gondolin, "Checkpoint", None)
    if found is not None:
        return found
    for module in ("gondolin.checkpoint", "gondolin.snapshot"):
        try:
            found = getattr(importlib.import_module(module), "Checkpoint", None)
        except ImportError:
            continue
        if found is not None:
            return found
    return None


async def take_checkpoint(vm: Any, path: str, *, disk_only: bool) -> None:
    method = getattr(vm, "checkpoint", None)
    if method is None:
        raise _not_supported("checkpointing a sandbox")
    kwargs = {"disk_only": True} if disk_only else {}
    if disk_only and not accepts(method, "disk_only"):
        raise _not_supported("disk-only checkpoints")
    try:
        result = method(path, **kwargs)
        if inspect.isawaitable(result):
            await result
    except GondolinError as exc:
        raise translate(exc) from exc


def require_restore() -> None:
    if _checkpoint_class() is None:
        raise _not_supported("restoring checkpoints")


async def resume_checkpoint(path: str, options: dict[str, Any], *, policy_matters: bool = True) -> Any:
    cls = _checkpoint_class()
    if cls is None:
        raise _not_supported("restoring checkpoints")
    loaded = cls.load(path)
    if inspect.isawaitable(loaded):
        loaded = await loaded
    resume = loaded.resume
    # The machine shape, image and network mode are part of the checkpoint; only live host
    # objects (policy hooks, mount providers) and the environment are passed again.
    fixed = ("image", "rootfs", "memory", "cpus", "network", "dns", "tcp_hosts")
    kwargs = {k: v for k, v in options.items() if k not in fixed and accepts(resume, k)}
    dropped = [k for k in ("http_hooks", "mounts") if options.get(k) and k not in kwargs]
    if not policy_matters and dropped == ["http_hooks"]:
        dropped = []  # a deny-all policy is what a resumed VM has without hooks
    if dropped:
        raise _not_supported(f"resuming a checkpoint with {' and '.join(dropped)}")
    vm = resume(**kwargs)
    if inspect.isawaitable(vm):
        vm = await vm
    return vm
