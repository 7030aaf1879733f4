"""ShadowProvider: hide paths, deny writes to paths, or keep writes to paths in memory.

Each rule is a predicate over provider paths: a callable, or globs (see
:func:`gondolin.vfs.paths.matcher`: ``".env"``, ``"*.pem"``, ``"/secrets/**"``). A path is
covered when it or an ancestor matches.

- ``hide``: the path does not exist (ENOENT, left out of listings) and cannot be created
  (``deny_errno``) unless ``redirect_writes_to_memory`` also covers it, in which case the
  guest may create its own file there, kept in memory.
- ``deny_writes``: visible and readable; every change fails with ``deny_errno``. Wins over
  the redirect rule.
- ``redirect_writes_to_memory``: reads see the inner provider until the guest writes; the
  written copy lives in memory (see :class:`~gondolin.vfs.overlay.OverlayProvider`).

Symlinks cannot bypass a rule: providers never follow them, and the guest kernel resolves
a link to the path it names, which is checked like any other. Renaming a directory that
contains covered paths is refused, since it would move them out from under their rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from . import paths
from .errors import EACCES, ENOENT, VfsError
from .memory import MemoryProvider
from .overlay import OverlayProvider, walk
from .provider import (
    ROOT,
    Attr,
    Caller,
    Dirent,
    FileHandle,
    OpenMode,
    Provider,
    ProviderWrapper,
    SetAttr,
    StatFs,
)

MAX_RENAME_SCAN = 100_000  # entries checked under a directory being renamed

Rule = paths.PathPredicate | str | Iterable[str] | None


async def _covers_subtree(provider: Provider, path: str, covered: paths.PathPredicate) -> bool:
    seen = 0
    async for sub, _ in walk(provider, path):
        seen += 1
        if covered(sub) or seen > MAX_RENAME_SCAN:
            return True
    return False


class _Hide(ProviderWrapper):
    def __init__(self, inner: Provider, hidden: paths.PathPredicate, errno: int) -> None:
        super().__init__(inner)
        self.hidden = hidden
        self.errno = errno

    def _absent(self, path: str) -> None:
        if self.hidden(path):
            raise VfsError(ENOENT)

    def _no_create(self, path: str) -> None:
        if self.hidden(path):
            raise VfsError(self.errno)

    async def getattr(self, path: str) -> Attr:
        self._absent(path)
        return await self.inner.getattr(path)

    async def readdir(self, path: str) -> Sequence[Dirent]:
        self._absent(path)
        return [
            e for e in await self.inner.readdir(path) if not self.hidden(paths.child(path, e.name))
        ]

    async def open(self, path: str, mode: OpenMode) -> FileHandle:
        self._absent(path)
        return await self.inner.open(path, mode)

    async def readlink(self, path: str) -> str:
        self._absent(path)
        return await self.inner.readlink(path)

    async def statfs(self, path: str) -> StatFs:
        self._absent(path)
        return await self.inner.statfs(path)

    async def access(self, path: str, mask: int, caller: Caller = ROOT) -> None:
        self._absent(path)
        await self.inner.access(path, mask, caller)

    async def setattr(self, path: str, changes: SetAttr) -> Attr:
        self._absent(path)
        return await self.inner.setattr(path, changes)

    async def create(
        self, path: str, mode: int, open_mode: OpenMode, caller: Caller = ROOT
    ) -> FileHandle:
        self._no_create(path)
        return await self.inner.create(path, mode, open_mode, caller)

    async def mkdir(self, path: str, mode: int, caller: Caller = ROOT) -> Attr:
        self._no_create(path)
        return await self.inner.mkdir(path, mode, caller)

    async def symlink(self, path: str, target: str, caller: Caller = ROOT) -> Attr:
        self._no_create(path)
        return await self.inner.symlink(path, target, caller)

    async def link(self, src: str, dst: str) -> Attr:
        self._absent(src)
        self._no_create(dst)
        return await self.inner.link(src, dst)

    async def unlink(self, path: str) -> None:
        self._absent(path)
        await self.inner.unlink(path)

    async def rmdir(self, path: str) -> None:
        self._absent(path)
        await self.inner.rmdir(path)

    async def rename(self, src: str, dst: str, flags: int = 0) -> None:
        self._absent(src)
        self._no_create(dst)
        if await _covers_subtree(self.inner, src, self.hidden) or await _covers_subtree(
            self.inner, dst, self.hidden
        ):
            raise VfsError(self.errno)
        await self.inner.rename(src, dst, flags)


class _Deny(ProviderWrapper):
    def __init__(self, inner: Provider, denied: paths.PathPredicate, errno: int) -> None:
        super().__init__(inner)
        self.denied = denied
        self.errno = errno

    def _check(self, *targets: str) -> None:
        if any(self.denied(p) for p in targets):
            raise VfsError(self.errno)

    async def open(self, path: str, mode: OpenMode) -> FileHandle:
        if mode.writes:
            self._check(path)
        return await self.inner.open(path, mode)

    async def setattr(self, path: str, changes: SetAttr) -> Attr:
        self._check(path)
        return await self.inner.setattr(path, changes)

    async def create(
        self, path: str, mode: int, open_mode: OpenMode, caller: Caller = ROOT
    ) -> FileHandle:
        self._check(path)
        return await self.inner.create(path, mode, open_mode, caller)

    async def mkdir(self, path: str, mode: int, caller: Caller = ROOT) -> Attr:
        self._check(path)
        return await self.inner.mkdir(path, mode, caller)

    async def symlink(self, path: str, target: str, caller: Caller = ROOT) -> Attr:
        self._check(path)
        return await self.inner.symlink(path, target, caller)

    async def link(self, src: str, dst: str) -> Attr:
        self._check(src, dst)  # a second name for a protected file would be writable
        return await self.inner.link(src, dst)

    async def unlink(self, path: str) -> None:
        self._check(path)
        await self.inner.unlink(path)

    async def rmdir(self, path: str) -> None:
        self._check(path)
        await self.inner.rmdir(path)

    async def rename(self, src: str, dst: str, flags: int = 0) -> None:
        self._check(src, dst)
        if await _covers_subtree(self.inner, src, self.denied) or await _covers_subtree(
            self.inner, dst, self.denied
        ):
            raise VfsError(self.errno)
        await self.inner.rename(src, dst, flags)


class ShadowProvider(ProviderWrapper):
    def __init__(
        self,
        inner: Provider,
        *,
        hide: Rule = None,
        deny_writes: Rule = None,
        redirect_writes_to_memory: Rule = None,
        deny_errno: int = EACCES,
        memory: MemoryProvider | None = None,
    ) -> None:
        self.hidden = paths.matcher(hide)
        self.denied = paths.matcher(deny_writes)
        self.redirected = paths.matcher(redirect_writes_to_memory)
        self.source = inner
        view: Provider = inner
        if hide is not None:
            view = _Hide(view, self.hidden, deny_errno)
        self.overlay: OverlayProvider | None = None
        if redirect_writes_to_memory is not None:
            self.overlay = OverlayProvider(view, memory, redirect=self.redirected)
            view = self.overlay
        if deny_writes is not None:
            view = _Deny(view, self.denied, deny_errno)
        super().__init__(view)
