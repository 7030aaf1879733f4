"""The public facade: :class:`VM`, :func:`open_vm` and :class:`Checkpoint`.

    async with gondolin.open_vm(memory="1G") as vm:
        result = await vm.exec("echo hello")

A VM is a facade over one :class:`gondolin.machine.Machine`, which owns its lifecycle. Every
public call raises only :class:`gondolin.GondolinError` subclasses (and ``ValueError`` /
``TypeError`` for bad arguments): task-group exception groups are unwrapped here.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import secrets
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar, Unpack

import anyio

from ._log import get_logger
from .errors import GondolinError, VMClosedError
from .exec import ExecProcess, ExecResult, StdinSource, StreamMode, normalize_command
from .fs import GuestFS
from .images import Image, ImageStore
from .ingress import IngressGateway, IngressHooks, IngressLimits, Route, RouteTable
from .ingress.expose import expose_http
from .machine import Machine, Network
from .machine.boot import BootSource, ForkClone
from .machine.checkpoint import CheckpointError, CheckpointFile, save_checkpoint
from .machine.fork import fork_machine
from .machine.launch import resolve, start_machine
from .machine.machine import kill_all_machines
from .machine.shape import MachineShape, machine_shape
from .machine.state import StateError
from .options import OptionChanges, RootfsMode, VMOptions
from .protocol import DEFAULT_WINDOW, T
from .registry import Registration, register
from .ssh_access import SshAccess, enable_ssh
from .streams import GuestStream, TcpForward, open_stream, start_forward

log = get_logger("vm")
P = ParamSpec("P")
R = TypeVar("R")


def _typed_errors(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Let only documented errors out of a public coroutine (see :func:`unwrap_errors`)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except BaseExceptionGroup as group:
            raise unwrap_errors(group) from group

    return wrapper


def unwrap_errors(group: BaseExceptionGroup[Any]) -> BaseException:
    """The one exception a task-group group stands for: its first Gondolin error (or
    cancellation, KeyboardInterrupt, ...), else a GondolinError naming what happened."""
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    for kind in (KeyboardInterrupt, SystemExit, anyio.get_cancelled_exc_class(), GondolinError,
                 ValueError, TypeError):
        for exc in leaves:
            if isinstance(exc, kind):
                return exc
    first = leaves[0] if leaves else group
    err = GondolinError(f"{type(first).__name__}: {first}", code="internal_error")
    err.__cause__ = first
    return err


class VM:
    """A running micro-VM. Start one with ``await VM.create(...)`` (close it with
    ``await vm.close()``) or ``async with open_vm(...) as vm``. Every wait has a host-side
    deadline; nothing (QEMU, sockets, temp files) outlives it, even when ``close()`` is never
    called (the VM is then stopped at garbage collection, event-loop shutdown or exit)."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self.fs = GuestFS(machine, machine, lambda: machine.shared_region)
        self._registration: Registration | None = None
        self._ssh: SshAccess | None = None
        self._finalizer = weakref.finalize(self, machine.kill_now)

    # -- starting ---------------------------------------------------------------------------
    @classmethod
    @_typed_errors
    async def create(cls, options: VMOptions | None = None, /, **changes: Unpack[OptionChanges]) -> VM:
        """Start a VM and return it once its agent answers and it is configured.

        ``options`` is a :class:`VMOptions` (default: the defaults); keyword ``changes`` are
        applied on top: ``VM.create(memory="1G", cpus=2)``. See :class:`VMOptions` for each.
        """
        opts = VMOptions.from_kwargs(options, **changes)
        return await cls._start(opts)

    @classmethod
    async def _start(cls, options: VMOptions, source: BootSource | None = None, *, image: Image | None = None) -> VM:
        machine = await start_machine(options, source, image=image)
        vm = cls(machine)
        await vm._register()
        return vm

    async def _register(self) -> None:
        try:
            self._registration = await register(self, self._machine)
        except OSError as exc:  # only `gondolin list` / `attach` miss it
            log.warning("could not register the VM in the VM registry: %s", exc)

    # -- what it is ---------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._machine.id

    @property
    def options(self) -> VMOptions:
        """The (checked) options this VM was started with."""
        return self._machine.options

    @property
    def image(self) -> Image:
        return self._machine.image

    @property
    def memory_mb(self) -> int:
        return self._machine.memory_mb

    @property
    def cpus(self) -> int:
        return self._machine.options.cpus

    @property
    def env(self) -> dict[str, str]:
        return dict(self._machine.options.env)

    @property
    def rootfs(self) -> RootfsMode:
        return self._machine.options.rootfs

    @property
    def accel(self) -> str:
        return self._machine.accel

    @property
    def hostname(self) -> str:
        return self._machine.options.hostname

    @property
    def label(self) -> str | None:
        return self._machine.options.label

    @property
    def network(self) -> Network | None:
        """Policy hooks, audit events and counters of the VM's network (None without one)."""
        return self._machine.network

    @property
    def mounts(self) -> dict[str, Any]:
        return self._machine.mounts

    @property
    def created(self) -> float:
        return self._machine.created

    @property
    def boot_time(self) -> float | None:
        """Seconds from QEMU's start until the agent answered."""
        return self._machine.boot_time

    @property
    def guest_boot_ms(self) -> int | None:
        """The guest's uptime when its agent said hello (cold boots only)."""
        return self._machine.guest_boot_ms

    @property
    def restored_from(self) -> str | None:
        """``"template"``, ``"checkpoint"`` or ``"fork"`` when not booted cold."""
        return self._machine.restored_from

    @property
    def running(self) -> bool:
        return self._machine.running

    async def wait_stopped(self) -> GondolinError | None:
        """Wait until this VM stops: the error that stopped it (QEMU exited, a background
        service failed, the guest stopped answering), or None when it was closed."""
        return await self._machine.wait_stopped()

    @property
    def qemu_pid(self) -> int | None:
        return self._machine.qemu_pid

    def console(self, lines: int = 50) -> list[str]:
        """The last lines QEMU's serial console printed."""
        return self._machine.console(lines)

    def shape(self) -> MachineShape:
        """What a saved memory image of this VM depends on (its warm template's key)."""
        return self._machine.shape()

    # -- commands -----------------------------------------------------------------------------
    async def exec(
        self,
        command: str | list[str] | tuple[str, ...],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        stdin: bytes | str | Iterable[bytes] | AsyncIterable[bytes] | None = None,
        pty: bool = False,
        rows: int = 24,
        cols: int = 80,
        timeout: float | None = None,
        stdout: Literal["buffer", "ignore"] = "buffer",
        stderr: Literal["buffer", "ignore"] = "buffer",
    ) -> ExecResult:
        """Run a command to completion and return its :class:`ExecResult` (a non-zero exit is a
        result, not an error). A string runs through ``/bin/sh -c``; a list is executed directly
        (PATH is searched). A coroutine, so ``tg.start_soon(vm.exec, ...)``, ``asyncio.gather``
        and ``create_task`` work. To stream output or write stdin yourself, use :meth:`start`.

        ``stdin``: bytes, str or a (async) iterable of bytes, sent and then closed. ``timeout``
        (seconds) kills the command in the guest when it expires (``result.timed_out``); if the
        guest does not report that within ``timeouts.grace`` more, :class:`ExecTimeout` is
        raised. ``user``: name or uid. ``env`` adds to the VM's environment.
        """
        if stdin is True or stdin is False:
            raise ValueError("stdin=True means writing stdin yourself: use `proc = await vm.start(..., stdin=True)`")
        for name, mode in (("stdout", stdout), ("stderr", stderr)):
            if mode not in ("buffer", "ignore"):
                raise ValueError(f"exec() collects output: {name} must be 'buffer' or 'ignore' "
                                 f"(use vm.start() to stream it)")
        proc = self._process(command, env=env, cwd=cwd, user=user, stdin=stdin, pty=pty, rows=rows, cols=cols,
                             timeout=timeout, stdout=stdout, stderr=stderr, window=DEFAULT_WINDOW)
        return await proc.wait()

    async def start(
        self,
        command: str | list[str] | tuple[str, ...],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        stdin: StdinSource = None,
        pty: bool = False,
        rows: int = 24,
        cols: int = 80,
        timeout: float | None = None,
        stdout: StreamMode = "pipe",
        stderr: StreamMode = "pipe",
        window: int = DEFAULT_WINDOW,
    ) -> ExecProcess:
        """Start a command and return its running :class:`ExecProcess`: iterate over it for
        output chunks (``stdout``/``stderr`` ``"pipe"``, the default), ``proc.write()`` /
        ``proc.close_stdin()`` with ``stdin=True``, ``proc.signal()``, ``proc.resize()``, and
        ``await proc.wait()`` for the result. Output is flow-controlled: the guest produces more
        only as it is read. Other arguments as for :meth:`exec`."""
        proc = self._process(command, env=env, cwd=cwd, user=user, stdin=stdin, pty=pty, rows=rows, cols=cols,
                             timeout=timeout, stdout=stdout, stderr=stderr, window=window)
        return await proc.start()

    def _process(self, command: str | list[str] | tuple[str, ...], *, env: Mapping[str, str] | None,
                 cwd: str | None, user: str | int | None, stdin: StdinSource, pty: bool, rows: int, cols: int,
                 timeout: float | None, stdout: StreamMode, stderr: StreamMode, window: int) -> ExecProcess:
        request: dict[str, Any] = normalize_command(command)
        defaults = self._machine.image.defaults  # the image's WorkingDir / User (docs/images.md)
        cwd = cwd if cwd is not None else defaults.get("workdir")
        user = user if user is not None else defaults.get("user")
        if env:
            request["env"] = {str(k): str(v) for k, v in env.items()}
        if cwd is not None:
            if not cwd.startswith("/"):
                raise ValueError(f"cwd must be an absolute guest path, got {cwd!r}")
            request["cwd"] = cwd
        if user is not None:
            request["user"] = user
        if pty:
            request.update(pty=True, rows=rows, cols=cols)
        if timeout is not None:
            if timeout <= 0:
                raise ValueError("timeout must be positive")
            request["timeout"] = timeout
        self._machine.control()  # a closed or dead VM fails here
        return ExecProcess(self._machine, request, stdin=stdin, stdout=stdout, stderr=stderr, window=window,
                           timeout=timeout)

    async def ping(self, timeout: float = 10.0) -> float:
        """Round trip to the guest agent, in seconds (:class:`GuestTimeoutError` after ``timeout``)."""
        t0 = anyio.current_time()
        await self._machine.control().request(T.PING, timeout=timeout)
        return anyio.current_time() - t0

    # -- reaching the guest -----------------------------------------------------------------------
    async def open_tcp(self, port: int, host: str = "127.0.0.1") -> GuestStream:
        """Connect to a TCP port on the guest's loopback (``127.0.0.1`` or ``::1``; nothing else)
        and return the connection, an :class:`anyio.abc.ByteStream` (``receive``, ``send``,
        ``send_eof``, ``aclose``; use it with ``async with``). Flow-controlled both ways: a side
        that stops reading makes the other side's ``send`` wait. Nothing listening raises
        :class:`GuestConnectionError`; closing the VM closes its streams."""
        return await open_stream(self._machine, port, host)

    async def forward_tcp(self, guest_port: int, host: str = "127.0.0.1", host_port: int = 0, *,
                          allow_remote: bool = False) -> TcpForward:
        """Listen on ``host:host_port`` on the host (0: any free port) and relay each connection
        to ``guest_port`` on the guest's loopback. Returns a :class:`TcpForward` (``.host``,
        ``.port``, ``await .close()``); it stops when the VM closes. Listening on an address other
        than loopback needs ``allow_remote=True``."""
        return await start_forward(self._machine, guest_port, host, host_port, allow_remote=allow_remote)

    @_typed_errors
    async def expose_http(self, port: int | None = None, *,
                          routes: RouteTable | Mapping[str, int] | Iterable[Route] | None = None,
                          host: str = "127.0.0.1", listen_port: int = 0, hooks: IngressHooks | None = None,
                          limits: IngressLimits | None = None, allow_remote: bool = False,
                          listeners_file: bool = True) -> IngressGateway:
        """Serve the guest's HTTP servers on the host: returns an :class:`IngressGateway`
        (``.url``, ``await .close()``; it stops when the VM closes). Requests go by path prefix
        to guest loopback ports: ``port`` is the route for ``/``, ``routes`` adds
        ``{prefix: port}`` or :class:`~gondolin.ingress.Route` values, and with
        ``listeners_file`` the guest's ``/etc/gondolin/listeners`` adds its own (the host's win).
        ``hooks`` (:class:`~gondolin.ingress.IngressHooks`) may refuse or edit requests and
        responses. Listening on an address other than loopback needs ``allow_remote=True``.
        See docs/access.md."""
        return await expose_http(self._machine, self.open_tcp, self.fs, port=port, routes=routes, host=host,
                                 listen_port=listen_port, hooks=hooks, limits=limits, allow_remote=allow_remote,
                                 listeners_file=listeners_file)

    @_typed_errors
    async def enable_ssh(self, user: str = "agent", *, guest_port: int = 22, host: str = "127.0.0.1",
                         host_port: int = 0) -> SshAccess:
        """Start ``sshd`` in the guest (guest loopback only, public-key login as ``user``, no
        forwarding of any kind) with host keys made now, a new key pair on the host (in the
        VM's run directory, removed with it) and a host loopback listener tunnelling to it.
        Returns an :class:`~gondolin.ssh_access.SshAccess`: ``.command`` is the ready ``ssh``
        argv (``str(access)`` as one line), which checks the guest's host key. Calling it again
        (after a checkpoint resume, say) replaces keys, sshd and listener."""
        run_dir = self._machine.run_dir
        if run_dir is None:
            raise VMClosedError("this VM is not running")
        self._ssh = await enable_ssh(self, run_dir, user, guest_port=guest_port, host=host, host_port=host_port,
                                     previous=self._ssh)
        return self._ssh

    # -- saved state ----------------------------------------------------------------------------
    @_typed_errors
    async def checkpoint(self, path: str | os.PathLike[str], *, disk_only: bool = False) -> Checkpoint:
        """Save this VM to the file ``path``: disk and memory (running processes included), or
        with ``disk_only=True`` the disk alone. The VM keeps running. Resume it with
        ``await Checkpoint.load(path).resume()``, any number of times; see docs/snapshots.md."""
        self._machine.control()

        async def sync_disk() -> None:
            await self.exec(["sync"], timeout=60)

        header = await save_checkpoint(self._machine, Path(os.fspath(path)), disk_only=disk_only,
                                       sync_disk=sync_disk)
        return Checkpoint(Path(os.fspath(path)).absolute(), header)

    @_typed_errors
    async def fork(self, n: int = 1, *, label: str | None = None) -> list[VM]:
        """``n`` new VMs whose memory, processes and disk are copies of this one now (this VM
        keeps running). Each copy gets its own entropy, clock, generation id, network stack and
        id; mounts and network policy are the same host objects as this VM's. Close each."""
        opts = self._machine.options.replace(label=label if label is not None else self._machine.options.label)
        image = self._machine.image

        async def start(clone: ForkClone) -> Machine:
            return await start_machine(opts.replace(accel=self._machine.accel), clone, image=image)

        machines, _stats = await fork_machine(self._machine, n, start)
        vms = [VM(m) for m in machines]
        for vm in vms:
            await vm._register()
        return vms

    # -- teardown -------------------------------------------------------------------------------
    @_typed_errors
    async def close(self) -> None:
        """Stop the VM and remove everything it created. Safe to call twice, from any task.
        Raises the error of a background failure that killed the VM (a crashed network or file
        service, an unresponsive guest) unless a call already raised it."""
        if self._registration is not None:
            self._registration.close()
        await self._machine.close()

    async def discard(self) -> None:
        """Close this VM without raising why it died (for VMs known to be dead or unwanted)."""
        if self._registration is not None:
            self._registration.close()
        await self._machine.close(raise_failure=False)

    async def __aenter__(self) -> VM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def kill_qemu(self) -> None:
        """Kill the QEMU process abruptly (for tests of failure handling)."""
        self._machine.kill_qemu()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<VM {self.id} {state} image={self.image.build_id[:12]} accel={self.accel}>"


@contextlib.asynccontextmanager
async def open_vm(options: VMOptions | None = None, /, **changes: Unpack[OptionChanges]) -> AsyncIterator[VM]:
    """``async with open_vm(...) as vm``: start a VM (same options as :meth:`VM.create`) and close
    it when the block ends, however it ends."""
    vm = await VM.create(options, **changes)
    try:
        yield vm
    finally:
        with anyio.CancelScope(shield=True):
            await vm.close()


class Checkpoint(CheckpointFile):
    """A saved VM. ``Checkpoint.load(path)`` reads and checks the header; :meth:`resume` starts
    a new VM from it (the file is only read)."""

    @_typed_errors
    async def resume(self, options: VMOptions | None = None, /, **changes: Unpack[OptionChanges]) -> VM:
        """Start a new VM from this checkpoint. A full checkpoint resumes with its processes
        running; a disk-only one boots with its disk (``memory``/``cpus`` may then change).

        What the checkpoint recorded (hostname, label, env, network mode, DNS mode, TCP
        mappings) is reused unless changed. Network policy (``http_hooks``) and mount providers
        (``mounts``, same guest paths as when saved) are live host objects, so they are passed
        again."""
        h = self.header
        try:
            img = await anyio.to_thread.run_sync(ImageStore().resolve, h.image)
        except GondolinError:
            raise CheckpointError(
                f"{self.path.name} needs guest image {h.image} (kernel {h.kernel_version}), which is not in the "
                "image store any more; rebuild or restore that image to resume it", code="checkpoint_image") from None
        o = h.options
        saved = VMOptions(image=img.build_id, memory=h.shape.memory_mb, cpus=h.shape.cpus,
                          rootfs=h.shape.rootfs,  # type: ignore[arg-type]
                          hostname=o.hostname, label=o.label, env=o.env, network=o.network,
                          dns=o.dns,  # type: ignore[arg-type]
                          tcp_hosts=o.tcp_hosts, accel=h.shape.accel,
                          fs_transport=o.fs_transport)  # type: ignore[arg-type]
        if options is not None:
            changes = {**{f: getattr(options, f) for f in ("env", "hostname", "label", "http_hooks", "mounts",
                                                           "timeouts")}, **changes}  # type: ignore[typeddict-item]
        if "image" in changes:
            wanted = await anyio.to_thread.run_sync(ImageStore().resolve, changes.pop("image"))
            if wanted.build_id != img.build_id:
                raise CheckpointError(f"{self.path.name} was saved from image {h.image}; it cannot resume on "
                                      f"image {wanted.build_id}", code="checkpoint_image")
        full = h.kind == "full"
        if full and ({"memory", "cpus", "rootfs", "network"} & {k for k, v in changes.items() if v is not None}):
            raise ValueError("memory, cpus, rootfs and network are fixed by a full checkpoint (part of its saved state)")
        opts = VMOptions.from_kwargs(saved, **{k: v for k, v in changes.items() if v is not None or k == "label"})
        checked, image, accel = await resolve(opts, image=img)
        if full:
            self.check_shape(machine_shape(checked, image, accel))
        failure: list[BaseException] = []

        async def verify() -> None:
            try:
                await anyio.to_thread.run_sync(self.verify)
            except CheckpointError as exc:
                failure.append(exc)

        if not full:
            await verify()
            if failure:
                raise failure[0]
        try:
            async with anyio.create_task_group() as tg:
                if full:
                    tg.start_soon(verify)  # while QEMU loads the memory
                vm = await VM._start(checked.replace(accel=accel), self.boot_source(), image=image)
        except* GondolinError as group:
            if failure:
                raise failure[0] from None
            first = group.exceptions[0]
            if isinstance(first, CheckpointError):
                raise first from None
            code = "checkpoint_failed" if isinstance(first, StateError) else "checkpoint_corrupt"
            raise CheckpointError(f"{self.path.name} could not be resumed: {first}", code=code) from first
        if failure:
            with anyio.CancelScope(shield=True):
                await vm._machine.close(raise_failure=False)
            raise failure[0]
        return vm


def _kill_at_exit() -> None:
    kill_all_machines()


atexit.register(_kill_at_exit)


async def vm_for(machine: Machine) -> VM:
    """The :class:`VM` of a started and configured machine (:class:`gondolin.VMPool` hands
    out spares this way); it owns the machine from then on."""
    vm = VM(machine)
    await vm._register()
    return vm


def new_hostname() -> str:
    return f"gondolin-{secrets.token_hex(3)}"


__all__ = ["VM", "Checkpoint", "VMClosedError", "new_hostname", "open_vm", "unwrap_errors", "vm_for"]
