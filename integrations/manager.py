"""The sandbox manager: named sandboxes with an owner, a cap, idle reaping and a sure shutdown.

    async with SandboxManager(config) as manager:
        sandbox = await manager.create(SandboxCreateInput())
        ...
    # every VM the manager started is closed here, whatever happened

Everything the model may choose (image, size, network profile, secrets, mounts) is checked
against the :class:`~integrations.config.OperatorConfig` here, before a VM exists.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import logging
import os
import posixpath
import secrets as _random
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

from gondolin import VM, GondolinError, VMOptions, VMPool
from gondolin.options import MountMode, check_mount_point

from . import runtime
from .commands import CommandRun
from .config import MOUNT_MODE_RANK, NetworkProfile, OperatorConfig
from .errors import ToolError, translate
from .models import CheckpointInfo, MountInfo, SandboxCreateInput, SandboxInfo
from .output import Redactor
from .runtime import LocalBackend, NamingBackend, VMBackend

log = logging.getLogger("gondolin.integrations")
Clock = Callable[[], float]
CLOSE_TIMEOUT_S = 30.0  # per VM, at shutdown
RECORD_VERSION = 1  # of Sandbox.record()
ENDED_OWNERS_KEPT = 10_000  # ended sessions remembered, so a late create cannot outlive its session
MAX_EXPOSED_PORTS = 8  # expose_port gateways per sandbox
# The MCP session a tool call acts for (see SandboxManager.acting_as); None: no session scope.
_OWNER: contextvars.ContextVar[str | None] = contextvars.ContextVar("gondolin_sandbox_owner", default=None)


def iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{_random.token_hex(4)}"


@dataclass
class Sandbox:
    """One live sandbox: its VM plus what the manager knows about it."""

    id: str
    name: str | None
    vm: VM
    image: str
    cpus: int
    memory_mb: int
    network: str
    profile: NetworkProfile
    secret_names: list[str]
    mounts: list[MountInfo]
    env: dict[str, str]
    created_at: float
    ttl_s: int
    last_used: float
    default_cwd: str | None = None
    from_checkpoint: str | None = None
    owner: str | None = None  # the MCP session that created it (None: unscoped, e.g. stdio)
    execs: dict[str, CommandRun] = field(default_factory=dict)
    exposures: dict[int, Any] = field(default_factory=dict)  # guest port -> IngressGateway (expose_port)
    busy: int = 0
    _exec_counter: int = 0

    def next_exec_id(self) -> str:
        self._exec_counter += 1
        return f"ex_{self._exec_counter}"

    @property
    def running(self) -> bool:
        return self.vm.running

    def expires_at(self) -> float:
        return self.last_used + self.ttl_s

    def record(self) -> dict[str, Any]:
        """What a later manager needs to take this sandbox over (plain data, kept with its VM by
        a :class:`~integrations.runtime.NamingBackend`). Never holds a secret's value."""
        return {"version": RECORD_VERSION, "sandbox_id": self.id, "name": self.name, "image": self.image,
                "cpus": self.cpus, "memory_mb": self.memory_mb, "network": self.network,
                "secrets": list(self.secret_names), "mounts": [m.model_dump(mode="json") for m in self.mounts],
                "env": dict(self.env), "created_at": self.created_at, "ttl_s": self.ttl_s,
                "from_checkpoint": self.from_checkpoint, "started_at": time.time()}

    def info(self) -> SandboxInfo:
        return SandboxInfo(
            sandbox_id=self.id, name=self.name, status="running" if self.running else "stopped",
            image=self.image, cpus=self.cpus, memory_mb=self.memory_mb, network=self.network,
            network_summary=self.profile.summary(), secrets=list(self.secret_names), mounts=list(self.mounts),
            created_at=iso(self.created_at), expires_at=iso(self.expires_at()), ttl_s=self.ttl_s,
            running_execs=sum(1 for s in self.execs.values() if s.running), from_checkpoint=self.from_checkpoint,
        )


@dataclass
class CheckpointRecord:
    id: str
    path: str
    sandbox_id: str
    name: str | None
    created_at: float
    disk_only: bool
    spec: dict[str, Any]  # the sandbox's creation choices, to start a new sandbox from it
    owner: str | None = None

    def info(self) -> CheckpointInfo:
        return CheckpointInfo(checkpoint_id=self.id, sandbox_id=self.sandbox_id, name=self.name,
                              created_at=iso(self.created_at), size_bytes=_tree_size(self.path),
                              disk_only=self.disk_only)


def _remove_tree(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _tree_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


class SandboxManager:
    """Owns every sandbox it creates. Use as ``async with``; all VMs close on exit."""

    def __init__(self, config: OperatorConfig | None = None, *, environ: Mapping[str, str] | None = None,
                 clock: Clock = time.time, backend: VMBackend | None = None, reap: bool = True) -> None:
        self.config = config or OperatorConfig()
        self._environ = dict(os.environ if environ is None else environ)
        self._clock = clock
        self._backend = backend or LocalBackend()
        self._reap = reap
        self._sandboxes: dict[str, Sandbox] = {}
        self._pending: dict[str | None, int] = {}  # sandboxes being started, per owner
        self._ended_owners: OrderedDict[str, None] = OrderedDict()  # sessions closed by close_owner
        self._checkpoints: dict[str, CheckpointRecord] = {}
        self._checkpoint_dir: str | None = None
        self._own_checkpoint_dir = False
        self._tg: TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._pool: VMPool | None = None
        self._cwd_cache: dict[tuple[str, tuple[str, ...]], str | None] = {}  # (image, mounts) -> default cwd
        self.redactor = Redactor({name: value for name in self.config.secrets
                                  if (value := self.config.secret_value(name, self._environ))})
        self.reaped: list[str] = []

    # -- lifetime --------------------------------------------------------------------------
    async def __aenter__(self) -> SandboxManager:
        stack = contextlib.AsyncExitStack()
        self._tg = await stack.enter_async_context(anyio.create_task_group())
        self._stack = stack
        if self._reap:
            self._tg.start_soon(self._reaper)
        pool = self._new_pool()
        if pool is not None:
            try:
                self._pool = await stack.enter_async_context(pool)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self.__aexit__(None, None, None)
                raise
        return self

    def _new_pool(self) -> VMPool | None:
        """Spares of the default sandbox's shape (and of the last other shape created), when
        ``limits.pool_size`` > 0 and VMs run on this host (the default backend)."""
        size = self.config.limits.pool_size
        if size < 1 or type(self._backend) is not LocalBackend:
            return None
        try:
            options = self._vm_options(self._resolve(SandboxCreateInput()))
        except ToolError as exc:
            log.warning("no pool of spare VMs: the default sandbox cannot be made (%s)", exc.message)
            return None
        return VMPool(options, size=size, follow_last=True)

    @property
    def pool(self) -> VMPool | None:
        """The pool of spare VMs sandboxes are made from (None when ``limits.pool_size`` is 0)."""
        return self._pool

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.close_all()
        finally:
            assert self._tg is not None and self._stack is not None
            self._tg.cancel_scope.cancel()
            stack, self._stack, self._tg = self._stack, None, None
            await stack.__aexit__(None, None, None)

    async def close_all(self) -> None:
        with anyio.CancelScope(shield=True):
            pool, self._pool = self._pool, None  # later creates start VMs directly
            if pool is not None:
                await pool.close()
            for sandbox_id in list(self._sandboxes):
                await self._close(sandbox_id)
            if self._own_checkpoint_dir and self._checkpoint_dir:
                shutil.rmtree(self._checkpoint_dir, ignore_errors=True)
                self._checkpoint_dir = None
                self._checkpoints.clear()

    @property
    def task_group(self) -> TaskGroup:
        if self._tg is None:
            raise RuntimeError("use the SandboxManager as `async with SandboxManager(...) as manager:`")
        return self._tg

    async def _reaper(self) -> None:
        while True:
            await anyio.sleep(self.config.limits.reap_interval_s)
            await self.reap_expired()

    async def reap_expired(self, now: float | None = None) -> list[str]:
        """Destroy sandboxes idle past their TTL (not while a tool call is using them)."""
        now = self._clock() if now is None else now
        expired = [s.id for s in self._sandboxes.values() if s.busy == 0 and now >= s.expires_at()]
        for sandbox_id in expired:
            await self._close(sandbox_id)
            self.reaped.append(sandbox_id)
        return expired

    # -- ownership -------------------------------------------------------------------------
    @staticmethod
    @contextlib.contextmanager
    def acting_as(owner: str | None) -> Iterator[None]:
        """Run the enclosed calls for ``owner`` (an MCP session id): they see, use and count only
        its sandboxes and checkpoints (unless ``config.http.share_sandboxes``), and what they
        create belongs to it. ``None`` (the default) is unscoped: everything is visible."""
        token = _OWNER.set(owner)
        try:
            yield
        finally:
            _OWNER.reset(token)

    def _visible(self, owner: str | None) -> bool:
        current = _OWNER.get()
        return current is None or owner == current or self.config.http.share_sandboxes

    async def close_owner(self, owner: str) -> list[str]:
        """Close every sandbox ``owner`` created and forget its checkpoints (its MCP session
        ended). With ``share_sandboxes`` they stay: other sessions may be using them."""
        if self.config.http.share_sandboxes:
            return []
        self._ended_owners[owner] = None  # a create still in flight for it is undone when it lands
        while len(self._ended_owners) > ENDED_OWNERS_KEPT:
            self._ended_owners.popitem(last=False)
        closed = [s.id for s in self._sandboxes.values() if s.owner == owner]
        with anyio.CancelScope(shield=True):
            for sandbox_id in closed:
                await self._close(sandbox_id)
            for record in [c for c in self._checkpoints.values() if c.owner == owner]:
                del self._checkpoints[record.id]
                _remove_tree(record.path)
        return closed

    # -- lookup ----------------------------------------------------------------------------
    def sandboxes(self) -> list[Sandbox]:
        return [s for s in self._sandboxes.values() if self._visible(s.owner)]

    def get(self, sandbox_id: str) -> Sandbox:
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is not None and not self._visible(sandbox.owner):
            sandbox = None  # another session's: answered exactly like an unknown id
        if sandbox is None:
            live = ", ".join(sorted(s.id for s in self.sandboxes())) or "none"
            raise ToolError("sandbox_not_found", f"no sandbox with id {sandbox_id!r} (live sandboxes: {live})",
                            "Call sandbox_list to see live sandboxes, or sandbox_create to make one. "
                            "Idle sandboxes are destroyed after their ttl_s.")
        sandbox.last_used = self._clock()
        if not sandbox.running:
            raise ToolError("sandbox_not_running", f"sandbox {sandbox_id} is not running (its VM stopped)",
                            "Destroy it with sandbox_destroy and create a new one.")
        return sandbox

    async def find(self, sandbox_id: str) -> Sandbox:
        """As :meth:`get`; a sandbox this manager does not know is looked up in the backend when
        it keeps sandboxes by id (:class:`~integrations.runtime.NamingBackend`: one a previous
        manager started, e.g. before the MCP server restarted), and adopted: this manager owns
        it from then on, and closes it at shutdown like its own."""
        if sandbox_id not in self._sandboxes and isinstance(self._backend, NamingBackend):
            await self._adopt(self._backend, sandbox_id)
        return self.get(sandbox_id)

    async def _adopt(self, backend: NamingBackend, sandbox_id: str) -> None:
        try:
            found = await backend.attach(sandbox_id)
        except GondolinError as exc:
            raise translate(exc) from exc
        if found is None or sandbox_id in self._sandboxes:  # not there, or adopted by a concurrent call
            return
        vm, record = found
        try:
            sandbox = self._from_record(vm, record)
            sandbox.default_cwd = await runtime.default_cwd(vm)
        except BaseException:
            if sandbox_id not in self._sandboxes:
                with anyio.CancelScope(shield=True):
                    await _stop(vm)
            raise
        if sandbox_id in self._sandboxes:
            return
        sandbox.owner = _OWNER.get()
        self._sandboxes[sandbox_id] = sandbox
        log.info("adopted sandbox %s from the backend", sandbox_id)

    def _from_record(self, vm: VM, record: Mapping[str, Any]) -> Sandbox:
        profiles = self.config.profiles()
        network = record.get("network")
        if record.get("version") != RECORD_VERSION or network not in profiles:
            raise ToolError("sandbox_not_found", f"sandbox {record.get('sandbox_id')!r} was started with a "
                                                 "configuration this server does not have (its network profile "
                                                 f"{network!r} or its record's version)")
        now = self._clock()
        return Sandbox(
            id=str(record["sandbox_id"]), name=record.get("name"), vm=vm, image=str(record["image"]),
            cpus=int(record["cpus"]), memory_mb=int(record["memory_mb"]), network=str(network),
            profile=profiles[str(network)], secret_names=list(record.get("secrets", [])),
            mounts=[MountInfo.model_validate(m) for m in record.get("mounts", [])], env=dict(record.get("env", {})),
            created_at=float(record.get("created_at", now)), ttl_s=int(record["ttl_s"]), last_used=now,
            from_checkpoint=record.get("from_checkpoint"))

    @contextlib.asynccontextmanager
    async def using(self, sandbox_id: str) -> AsyncIterator[Sandbox]:
        """:meth:`use` for tool calls: finds (and adopts) the sandbox with :meth:`find` first."""
        await self.find(sandbox_id)
        with self.use(sandbox_id) as sandbox:
            yield sandbox

    @contextlib.contextmanager
    def use(self, sandbox_id: str) -> Iterator[Sandbox]:
        """Hold a sandbox for the length of a tool call: it is not reaped meanwhile."""
        sandbox = self.get(sandbox_id)
        sandbox.busy += 1
        try:
            yield sandbox
        finally:
            sandbox.busy -= 1
            sandbox.last_used = self._clock()

    # -- create / destroy ------------------------------------------------------------------
    async def create(self, request: SandboxCreateInput, *, progress: Any = None) -> Sandbox:
        if request.from_checkpoint:
            return await self.restore(request.from_checkpoint, overrides=request)
        spec = self._resolve(request)
        return await self._start(spec, progress=progress)

    def _resolve(self, request: SandboxCreateInput) -> dict[str, Any]:
        """Check the model's choices against the operator's configuration."""
        cfg = self.config
        limits = cfg.limits
        profile = cfg.profiles().get(request.network or cfg.default_network)
        image = request.image or (profile.image if profile is not None else None) or cfg.default_image
        if image not in cfg.allowed_images:
            raise ToolError("not_allowed", f"image {image!r} is not allowed",
                            f"Allowed images: {', '.join(cfg.allowed_images)} (or omit image).")
        cpus = request.cpus or limits.default_cpus
        if cpus > limits.max_cpus:
            raise ToolError("not_allowed", f"cpus={cpus} exceeds the server's limit of {limits.max_cpus}")
        memory = request.memory_mb or limits.default_memory_mb
        if memory > limits.max_memory_mb:
            raise ToolError("not_allowed", f"memory_mb={memory} exceeds the server's limit of {limits.max_memory_mb}")
        ttl = request.ttl_s or limits.default_ttl_s
        if ttl > limits.max_ttl_s:
            raise ToolError("not_allowed", f"ttl_s={ttl} exceeds the server's limit of {limits.max_ttl_s}")
        profiles = cfg.profiles()
        network = request.network or cfg.default_network
        if network not in profiles:
            raise ToolError("not_allowed", f"unknown network profile {network!r}",
                            f"Configured profiles: {', '.join(sorted(profiles))}.")
        secret_names = list(dict.fromkeys(request.secrets or []))
        for name in secret_names:
            if name not in cfg.secrets:
                known = ", ".join(sorted(cfg.secrets)) or "none"
                raise ToolError("not_allowed", f"unknown secret {name!r} (configured secrets: {known})",
                                "Secrets are configured by the operator; you can only name them.")
            if not cfg.secret_value(name, self._environ):
                raise ToolError("not_allowed", f"secret {name!r} is configured but has no value in the server's "
                                               "environment", "Ask the operator to set it, or continue without it.")
        if secret_names and not profiles[network].enabled:
            raise ToolError("invalid_argument", f"secrets need network access, and profile {network!r} has none",
                            "Pick a network profile that allows the secret's hosts.")
        env = dict(cfg.env)
        for var in request.env or []:
            env[var.name] = var.value
        mounts = [self._check_mount(m.host_path, m.guest_path, m.mode) for m in request.mounts or []]
        guest_paths = [m.guest_path for m in mounts]
        if len(set(guest_paths)) != len(guest_paths):
            raise ToolError("invalid_argument", "two mounts share one guest_path")
        return {"name": request.name, "image": image, "cpus": cpus, "memory_mb": memory, "ttl_s": ttl,
                "network": network, "secrets": secret_names, "env": env, "mounts": mounts}

    def _check_mount(self, host_path: str, guest_path: str | None, mode: MountMode | None) -> MountInfo:
        if not host_path or not os.path.isabs(host_path):
            raise ToolError("invalid_argument", f"mount host_path must be absolute, got {host_path!r}")
        real = os.path.realpath(host_path)
        roots = self.config.mounts
        root = next((r for r in sorted(roots, key=lambda r: -len(r.host_path))
                     if real == r.host_path or real.startswith(r.host_path.rstrip("/") + "/")), None)
        if root is None:
            approved = ", ".join(r.host_path for r in roots) or "none"
            raise ToolError("not_allowed", f"host path {host_path!r} is outside every approved mount root "
                                           f"(approved: {approved})",
                            "Only directories the operator approved can be mounted.")
        if not os.path.isdir(real):
            raise ToolError("path_not_found", f"host directory {host_path!r} does not exist")
        chosen: MountMode = mode or ("cow" if MOUNT_MODE_RANK[root.mode] >= MOUNT_MODE_RANK["cow"] else "ro")
        if MOUNT_MODE_RANK[chosen] > MOUNT_MODE_RANK[root.mode]:
            raise ToolError("not_allowed", f"mode {chosen!r} is not allowed under {root.host_path} "
                                           f"(at most {root.mode!r})")
        if guest_path is None:
            if root.guest_path is not None:
                rel = os.path.relpath(real, root.host_path)
                guest_path = root.guest_path if rel == "." else posixpath.join(root.guest_path, rel)
            else:
                guest_path = "/mnt/" + (os.path.basename(real) or "host")
        try:
            guest_path = check_mount_point(guest_path)
        except ValueError as exc:
            raise ToolError("invalid_argument", str(exc)) from None
        return MountInfo(guest_path=guest_path, host_path=real, mode=chosen)

    def _reserve(self) -> None:
        limits = self.config.limits
        cap = limits.max_sandboxes
        if len(self._sandboxes) + sum(self._pending.values()) >= cap:
            raise ToolError("sandbox_limit", f"the server allows at most {cap} live sandboxes",
                            "Destroy a sandbox you no longer need (sandbox_list shows them), then retry.")
        owner = _OWNER.get()
        own_cap = limits.max_sandboxes_per_session
        if owner is not None and own_cap is not None:
            own = sum(1 for s in self._sandboxes.values() if s.owner == owner) + self._pending.get(owner, 0)
            if own >= own_cap:
                raise ToolError("sandbox_limit", f"the server allows at most {own_cap} live sandboxes per session",
                                "Destroy a sandbox you no longer need (sandbox_list shows them), then retry.")
        self._pending[owner] = self._pending.get(owner, 0) + 1

    def _release(self) -> None:
        owner = _OWNER.get()
        self._pending[owner] -= 1
        if not self._pending[owner]:
            del self._pending[owner]

    def _vm_options(self, spec: Mapping[str, Any]) -> VMOptions:
        secrets = {name: self.config.secrets[name].secret(self.config.secret_value(name, self._environ) or "")
                   for name in spec["secrets"]}
        return runtime.vm_options(image=spec["image"], cpus=spec["cpus"], memory_mb=spec["memory_mb"],
                                  env=spec["env"], rootfs=self.config.rootfs, label=spec.get("name"),
                                  profile=self.config.profiles()[spec["network"]], secrets=secrets,
                                  mounts=spec["mounts"])

    async def _boot(self, sandbox: Sandbox, options: VMOptions, checkpoint_path: str | None) -> VM:
        """Start a VM for ``sandbox``: under its id with its record when the backend keeps
        sandboxes by id, else plainly."""
        backend = self._backend
        try:
            if isinstance(backend, NamingBackend):
                if checkpoint_path is None:
                    return await backend.create_named(sandbox.id, options, sandbox.record())
                return await backend.resume_named(sandbox.id, checkpoint_path, options, sandbox.record())
            if checkpoint_path is None:
                if self._pool is not None:
                    return await self._pool.acquire(options)
                return await backend.create(options)
            return await backend.resume(checkpoint_path, options)
        except GondolinError as exc:
            raise translate(exc) from exc

    async def _start(self, spec: dict[str, Any], *, progress: Any = None, checkpoint_path: str | None = None,
                     from_checkpoint: str | None = None) -> Sandbox:
        self._reserve()
        try:
            options = self._vm_options(spec)
            if progress is not None:
                await progress(0, None, "booting the sandbox VM")
            now = self._clock()
            sandbox = Sandbox(
                id=_new_id("sb"), name=spec["name"], vm=None, image=spec["image"],  # type: ignore[arg-type]
                cpus=spec["cpus"], memory_mb=spec["memory_mb"], network=spec["network"],
                profile=self.config.profiles()[spec["network"]], secret_names=list(spec["secrets"]),
                mounts=list(spec["mounts"]), env=dict(spec["env"]), created_at=now, ttl_s=spec["ttl_s"],
                last_used=now, from_checkpoint=from_checkpoint, owner=_OWNER.get())
            vm = await self._boot(sandbox, options, checkpoint_path)
            sandbox.vm = vm
            sandbox.created_at = sandbox.last_used = self._clock()
            self._sandboxes[sandbox.id] = sandbox  # owned from here on, even if the next await is cancelled
            if sandbox.owner is not None and sandbox.owner in self._ended_owners:
                await self._close(sandbox.id)
                raise ToolError("sandbox_not_found", "this MCP session ended while its sandbox was starting")
            sandbox.default_cwd = await self._default_cwd(vm, fresh=checkpoint_path is None)
            return sandbox
        finally:
            self._release()

    async def _default_cwd(self, vm: VM, *, fresh: bool) -> str | None:
        """:func:`runtime.default_cwd`, asked once per image and set of mount points for new VMs
        on this host (each starts from the same image, so the answer cannot differ)."""
        if not fresh or type(vm) is not VM:
            return await runtime.default_cwd(vm)
        key = (vm.image.build_id, tuple(sorted(vm.mounts)))
        if key not in self._cwd_cache:
            self._cwd_cache[key] = await runtime.default_cwd(vm)
        return self._cwd_cache[key]

    async def destroy(self, sandbox_id: str) -> bool:
        if sandbox_id not in self._sandboxes and isinstance(self._backend, NamingBackend):
            await self._adopt(self._backend, sandbox_id)
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None or not self._visible(sandbox.owner):
            return False
        await self._close(sandbox_id)
        return True

    async def _close(self, sandbox_id: str) -> None:
        sandbox = self._sandboxes.pop(sandbox_id, None)
        if sandbox is None:
            return
        with anyio.CancelScope(shield=True):
            for job in sandbox.execs.values():
                job.cancel()
            await _close_exposures(sandbox)
            await _stop(sandbox.vm)

    # -- running commands ---------------------------------------------------------------------
    async def start_exec(self, sandbox: Sandbox, command: str, *, env: dict[str, str] | None, cwd: str | None,
                   user: str | None, stdin: str | None, stdin_open: bool, timeout: float) -> CommandRun:
        limit = self.config.limits.max_execs_per_sandbox
        if sum(1 for s in sandbox.execs.values() if s.running) >= limit:
            raise ToolError("sandbox_limit", f"{limit} commands are already running in this sandbox",
                            "Wait for them with exec_poll or stop them with exec_kill.")
        while len(sandbox.execs) >= limit:  # forget the oldest finished command
            oldest = next(k for k, s in sandbox.execs.items() if not s.running)
            del sandbox.execs[oldest]
        stdin_source: Any = True if stdin_open else stdin
        try:
            proc = await sandbox.vm.start(command, env=env or None, cwd=cwd, user=user, stdin=stdin_source,
                                          timeout=timeout, stdout="pipe", stderr="pipe")
        except (GondolinError, ValueError) as exc:
            raise translate(exc) from exc
        job = CommandRun(sandbox.next_exec_id(), proc, command, buffer_bytes=self.config.limits.exec_buffer_bytes,
                              redactor=self.redactor, stdin_open=stdin_open)
        sandbox.execs[job.exec_id] = job
        self.task_group.start_soon(job.run)
        return job

    def get_exec(self, sandbox: Sandbox, exec_id: str) -> CommandRun:
        job = sandbox.execs.get(exec_id)
        if job is None:
            raise ToolError("exec_not_found", f"no command {exec_id!r} in sandbox {sandbox.id}",
                            "exec_id values come from exec; finished commands are forgotten after a while.")
        return job

    # -- access ------------------------------------------------------------------------------
    async def expose_port(self, sandbox: Sandbox, port: int) -> tuple[str, bool]:
        """The URL of an ingress gateway on host loopback to guest ``port`` (one per port, closed
        with the sandbox), and whether something accepts connections on that port now."""
        if not isinstance(sandbox.vm, VM):
            raise ToolError("not_allowed", "expose_port works only for sandboxes running on this host")
        gateway = sandbox.exposures.get(port)
        if gateway is None:
            if len(sandbox.exposures) >= MAX_EXPOSED_PORTS:
                raise ToolError("sandbox_limit", f"at most {MAX_EXPOSED_PORTS} ports can be exposed per sandbox")
            try:
                gateway = await sandbox.vm.expose_http(port, listeners_file=False)
            except (GondolinError, ValueError) as exc:
                raise translate(exc) from exc
            sandbox.exposures[port] = gateway
        try:
            stream = await sandbox.vm.open_tcp(port)
        except GondolinError:
            return gateway.url, False
        await stream.aclose()
        return gateway.url, True

    # -- checkpoints -----------------------------------------------------------------------
    def _checkpoint_root(self) -> str:
        if self._checkpoint_dir is None:
            if self.config.checkpoint_dir:
                os.makedirs(self.config.checkpoint_dir, exist_ok=True)
                self._checkpoint_dir = self.config.checkpoint_dir
            else:
                self._checkpoint_dir = tempfile.mkdtemp(prefix="gondolin-checkpoints-")
                self._own_checkpoint_dir = True
        return self._checkpoint_dir

    def list_checkpoints(self, sandbox_id: str | None = None) -> list[CheckpointRecord]:
        return [c for c in self._checkpoints.values()
                if (sandbox_id is None or c.sandbox_id == sandbox_id) and self._visible(c.owner)]

    async def checkpoint(self, sandbox: Sandbox, name: str | None, disk_only: bool) -> CheckpointRecord:
        cap = self.config.limits.max_checkpoints
        if len(self._checkpoints) >= cap:
            raise ToolError("not_allowed", f"the server keeps at most {cap} checkpoints")
        owner, own_cap = _OWNER.get(), self.config.limits.max_checkpoints_per_session
        if owner is not None and own_cap is not None and \
                sum(1 for c in self._checkpoints.values() if c.owner == owner) >= own_cap:
            raise ToolError("not_allowed", f"the server keeps at most {own_cap} checkpoints per session")
        checkpoint_id = _new_id("cp")
        path = os.path.join(self._checkpoint_root(), checkpoint_id + ".ckpt")
        try:
            await sandbox.vm.checkpoint(path, disk_only=disk_only)
        except GondolinError as exc:
            raise translate(exc) from exc
        spec = {"name": sandbox.name, "image": sandbox.image, "cpus": sandbox.cpus, "memory_mb": sandbox.memory_mb,
                "ttl_s": sandbox.ttl_s, "network": sandbox.network, "secrets": list(sandbox.secret_names),
                "env": dict(sandbox.env), "mounts": list(sandbox.mounts)}
        record = CheckpointRecord(checkpoint_id, path, sandbox.id, name, self._clock(), disk_only, spec,
                                  owner=_OWNER.get())
        self._checkpoints[checkpoint_id] = record
        return record

    def get_checkpoint(self, checkpoint_id: str) -> CheckpointRecord:
        record = self._checkpoints.get(checkpoint_id)
        if record is None or not self._visible(record.owner):
            raise ToolError("checkpoint_not_found", f"no checkpoint {checkpoint_id!r}",
                            "Call checkpoint_list to see checkpoints.")
        return record

    async def restore(self, checkpoint_id: str, *, sandbox_id: str | None = None,
                      overrides: SandboxCreateInput | None = None) -> Sandbox:
        record = self.get_checkpoint(checkpoint_id)
        spec = dict(record.spec)
        if overrides is not None:
            if overrides.name:
                spec["name"] = overrides.name
            if overrides.ttl_s:
                spec["ttl_s"] = min(overrides.ttl_s, self.config.limits.max_ttl_s)

        if sandbox_id is None:
            return await self._start(spec, checkpoint_path=record.path, from_checkpoint=checkpoint_id)
        old = await self.find(sandbox_id)
        previous_from = old.from_checkpoint
        old.from_checkpoint = checkpoint_id  # in the record the new VM keeps
        try:
            vm = await self._boot(old, self._vm_options(spec), record.path)
        except BaseException:
            old.from_checkpoint = previous_from
            raise
        with anyio.CancelScope(shield=True):
            for job in old.execs.values():
                job.cancel()
            old.execs.clear()
            await _close_exposures(old)
            previous, old.vm = old.vm, vm
            old.from_checkpoint = checkpoint_id
            await _stop(previous)
        return old


async def _close_exposures(sandbox: Sandbox) -> None:
    """Close the sandbox's expose_port gateways (the caller shields it; the VM's close would too)."""
    gateways, sandbox.exposures = list(sandbox.exposures.values()), {}
    for gateway in gateways:
        with anyio.move_on_after(CLOSE_TIMEOUT_S):
            await gateway.close()


async def _stop(vm: VM) -> None:
    """Close a sandbox's VM (the caller shields it). A background failure that had killed the VM
    is logged, not raised: the sandbox is going away either way, and the other sandboxes still
    have to be closed."""
    with anyio.move_on_after(CLOSE_TIMEOUT_S) as scope:
        try:
            await vm.close()
        except GondolinError as exc:
            log.warning("sandbox VM %s had failed: %s", vm.id, exc)
    if scope.cancelled_caught:
        log.warning("sandbox VM %s did not close within %ss", vm.id, CLOSE_TIMEOUT_S)

