"""ReadonlyProvider: any provider, with every write refused with EROFS."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import EROFS, VfsError
from .provider import (
    ROOT,
    W_OK,
    Attr,
    Caller,
    DirectIO,
    FileHandle,
    HandleWrapper,
    OpenMode,
    ProviderWrapper,
    SetAttr,
)


class ReadonlyProvider(ProviderWrapper):
    @property
    def readonly(self) -> bool:
        return True

    async def access(self, path: str, mask: int, caller: Caller = ROOT) -> None:
        await self.inner.access(path, mask & ~W_OK, caller)
        if mask & W_OK:
            raise VfsError(EROFS)

    async def open(self, path: str, mode: OpenMode) -> FileHandle:
        if mode.writes:
            raise VfsError(EROFS)
        return _ReadonlyHandle(await self.inner.open(path, mode))

    async def setattr(self, path: str, changes: SetAttr) -> Attr:
        raise VfsError(EROFS)

    async def create(
        self, path: str, mode: int, open_mode: OpenMode, caller: Caller = ROOT
    ) -> FileHandle:
        raise VfsError(EROFS)

    async def mkdir(self, path: str, mode: int, caller: Caller = ROOT) -> Attr:
        raise VfsError(EROFS)

    async def symlink(self, path: str, target: str, caller: Caller = ROOT) -> Attr:
        raise VfsError(EROFS)

    async def link(self, src: str, dst: str) -> Attr:
        raise VfsError(EROFS)

    async def unlink(self, path: str) -> None:
        raise VfsError(EROFS)

    async def rmdir(self, path: str) -> None:
        raise VfsError(EROFS)

    async def rename(self, src: str, dst: str, flags: int = 0) -> None:
        raise VfsError(EROFS)


class _ReadonlyDirect(DirectIO):
    def __init__(self, inner: DirectIO) -> None:
        self.inner = inner

    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> int:
        return self.inner.readinto(offset, buffers)

    def writefrom(self, offset: int, buffers: Sequence[memoryview]) -> int:
        raise VfsError(EROFS)


class _ReadonlyHandle(HandleWrapper):
    def direct_io(self) -> DirectIO | None:
        inner = self.inner.direct_io()
        return None if inner is None else _ReadonlyDirect(inner)

    async def write(self, offset: int, data: bytes) -> int:
        raise VfsError(EROFS)

    async def setattr(self, changes: SetAttr) -> Attr:
        raise VfsError(EROFS)

    async def fallocate(self, offset: int, length: int, mode: int) -> None:
        raise VfsError(EROFS)
