"""HookedProvider: before/after callbacks around every operation, able to deny with an errno.

A hook is a plain or async callable. ``before(event)`` runs first: returning a non-zero
errno (or raising :class:`VfsError`) denies the operation, which then never reaches the
provider. ``after(event, errno)`` runs once the provider has answered (``errno`` 0 on
success); returning a non-zero errno turns the answer into that error, but the operation's
effects have already happened. Handle operations (``read``, ``write``, ...) carry the path
the file was opened under.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import VfsError
from .provider import (
    ROOT,
    Attr,
    Caller,
    Dirent,
    FileHandle,
    HandleWrapper,
    OpenMode,
    Provider,
    ProviderWrapper,
    SetAttr,
    StatFs,
    current_caller,
)

T = TypeVar("T")

OPS = frozenset(
    {
        "getattr", "readdir", "readlink", "statfs", "access", "open", "create", "setattr",
        "mkdir", "symlink", "link", "unlink", "rmdir", "rename",
        # on an open file
        "read", "write", "fsetattr", "fsync", "fallocate", "release",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class HookEvent:
    op: str
    path: str
    new_path: str | None = None  # rename / link destination
    target: str | None = None  # symlink target
    mode: int | None = None  # create / mkdir permission bits, access mask
    open_mode: OpenMode | None = None
    changes: SetAttr | None = None
    offset: int | None = None
    size: int | None = None  # read size, write length
    data: bytes | None = None  # write payload
    flags: int = 0  # rename flags, fallocate mode
    caller: Caller = ROOT


HookResult = int | None
BeforeHook = Callable[[HookEvent], HookResult | Awaitable[HookResult]]
AfterHook = Callable[[HookEvent, int], HookResult | Awaitable[HookResult]]


async def _call(fn: Callable[..., object], *args: object) -> HookResult:
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    if result is not None and not isinstance(result, int):
        raise TypeError(f"hook returned {result!r}; expected an errno or None")
    return result


class HookedProvider(ProviderWrapper):
    """Run ``before``/``after`` around the operations in ``ops`` (all of :data:`OPS` by default)."""

    def __init__(
        self,
        inner: Provider,
        *,
        before: BeforeHook | None = None,
        after: AfterHook | None = None,
        ops: Iterable[str] | None = None,
    ) -> None:
        super().__init__(inner)
        self.before = before
        self.after = after
        self.ops = OPS if ops is None else frozenset(ops)
        unknown = self.ops - OPS
        if unknown:
            raise ValueError(f"unknown ops: {sorted(unknown)}")

    async def run(
        self,
        event: HookEvent,
        action: Callable[[], Awaitable[T]],
        undo: Callable[[T], Awaitable[None]] | None = None,
    ) -> T:
        """Run ``action`` between the hooks; ``undo`` releases its result if ``after`` denies."""
        if event.op not in self.ops:
            return await action()
        if self.before is not None:
            denied = await _call(self.before, event)
            if denied:
                raise VfsError(denied)
        try:
            result = await action()
        except VfsError as exc:
            if self.after is not None:
                override = await _call(self.after, event, exc.errno or 0)
                if override:
                    raise VfsError(override) from exc
            raise
        if self.after is not None:
            override = await _call(self.after, event, 0)
            if override:
                if undo is not None:
                    await undo(result)
                raise VfsError(override)
        return result

    def _event(self, op: str, path: str, **kw: object) -> HookEvent:
        return HookEvent(op, path, caller=current_caller.get(), **kw)  # type: ignore[arg-type]

    async def getattr(self, path: str) -> Attr:
        return await self.run(self._event("getattr", path), lambda: self.inner.getattr(path))

    async def readdir(self, path: str) -> Sequence[Dirent]:
        return await self.run(self._event("readdir", path), lambda: self.inner.readdir(path))

    async def readlink(self, path: str) -> str:
        return await self.run(self._event("readlink", path), lambda: self.inner.readlink(path))

    async def statfs(self, path: str) -> StatFs:
        return await self.run(self._event("statfs", path), lambda: self.inner.statfs(path))

    async def access(self, path: str, mask: int, caller: Caller = ROOT) -> None:
        await self.run(
            self._event("access", path, mode=mask),
            lambda: self.inner.access(path, mask, caller),
        )

    async def open(self, path: str, mode: OpenMode) -> FileHandle:
        handle = await self.run(
            self._event("open", path, open_mode=mode),
            lambda: self.inner.open(path, mode),
            _release,
        )
        return _HookedHandle(handle, self, path)

    async def create(
        self, path: str, mode: int, open_mode: OpenMode, caller: Caller = ROOT
    ) -> FileHandle:
        handle = await self.run(
            self._event("create", path, mode=mode, open_mode=open_mode),
            lambda: self.inner.create(path, mode, open_mode, caller),
            _release,
        )
        return _HookedHandle(handle, self, path)

    async def setattr(self, path: str, changes: SetAttr) -> Attr:
        return await self.run(
            self._event("setattr", path, changes=changes),
            lambda: self.inner.setattr(path, changes),
        )

    async def mkdir(self, path: str, mode: int, caller: Caller = ROOT) -> Attr:
        return await self.run(
            self._event("mkdir", path, mode=mode), lambda: self.inner.mkdir(path, mode, caller)
        )

    async def symlink(self, path: str, target: str, caller: Caller = ROOT) -> Attr:
        return await self.run(
            self._event("symlink", path, target=target),
            lambda: self.inner.symlink(path, target, caller),
        )

    async def link(self, src: str, dst: str) -> Attr:
        return await self.run(
            self._event("link", src, new_path=dst), lambda: self.inner.link(src, dst)
        )

    async def unlink(self, path: str) -> None:
        await self.run(self._event("unlink", path), lambda: self.inner.unlink(path))

    async def rmdir(self, path: str) -> None:
        await self.run(self._event("rmdir", path), lambda: self.inner.rmdir(path))

    async def rename(self, src: str, dst: str, flags: int = 0) -> None:
        await self.run(
            self._event("rename", src, new_path=dst, flags=flags),
            lambda: self.inner.rename(src, dst, flags),
        )


class _HookedHandle(HandleWrapper):
    def __init__(self, inner: FileHandle, hooks: HookedProvider, path: str) -> None:
        super().__init__(inner)
        self._hooks = hooks
        self._path = path

    def _event(self, op: str, **kw: object) -> HookEvent:
        return self._hooks._event(op, self._path, open_mode=self.mode, **kw)

    async def read(self, offset: int, size: int) -> bytes:
        return await self._hooks.run(
            self._event("read", offset=offset, size=size), lambda: self.inner.read(offset, size)
        )

    async def write(self, offset: int, data: bytes) -> int:
        return await self._hooks.run(
            self._event("write", offset=offset, size=len(data), data=data),
            lambda: self.inner.write(offset, data),
        )

    async def setattr(self, changes: SetAttr) -> Attr:
        return await self._hooks.run(
            self._event("fsetattr", changes=changes), lambda: self.inner.setattr(changes)
        )

    async def fsync(self, datasync: bool) -> None:
        await self._hooks.run(self._event("fsync"), lambda: self.inner.fsync(datasync))

    async def fallocate(self, offset: int, length: int, mode: int) -> None:
        await self._hooks.run(
            self._event("fallocate", offset=offset, size=length, flags=mode),
            lambda: self.inner.fallocate(offset, length, mode),
        )

    async def release(self) -> None:
        try:
            await self._hooks.run(self._event("release"), self.inner.release)
        finally:
            await self.inner.release()  # a denied release must not leak the handle


async def _release(handle: FileHandle) -> None:
    await handle.release()
