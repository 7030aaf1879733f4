"""Synchronous facade over :class:`gondolin.VM`, for scripts and notebooks without an event loop.

    from gondolin.sync import VM

    with VM.create() as vm:
        print(vm.exec("uname -a").stdout)
        vm.fs.write("/tmp/hello.txt", "hi")

Each sync VM runs its own event loop in a background thread (an anyio blocking portal);
closing the VM stops that thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from . import vm as _vm
from .exec import ExecResult
from .fs import DirEntry, FileStat

R = TypeVar("R")


class SyncFS:
    def __init__(self, vm: VM) -> None:
        self._vm = vm

    def _call(self, name: str, *args: Any, **kw: Any) -> Any:
        fn = getattr(self._vm._async.fs, name)
        return self._vm._portal.call(lambda: fn(*args, **kw))

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


class VM:
    """Blocking twin of :class:`gondolin.VM`; same options, same results."""

    def __init__(self, portal: BlockingPortal, cm: contextlib.AbstractContextManager[BlockingPortal],
                 async_vm: _vm.VM) -> None:
        self._portal = portal
        self._portal_cm = cm
        self._async = async_vm
        self.fs = SyncFS(self)

    @classmethod
    def create(cls, **options: Any) -> VM:
        cm = start_blocking_portal("asyncio")
        portal = cm.__enter__()
        try:
            async_vm = portal.call(lambda: _vm.VM.create(**options))
        except BaseException as exc:
            cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return cls(portal, cm, async_vm)

    @property
    def id(self) -> str:
        return self._async.id

    @property
    def running(self) -> bool:
        return self._async.running

    def exec(self, command: str | list[str], **kw: Any) -> ExecResult:
        """Run a command to completion (see :meth:`gondolin.VM.exec`; ``stdin`` may be bytes/str)."""
        if kw.get("stdout") == "pipe" or kw.get("stderr") == "pipe":
            raise ValueError("the sync facade buffers output; use exec_lines() to stream")

        async def run() -> ExecResult:
            return await self._async.exec(command, **kw)

        return self._portal.call(run)

    def exec_lines(self, command: str | list[str], **kw: Any) -> Iterator[str]:
        """Run a command and yield its stdout line by line as it arrives."""
        kw["stdout"] = "pipe"
        proc = self._async.exec(command, **kw)
        agen = proc.lines()
        try:
            while True:
                try:
                    yield self._portal.call(agen.__anext__)
                except StopAsyncIteration:
                    break
            self._portal.call(proc.wait)
        finally:
            self._portal.call(agen.aclose)  # type: ignore[attr-defined,call-arg]

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``await fn(async_vm, *args)`` on the VM's event loop (escape hatch to the async API)."""
        return self._portal.call(lambda: fn(self._async, *args))

    def close(self) -> None:
        try:
            self._portal.call(self._async.close)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["VM", "SyncFS"]
