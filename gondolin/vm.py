"""The VM: boot a guest under QEMU, run commands in it, move files in and out, close it for sure."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import secrets
import shutil
import signal as _signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
from anyio.abc import SocketListener

from ._log import get_logger
from ._proc import pid_alive
from .channel import Channel
from .errors import GondolinError, MissingToolError, VMClosedError, VMDiedError, VMStartError
from .exec import ExecProcess, StdinSource, StreamMode, normalize_command
from .fs import GuestFS
from .images import Image, ImageStore, ensure_image
from .protocol import DEFAULT_WINDOW, T
from .qemu import accel as _accel
from .qemu.argv import MachineSpec, SerialPort, build_argv, parse_memory
from .qemu.process import QemuProcess, find_qemu
from .qemu.qmp import QmpClient
from .snapshot import RestoreSource, Resync, Section, prepare_restored_disk

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .templates import MachineShape, TemplateStore

log = get_logger("vm")
RootfsMode = Literal["cow", "readonly", "memory"]
CONTROL_PORT = "gondolin.control"
FS_PORT = "gondolin.fs"
GUEST_IP = "192.168.127.3"
JUMBO_MTU = 65520  # gondolin.net.JUMBO_MTU (kept here so importing vm does not load the stack)
GATEWAY_IP = "192.168.127.1"
_CA_CACHE: dict[str, Any] = {}


def _load_ca(cls: Any) -> Any:
    """The per-install MITM CA, loaded once per process."""
    if "ca" not in _CA_CACHE:
        _CA_CACHE["ca"] = cls.load_or_create()
    return _CA_CACHE["ca"]


@dataclass(frozen=True)
class NetworkOptions:
    dns: str = "synthetic"
    tcp_hosts: dict[str, str] = field(default_factory=dict)
    http_hooks: Any = None


class Network:
    """A running VM's network: policy hooks, audit events, counters."""

    def __init__(self, hooks: Any, mediator: Any, driver: Any, ca: Any) -> None:
        self.hooks = hooks
        self.mediator = mediator
        self.driver = driver
        self.ca = ca

    def events(self) -> list[Any]:
        """Recent HTTP audit events (allowed and blocked requests, with reasons)."""
        return list(self.hooks.events.events())

    @property
    def stats(self) -> Any:
        return self.driver.stats
DEFAULT_START_TIMEOUT = float(os.environ.get("GONDOLIN_START_TIMEOUT", "120"))
# Processes one exec may have at once in the guest (its own pids cgroup there): far above what
# builds and test runners use, far below what takes a 512 MiB guest down.
DEFAULT_PIDS_MAX = 1024
RUN_PREFIX = "gondolin-vm-"


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
        if not owner and time.time() - d.stat().st_mtime < 60:
            continue  # being created right now
        shutil.rmtree(d, ignore_errors=True)
        removed += 1
    return removed


class _TaskSet:
    """Background tasks owned by one VM; cancelled and awaited when it closes."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            raise GondolinError("gondolin needs an asyncio event loop (anyio's asyncio backend)") from None
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("background task failed: %r", task.exception())

    async def cancel_all(self, timeout: float = 5.0) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
                await asyncio.gather(*tasks, return_exceptions=True)


class VM:
    """A running micro-VM. Create it with ``await VM.create(...)``; close it with ``await vm.close()``
    or ``async with``. Every wait has a timeout; nothing (QEMU, sockets, temp files) outlives it."""

    def __init__(self, *, image: Image, memory_mb: int, cpus: int, env: Mapping[str, str], rootfs: RootfsMode,
                 accel: str, hostname: str, start_timeout: float, label: str | None,
                 network: NetworkOptions | None = None, mounts: Mapping[str, Any] | None = None,
                 pids_max: int | None = None) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.pids_max = pids_max
        self.image = image
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.env = dict(env)
        self.rootfs = rootfs
        self.accel = accel
        self.hostname = hostname
        self.label = label
        self._start_timeout = start_timeout
        self._tasks = _TaskSet()
        self._qemu: QemuProcess | None = None
        self._channel: Channel | None = None
        self._listeners: dict[str, SocketListener] = {}
        self._run_dir: Path | None = None
        self._closed = False
        self._close_lock = anyio.Lock()
        self.fs = GuestFS(self)
        self._net_options = network
        self.network: Network | None = None
        self.mounts: dict[str, Any] = dict(mounts or {})
        self._vfs_stream: Any = None
        self._vfs: Any = None  # gondolin.vfs.port.VfsServer while the fs port is served
        self.boot_time: float | None = None
        self.guest_boot_ms: int | None = None
        self.created = time.time()
        self.restored_from: str | None = None  # "template" or "checkpoint" when not booted cold
        self._qmp: QmpClient | None = None
        self._qmp_lock = anyio.Lock()
        self._snapshot_lock = anyio.Lock()
        self._session: Any = None

    # -- creation --------------------------------------------------------------
    @classmethod
    async def create(
        cls,
        *,
        memory: int | str = 512,
        cpus: int = 1,
        env: Mapping[str, str] | None = None,
        rootfs: RootfsMode = "cow",
        image: str = "default",
        hostname: str = "gondolin",
        start_timeout: float | None = None,
        label: str | None = None,
        accel: str | None = None,
        network: bool = True,
        dns: str = "synthetic",
        tcp_hosts: Mapping[str, str] | None = None,
        http_hooks: Any = None,
        mounts: Mapping[str, Any] | None = None,
        warm: bool = True,
        pids_max: int | None = DEFAULT_PIDS_MAX,
    ) -> VM:
        """Start a VM and return it once its agent answers.

        ``memory`` in MiB (or "1G"), ``cpus`` vCPUs, ``env`` defaults for every exec, ``rootfs``:
        ``"cow"`` (writes go to a throwaway qcow2 overlay), ``"memory"`` (writes go to guest RAM) or
        ``"readonly"``; ``image``: a ref name, build id or image directory (``"default"`` is built on
        first use). ``accel``: ``"kvm"``/``"tcg"`` (default: probe once, or ``GONDOLIN_ACCEL``).

        Network: ``network=False`` gives the guest no NIC at all. Otherwise every guest connection
        goes through the host's network stack: ``http_hooks`` (from :func:`gondolin.http.create_http_hooks`)
        decide which HTTP(S) requests may leave (none without hooks), ``tcp_hosts`` maps
        ``"name:port"`` to a host ``"ip:port"`` for raw TCP, ``dns`` is ``"synthetic"`` (default),
        ``"trusted"`` or ``"open"``. ``mounts`` maps guest paths to :mod:`gondolin.vfs` providers.

        ``warm=True`` (default) restores the VM from a saved template of this image and machine
        shape (a fraction of a second) instead of booting it; the first VM of a shape boots cold
        and saves the template. ``warm=False`` always boots cold. See docs/snapshots.md.

        ``pids_max``: processes one exec (with everything it starts) may have at once in the
        guest, so a fork bomb cannot take the VM; ``None`` for no limit.
        """
        make = await cls._factory(memory=memory, cpus=cpus, env=env, rootfs=rootfs, image=image, hostname=hostname,
                                  start_timeout=start_timeout, label=label, accel=accel, network=network, dns=dns,
                                  tcp_hosts=tcp_hosts, http_hooks=http_hooks, mounts=mounts, pids_max=pids_max)
        if warm:
            from .templates import create_warm

            return await create_warm(make)
        vm = make()
        await vm._launch()
        return vm

    @classmethod
    async def _factory(
        cls,
        *,
        memory: int | str = 512,
        cpus: int = 1,
        env: Mapping[str, str] | None = None,
        rootfs: RootfsMode = "cow",
        image: str = "default",
        hostname: str = "gondolin",
        start_timeout: float | None = None,
        label: str | None = None,
        accel: str | None = None,
        network: bool = True,
        dns: str = "synthetic",
        tcp_hosts: Mapping[str, str] | None = None,
        http_hooks: Any = None,
        mounts: Mapping[str, Any] | None = None,
        pids_max: int | None = DEFAULT_PIDS_MAX,
    ) -> Callable[[], VM]:
        """Check the options and resolve the image; return a constructor of unstarted VMs."""
        if rootfs not in ("cow", "readonly", "memory"):
            raise ValueError(f"rootfs must be 'cow', 'readonly' or 'memory', not {rootfs!r}")
        if cpus < 1 or cpus > 64:
            raise ValueError("cpus must be between 1 and 64")
        memory_mb = parse_memory(memory)
        find_qemu()
        store = ImageStore()
        img = await anyio.to_thread.run_sync(ensure_image, image, store)
        timeout = DEFAULT_START_TIMEOUT if start_timeout is None else start_timeout
        net = NetworkOptions(dns=dns, tcp_hosts=dict(tcp_hosts or {}), http_hooks=http_hooks) if network else None
        if not network and (tcp_hosts or http_hooks is not None):
            raise ValueError("tcp_hosts and http_hooks need network=True")
        for guest_path in mounts or {}:
            if not guest_path.startswith("/") or guest_path.rstrip("/") in ("", "/proc", "/sys", "/dev", "/run"):
                raise ValueError(f"cannot mount at {guest_path!r}: give an absolute path such as /workspace")
        chosen = accel or await _accel.choose(img, cls._probe_boot)
        return functools.partial(cls, image=img, memory_mb=memory_mb, cpus=cpus, env=env or {}, rootfs=rootfs,
                                 accel=chosen, hostname=hostname, start_timeout=timeout, label=label, network=net,
                                 mounts=mounts, pids_max=pids_max)

    async def _launch(self, *, restore: RestoreSource | None = None, disk: Section | None = None,
                      save_template: tuple[TemplateStore, MachineShape] | None = None) -> None:
        """Start this VM (cold, or from saved state); close it if that fails."""
        try:
            await self._start(restore=restore, disk=disk, save_template=save_template)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.close()
            raise

    @classmethod
    async def _probe_boot(cls, image: Image, accel: str, timeout: float) -> None:
        vm = cls(image=image, memory_mb=256, cpus=1, env={}, rootfs="readonly", accel=accel,
                 hostname="probe", start_timeout=timeout, label="accelerator probe")
        try:
            await vm._start()
        finally:
            with anyio.CancelScope(shield=True):
                await vm.close()

    def _machine_spec(self, run_dir: Path) -> MachineSpec:
        """The QEMU machine for this VM; every per-VM path lives under ``run_dir``."""
        ports = [SerialPort(CONTROL_PORT, str(run_dir / "control.sock"))]
        if self.mounts:
            ports.append(SerialPort(FS_PORT, str(run_dir / "fs.sock")))
        disk, fmt, readonly, mode = self._disk_layout(run_dir)
        return MachineSpec(
            kernel=str(self.image.kernel), initrd=str(self.image.initrd), disk=disk, disk_format=fmt,
            disk_readonly=readonly, root_mode=mode, memory_mb=self.memory_mb, cpus=self.cpus,
            accel=self.accel, ports=tuple(ports),
            net_socket=str(run_dir / "net.sock") if self._net_options is not None else None,
            qmp_socket=str(run_dir / "qmp.sock"),
            extra_append=" ".join(filter(None, (
                "gondolin.debug=1 loglevel=6" if os.environ.get("GONDOLIN_GUEST_DEBUG") else "",
                os.environ.get("GONDOLIN_KERNEL_APPEND", "")))),
        )

    def machine_shape(self) -> MachineShape:
        """What a saved memory image of this VM depends on (the template key)."""
        from .templates import (
            RUN_PLACEHOLDER,
            MachineShape,
            device_fingerprint,
            qemu_version_cached,
        )

        spec = self._machine_spec(Path(RUN_PLACEHOLDER))
        return MachineShape(
            image=self.image.build_id, memory_mb=self.memory_mb, cpus=self.cpus, rootfs=self.rootfs,
            accel=self.accel, network=self._net_options is not None, fs_port=bool(self.mounts),
            qemu=qemu_version_cached(find_qemu()),
            devices=device_fingerprint(spec, RUN_PLACEHOLDER, str(self.image.path)),
        )

    async def _start(self, *, restore: RestoreSource | None = None, disk: Section | None = None,
                     save_template: tuple[TemplateStore, MachineShape] | None = None) -> None:
        t0 = time.monotonic()
        gc_run_dirs()
        self._run_dir = Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir=_run_base()))
        (self._run_dir / "owner.pid").write_text(str(os.getpid()))
        spec = self._machine_spec(self._run_dir)
        sockets = {"control": spec.ports[0].socket_path}
        if self.mounts:
            sockets["fs"] = spec.ports[1].socket_path
        if spec.net_socket:
            sockets["net"] = spec.net_socket
        for name, path in sockets.items():
            self._listeners[name] = await anyio.create_unix_listener(path)
        await anyio.to_thread.run_sync(self._prepare_disk, restore.disk if restore else disk)
        if restore is not None:
            spec = dataclasses.replace(spec, incoming=restore.incoming_uri())
        self._qemu = QemuProcess(build_argv(spec, find_qemu()))
        try:
            self._qemu.start()
        except OSError as exc:
            raise VMStartError(f"cannot start QEMU: {exc}") from exc
        self._tasks.spawn(self._qemu.watch())
        qemu = self._qemu
        try:
            with anyio.fail_after(self._start_timeout):
                streams = await self._accept_all()
                control = streams["control"]
                resync = Resync(control) if restore is not None else None
                if resync is not None:
                    await resync.ping()  # answered once QEMU has loaded the guest; set up the rest meanwhile
                if "net" in streams:
                    await self._start_network(streams["net"])
                if "fs" in streams:
                    await self._start_vfs(streams["fs"])
                first_id = 1
                if resync is not None:
                    control = await resync.wait()
                    first_id = secrets.randbelow(1 << 30) + (1 << 30)
                self._channel = Channel(control, qemu.console_tail, self._wait_qemu_exit, first_id=first_id)
                self._tasks.spawn(self._channel.run())
                if restore is None:
                    hello = await self._first_message(T.HELLO)
                    self.guest_boot_ms = int(hello.p.get("boot_ms") or 0)
                    if save_template is not None:
                        await self._configure(base=True)
                        await self._save_template(*save_template)
                else:
                    self.restored_from = restore.kind
                await self._configure(new_session=restore is not None)
        except TimeoutError:
            raise VMStartError(
                f"the guest agent did not answer within {self._start_timeout:.0f}s (accelerator {self.accel}); "
                "raise start_timeout / GONDOLIN_START_TIMEOUT, or set GONDOLIN_ACCEL=tcg if KVM hangs here",
                qemu.console_tail(), code="vm_start_timeout") from None
        except VMDiedError as exc:
            raise VMStartError(f"the VM stopped while booting (QEMU exit code {qemu.returncode})",
                               exc.console or qemu.console_tail()) from None
        finally:
            await self._close_listeners()
        self.boot_time = time.monotonic() - t0
        log.debug("vm %s ready in %.3fs (%s)", self.id, self.boot_time,
                  f"restored from a {self.restored_from}" if self.restored_from
                  else f"guest agent at {self.guest_boot_ms}ms uptime")
        from .sessions import register_session

        try:
            self._session = await register_session(self)
        except OSError as exc:  # only `gondolin list` / `attach` miss it
            log.warning("could not register the VM in the session registry: %s", exc)

    async def _save_template(self, store: TemplateStore, shape: MachineShape) -> None:
        """Save this freshly booted, idle VM as its shape's template. A failure only costs speed."""
        from .snapshot import SnapshotError
        from .templates import save_template

        assert self._run_dir is not None and self._channel is not None
        overlay = self._run_dir / "root.qcow2" if self.rootfs == "cow" else None
        try:
            await save_template(store, shape, await self._qmp_client(), self._channel.quiesced, overlay)
        except (SnapshotError, OSError) as exc:
            log.warning("could not save a warm template (%s); later VMs boot cold", exc)

    async def checkpoint(self, path: str | os.PathLike[str], *, disk_only: bool = False) -> Checkpoint:
        """Save this VM to the file ``path``: disk and memory (running processes included), or
        with ``disk_only=True`` the disk alone. The VM keeps running. Resume it with
        ``await Checkpoint.load(path).resume()``, any number of times; see docs/snapshots.md."""
        from .checkpoint import save_checkpoint

        self._require_channel()
        return await save_checkpoint(self, Path(os.fspath(path)), disk_only=disk_only)

    async def _qmp_client(self) -> QmpClient:
        """The QMP connection to this VM's QEMU (opened on first use)."""
        async with self._qmp_lock:
            if self._qmp is None:
                assert self._run_dir is not None
                self._qmp = await QmpClient.connect(str(self._run_dir / "qmp.sock"))
            return self._qmp

    async def _close_listeners(self) -> None:
        for listener in self._listeners.values():
            with anyio.CancelScope(shield=True):
                await listener.aclose()
        self._listeners.clear()

    async def _start_network(self, stream: Any) -> None:
        from .http import CertificateAuthority, HttpMediator, deny_all_hooks
        from .net import NetworkConfig, NetworkDriver

        opts = self._net_options
        assert opts is not None
        hooks = opts.http_hooks if opts.http_hooks is not None else deny_all_hooks()
        ca = await anyio.to_thread.run_sync(_load_ca, CertificateAuthority)
        mediator = HttpMediator(hooks, ca)
        driver = NetworkDriver(NetworkConfig(dns=opts.dns, tcp_hosts=opts.tcp_hosts,  # type: ignore[arg-type]
                                             flow_handler=mediator, mtu=JUMBO_MTU))
        self.network = Network(hooks, mediator, driver, ca)
        self._tasks.spawn(driver.run(stream))

    async def _start_vfs(self, stream: Any) -> None:
        from .vfs.port import VfsServer

        self._vfs = VfsServer(self.mounts)
        self._tasks.spawn(self._vfs.serve(stream))

    def _vfs_root(self) -> Any:
        """The provider tree the guest's mounts see (``vm.fs`` uses it for mounted paths)."""
        return self._vfs.root if self._vfs is not None else None

    def _vfs_invalidate(self, path: str) -> None:
        """Drop what the guest kernel caches about ``path`` (changed from the host side)."""
        if self._vfs is not None:
            self._vfs.invalidate(path)

    def _disk_layout(self, run_dir: Path) -> tuple[str, str, bool, str]:
        """(disk path, format, read-only, guest root mode) for this VM's rootfs mode."""
        base = str(self.image.rootfs)
        if self.rootfs == "readonly":
            return base, "raw", True, "ro"
        if self.rootfs == "memory":
            return base, "raw", True, "overlay"
        return str(run_dir / "root.qcow2"), "qcow2", False, "rw"

    def _prepare_disk(self, saved: Section | None = None) -> None:
        """Create the cow overlay: empty, or a copy of a saved one (template or checkpoint)."""
        if self.rootfs != "cow":
            return
        assert self._run_dir is not None
        base = str(self.image.rootfs)
        overlay = self._run_dir / "root.qcow2"
        if saved is not None:
            prepare_restored_disk(saved, overlay, base)
            return
        qemu_img = shutil.which("qemu-img")
        if not qemu_img:
            raise MissingToolError("qemu-img", "qemu-utils", "create copy-on-write disks")
        proc = subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, str(overlay)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise VMStartError(f"qemu-img could not create the overlay disk: {proc.stderr.strip()}")

    async def _wait_qemu_exit(self) -> None:
        if self._qemu is not None:
            await self._qemu.exited.wait()

    async def _accept_all(self) -> dict[str, Any]:
        """Accept QEMU's connection on every listener (it connects to all at start), unless it exits first."""
        qemu = self._qemu
        assert qemu is not None
        result: dict[str, Any] = {}
        async with anyio.create_task_group() as tg:
            async def accept(name: str, listener: SocketListener) -> None:
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

    async def _configure(self, *, base: bool = False, new_session: bool = False) -> None:
        """Send the guest its configuration: after every boot and every restore (clock, fresh
        entropy, ...). ``base`` leaves out what is per VM (for a template); ``new_session`` tells
        a restored agent that the requests of the host that saved it are gone."""
        channel = self._require_channel()
        inbox = channel.open()
        try:
            extra: dict[str, Any] = {}
            if self.network is not None:
                # A 64 KiB link MTU: the link is virtual, and fewer, larger frames halve the host CPU
                # per MiB and double throughput under TCG (the host stack takes frames of any size).
                extra["network"] = {"address": f"{GUEST_IP}/24", "gateway": GATEWAY_IP, "dns": GATEWAY_IP,
                                    "mtu": JUMBO_MTU}
                extra["ca_pem"] = self.network.ca.ca_bundle_pem().decode()
            if not base:
                extra.update(hostname=self.hostname, env=self.env)
                if self.mounts:
                    extra["mounts"] = sorted(self.mounts)
            if new_session:
                extra["new_session"] = True
            extra["pids_max"] = self.pids_max
            await channel.send_message(T.CONFIGURE, inbox.id, os.urandom(64), clock_ns=time.time_ns(), **extra)
            msg = await inbox.get()
            if msg.t != T.CONFIGURED:
                raise VMStartError(f"guest rejected its configuration: {msg.p}")
            for err in msg.p.get("errors") or []:
                log.warning("guest configuration: %s", err)
        finally:
            inbox.close()

    # -- operations ------------------------------------------------------------
    def _require_channel(self) -> Channel:
        if self._closed:
            raise VMClosedError("this VM is closed")
        if self._channel is None:
            raise VMClosedError("this VM is not running")
        if self._channel.dead is not None:
            self._channel.refresh_console()
            raise self._channel.dead
        return self._channel

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._tasks.spawn(coro)

    def exec(
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
        stdout: StreamMode = "buffer",
        stderr: StreamMode = "buffer",
        window: int = DEFAULT_WINDOW,
    ) -> ExecProcess:
        """Run a command. A string runs through ``/bin/sh -c``; a list is executed directly (PATH
        is searched). ``await`` the result for an :class:`ExecResult`, or pipe and iterate.

        ``stdin``: bytes/str/iterable/async iterable to send then close, or ``True`` to write it
        yourself with ``proc.write()`` / ``proc.close_stdin()``. ``timeout`` (seconds) kills the
        process in the guest when it expires (``result.timed_out``). ``user``: name or uid.
        """
        request: dict[str, Any] = normalize_command(command)
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
        if self._closed:
            raise VMClosedError("this VM is closed")
        return ExecProcess(self, request, stdin=stdin, stdout=stdout, stderr=stderr, window=window,
                           timeout=timeout)

    async def ping(self, timeout: float = 10.0) -> float:
        """Round trip to the guest agent, in seconds."""
        channel = self._require_channel()
        inbox = channel.open()
        try:
            t0 = time.perf_counter()
            with anyio.fail_after(timeout):
                await channel.send_message(T.PING, inbox.id)
                await inbox.get()
            return time.perf_counter() - t0
        finally:
            inbox.close()

    @property
    def running(self) -> bool:
        return not self._closed and self._channel is not None and self._channel.dead is None

    @property
    def qemu_pid(self) -> int | None:
        return self._qemu.pid if self._qemu else None

    def console(self, lines: int = 50) -> list[str]:
        """The last lines QEMU's serial console printed."""
        return self._qemu.console_tail(lines) if self._qemu else []

    # -- teardown --------------------------------------------------------------
    async def close(self) -> None:
        """Stop the VM and remove everything it created. Safe to call twice, from any task."""
        async with self._close_lock:
            if self._closed:
                return
            self._closed = True
            with anyio.CancelScope(shield=True):
                if self._session is not None:
                    self._session.close()
                if self._qmp is not None:
                    await self._qmp.aclose()
                if self._channel is not None:
                    await self._channel.aclose()
                await self._close_listeners()
                if self._qemu is not None:
                    await self._qemu.stop()
                await self._tasks.cancel_all()
                if self.network is not None:
                    await self.network.mediator.aclose()
                if self._run_dir is not None:
                    shutil.rmtree(self._run_dir, ignore_errors=True)
            log.debug("vm %s closed", self.id)

    async def __aenter__(self) -> VM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def kill_qemu(self) -> None:
        """Kill the QEMU process abruptly (for tests of failure handling)."""
        if self._qemu is not None and self._qemu.pid:
            os.kill(self._qemu.pid, _signal.SIGKILL)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.running else "starting")
        return f"<VM {self.id} {state} image={self.image.build_id[:12]} accel={self.accel}>"


def new_hostname() -> str:
    return f"gondolin-{secrets.token_hex(3)}"
