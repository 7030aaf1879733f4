"""OverlayProvider: a lower provider seen through an in-memory upper layer.

Writes to paths the ``redirect`` predicate selects land in the upper :class:`MemoryProvider`;
everything else goes to the lower provider as usual. Reading merges both: an upper entry
hides the lower one at the same path, directories present in both list the union. Deleting
a lower entry *masks* it: the path and everything below it in the lower layer become
invisible. Modifying a lower file first copies it up (content, mode, owner, times).

Renaming a directory that still has lower content fails with EXDEV, like Linux overlayfs
without ``redirect_dir``; ``mv`` then falls back to copy and delete. Hard links between a
lower file and its copy-up are not preserved. The ``redirect`` predicate should be closed
under descendants (a glob from :func:`gondolin.vfs.paths.matcher` is).
"""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import anyio

from . import paths
from .errors import (
    EACCES,
    EBUSY,
    EEXIST,
    EINVAL,
    EISDIR,
    ENOENT,
    ENOTDIR,
    ENOTEMPTY,
    EPERM,
    EXDEV,
    VfsError,
)
from .memory import MemoryProvider
from .provider import (
    MAX_IO,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT,
    Attr,
    Caller,
    DirectIO,
    Dirent,
    FileHandle,
    HandleWrapper,
    OpenMode,
    Provider,
    SetAttr,
    StatFs,
    check_rename_flags,
)

T = TypeVar("T")

UPPER_INO = 1 << 62  # xor-ed into upper inode numbers so they never equal a lower one
_COPY_MODE = OpenMode(read=True, write=True, exclusive=True)
_READ = OpenMode()


async def probe(call: Callable[[str], Awaitable[T]], path: str) -> T | None:
    """``call(path)``, or None when the path does not exist."""
    try:
        return await call(path)
    except VfsError as exc:
        if exc.errno in (ENOENT, ENOTDIR):
            return None
        raise


def _tag(attr: Attr) -> Attr:
    return replace(attr, ino=attr.ino ^ UPPER_INO)


def _is_dir(attr: Attr | None) -> bool:
    return attr is not None and stat.S_ISDIR(attr.mode)


class OverlayProvider(Provider):
    def __init__(
        self,
        lower: Provider,
        upper: MemoryProvider | None = None,
        *,
        redirect: paths.PathPredicate = paths.always,
    ) -> None:
        self.lower = lower
        self.upper = upper if upper is not None else MemoryProvider()
        self.redirect = redirect
        self._masked: set[str] = set()
        # Lower attributes at the moment a path was first copied up or masked (None: it was
        # absent), so a commit can tell whether the host changed it since.
        self._base: dict[str, Attr | None] = {}
        self._root_ready = False  # the upper root has the lower root's mode/owner
        self._lock = anyio.Lock()  # one mutation at a time: they are multi-step

    def _reset(self, upper: MemoryProvider) -> None:
        self.upper = upper
        self._masked.clear()
        self._base.clear()
        self._root_ready = False

    # --- the merged view ---------------------------------------------------------------------

    def _is_masked(self, parts: Sequence[str]) -> bool:
        if not self._masked:
            return False
        p = ""
        for name in parts:
            p += "/" + name
            if p in self._masked:
                return True
        return False

    async def _layers(self, path: str) -> tuple[Attr | None, Attr | None]:
        """(upper attr, visible lower attr) of ``path``."""
        parts = paths.split(path)
        up = await probe(self.upper.getattr, path) if parts or self._root_ready else None
        lo = None if self._is_masked(parts) else await probe(self.lower.getattr, path)
        return up, lo

    def _merge(self, path: str, up: Attr | None, lo: Attr | None) -> Attr | None:
        if up is None:
            return lo
        if lo is not None and _is_dir(up) and _is_dir(lo):
            # A directory in both layers: keep the lower inode number; the link count is
            # unknown, which (like btrfs) we say with 1.
            src = up if self.redirect(path) or not paths.split(path) else lo
            return replace(src, ino=lo.ino, nlink=1)
        return _tag(up)

    async def _attr(self, path: str) -> Attr | None:
        up, lo = await self._layers(path)
        return self._merge(path, up, lo)

    async def _existing(self, path: str) -> Attr:
        attr = await self._attr(path)
        if attr is None:
            raise await self._missing(path)
        return attr

    async def _missing(self, path: str) -> VfsError:
        """ENOENT, or ENOTDIR when the nearest existing ancestor is not a directory."""
        parts = paths.split(path)
        for depth in range(len(parts) - 1, 0, -1):
            attr = await self._attr(paths.join(parts[:depth]))
            if attr is not None:
                return VfsError(ENOENT if _is_dir(attr) else ENOTDIR)
        return VfsError(ENOENT)

    async def _dir(self, path: str) -> Attr:
        attr = await self._existing(path)
        if not _is_dir(attr):
            raise VfsError(ENOTDIR)
        return attr

    async def getattr(self, path: str) -> Attr:
        return await self._existing(path)

    async def readdir(self, path: str) -> list[Dirent]:
        up, lo = await self._layers(path)
        merged = self._merge(path, up, lo)
        if merged is None:
            raise await self._missing(path)
        if not _is_dir(merged):
            raise VfsError(ENOTDIR)
        lower: dict[str, Attr] = {}
        if _is_dir(lo):
            for ent in await self.lower.readdir(path):
                if paths.child(path, ent.name) not in self._masked:
                    lower[ent.name] = ent.attr
        out = []
        if _is_dir(up):
            for ent in await self.upper.readdir(path):
                child = paths.child(path, ent.name)
                attr = self._merge(child, ent.attr, lower.pop(ent.name, None))
                assert attr is not None
                out.append(Dirent(ent.name, attr))
        out.extend(Dirent(name, attr) for name, attr in lower.items())
        return out

    async def readlink(self, path: str) -> str:
        up, lo = await self._layers(path)
        if up is not None:
            return await self.upper.readlink(path)
        if lo is not None:
            return await self.lower.readlink(path)
        raise await self._missing(path)

    async def statfs(self, path: str) -> StatFs:
        return await self.lower.statfs("/")

    async def open(self, path: str, mode: OpenMode) -> FileHandle:
        if mode.writes and self.redirect(path):
            async with self._lock:
                await self._copy_up(path, data=not mode.truncate)
            return _UpperHandle(await self.upper.open(path, mode))
        up, lo = await self._layers(path)
        if up is not None:
            return _UpperHandle(await self.upper.open(path, mode))
        if lo is not None:
            return await self.lower.open(path, mode)
        raise await self._missing(path)

    # --- copy-up -----------------------------------------------------------------------------

    async def _copy_up(self, path: str, *, data: bool = True) -> Attr:
        """Make sure ``path`` exists in the upper layer; return its upper attributes."""
        up, lo = await self._layers(path)
        if up is not None:
            return up
        if lo is None:
            raise await self._missing(path)
        parts = paths.split(path)
        if parts:
            parent = await self._copy_up(paths.join(parts[:-1]))
            if not _is_dir(parent):
                raise VfsError(ENOTDIR)
        if stat.S_ISDIR(lo.mode):
            if parts:
                await self.upper.mkdir(path, lo.mode & 0o7777)
            else:
                self._root_ready = True
        elif stat.S_ISLNK(lo.mode):
            await self.upper.symlink(path, await self.lower.readlink(path))
        elif stat.S_ISREG(lo.mode):
            await self._copy_file(path, data)
        else:
            raise VfsError(EACCES, "special files cannot be copied up")
        changes = SetAttr(uid=lo.uid, gid=lo.gid, atime_ns=lo.atime_ns, mtime_ns=lo.mtime_ns)
        if not stat.S_ISLNK(lo.mode):
            changes = replace(changes, mode=lo.mode & 0o7777)
        self._base.setdefault(path, lo)
        return await self.upper.setattr(path, changes)

    async def _copy_file(self, path: str, data: bool) -> None:
        dst = await self.upper.create(path, 0o600, _COPY_MODE)
        try:
            if data:
                src = await self.lower.open(path, _READ)
                try:
                    offset = 0
                    while chunk := await src.read(offset, MAX_IO):
                        await dst.write(offset, chunk)
                        offset += len(chunk)
                finally:
                    await src.release()
        finally:
            await dst.release()

    def _mask(self, path: str, lower: Attr) -> None:
        self._masked.add(path)
        self._base.setdefault(path, lower)

    async def _prepare_new(self, path: str) -> None:
        """Checks for creating ``path``: absent, parent a directory; copy the parent up."""
        parts = paths.split(path)
        if not parts:
            raise VfsError(EEXIST)
        parent = paths.join(parts[:-1])
        await self._dir(parent)
        if await self._attr(path) is not None:
            raise VfsError(EEXIST)
        if self.redirect(path):
            await self._copy_up(parent)
            self._base.setdefault(path, None)

    # --- mutations ---------------------------------------------------------------------------

    async def create(
        self, path: str, mode: int, open_mode: OpenMode, caller: Caller = ROOT
    ) -> FileHandle:
        if await self._attr(path) is not None:
            if open_mode.exclusive:
                raise VfsError(EEXIST)
            return await self.open(path, open_mode)
        if not self.redirect(path):
            return await self.lower.create(path, mode, open_mode, caller)
        async with self._lock:
            await self._prepare_new(path)
            return _UpperHandle(await self.upper.create(path, mode, open_mode, caller))

    async def mkdir(self, path: str, mode: int, caller: Caller = ROOT) -> Attr:
        if not self.redirect(path):
            return await self.lower.mkdir(path, mode, caller)
        async with self._lock:
            await self._prepare_new(path)
            return _tag(await self.upper.mkdir(path, mode, caller))

    async def symlink(self, path: str, target: str, caller: Caller = ROOT) -> Attr:
        if not self.redirect(path):
            return await self.lower.symlink(path, target, caller)
        async with self._lock:
            await self._prepare_new(path)
            return _tag(await self.upper.symlink(path, target, caller))

    async def link(self, src: str, dst: str) -> Attr:
        if self.redirect(src) != self.redirect(dst):
            raise VfsError(EXDEV)
        if not self.redirect(dst):
            return await self.lower.link(src, dst)
        async with self._lock:
            if _is_dir(await self._existing(src)):
                raise VfsError(EPERM)
            await self._prepare_new(dst)
            await self._copy_up(src)
            return _tag(await self.upper.link(src, dst))

    async def setattr(self, path: str, changes: SetAttr) -> Attr:
        if not self.redirect(path):
            return await self.lower.setattr(path, changes)
        async with self._lock:
            await self._copy_up(path, data=changes.size != 0)
            attr = await self.upper.setattr(path, changes)
        merged = await self._attr(path)
        return merged if merged is not None else _tag(attr)

    async def unlink(self, path: str) -> None:
        async with self._lock:
            up, lo = await self._layers(path)
            attr = self._merge(path, up, lo)
            if attr is None:
                raise await self._missing(path)
            if _is_dir(attr):
                raise VfsError(EISDIR)
            if not self.redirect(path):
                await self.lower.unlink(path)
                return
            if up is not None:
                await self.upper.unlink(path)
            if lo is not None:
                self._mask(path, lo)

    async def rmdir(self, path: str) -> None:
        if not paths.split(path):
            raise VfsError(EBUSY)
        async with self._lock:
            up, lo = await self._layers(path)
            attr = self._merge(path, up, lo)
            if attr is None:
                raise await self._missing(path)
            if not _is_dir(attr):
                raise VfsError(ENOTDIR)
            if await self.readdir(path):
                raise VfsError(ENOTEMPTY)
            if not self.redirect(path):
                await self.lower.rmdir(path)
                if up is not None:
                    await self.upper.rmdir(path)
                return
            if up is not None:
                await self.upper.rmdir(path)
            if lo is not None:
                self._mask(path, lo)

    async def _has_lower_content(self, path: str, lo: Attr | None) -> bool:
        if not _is_dir(lo):
            return False
        return any(
            paths.child(path, e.name) not in self._masked for e in await self.lower.readdir(path)
        )

    async def rename(self, src: str, dst: str, flags: int = 0) -> None:
        check_rename_flags(flags)
        sparts, dparts = paths.split(src), paths.split(dst)
        if not sparts or not dparts:
            raise VfsError(EBUSY)
        if self.redirect(src) != self.redirect(dst):
            raise VfsError(EXDEV)
        async with self._lock:
            s_up, s_lo = await self._layers(src)
            d_up, d_lo = await self._layers(dst)
            s_attr = self._merge(src, s_up, s_lo)
            d_attr = self._merge(dst, d_up, d_lo)
            if s_attr is None:
                raise await self._missing(src)
            await self._dir(paths.join(dparts[:-1]))
            if sparts == dparts:
                return
            if _is_dir(s_attr) and dparts[: len(sparts)] == sparts:
                raise VfsError(EINVAL)
            if not self.redirect(src):
                if s_up is not None or d_up is not None:
                    raise VfsError(EXDEV)  # would strand upper-layer content
                await self.lower.rename(src, dst, flags)
                return
            if flags & RENAME_EXCHANGE:
                if d_attr is None:
                    raise VfsError(ENOENT)
                if _is_dir(d_attr) and sparts[: len(dparts)] == dparts:
                    raise VfsError(EINVAL)
                if await self._has_lower_content(src, s_lo) or await self._has_lower_content(
                    dst, d_lo
                ):
                    raise VfsError(EXDEV)
                await self._copy_up(src)
                await self._copy_up(dst)
                await self.upper.rename(src, dst, RENAME_EXCHANGE)
                for path, lo in ((src, s_lo), (dst, d_lo)):
                    if lo is not None:
                        self._mask(path, lo)
                return
            if d_attr is not None:
                if flags & RENAME_NOREPLACE:
                    raise VfsError(EEXIST)
                if _is_dir(s_attr):
                    if not _is_dir(d_attr):
                        raise VfsError(ENOTDIR)
                    if await self.readdir(dst):
                        raise VfsError(ENOTEMPTY)
                elif _is_dir(d_attr):
                    raise VfsError(EISDIR)
            if await self._has_lower_content(src, s_lo):
                raise VfsError(EXDEV)
            await self._copy_up(src)
            await self._copy_up(paths.join(dparts[:-1]))
            if d_up is None and d_lo is None:
                self._base.setdefault(dst, None)
            await self.upper.rename(src, dst)
            if s_lo is not None:
                self._mask(src, s_lo)
            if d_lo is not None:
                self._mask(dst, d_lo)

    # --- walking (for changes and diffs) -----------------------------------------------------

    async def walk_upper(self, path: str = "/") -> AsyncIterator[tuple[str, Attr]]:
        """Every upper-layer entry below ``path``, parents first (upper inode numbers)."""
        for ent in await self.upper.readdir(path):
            child = paths.child(path, ent.name)
            yield child, ent.attr
            if _is_dir(ent.attr):
                async for item in self.walk_upper(child):
                    yield item


async def walk(provider: Provider, path: str) -> AsyncIterator[tuple[str, Attr]]:
    """``path`` and everything below it in ``provider``, parents first."""
    attr = await probe(provider.getattr, path)
    if attr is None:
        return
    yield path, attr
    if _is_dir(attr):
        for ent in await provider.readdir(path):
            async for item in walk(provider, paths.child(path, ent.name)):
                yield item


class _UpperHandle(HandleWrapper):
    """An upper-layer file: inode numbers tagged like the rest of the upper layer."""

    def direct_io(self) -> DirectIO | None:
        return self.inner.direct_io()  # the tag is on attributes only, not on the data

    async def getattr(self) -> Attr:
        return _tag(await self.inner.getattr())

    async def setattr(self, changes: SetAttr) -> Attr:
        return _tag(await self.inner.setattr(changes))
