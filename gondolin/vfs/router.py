"""MountRouter: several providers in one tree, routed by longest mount prefix.

Directories above mount points that no provider has (``/a`` for a mount at ``/a/b``) are
synthesised read-only; a mount point hides whatever its parent provider has under that
name. Inode numbers carry the mount's index in their top byte so that ``stat`` never shows
two files from different mounts as one. Links and renames across mounts fail with EXDEV,
like across real filesystems.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import replace

from . import paths
from .errors import EBUSY, EISDIR, ENOENT, ENOTDIR, EROFS, EXDEV, VfsError
from .provider import (
    ROOT,
    SYNTHETIC_STATFS,
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
)

MAX_MOUNTS = 254
_INO_SHIFT = 56
_INO_MASK = (1 << _INO_SHIFT) - 1
_VIRTUAL_MODE = stat.S_IFDIR | 0o555


class MountRouter(Provider):
    def __init__(self, mounts: Mapping[str, Provider]) -> None:
        if not mounts:
            raise ValueError("no mounts")
        if len(mounts) > MAX_MOUNTS:
            raise ValueError(f"at most {MAX_MOUNTS} mounts")
        table: dict[str, tuple[int, Provider]] = {}
        for index, (point, provider) in enumerate(mounts.items()):
            norm = paths.normalize(point)
            if norm != point:
                raise ValueError(f"mount point {point!r} is not normalised ({norm!r})")
            table[norm] = (index + 1, provider)
        self._mounts = table
        # Longest first, so the first prefix that matches is the right one.
        self._order = sorted(table, key=lambda p: len(p), reverse=True)
        self._virtual: dict[str, set[str]] = {}  # synthesised dir -> names of children
        for point in table:
            parts = paths.split(point)
            for i in range(len(parts)):
                parent = paths.join(parts[:i])
                self._virtual.setdefault(parent, set()).add(parts[i])
        self._virtual_ino = {
            p: (0xFF << _INO_SHIFT) | i for i, p in enumerate(sorted(self._virtual))
        }

    @property
    def mounts(self) -> dict[str, Provider]:
        return {point: provider for point, (_, provider) in self._mounts.items()}

    @property
    def readonly(self) -> bool:
        return all(p.readonly for _, p in self._mounts.values())

    def route(self, path: str) -> tuple[Provider, int, str] | None:
        """(provider, mount index, path inside the provider), or None outside every mount."""
        norm = paths.normalize(path)
        for point in self._order:
            if paths.is_within(norm, point):
                index, provider = self._mounts[point]
                rest = norm[len(point) :] if point != "/" else norm
                return provider, index, rest or "/"
        return None

    def _routed(self, path: str) -> tuple[Provider, int, str]:
        hit = self.route(path)
        if hit is None:
            norm = paths.normalize(path)
            # A synthesised directory, or a new name in one: nothing there can change.
            synthetic = norm in self._virtual or paths.parent_of(norm) in self._virtual
            raise VfsError(EROFS if synthetic else ENOENT)
        return hit

    async def _writable(self, path: str) -> tuple[Provider, int, str]:
        norm = paths.normalize(path)
        if norm in self._mounts or norm in self._virtual:
            raise VfsError(EBUSY)  # a mount point or a directory above one
        provider, index, sub = self._routed(norm)
        parent = paths.parent_of(norm)
        if parent in self._virtual and parent not in self._mounts:
            # Inside a synthesised directory: only if the routed provider really has it.
            try:
                await provider.getattr(paths.parent_of(sub))
            except VfsError as exc:
                if exc.errno in (ENOENT, ENOTDIR):
                    raise VfsError(EROFS) from None
                raise
        return provider, index, sub

    @staticmethod
    def _tag(attr: Attr, index: int) -> Attr:
        return replace(attr, ino=(index << _INO_SHIFT) | (attr.ino & _INO_MASK))

    def _virtual_attr(self, path: str) -> Attr:
        return Attr(ino=self._virtual_ino[path], mode=_VIRTUAL_MODE, nlink=2, size=4096)

    # --- reading -----------------------------------------------------------------------------

    async def getattr(self, path: str) -> Attr:
        norm = paths.normalize(path)
        hit = self.route(norm)
        if hit is not None:
            provider, index, sub = hit
            try:
                return self._tag(await provider.getattr(sub), index)
            except VfsError as exc:
                if exc.errno not in (ENOENT, ENOTDIR) or norm not in self._virtual:
                    raise
        if norm in self._virtual:
            return self._virtual_attr(norm)
        raise VfsError(ENOENT)

    async def readdir(self, path: str) -> list[Dirent]:
        norm = paths.normalize(path)
        hit = self.route(norm)
        entries: dict[str, Dirent] = {}
        if hit is not None:
            provider, index, sub = hit
            try:
                for ent in await provider.readdir(sub):
                    entries[ent.name] = Dirent(ent.name, self._tag(ent.attr, index))
            except VfsError as exc:
                if exc.errno not in (ENOENT, ENOTDIR) or norm not in self._virtual:
                    raise
        elif norm not in self._virtual:
            raise VfsError(ENOENT)
        for name in sorted(self._virtual.get(norm, ())):
            entries[name] = Dirent(name, await self.getattr(paths.child(norm, name)))
        return list(entries.values())

    async def readlink(self, path: str) -> str:
        provider, _, sub = self._routed(path)
        return await provider.readlink(sub)

    async def statfs(self, path: str) -> StatFs:
        hit = self.route(path)
        if hit is None:
            return SYNTHETIC_STATFS
        provider, _, sub = hit
        try:
            return await provider.statfs(sub)
        except VfsError as exc:
            if exc.errno in (ENOENT, ENOTDIR) and paths.normalize(path) in self._virtual:
                return SYNTHETIC_STATFS
            raise

    async def access(self, path: str, mask: int, caller: Caller = ROOT) -> None:
        norm = paths.normalize(path)
        hit = self.route(norm)
        if hit is None or norm in self._virtual:
            await super().access(norm, mask, caller)
            return
        provider, _, sub = hit
        await provider.access(sub, mask, caller)

    async def open(self, path: str, mode: OpenMode) -> FileHandle:
        norm = paths.normalize(path)
        if self.route(norm) is None:
            if norm in self._virtual:
                raise VfsError(EISDIR)
            raise VfsError(ENOENT)
        provider, index, sub = self._routed(norm)
        return _RoutedHandle(await provider.open(sub, mode), index)

    # --- writing -----------------------------------------------------------------------------

    async def setattr(self, path: str, changes: SetAttr) -> Attr:
        norm = paths.normalize(path)
        if self.route(norm) is None:
            raise VfsError(EROFS if norm in self._virtual else ENOENT)
        provider, index, sub = self._routed(norm)
        return self._tag(await provider.setattr(sub, changes), index)

    async def create(
        self, path: str, mode: int, open_mode: OpenMode, caller: Caller = ROOT
    ) -> FileHandle:
        provider, index, sub = await self._writable(path)
        return _RoutedHandle(await provider.create(sub, mode, open_mode, caller), index)

    async def mkdir(self, path: str, mode: int, caller: Caller = ROOT) -> Attr:
        provider, index, sub = await self._writable(path)
        return self._tag(await provider.mkdir(sub, mode, caller), index)

    async def symlink(self, path: str, target: str, caller: Caller = ROOT) -> Attr:
        provider, index, sub = await self._writable(path)
        return self._tag(await provider.symlink(sub, target, caller), index)

    async def link(self, src: str, dst: str) -> Attr:
        sp, si, ssub = await self._writable(src)
        dp, di, dsub = await self._writable(dst)
        if si != di:
            raise VfsError(EXDEV)
        return self._tag(await sp.link(ssub, dsub), si)

    async def unlink(self, path: str) -> None:
        provider, _, sub = await self._writable(path)
        await provider.unlink(sub)

    async def rmdir(self, path: str) -> None:
        provider, _, sub = await self._writable(path)
        await provider.rmdir(sub)

    async def rename(self, src: str, dst: str, flags: int = 0) -> None:
        sp, si, ssub = await self._writable(src)
        _, di, dsub = await self._writable(dst)
        if si != di:
            raise VfsError(EXDEV)
        await sp.rename(ssub, dsub, flags)

    async def aclose(self) -> None:
        for _, provider in self._mounts.values():
            await provider.aclose()


class _RoutedHandle(HandleWrapper):
    def __init__(self, inner: FileHandle, index: int) -> None:
        super().__init__(inner)
        self._index = index

    async def getattr(self) -> Attr:
        return MountRouter._tag(await self.inner.getattr(), self._index)

    async def setattr(self, changes: SetAttr) -> Attr:
        return MountRouter._tag(await self.inner.setattr(changes), self._index)

    def direct_io(self) -> DirectIO | None:
        return self.inner.direct_io()  # routing adds nothing to the data

    async def copy_to(
        self, offset: int, dst: FileHandle, dst_offset: int, length: int
    ) -> int | None:
        # Routing adds nothing a native copy could bypass.
        target = dst.inner if isinstance(dst, _RoutedHandle) else dst
        return await self.inner.copy_to(offset, target, dst_offset, length)


def single_or_router(mounts: Mapping[str, Provider]) -> Provider:
    """The provider for a FUSE root: the only mount when it is at ``/``, else a router."""
    if len(mounts) == 1 and "/" in mounts:
        return mounts["/"]
    return MountRouter(mounts)


__all__ = ["MountRouter", "single_or_router"]
