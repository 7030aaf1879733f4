"""The owner of one VM's lifecycle: run directory, QEMU, QMP, control channel, network and
file services, the configure message, health checks and close.

A :class:`Machine` is started from a boot source (:mod:`gondolin.machine.boot`) and runs in
one service task that owns an anyio task group; every background task of the VM (QEMU's
console reader, the control channel reader, the network driver, the file service, the
health monitor, stdin feeders, the registry server) runs in that group. A background task
that fails marks the machine dead: every pending and later call fails with that error (its
cause chained), and :meth:`close` raises it. Cancelling the service task (the event loop is
shutting down) tears everything down too, so a program that never calls ``close()`` still
exits promptly and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream, TaskGroup

from .._log import get_logger
from .._proc import pid_alive
from .._sockets import UnixListener
from .._tasks import spawn_service
from ..channel import Channel
from ..errors import (
    GondolinError,
    MissingToolError,
    VMClosedError,
    VMDiedError,
    VMStartError,
    VMUnresponsiveError,
)
from ..images import Image
from ..options import Timeouts, VMOptions
from ..protocol import T
from ..qemu.argv import build_argv
from ..qemu.process import QemuProcess, find_qemu
from ..qemu.qmp import QmpClient, QmpError
from ..shm import SharedRegion
from .boot import BootSource, ColdBoot
from .shape import (
    VIRTIOFS_CHARDEV,
    VIRTIOFS_DEVICE,
    VIRTIOFS_SOCKET,
    MachineShape,
    machine_shape,
    machine_spec,
    uses_virtiofs,
    virtiofs_chardev,
    virtiofs_device,
)
from .state import Resync, Section, prepare_restored_disk

log = get_logger("vm")
GUEST_IP = "192.168.127.3"
GATEWAY_IP = "192.168.127.1"
# A 64 KiB link MTU: the link is virtual, and fewer, larger frames halve the host CPU per MiB
# and double throughput under TCG (the host stack takes frames of any size).
JUMBO_MTU = 65520
RUN_PREFIX = "gondolin-vm-"
TEARDOWN_TIMEOUT = 10.0  # seconds the shielded teardown may take before it gives up waiting
_CA_CACHE: dict[str, Any] = {}
# virtiofs has no notification queue in the guest kernel, so host-side changes (vm.fs writes)
# cannot be pushed to it: the guest re-checks names and attributes after these instead.
VIRTIOFS_TTLS_MS = {"entry_ttl_ms": 1_000, "attr_ttl_ms": 1_000, "negative_ttl_ms": 1_000}
# How long the guest waits for a hot-plugged virtiofs device to show up before it gives up.
VIRTIOFS_ATTACH_WAIT = 20.0
_LIVE: weakref.WeakSet[Machine] = weakref.WeakSet()


def _run_base() -> Path:
    return Path(tempfile.gettempdir())


def gc_run_dirs() -> int:
    """Remove run directories left behind by host processes that died without cleaning up."""
    removed = 0
    for d in _run_base().glob(f"{RUN_PREFIX}*"):
        try:
            owner = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            owner = 0
        if owner and pid_alive(owner):
            continue
        try:
            if not owner and time.time() - d.stat().st_mtime < 60:
                continue  # being created right now
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed += 1
    return removed


class Network:
    """A running VM's network: policy hooks, audit events, counters."""

    def __init__(self, hooks: Any, mediator: Any, driver: Any, ca: Any) -> None:
        self.hooks = hooks
        self.mediator = mediator
        self.driver = driver
        self.ca = ca
        self.ssh: Any = None  # the SSH egress proxy (gondolin.ssh.egress), when options.ssh is set

    def events(self) -> list[Any]:
        """Recent HTTP audit events (allowed and blocked requests, with reasons)."""
        return list(self.hooks.events.events())

    @property
    def stats(self) -> Any:
        return self.driver.stats


def _load_ca() -> Any:
    """The per-install MITM CA, loaded once per process."""
    from ..http import CertificateAuthority

    if "ca" not in _CA_CACHE:
        _CA_CACHE["ca"] = CertificateAuthority.load_or_create()
    return _CA_CACHE["ca"]


async def _ca() -> Any:
    """:func:`_load_ca` without a thread hop once it is loaded."""
    return _CA_CACHE.get("ca") or await anyio.to_thread.run_sync(_load_ca)


class Machine:
    """One VM's lifecycle. Not public: :class:`gondolin.VM` is the facade users hold.

    ``options`` must be checked (:meth:`VMOptions.checked`); ``image`` and ``accel`` resolved.

    A ``spare`` machine (for :class:`gondolin.VMPool`) starts with its network and file
    services held back: QEMU's ends of those ports are accepted but nothing answers on them,
    so the guest has no network and no mounts until :meth:`assign` gives the machine its
    caller's options (policy, secrets, mounts) and starts the services with them.
    """

    def __init__(self, options: VMOptions, image: Image, accel: str, *, spare: bool = False) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.options = options
        self.image = image
        self.accel = accel
        self.timeouts: Timeouts = options.timeouts
        self.created = time.time()
        self.restored_from: str | None = None
        self.boot_time: float | None = None
        self.guest_boot_ms: int | None = None
        self.run_dir: Path | None = None
        self.network: Network | None = None
        self.qemu: QemuProcess | None = None
        self._vfs: Any = None  # gondolin.vfs.port.VfsServer while the fs port is served
        self.shared_region: SharedRegion | None = None  # vm.fs bulk data (gondolin.shm)
        self._virtiofs = False  # the mounts are served through the virtiofs device
        self._virtiofs_attached = False  # the device is plugged in (QMP device_add done)
        self._virtiofs_mounted = False  # ... and the guest mounted it (vm.fs may stage copies on it)
        self._channel: Channel | None = None
        self._listeners: dict[str, UnixListener] = {}
        self._tg: TaskGroup | None = None
        self._qmp: QmpClient | None = None
        self._qmp_lock = anyio.Lock()
        self.state_lock = anyio.Lock()  # one save (template, checkpoint, fork) at a time
        self._health_paused = 0
        self._failure: GondolinError | None = None  # a background failure: raised by close()
        self._failure_reported = False
        self._closing = False
        self._stop = anyio.Event()  # close requested, or a background task failed
        self._ready = anyio.Event()
        self._start_error: BaseException | None = None
        self._finished = anyio.Event()
        self._on_close: list[Callable[[], None]] = []
        self._spawned = False
        self.spare = spare
        self._held: dict[str, ByteStream] = {}  # a spare's network and fs port streams, unserved

    # -- shape ------------------------------------------------------------------------------
    @property
    def memory_mb(self) -> int:
        return self.options.memory_mb

    def shape(self) -> MachineShape:
        return machine_shape(self.options, self.image, self.accel)

    @property
    def disk_overlay(self) -> Path | None:
        """This machine's own qcow2 overlay (rootfs ``"cow"``), else None."""
        if self.options.rootfs != "cow" or self.run_dir is None:
            return None
        return self.run_dir / "root.qcow2"

    # -- start ------------------------------------------------------------------------------
    async def start(self, source: BootSource) -> None:
        """Start QEMU from ``source`` and return once the agent answers (not yet configured).
        The machine's service task runs until :meth:`close`; if starting fails, everything it
        created is gone when this raises."""
        if self._tg is not None or self._ready.is_set() or self._closing:
            raise GondolinError("a machine starts once")
        _LIVE.add(self)
        self._spawned = True
        spawn_service(lambda: self._serve(source), name=f"gondolin-vm-{self.id}")
        try:
            await self._ready.wait()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.close(raise_failure=False)
            raise
        if self._start_error is not None:
            with anyio.CancelScope(shield=True):
                await self._finished.wait()
            raise self._start_error

    async def _serve(self, source: BootSource) -> None:
        """The service task: owns the task group; never raises."""
        try:
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    try:
                        await self._launch(source)
                    except BaseException as exc:
                        self._start_error = _start_error(exc, self)
                        tg.cancel_scope.cancel()
                        raise
                    self._ready.set()
                    await self._stop.wait()
                    # Cancel first: QEMU's console reader kills QEMU when it is cancelled. Killing
                    # QEMU first would make every socket readable (EOF) in the same loop iteration
                    # as the cancellation, and anyio's asyncio socket waits then set a result on a
                    # cancelled future (InvalidStateError reported by the event loop).
                    tg.cancel_scope.cancel()
            except BaseException as exc:  # noqa: BLE001 - recorded; cancellation re-raised below
                if self._start_error is None and self._failure is None and not _is_cancel(exc):
                    self._fail("service", exc)
                if _is_cancel(exc) and not self._ready.is_set() and self._start_error is None:
                    self._start_error = VMStartError("the VM's start was cancelled (the event loop is shutting down)")
                if _is_cancel(exc):
                    raise
        finally:
            self._tg = None
            self._ready.set()
            with anyio.CancelScope(shield=True):
                await self._teardown()

    async def _launch(self, source: BootSource) -> None:
        t0 = time.monotonic()
        if self._closing:
            raise VMClosedError("the VM was closed while it was starting")
        await anyio.to_thread.run_sync(gc_run_dirs)
        self.run_dir = Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir=_run_base()))
        (self.run_dir / "owner.pid").write_text(str(os.getpid()))
        spec = machine_spec(self.options, self.image, self.accel, self.run_dir)
        sockets = {"control": spec.ports[0].socket_path}
        virtiofs = uses_virtiofs(self.options)
        if self.options.mounts and not virtiofs:
            sockets["fs"] = spec.ports[1].socket_path
        if spec.net_socket:
            sockets["net"] = spec.net_socket
        for name, path in sockets.items():
            self._listeners[name] = UnixListener(path)
        if spec.shared_region:  # before QEMU maps it; a restore fills it from the saved memory
            self.shared_region = SharedRegion(spec.shared_region, spec.shared_region_mb << 20)
        restore = source.restore_source()
        if virtiofs:  # the device is hot-plugged by configure(), after any restore (see attach_virtiofs)
            self._start_virtiofs(self.run_dir / VIRTIOFS_SOCKET)
        disk = restore.disk if restore is not None else (source.disk if isinstance(source, ColdBoot) else None)
        await anyio.to_thread.run_sync(self._prepare_disk, disk)
        if restore is not None:
            spec = replace(spec, incoming=restore.incoming_uri())
        self.qemu = qemu = QemuProcess(build_argv(spec, find_qemu()))
        try:
            qemu.start()
        except OSError as exc:
            raise VMStartError(f"cannot start QEMU: {exc}") from exc
        self.spawn("QEMU console", qemu.watch, critical=False)
        try:
            with anyio.fail_after(self.timeouts.start):
                streams = await self._accept_all()
                control: ByteStream = streams["control"]
                resync = Resync(control) if restore is not None else None
                if resync is not None:
                    await resync.ping()  # answered once QEMU has loaded the guest; set up the rest meanwhile
                if self.spare:
                    self._held.update((k, v) for k, v in streams.items() if k in ("net", "fs"))
                if "net" in streams and not self.spare:
                    await self._start_network(streams["net"])
                if "fs" in streams and not self.spare:
                    self._start_vfs(streams["fs"], getattr(source, "file_state", None))
                first_id = 1
                if resync is not None:
                    control = await resync.wait()
                    first_id = secrets.randbelow(1 << 30) + (1 << 30)
                self._channel = Channel(control, qemu.console_tail, self._wait_qemu_exit, first_id=first_id)
                self.spawn("control channel", self._channel.run, critical=False)
                if restore is None:
                    hello = await self._first_message(T.HELLO)
                    self.guest_boot_ms = int(hello.p.get("boot_ms") or 0)
                else:
                    self.restored_from = restore.kind
                self._channel.booted()
        except TimeoutError:
            raise VMStartError(
                f"the guest agent did not answer within {self.timeouts.start:.0f}s (accelerator {self.accel}); "
                "raise timeouts.start / GONDOLIN_START_TIMEOUT, or set GONDOLIN_ACCEL=tcg if KVM hangs here",
                qemu.console_tail(), code="vm_start_timeout") from None
        except VMDiedError as exc:
            if self._failure is not None:
                raise VMStartError(f"the VM failed while starting: {self._failure.message}") from self._failure
            raise VMStartError(f"the VM stopped while booting (QEMU exit code {qemu.returncode})",
                               exc.console or qemu.console_tail()) from None
        finally:
            await self._close_listeners()
        self.spawn("health monitor", self._monitor)
        self.spawn("QEMU exit watch", self._watch_exit, critical=False)
        self.boot_time = time.monotonic() - t0
        log.debug("vm %s up in %.3fs (%s)", self.id, self.boot_time,
                  f"restored from a {self.restored_from}" if self.restored_from
                  else f"guest agent at {self.guest_boot_ms}ms uptime")

    def _prepare_disk(self, saved: Section | None) -> None:
        """Create the cow overlay: empty, or a copy of a saved one (template, checkpoint, fork)."""
        overlay = self.disk_overlay
        if overlay is None:
            return
        base = str(self.image.rootfs)
        if saved is not None:
            prepare_restored_disk(saved, overlay, base)
            return
        qemu_img = shutil.which("qemu-img")
        if not qemu_img:
            raise MissingToolError("qemu-img", "qemu-utils", "create copy-on-write disks")
        # disk_size: the overlay's virtual size, so the guest's disk (and this file) never grows past it.
        size = [f"{self.options.disk_size}M"] if self.options.disk_size else []
        proc = subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, str(overlay), *size],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise VMStartError(f"qemu-img could not create the overlay disk: {proc.stderr.strip()}")

    async def _accept_all(self) -> dict[str, ByteStream]:
        """Accept QEMU's connection on every listener (it connects to all at start), unless it exits first."""
        qemu = self.qemu
        assert qemu is not None
        result: dict[str, ByteStream] = {}
        async with anyio.create_task_group() as tg:
            async def accept(name: str, listener: UnixListener) -> None:
                result[name] = await listener.accept()
                if len(result) == len(self._listeners):
                    tg.cancel_scope.cancel()

            async def exited() -> None:
                await qemu.exited.wait()
                tg.cancel_scope.cancel()

            for name, listener in self._listeners.items():
                tg.start_soon(accept, name, listener)
            tg.start_soon(exited)
        if len(result) != len(self._listeners):
            for stream in result.values():
                await stream.aclose()
            raise VMStartError(f"QEMU exited at start (exit code {qemu.returncode})", qemu.console_tail())
        return result

    async def _close_listeners(self) -> None:
        for listener in self._listeners.values():
            with anyio.CancelScope(shield=True):
                await listener.aclose()
        self._listeners.clear()

    async def _start_network(self, stream: ByteStream) -> None:
        from ..http import HttpMediator, deny_all_hooks
        from ..net import NetworkConfig, NetworkDriver

        opts = self.options
        hooks = opts.http_hooks if opts.http_hooks is not None else deny_all_hooks()
        ca = await _ca()
        mediator = HttpMediator(hooks, ca)
        handler: Any = mediator
        ssh = None
        if opts.ssh is not None:
            from ..ssh.egress import SshEgressProxy, flow_router

            ssh = SshEgressProxy(opts.ssh, hooks.events)
            handler = flow_router(mediator, ssh)
        driver = NetworkDriver(NetworkConfig(dns=opts.dns, tcp_hosts=dict(opts.tcp_hosts),
                                             flow_handler=handler, mtu=JUMBO_MTU, ssh_enabled=ssh is not None,
                                             ssh_ports=opts.ssh.ports if opts.ssh is not None else frozenset()))
        self.network = Network(hooks, mediator, driver, ca)
        self.network.ssh = ssh
        self.spawn("network driver", driver.run, stream)

    def _start_vfs(self, stream: ByteStream, state: Any = None) -> None:
        """Serve the mounts on the fs port; ``state``: the session a checkpoint or fork saved,
        taken over so the guest keeps its open files and working directories on them."""
        from ..vfs.port import VfsServer

        region = self.shared_region
        self._vfs = VfsServer(self.options.mounts, state=state,
                              shm=region.fuse_area() if region is not None else None)
        self.spawn("file service", self._vfs.serve, stream)

    def _start_virtiofs(self, path: Path) -> None:
        """Listen on the vhost-user socket and serve the mounts on it from this machine's task
        group: one connection per hot-plugged device (QEMU connects at ``chardev-add`` and
        negotiates during ``device_add``); a device unplugged before a save and plugged again
        after it is a new connection to the same file service."""
        from ..vfs.port import VfsServer
        from ..vhost.fs_device import serve_virtiofs

        vfs = VfsServer(dict(self.options.mounts), **VIRTIOFS_TTLS_MS)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(str(path))  # in the run directory, which only its owner can enter
            listener.listen(1)
        except OSError as exc:
            listener.close()
            raise VMStartError(f"cannot listen for the virtiofs device on {path}: {exc}") from exc

        async def serve() -> None:
            try:
                while True:
                    await serve_virtiofs(listener, vfs)
            finally:
                listener.close()
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await vfs.service.aclose()  # release what the guest left open

        self._vfs = vfs
        self._virtiofs = True
        try:
            self.spawn("virtiofs device", serve)
        except BaseException:
            listener.close()
            raise

    async def _wait_qemu_exit(self) -> None:
        if self.qemu is not None:
            await self.qemu.exited.wait()

    async def _watch_exit(self) -> None:
        """QEMU exited by itself (crash, guest power-off, killed): the machine is dead."""
        assert self.qemu is not None
        await self.qemu.exited.wait()
        if not self._closing and self._channel is not None:
            code = self.qemu.returncode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            self._channel.kill(VMDiedError(f"the VM stopped unexpectedly (QEMU exited, {how})",
                                           self.qemu.console_tail()))
        self._stop.set()

    async def _first_message(self, t: int) -> Any:
        assert self._channel is not None
        while True:
            try:
                msg = await self._channel.next_unsolicited()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                self._channel.refresh_console()
                raise self._channel.dead or VMDiedError("the VM stopped while booting") from None
            if msg.t == t:
                return msg
            log.debug("ignoring unsolicited %s during boot", msg.type_name)

    # -- background tasks ---------------------------------------------------------------------
    def spawn(self, name: str, fn: Callable[..., Awaitable[Any]], *args: Any, critical: bool = True) -> None:
        """Run ``fn(*args)`` in this machine's task group. If it raises, the machine is dead
        and the error is raised by every later call and by :meth:`close`; ``critical=False``
        tasks (those whose end is reported another way) only log a failure."""
        if self._tg is None:
            raise VMClosedError("this VM is not running")

        async def guarded() -> None:
            try:
                await fn(*args)
            except BaseException as exc:  # noqa: BLE001 - cancellation is re-raised
                if _is_cancel(exc):
                    raise
                if critical:
                    self._fail(name, exc)
                else:
                    log.debug("vm %s: %s ended with %r", self.id, name, exc)

        self._tg.start_soon(guarded, name=f"{name} of VM {self.id}")

    def _fail(self, what: str, exc: BaseException) -> None:
        """A background task failed: the machine is dead; ``close`` and every call raise it."""
        if self._closing or self._failure is not None:
            return
        exc = _root_cause(exc)
        if isinstance(exc, VMUnresponsiveError):
            error: GondolinError = exc
        else:
            error = VMDiedError(f"the VM's {what} failed ({type(exc).__name__}: {exc}); the VM was stopped",
                                self.qemu.console_tail() if self.qemu else [])
            error.__cause__ = exc
        log.warning("vm %s: %s", self.id, error.message.splitlines()[0])
        self._failure = error
        if self._channel is not None:
            self._channel.kill(error)
        self._stop.set()

    async def _monitor(self) -> None:
        """Ping the agent every ``ping_interval``; no answer for ``unresponsive`` s kills the VM."""
        while True:
            t = self.timeouts  # a pool's spare gets its caller's timeouts when handed out
            await anyio.sleep(t.ping_interval)
            if self._health_paused or self._channel is None or self._channel.dead is not None:
                continue
            with anyio.move_on_after(t.unresponsive) as scope:
                await self._channel.request(T.PING)
            if scope.cancelled_caught and not self._health_paused:
                raise VMUnresponsiveError(
                    f"the guest has not answered for {t.unresponsive:.0f}s (frozen, or too busy to schedule "
                    "the agent); the VM was stopped", self.qemu.console_tail() if self.qemu else [])

    @contextlib.asynccontextmanager
    async def health_paused(self) -> AsyncIterator[None]:
        """Suspend the health monitor (while the VM is deliberately stopped to save its state)."""
        self._health_paused += 1
        try:
            yield
        finally:
            self._health_paused -= 1

    # -- what callers use -----------------------------------------------------------------------
    def control(self) -> Channel:
        """The control channel, or the error that ended it."""
        if self._closing:
            raise VMClosedError("this VM is closed")
        if self._channel is None:
            raise VMClosedError("this VM is not running")
        if self._channel.dead is not None:
            self._channel.refresh_console()
            if self._channel.dead is self._failure:
                self._failure_reported = True
            raise self._channel.dead
        return self._channel

    async def wait_stopped(self) -> GondolinError | None:
        """Wait until the machine stops; the error that stopped it (None when it was closed)."""
        await self._stop.wait()
        return self._failure if self._failure is not None else (
            None if self._closing or self._channel is None else self._channel.dead)

    @property
    def running(self) -> bool:
        return (not self._closing and self._channel is not None and self._channel.dead is None
                and not self._stop.is_set())

    @property
    def qemu_pid(self) -> int | None:
        return self.qemu.pid if self.qemu else None

    @property
    def mounts(self) -> dict[str, Any]:
        return dict(self.options.mounts)

    @contextlib.contextmanager
    def recording_file_session(self) -> Iterator[None]:
        """Around a memory save: the fs port's server records what it sends, for
        :meth:`file_hand_over`. Nothing to do without mounts or on virtiofs."""
        vfs = self._vfs if not self._virtiofs else None
        if vfs is not None:
            vfs.begin_hand_over()
        try:
            yield
        finally:
            if vfs is not None:
                vfs.end_hand_over()

    async def file_hand_over(self) -> Any:
        """With the guest stopped after a memory save: the fs port session its copies take
        over (None: no mounts, virtiofs, or too much in flight; the copies then mount afresh)."""
        if self._vfs is None or self._virtiofs:
            return None
        return await self._vfs.hand_over(timeout=self.timeouts.call)

    def vfs_root(self) -> Any:
        """The provider tree the guest's mounts see (``vm.fs`` uses it for mounted paths)."""
        return self._vfs.root if self._vfs is not None else None

    def vfs_invalidate(self, path: str) -> None:
        """Drop what the guest kernel caches about ``path`` (changed from the host side)."""
        if self._vfs is not None and not self._virtiofs:  # virtiofs: the TTLs bound staleness
            self._vfs.invalidate(path)

    def unmigratable(self) -> str | None:
        """Why this machine's state cannot be saved (checkpoint, fork, template), or None. (A
        virtiofs VM can be saved: :meth:`detach_virtiofs` unplugs its device around the save.)"""
        return None

    async def attach_virtiofs(self) -> None:
        """Hot-plug the virtiofs device (QMP ``chardev-add`` + ``device_add`` on pci.0): after a
        cold boot, after a restore (a template, checkpoint or fork holds the machine without it)
        and after a save that unplugged it. The configure message that follows makes the guest
        wait for it and mount it. QEMU refusing it raises :class:`VMStartError` (code
        ``virtiofs_attach``); the chardev of a refused device is removed again."""
        if not self._virtiofs or self._virtiofs_attached:
            return
        if self.run_dir is None:
            raise VMClosedError("this VM is not running")
        qmp = await self.qmp()
        try:
            with anyio.fail_after(self.timeouts.call):
                await qmp.execute("chardev-add", virtiofs_chardev(str(self.run_dir / VIRTIOFS_SOCKET)))
                try:
                    await qmp.execute("device_add", virtiofs_device())
                except QmpError:
                    with contextlib.suppress(QmpError):
                        await qmp.execute("chardev-remove", {"id": VIRTIOFS_CHARDEV})
                    raise
        except QmpError as exc:
            raise VMStartError(f"QEMU refused to plug in the virtiofs device ({exc.message}); create the VM "
                               "with fs_transport='port' (the default) if this QEMU cannot serve virtiofs",
                               self.console(), code="virtiofs_attach") from exc
        except TimeoutError:
            raise VMStartError(f"QEMU did not plug in the virtiofs device within {self.timeouts.call:.0f}s",
                               self.console(), code="virtiofs_attach") from None
        self._virtiofs_attached = True

    async def detach_virtiofs(self) -> str | None:
        """Before a save of this VM's memory: the guest unmounts its virtiofs mounts and the
        device is unplugged (QMP ``device_del``, then the guest ejects it; ``chardev-remove``).
        Returns why not (and changes nothing) when a guest process still uses a mount: its
        open file or working directory could not survive the unplug (the guest kernel ties a
        virtiofs mount to its device: with the device gone every request on it fails with
        ENOTCONN, and a device plugged in later is a new file system). :meth:`reattach_virtiofs`
        undoes it."""
        if not self._virtiofs_attached:
            return None
        msg = await self.control().request(T.CONFIGURE, b"", timeout=self.timeouts.call, fs_detach=True)
        errors = [str(e) for e in (msg.p.get("errors") or [])] if msg.t == T.CONFIGURED else [str(msg.p)]
        if errors:
            return "; ".join(e.removeprefix("mounts: ") for e in errors)
        self._virtiofs_mounted = False
        qmp = await self.qmp()
        try:
            with anyio.fail_after(self.timeouts.call):
                qmp.take_events("DEVICE_DELETED")
                await qmp.execute("device_del", {"id": VIRTIOFS_DEVICE})
                while not any(e.data.get("device") == VIRTIOFS_DEVICE for e in qmp.take_events("DEVICE_DELETED")):
                    await anyio.sleep(0.01)
                    await qmp.execute("query-status")  # events arrive with replies
                await qmp.execute("chardev-remove", {"id": VIRTIOFS_CHARDEV})
        except (QmpError, TimeoutError) as exc:
            detail = exc.message if isinstance(exc, QmpError) else f"the guest did not release it within " \
                f"{self.timeouts.call:.0f}s"
            raise VMDiedError(f"the virtiofs device could not be unplugged for a save ({detail})",
                              self.console()) from exc
        self._virtiofs_attached = False
        return None

    async def reattach_virtiofs(self) -> None:
        """After a save: plug the virtiofs device in again and mount it (see :meth:`detach_virtiofs`)."""
        if not self._virtiofs or self._virtiofs_attached or not self.options.mounts:
            return
        try:
            await self.attach_virtiofs()
            msg = await self.control().request(
                T.CONFIGURE, b"", timeout=self.timeouts.call, mounts=sorted(self.options.mounts),
                fs_transport="virtiofs", fs_readonly=bool(self._vfs.root.readonly),
                fs_wait_s=min(VIRTIOFS_ATTACH_WAIT, self.timeouts.call / 2))
            errors = [str(e) for e in (msg.p.get("errors") or [])] if msg.t == T.CONFIGURED else [str(msg.p)]
            if errors:
                raise VMStartError("the guest could not mount its virtiofs device again: " + "; ".join(errors),
                                   code="virtiofs_attach")
            self._virtiofs_mounted = True
        except GondolinError as exc:  # the VM lost its mounts: it is dead, the save itself stands
            self._fail("virtiofs device (plugged in again after a save)", exc)
            raise self._failure or exc from None

    def console(self, lines: int = 50) -> list[str]:
        return self.qemu.console_tail(lines) if self.qemu else []

    async def qmp(self) -> QmpClient:
        """The QMP connection to this VM's QEMU (opened on first use)."""
        async with self._qmp_lock:
            if self._qmp is None:
                if self.run_dir is None:
                    raise VMClosedError("this VM is not running")
                self._qmp = await QmpClient.connect(str(self.run_dir / "qmp.sock"))
            return self._qmp

    def quiesced(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold back host sends after a PING round trip (see :meth:`Channel.quiesced`)."""
        return self.control().quiesced(timeout=self.timeouts.call)

    async def assign(self, options: VMOptions) -> None:
        """Make a spare this caller's machine: its ``options`` (checked, of the same machine
        shape) replace the spare's, and the network and file services start with the caller's
        policy, secrets and mounts. Send :meth:`configure` next. A spare is assigned once."""
        if not self.spare:
            raise GondolinError("only a spare machine that was never assigned can be assigned options")
        if machine_shape(options, self.image, self.accel) != self.shape():
            raise ValueError("these options need a machine of another shape than this spare: "
                             + "; ".join(machine_shape(options, self.image, self.accel).differences(self.shape())))
        self.control()  # a closed or dead spare fails here
        self.spare = False
        self.options = options
        self.timeouts = options.timeouts
        self.created = time.time()
        if "net" in self._held:
            await self._start_network(self._held["net"])
            del self._held["net"]
        if "fs" in self._held:
            self._start_vfs(self._held.pop("fs"))

    async def configure(self, *, base: bool = False, hostname: str | None = None,
                        env: dict[str, str] | None = None) -> None:
        """Send the guest its configuration: after every boot and every restore (clock, fresh
        entropy, ...). ``base`` leaves out what is per VM (for a template). A restored agent
        is told that the requests of the host that saved it are gone."""
        extra: dict[str, Any] = {}
        if self._virtiofs:
            extra["fs_transport"] = "virtiofs"  # a template's agent loads the driver ahead of its mount
            if not base:
                await self.attach_virtiofs()
                extra["fs_wait_s"] = min(VIRTIOFS_ATTACH_WAIT, self.timeouts.call / 2)
        if self.options.network:  # also for a spare, whose network service starts when it is assigned
            extra["network"] = {"address": f"{GUEST_IP}/24", "gateway": GATEWAY_IP, "dns": GATEWAY_IP,
                                "mtu": JUMBO_MTU}
            ca = self.network.ca if self.network is not None else await _ca()
            extra["ca_pem"] = ca.ca_bundle_pem().decode()
        if base and hostname:  # a pool's spare: its guest sets a hostname now, the caller's later
            extra["hostname"] = hostname
        if not base:
            extra.update(hostname=hostname or self.options.hostname, env=dict(env or self.options.env))
            if self.options.mounts:
                extra["mounts"] = sorted(self.options.mounts)
                if self._virtiofs:
                    extra["fs_readonly"] = bool(self._vfs.root.readonly)
            if self.network is not None and self.network.ssh is not None:  # the guest trusts the SSH proxy
                mapped = {k.rpartition(":")[0] if ":" in k else k for k in self.options.tcp_hosts}
                extra.setdefault("files", {})["/etc/ssh/ssh_known_hosts"] = self.network.ssh.known_hosts_line(mapped)
        if self.restored_from is not None:
            extra["new_host"] = True
            if self._vfs is not None and not self._virtiofs and self._vfs.carried_over:
                extra["keep_mounts"] = True  # this host answers the saved session: the guest keeps its FUSE mount
        extra["pids_max"] = self.options.pids_max  # None: no limit
        msg = await self.control().request(T.CONFIGURE, os.urandom(64), timeout=self.timeouts.call,
                                           clock_ns=time.time_ns(), **extra)
        if msg.t != T.CONFIGURED:
            raise VMStartError(f"guest rejected its configuration: {msg.p}")
        errors = [str(e) for e in msg.p.get("errors") or []]
        if self._virtiofs and not base and any(e.startswith("mounts:") for e in errors):
            raise VMStartError("the guest could not mount its virtiofs device: "
                               + "; ".join(e for e in errors if e.startswith("mounts:")), self.console(),
                               code="virtiofs_attach")
        if self._virtiofs and not base and self.options.mounts:
            self._virtiofs_mounted = True
        for err in errors:
            log.warning("guest configuration: %s", err)
        if self.shared_region is not None:  # the agent maps the region's device; vm.fs uses it once it has
            self.shared_region.usable = msg.p.get("shm") == self.shared_region.size

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (sync, must not raise) when the machine is torn down."""
        self._on_close.append(callback)

    # -- stop ----------------------------------------------------------------------------------
    async def close(self, *, raise_failure: bool = True) -> None:
        """Stop the VM and remove everything it created; safe to call twice, from any task.
        Raises the background failure that killed the VM, if one did and it was not yet raised."""
        self._closing = True
        self._stop.set()
        if self._channel is not None:
            self._channel.kill(VMClosedError("the VM was closed"))
        with anyio.CancelScope(shield=True):
            if self._spawned:
                with anyio.move_on_after(TEARDOWN_TIMEOUT + 5):
                    await self._finished.wait()
            if not self._finished.is_set():
                self.kill_now()
        if raise_failure and self._failure is not None and not self._failure_reported:
            self._failure_reported = True
            raise self._failure

    async def _teardown(self) -> None:
        """Everything the machine created goes (shielded by the caller, bounded)."""
        try:
            with anyio.move_on_after(TEARDOWN_TIMEOUT):
                for callback in self._on_close:
                    with contextlib.suppress(Exception):
                        callback()
                if self._qmp is not None:
                    await self._qmp.aclose()
                if self._channel is not None:
                    await self._channel.aclose()
                held, self._held = list(self._held.values()), {}
                for stream in held:
                    await stream.aclose()
                await self._close_listeners()
                if self.qemu is not None:
                    await self.qemu.stop()
                if self.network is not None:
                    await self.network.mediator.aclose()
        finally:
            self.kill_now()
            self._finished.set()
            _LIVE.discard(self)
            log.debug("vm %s closed", self.id)

    def kill_now(self) -> None:
        """Synchronous last resort (exit handlers, finalizers): kill QEMU, remove the run directory."""
        if self.qemu is not None:
            self.qemu.kill()
        if self.shared_region is not None:
            self.shared_region.close()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def kill_qemu(self) -> None:
        """Kill the QEMU process abruptly (for tests of failure handling)."""
        if self.qemu is not None and self.qemu.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.qemu.pid, signal.SIGKILL)


def kill_all_machines() -> None:
    """Kill every machine of this process that is still running (interpreter exit)."""
    for machine in list(_LIVE):
        machine.kill_now()


def _is_cancel(exc: BaseException) -> bool:
    return isinstance(exc, anyio.get_cancelled_exc_class()) or (
        isinstance(exc, BaseExceptionGroup) and all(_is_cancel(e) for e in exc.exceptions))


def _root_cause(exc: BaseException) -> BaseException:
    """The first exception inside (nested) task-group groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _start_error(exc: BaseException, machine: Machine) -> BaseException:
    """The one typed error a failed start raises (task-group groups unwrapped)."""
    exc = _root_cause(exc)
    if isinstance(exc, GondolinError):
        return exc
    if _is_cancel(exc):
        return VMStartError("the VM's start was cancelled")
    err = VMStartError(f"the VM could not start: {type(exc).__name__}: {exc}", machine.console())
    err.__cause__ = exc
    return err


__all__ = ["GATEWAY_IP", "GUEST_IP", "JUMBO_MTU", "Machine", "Network", "gc_run_dirs", "kill_all_machines"]
