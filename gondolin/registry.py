"""The registry of running VMs, and the socket through which other processes reach them.

Every running VM writes ``$XDG_CACHE_HOME/gondolin/vms/<id>.json`` (id, owner pid, QEMU
pid, label, created, socket) and removes it on close. An entry whose owner process is gone is
garbage: :func:`list_vms` deletes it.

The owner serves the VM on a unix socket in its private run directory (mode 0700, so only the
same user can connect). One connection carries one request, framed like the control port
(:mod:`gondolin.protocol`) with the message types of :class:`S`: run a command (with a PTY or
pipes, stdin streamed, resize, signals) or save a checkpoint. ``gondolin list``, ``attach`` and
``snapshot`` are clients of it (:class:`RemoteVM`).
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import time
import weakref
from collections.abc import AsyncIterator, Generator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import ByteStream

from ._log import get_logger
from ._proc import pid_alive
from ._sockets import UnixListener, connect_unix
from .errors import GondolinError, ProtocolError
from .exec import ExecResult, OutputChunk
from .images.store import cache_root
from .protocol import FrameDecoder, FrameError, Message, encode

if TYPE_CHECKING:
    from .machine import Machine
    from .vm import VM

log = get_logger("vm")
READ_SIZE = 256 * 1024
MAX_CLIENTS = 16  # connections served at once per VM; more wait in the listen backlog
SOCKET_NAME = "registry.sock"


class RegistryError(GondolinError):
    """No such running VM, or its owner process could not be reached."""

    code = "registry_error"


class S(enum.IntEnum):
    """Message types of the VM's registry socket (host to host; distinct from the guest's :class:`T`)."""

    INFO = 100  # -> {} ; <- {entry fields}
    EXEC = 101  # -> {command, env, cwd, user, pty, rows, cols, stdin, timeout}
    STARTED = 102  # <- {pid}
    STDOUT = 103  # <- data
    STDERR = 104  # <- data
    STDIN = 105  # -> data
    STDIN_EOF = 106  # ->
    RESIZE = 107  # -> {rows, cols}
    SIGNAL = 108  # -> {signal}
    EXIT = 109  # <- {exit_code, signal, timed_out}
    CHECKPOINT = 110  # -> {path, disk_only}
    DONE = 111  # <- {path, size, kind, seconds}
    ERROR = 112  # <- {code, message}


@dataclass(frozen=True)
class VMEntry:
    id: str
    pid: int  # the host process that owns the VM
    qemu_pid: int | None
    label: str | None
    created: float
    socket: str
    image: str
    memory_mb: int
    cpus: int
    rootfs: str
    restored_from: str | None = None

    @classmethod
    def from_dict(cls, data: Any) -> VMEntry:
        if not isinstance(data, dict):
            raise ValueError("registry entry is not an object")
        return cls(
            id=str(data["id"]), pid=int(data["pid"]),
            qemu_pid=int(data["qemu_pid"]) if data.get("qemu_pid") else None,
            label=str(data["label"]) if data.get("label") is not None else None,
            created=float(data["created"]), socket=str(data["socket"]), image=str(data.get("image", "")),
            memory_mb=int(data.get("memory_mb", 0)), cpus=int(data.get("cpus", 0)),
            rootfs=str(data.get("rootfs", "")),
            restored_from=str(data["restored_from"]) if data.get("restored_from") else None,
        )

    @property
    def alive(self) -> bool:
        return pid_alive(self.pid) and Path(self.socket).exists()


def registry_dir() -> Path:
    return Path(os.environ.get("GONDOLIN_REGISTRY_DIR") or cache_root() / "vms")


def _read(path: Path) -> VMEntry:
    return VMEntry.from_dict(json.loads(path.read_text()))


def list_vms(*, gc: bool = True) -> list[VMEntry]:
    """Running VMs, oldest first. With ``gc``, entries of dead owners are deleted."""
    out = []
    root = registry_dir()
    if not root.is_dir():
        return []
    for path in sorted(root.glob("*.json")):
        try:
            info = _read(path)
        except (OSError, ValueError, KeyError, TypeError):
            if gc and time.time() - _mtime(path) > 60:  # unreadable and not being written now
                path.unlink(missing_ok=True)
            continue
        if not info.alive:
            if gc:
                path.unlink(missing_ok=True)
            continue
        out.append(info)
    out.sort(key=lambda s: s.created)
    return out


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def find_vm(ident: str) -> VMEntry:
    """A running VM by id, unique id prefix, or label."""
    running = list_vms()
    exact = [s for s in running if s.id == ident]
    if exact:
        return exact[0]
    hits = [s for s in running if s.id.startswith(ident)] or [s for s in running if s.label == ident]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        known = ", ".join(s.id for s in running) or "none"
        raise RegistryError(f"no running VM {ident!r} (running: {known}); see `gondolin list`")
    raise RegistryError(f"{ident!r} matches several VMs: {', '.join(s.id for s in hits)}")


# -- owner side ------------------------------------------------------------------------
class Registration:
    """A VM's registry entry and socket; :meth:`close` removes both."""

    def __init__(self, entry: Path, listener: UnixListener, socket: Path) -> None:
        self.entry = entry
        self.listener = listener
        self.socket = socket
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.entry.unlink(missing_ok=True)
            self.socket.unlink(missing_ok=True)


async def register(vm: VM, machine: Machine) -> Registration:
    """Write the VM's entry and start serving its socket (a background task of its machine)."""
    if machine.run_dir is None:
        raise OSError("the VM has no run directory")
    sock = machine.run_dir / SOCKET_NAME
    listener = UnixListener(sock)
    info = VMEntry(
        id=vm.id, pid=os.getpid(), qemu_pid=vm.qemu_pid, label=vm.label, created=vm.created, socket=str(sock),
        image=vm.image.build_id, memory_mb=vm.memory_mb, cpus=vm.cpus, rootfs=vm.rootfs,
        restored_from=vm.restored_from,
    )
    root = registry_dir()
    root.mkdir(parents=True, exist_ok=True)
    entry = root / f"{vm.id}.json"
    tmp = root / f".{vm.id}.tmp"
    tmp.write_text(json.dumps(asdict(info), indent=2) + "\n")
    os.replace(tmp, entry)
    reg = Registration(entry, listener, sock)
    machine.on_close(reg.close)
    machine.spawn("registry server", _serve, weakref.ref(vm), listener, critical=False)
    return reg


async def _serve(vm_ref: weakref.ref[VM], listener: UnixListener) -> None:
    """Serve the VM's socket. It holds the VM weakly: a VM its owner dropped is collected
    (and stopped) even while it is registered."""
    limit = anyio.Semaphore(MAX_CLIENTS)
    async with listener, anyio.create_task_group() as tg:
        while True:
            stream = await listener.accept()
            await limit.acquire()

            async def one(s: ByteStream = stream) -> None:
                try:
                    vm = vm_ref()
                    if vm is None:
                        await s.aclose()
                        return
                    await _handle(vm, s)
                finally:
                    limit.release()

            tg.start_soon(one)


class _PeerGone(Exception):
    """The other end of a registry connection closed it."""


class _Conn:
    """Framed messages over one socket; sends serialized by a lock."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self.pending: list[Message] = []
        self.lock = anyio.Lock()

    async def send(self, t: int, data: bytes = b"", **p: Any) -> None:
        async with self.lock:
            try:
                await self.stream.send(encode(Message(t, 0, p, data)))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise _PeerGone from exc

    async def receive(self) -> Message | None:
        """The next message, or None when the peer closed the connection."""
        while not self.pending:
            try:
                data = await self.stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return None
            try:
                self.decoder.feed(data)
                self.pending.extend(self.decoder.messages())
            except FrameError as exc:
                raise ProtocolError(f"malformed registry frame: {exc}", code=exc.code) from None
        return self.pending.pop(0)


async def _handle(vm: VM, stream: ByteStream) -> None:
    conn = _Conn(stream)
    async with stream:
        try:
            msg = await conn.receive()
            if msg is None:
                return
            if msg.t == S.INFO:
                await conn.send(S.INFO, id=vm.id, label=vm.label, running=vm.running)
            elif msg.t == S.EXEC:
                await _serve_exec(vm, conn, msg.p)
            elif msg.t == S.CHECKPOINT:
                t0 = time.monotonic()
                cp = await vm.checkpoint(str(msg.p["path"]), disk_only=bool(msg.p.get("disk_only")))
                await conn.send(S.DONE, path=str(cp.path), size=cp.size, kind=cp.kind,
                                seconds=time.monotonic() - t0)
            else:
                await conn.send(S.ERROR, code="unknown_request", message=f"unknown request type {msg.t}")
        except* _PeerGone:
            pass
        except* (GondolinError, KeyError, ValueError, TypeError, OSError) as group:
            exc = group.exceptions[0]
            with contextlib.suppress(_PeerGone):
                await conn.send(S.ERROR, code=str(getattr(exc, "code", "error")), message=str(exc))


async def _serve_exec(vm: VM, conn: _Conn, p: dict[str, Any]) -> None:
    command = p.get("command")
    if not (isinstance(command, str) or (isinstance(command, list) and all(isinstance(a, str) for a in command))):
        raise ValueError("command must be a string or a list of strings")
    want_stdin = bool(p.get("stdin"))
    proc = await vm.start(command, env=p.get("env") or None, cwd=p.get("cwd"), user=p.get("user"),
                          pty=bool(p.get("pty")), rows=int(p.get("rows") or 24), cols=int(p.get("cols") or 80),
                          timeout=p.get("timeout"), stdin=True if want_stdin else None, stdout="pipe", stderr="pipe")
    await proc.wait_started()  # so the client learns the guest pid
    finished = False
    try:
        await _pump_exec(proc, conn, want_stdin)
        finished = True
    except* _PeerGone:
        pass
    finally:
        if not finished:  # the client went away (or the pump failed): so does its command
            with anyio.CancelScope(shield=True), contextlib.suppress(GondolinError):
                await proc.kill()


async def _pump_exec(proc: Any, conn: _Conn, want_stdin: bool) -> None:
    async with anyio.create_task_group() as tg:
        async def from_client() -> None:
            while True:
                msg = await conn.receive()
                if msg is None:
                    raise _PeerGone
                if msg.t == S.STDIN and want_stdin:
                    await proc.write(msg.data)
                elif msg.t == S.STDIN_EOF and want_stdin:
                    await proc.close_stdin()
                elif msg.t == S.RESIZE:
                    await proc.resize(int(msg.p.get("rows") or 24), int(msg.p.get("cols") or 80))
                elif msg.t == S.SIGNAL:
                    await proc.signal(int(msg.p.get("signal") or 15))

        tg.start_soon(from_client)
        await conn.send(S.STARTED, pid=proc.pid or 0)
        async for chunk in proc:
            await conn.send(S.STDOUT if chunk.stream == "stdout" else S.STDERR, chunk.data)
        result = await proc.wait()
        await conn.send(S.EXIT, exit_code=result.exit_code, signal=result.signal, timed_out=result.timed_out)
        tg.cancel_scope.cancel()


# -- client side -----------------------------------------------------------------------
class RemoteProcess:
    """A command running in a VM owned by another process; the interface of
    :class:`gondolin.ExecProcess` that an interactive terminal needs."""

    def __init__(self, socket: str, request: dict[str, Any]) -> None:
        self._socket = socket
        self._request = request
        self._conn: _Conn | None = None
        self._result: ExecResult | None = None
        self._t0 = time.monotonic()
        self._out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.pid: int | None = None

    async def start(self) -> RemoteProcess:
        if self._conn is None:
            self._conn = await _connect(self._socket)
            await self._conn.send(S.EXEC, **self._request)
            msg = await self._conn.receive()
            _raise_if_error(msg)
            if msg is None or msg.t != S.STARTED:
                raise RegistryError("the VM's owner closed the connection before the command started")
            self.pid = int(msg.p.get("pid") or 0) or None
        return self

    async def write(self, data: bytes | str) -> None:
        conn = await self._started()
        await conn.send(S.STDIN, data.encode() if isinstance(data, str) else data)

    async def close_stdin(self) -> None:
        await (await self._started()).send(S.STDIN_EOF)

    async def resize(self, rows: int, cols: int) -> None:
        await (await self._started()).send(S.RESIZE, rows=rows, cols=cols)

    async def signal(self, signum: int) -> None:
        await (await self._started()).send(S.SIGNAL, signal=int(signum))

    async def _started(self) -> _Conn:
        await self.start()
        assert self._conn is not None
        return self._conn

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[OutputChunk]:
        conn = await self._started()
        while self._result is None:
            msg = await conn.receive()
            _raise_if_error(msg)
            if msg is None:
                raise RegistryError("the VM's owner closed the connection (did its process exit?)")
            if msg.t in (S.STDOUT, S.STDERR):
                yield OutputChunk("stdout" if msg.t == S.STDOUT else "stderr", msg.data)
            elif msg.t == S.EXIT:
                self._result = ExecResult(
                    exit_code=int(msg.p.get("exit_code", -1)), signal=msg.p.get("signal"),
                    stdout_bytes=b"".join(self._out["stdout"]), stderr_bytes=b"".join(self._out["stderr"]),
                    duration=time.monotonic() - self._t0, timed_out=bool(msg.p.get("timed_out")))
                with anyio.CancelScope(shield=True):
                    await conn.stream.aclose()

    async def wait(self) -> ExecResult:
        """Wait for the command to end; output not iterated over is collected into the result."""
        async for chunk in self:
            self._out[chunk.stream].append(chunk.data)
        if self._result is None:
            raise RegistryError("the command's result never arrived")
        if not self._result.stdout_bytes and self._out["stdout"]:
            self._result = ExecResult(self._result.exit_code, self._result.signal, b"".join(self._out["stdout"]),
                                      b"".join(self._out["stderr"]), self._result.duration, self._result.timed_out)
        return self._result

    def __await__(self) -> Generator[Any, None, ExecResult]:
        return self.wait().__await__()


class RemoteVM:
    """A running VM owned by another process, reached through its registry socket."""

    def __init__(self, info: VMEntry) -> None:
        self.info = info
        self.id = info.id

    @classmethod
    def find(cls, ident: str) -> RemoteVM:
        return cls(find_vm(ident))

    async def start(self, command: str | list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
             user: str | int | None = None, stdin: bool | None = None, pty: bool = False, rows: int = 24,
             cols: int = 80, timeout: float | None = None, stdout: str = "pipe", stderr: str = "pipe") -> RemoteProcess:
        """Start a command in the remote VM (the interface of :meth:`gondolin.VM.start`)."""
        request: dict[str, Any] = {"command": command, "pty": pty, "rows": rows, "cols": cols, "stdin": bool(stdin)}
        for key, value in (("env", env), ("cwd", cwd), ("user", user), ("timeout", timeout)):
            if value is not None:
                request[key] = value
        return await RemoteProcess(self.info.socket, request).start()

    async def checkpoint(self, path: str | os.PathLike[str], *, disk_only: bool = False) -> dict[str, Any]:
        """Ask the owner to save a checkpoint of the VM to ``path`` (absolute, on this host)."""
        conn = await _connect(self.info.socket)
        async with conn.stream:
            await conn.send(S.CHECKPOINT, path=os.path.abspath(os.fspath(path)), disk_only=disk_only)
            msg = await conn.receive()
            _raise_if_error(msg)
            if msg is None or msg.t != S.DONE:
                raise RegistryError("the VM's owner closed the connection before the checkpoint was saved")
            return dict(msg.p)


async def _connect(path: str) -> _Conn:
    try:
        stream = await connect_unix(path)
    except OSError as exc:
        raise RegistryError(f"cannot reach the VM's owner process at {path}: {exc}") from exc
    return _Conn(stream)


def _raise_if_error(msg: Message | None) -> None:
    """Turn the owner's ERROR reply into an exception that keeps its code."""
    if msg is not None and msg.t == S.ERROR:
        text = str(msg.p.get("message") or "the VM's owner refused the request")
        code = msg.p.get("code")
        raise GondolinError(text, code=str(code)) if code else RegistryError(text)
