"""Synchronous facade over :class:`gondolin.VM`, for scripts and notebooks without an event loop.

    from gondolin.sync import VM

    with VM.create() as vm:
        print(vm.exec("uname -a").stdout)
        vm.fs.write("/tmp/hello.txt", "hi")

Each sync VM runs its own event loop in a background (daemon) thread. Closing the VM stops
that thread; a VM that is never closed is closed when it is garbage collected or when the
interpreter exits, so a script that raises before ``close()`` still exits promptly.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar, Unpack

import anyio
from anyio.from_thread import BlockingPortal

from . import vm as _vm
from .errors import GondolinError
from .exec import ExecResult
from .fstypes import DirEntry, FileStat
from .ingress import IngressEvent, IngressGateway, Route, RouteTable
from .options import OptionChanges, VMOptions
from .ssh_access import SshAccess
from .streams import TcpForward

R = TypeVar("R")
CLOSE_AT_EXIT_TIMEOUT = 15.0  # seconds an exit handler waits for one VM to close
_OPEN: weakref.WeakSet[_Loop] = weakref.WeakSet()


class _Loop:
    """An event loop in a daemon thread, reached through a blocking portal."""

    def __init__(self) -> None:
        ready: concurrent.futures.Future[BlockingPortal] = concurrent.futures.Future()
        self._stop: anyio.Event | None = None

        async def main() -> None:
            async with BlockingPortal() as portal:
                self._stop = anyio.Event()
                ready.set_result(portal)
                await self._stop.wait()

        def run() -> None:
            try:
                anyio.run(main)
            except BaseException as exc:  # noqa: BLE001 - reported to the thread that waits
                if not ready.done():
                    ready.set_exception(exc)

        self._thread = threading.Thread(target=run, name="gondolin-sync-vm", daemon=True)
        self._thread.start()
        self.portal = ready.result()
        _OPEN.add(self)

    def call(self, fn: Callable[[], Awaitable[R]], timeout: float | None = None) -> R:
        future = self.portal.start_task_soon(fn)
        return future.result(timeout)

    def stop(self) -> None:
        if self._thread.is_alive() and self._stop is not None:
            stop = self._stop
            try:
                self.portal.call(stop.set)
            except RuntimeError:
                return  # the loop is already gone
            self._thread.join(5.0)
        _OPEN.discard(self)


class SyncFS:
    """Blocking twin of ``vm.fs``."""

    def __init__(self, vm: VM) -> None:
        self._vm = vm

    def _call(self, name: str, *args: Any, **kw: Any) -> Any:
        fn = getattr(self._vm._async.fs, name)
        return self._vm._loop.call(lambda: fn(*args, **kw))

    def read_bytes(self, path: str, **kw: Any) -> bytes:
        return self._call("read_bytes", path, **kw)  # type: ignore[no-any-return]

    def read_text(self, path: str, **kw: Any) -> str:
        return self._call("read_text", path, **kw)  # type: ignore[no-any-return]

    def write(self, path: str, data: bytes | str, **kw: Any) -> int:
        return self._call("write", path, data, **kw)  # type: ignore[no-any-return]

    def stat(self, path: str, **kw: Any) -> FileStat:
        return self._call("stat", path, **kw)  # type: ignore[no-any-return]

    def exists(self, path: str) -> bool:
        return self._call("exists", path)  # type: ignore[no-any-return]

    def listdir(self, path: str) -> list[str]:
        return self._call("listdir", path)  # type: ignore[no-any-return]

    def scandir(self, path: str) -> list[DirEntry]:
        return self._call("scandir", path)  # type: ignore[no-any-return]

    def mkdir(self, path: str, **kw: Any) -> None:
        self._call("mkdir", path, **kw)

    def rename(self, src: str, dst: str) -> None:
        self._call("rename", src, dst)

    def remove(self, path: str, **kw: Any) -> bool:
        return self._call("remove", path, **kw)  # type: ignore[no-any-return]

    def upload(self, host_path: str, guest_path: str, **kw: Any) -> int:
        return self._call("upload", host_path, guest_path, **kw)  # type: ignore[no-any-return]

    def download(self, guest_path: str, host_path: str) -> int:
        return self._call("download", guest_path, host_path)  # type: ignore[no-any-return]


class SyncForward:
    """Blocking twin of :class:`gondolin.streams.TcpForward`: ``host``, ``port``, ``close()``."""

    def __init__(self, loop: _Loop, forward: TcpForward) -> None:
        self._loop = loop
        self._forward = forward
        self.host = forward.host
        self.port = forward.port
        self.guest_port = forward.guest_port

    def close(self) -> None:
        self._loop.call(self._forward.close)

    def __repr__(self) -> str:
        return repr(self._forward)


class SyncGateway:
    """Blocking twin of :class:`gondolin.ingress.IngressGateway`: ``url``, ``routes``,
    ``set_routes()``, ``events()``, ``close()``."""

    def __init__(self, loop: _Loop, gateway: IngressGateway) -> None:
        self._loop = loop
        self._gateway = gateway
        self.host = gateway.host
        self.port = gateway.port

    @property
    def url(self) -> str:
        return self._gateway.url

    @property
    def routes(self) -> RouteTable:
        return self._gateway.routes

    def set_routes(self, routes: RouteTable | Mapping[str, int] | Iterable[Route] | None) -> None:
        self._loop.call(lambda: _now(self._gateway.set_routes, routes))

    def events(self) -> list[IngressEvent]:
        return self._gateway.events()

    def close(self) -> None:
        self._loop.call(self._gateway.close)

    def __enter__(self) -> SyncGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._gateway)


async def _now(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a plain function on the VM's loop (where the object it changes lives)."""
    return fn(*args)


def _close_quietly(loop: _Loop, async_vm: _vm.VM | None) -> None:
    """Finalizer and exit handler: close the VM (bounded) and stop its loop."""
    try:
        if async_vm is not None:
            loop.call(async_vm.discard, timeout=CLOSE_AT_EXIT_TIMEOUT)
    except (GondolinError, RuntimeError, concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
        pass
    finally:
        loop.stop()


class VM:
    """Blocking twin of :class:`gondolin.VM`; same options, same results."""

    def __init__(self, loop: _Loop, async_vm: _vm.VM) -> None:
        self._loop = loop
        self._async = async_vm
        self.fs = SyncFS(self)
        self._finalizer = weakref.finalize(self, _close_quietly, loop, async_vm)

    @classmethod
    def create(cls, options: VMOptions | None = None, /, **changes: Unpack[OptionChanges]) -> VM:
        """Start a VM (see :meth:`gondolin.VM.create`: the same options)."""
        loop = _Loop()
        try:
            async_vm = loop.call(lambda: _vm.VM.create(options, **changes))
        except BaseException:
            loop.stop()
            raise
        return cls(loop, async_vm)

    @property
    def id(self) -> str:
        return self._async.id

    @property
    def running(self) -> bool:
        return self._async.running

    @property
    def options(self) -> VMOptions:
        return self._async.options

    @property
    def qemu_pid(self) -> int | None:
        return self._async.qemu_pid

    def exec(self, command: str | list[str], **kw: Any) -> ExecResult:
        """Run a command to completion (see :meth:`gondolin.VM.exec`; ``stdin`` may be bytes/str)."""
        if kw.get("stdout") == "pipe" or kw.get("stderr") == "pipe":
            raise ValueError("the sync facade buffers output; use exec_lines() to stream")
        return self._loop.call(lambda: self._async.exec(command, **kw))

    def exec_lines(self, command: str | list[str], **kw: Any) -> Iterator[str]:
        """Run a command and yield its stdout line by line as it arrives."""
        kw["stdout"] = "pipe"
        proc = self._loop.call(lambda: self._async.start(command, **kw))
        agen = proc.lines()
        try:
            while True:
                try:
                    yield self._loop.call(agen.__anext__)
                except StopAsyncIteration:
                    break
            self._loop.call(proc.wait)
        finally:
            self._loop.call(agen.aclose)  # type: ignore[attr-defined]

    def forward_tcp(self, guest_port: int, host: str = "127.0.0.1", host_port: int = 0, *,
                    allow_remote: bool = False) -> SyncForward:
        """Relay a host listener to a guest loopback port (see :meth:`gondolin.VM.forward_tcp`)."""
        fwd = self._loop.call(lambda: self._async.forward_tcp(guest_port, host, host_port,
                                                              allow_remote=allow_remote))
        return SyncForward(self._loop, fwd)

    def expose_http(self, port: int | None = None, **kw: Any) -> SyncGateway:
        """Serve the guest's HTTP servers on a host listener (see :meth:`gondolin.VM.expose_http`:
        the same keywords); it stops when the VM closes."""
        gateway = self._loop.call(lambda: self._async.expose_http(port, **kw))
        return SyncGateway(self._loop, gateway)

    def enable_ssh(self, user: str = "agent", **kw: Any) -> SshAccess:
        """Start sshd in the guest and return the ready ``ssh`` command (see
        :meth:`gondolin.VM.enable_ssh`); it stops when the VM closes."""
        return self._loop.call(lambda: self._async.enable_ssh(user, **kw))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``await fn(async_vm, *args)`` on the VM's event loop (escape hatch to the async API)."""
        return self._loop.call(lambda: fn(self._async, *args))

    def close(self) -> None:
        """Stop the VM (raises what killed it, as :meth:`gondolin.VM.close` does)."""
        if not self._finalizer.alive:
            return
        self._finalizer.detach()
        try:
            self._loop.call(self._async.close)
        finally:
            self._loop.stop()

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _stop_loops_at_exit() -> None:
    """Open VMs were closed by their finalizers (weakref runs those at exit); stop what is left."""
    for loop in list(_OPEN):
        loop.stop()


__all__ = ["VM", "SyncFS"]
