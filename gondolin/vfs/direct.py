"""``vm.fs`` on a mounted path: straight to the provider, no guest round trip.

The mount router's paths are guest paths, so a ``vm.fs`` call on ``/workspace/x`` becomes a
provider call on ``/workspace/x``, followed by an invalidation of whatever the guest kernel
caches about the paths it changed. Symlinks are resolved here one component at a time, as
the guest kernel would; a link that leads out of every mount hands the rest of the operation
back to the guest.
"""

from __future__ import annotations

import errno as _errno
import posixpath
import stat
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import GuestFileError
from ..fstypes import DirEntry, FileStat
from . import paths
from .errors import EEXIST, EISDIR, ELOOP, ENOENT, ENOTDIR, EXDEV, LINUX_ERRNO, VfsError
from .provider import MAX_IO, Attr, Caller, FileHandle, OpenMode, Provider, SetAttr
from .router import single_or_router

if TYPE_CHECKING:
    from ..fs import GuestFS

MAX_LINKS = 40  # symlinks followed in one path (Linux MAXSYMLINKS)
_NAMES = {v: k for k, v in reversed(LINUX_ERRNO.items())}  # first name wins (ENOTSUP -> ...)


def mounted(mounts: Iterable[str], path: str) -> bool:
    """Whether the normalised absolute ``path`` lies on (or is) one of the mount points."""
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


class _Outside(Exception):
    """Resolution left the mounts: the guest has to finish the job at ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


def _file_error(exc: VfsError, op: str, path: str) -> Exception:
    num = exc.errno or LINUX_ERRNO["EIO"]
    name = _NAMES.get(num, _errno.errorcode.get(num, "EIO"))
    return GuestFileError(f"{op} {path}: {exc.strerror}", errno=num, errno_name=name, path=path)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "file" if stat.S_ISREG(mode) else "other"


class DirectFS:
    """The ``vm.fs`` operations over a VM's mounts.

    ``root`` gives the provider tree to use (the running VM's router); ``invalidate`` tells
    the guest kernel a path changed; ``guest`` is the ``vm.fs`` to hand paths back to.
    """

    def __init__(
        self,
        mounts: Mapping[str, Provider],
        guest: GuestFS,
        root: Callable[[], Provider | None],
        invalidate: Callable[[str], None],
    ) -> None:
        self._mounts = mounts
        self._guest = guest
        self._root_fn = root
        self._invalidate = invalidate

    def handles(self, path: str) -> bool:
        return mounted(self._mounts, path)

    @property
    def _root(self) -> Provider:
        return self._root_fn() or single_or_router(self._mounts)

    # --- path resolution ---------------------------------------------------------------------

    async def _resolve(self, path: str, follow_last: bool, missing_ok: bool = False) -> str:
        """``path`` with every symlink in it replaced (the last one only with ``follow_last``).

        The last name may be missing; with ``missing_ok`` so may the ones before it (nothing
        below a missing directory can be a link)."""
        root = self._root
        links = 0
        pending = list(paths.split(path))
        done: list[str] = []
        while pending:
            name = pending.pop(0)
            current = paths.join([*done, name])
            if not mounted(self._mounts, current):
                if not pending:
                    done.append(name)
                    break
                done.append(name)  # a directory above a mount point: not a link
                continue
            if not pending and not follow_last:
                done.append(name)
                break
            try:
                attr = await root.getattr(current)
            except VfsError as exc:
                if exc.errno == ENOENT and (missing_ok or not pending):
                    done.append(name)  # does not exist yet: it will be created
                    done.extend(pending)
                    break
                raise
            if not stat.S_ISLNK(attr.mode):
                if pending and not stat.S_ISDIR(attr.mode):
                    raise VfsError(ENOTDIR)
                done.append(name)
                continue
            links += 1
            if links > MAX_LINKS:
                raise VfsError(ELOOP)
            target = await root.readlink(current)
            base = "/" if target.startswith("/") else paths.join(done)
            rest = posixpath.normpath(posixpath.join(base, target, *pending))
            pending = list(paths.split(rest))
            done = []
        resolved = paths.join(done)
        if not mounted(self._mounts, resolved):
            raise _Outside(resolved)
        return resolved

    async def _attr(self, path: str, follow: bool) -> tuple[str, Attr]:
        resolved = await self._resolve(path, follow)
        return resolved, await self._root.getattr(resolved)

    # --- metadata ----------------------------------------------------------------------------

    async def stat(self, path: str, *, follow_symlinks: bool = True) -> FileStat:
        try:
            _, a = await self._attr(path, follow_symlinks)
        except _Outside as out:
            return await self._guest.stat(out.path, follow_symlinks=follow_symlinks)
        except VfsError as exc:
            raise _file_error(exc, "stat", path) from None
        return FileStat(
            mode=a.mode, size=a.size, uid=a.uid, gid=a.gid, mtime_ns=a.mtime_ns,
            atime_ns=a.atime_ns, ctime_ns=a.ctime_ns, nlink=a.nlink, ino=a.ino,
        )  # fmt: skip

    async def scandir(self, path: str) -> list[DirEntry]:
        try:
            resolved = await self._resolve(path, True)
            listing = await self._root.readdir(resolved)
        except _Outside as out:
            return await self._guest.scandir(out.path)
        except VfsError as exc:
            raise _file_error(exc, "listdir", path) from None
        return sorted((DirEntry(e.name, _kind(e.attr.mode)) for e in listing), key=lambda e: e.name)

    async def mkdir(self, path: str, *, parents: bool, exist_ok: bool, mode: int) -> None:
        try:
            resolved = await self._resolve(path, False, missing_ok=parents)
            if parents:
                await self._makedirs(resolved, mode, exist_ok)
            else:
                await self._root.mkdir(resolved, mode & 0o7777)
                self._invalidate(resolved)
        except _Outside as out:
            await self._guest.mkdir(out.path, parents=parents, exist_ok=exist_ok, mode=mode)
        except VfsError as exc:
            raise _file_error(exc, "mkdir", path) from None

    async def _makedirs(self, path: str, mode: int, exist_ok: bool) -> None:
        root = self._root
        parts = paths.split(path)
        for i in range(1, len(parts) + 1):
            current = paths.join(parts[:i])
            last = i == len(parts)
            try:
                attr = await root.getattr(current)
            except VfsError as exc:
                if exc.errno != ENOENT:
                    raise
            else:
                if not stat.S_ISDIR(attr.mode):
                    raise VfsError(EEXIST if last else ENOTDIR)
                if last and not exist_ok:
                    raise VfsError(EEXIST)
                continue
            await root.mkdir(current, (mode if last else 0o777) & 0o7777)
            self._invalidate(current)

    async def rename(self, src: str, dst: str) -> None:
        if not (self.handles(src) and self.handles(dst)):
            raise _file_error(VfsError(EXDEV), "rename", src)
        try:
            s = await self._resolve(src, False)
            d = await self._resolve(dst, False)
            await self._root.rename(s, d)
        except _Outside:
            raise _file_error(VfsError(EXDEV), "rename", src) from None
        except VfsError as exc:
            raise _file_error(exc, "rename", src) from None
        self._invalidate(s)
        self._invalidate(d)

    async def remove(self, path: str, *, recursive: bool, force: bool) -> bool:
        try:
            resolved, attr = await self._attr(path, False)
        except _Outside as out:
            return await self._guest.remove(out.path, recursive=recursive, force=force)
        except VfsError as exc:
            if force and exc.errno == ENOENT:
                return False
            raise _file_error(exc, "remove", path) from None
        try:
            if stat.S_ISDIR(attr.mode):
                if recursive:
                    await self._rmtree(resolved)
                else:
                    await self._root.rmdir(resolved)
            else:
                await self._root.unlink(resolved)
        except VfsError as exc:
            raise _file_error(exc, "remove", path) from None
        finally:
            self._invalidate(resolved)
        return True

    async def _rmtree(self, path: str) -> None:
        root = self._root
        for entry in await root.readdir(path):
            child = paths.child(path, entry.name)
            if stat.S_ISDIR(entry.attr.mode):
                await self._rmtree(child)
            else:
                await root.unlink(child)
        await root.rmdir(path)

    # --- contents ----------------------------------------------------------------------------

    async def open_read(
        self, path: str, *, offset: int, length: int | None, chunk_size: int
    ) -> AsyncIterator[bytes]:
        try:
            resolved, attr = await self._attr(path, True)
            if stat.S_ISDIR(attr.mode):
                raise VfsError(EISDIR)
            handle = await self._root.open(resolved, OpenMode())
        except _Outside as out:
            return await self._guest.open_read(
                out.path, offset=offset, length=length, chunk_size=chunk_size
            )
        except VfsError as exc:
            raise _file_error(exc, "open", path) from None
        return self._read_stream(handle, path, offset, length, max(1, min(chunk_size, MAX_IO)))

    async def _read_stream(
        self, handle: FileHandle, path: str, offset: int, length: int | None, chunk: int
    ) -> AsyncIterator[bytes]:
        try:
            while length is None or length > 0:
                want = chunk if length is None else min(chunk, length)
                try:
                    data = await handle.read(offset, want)
                except VfsError as exc:
                    raise _file_error(exc, "read", path) from None
                if not data:
                    return
                offset += len(data)
                if length is not None:
                    length -= len(data)
                yield data
        finally:
            await handle.release()

    async def write(
        self, path: str, data: Any, *, mode: int | None, append: bool, parents: bool,
        user: str | int | None,
    ) -> int:  # fmt: skip
        owner = await self._owner(user) if user is not None else None
        try:
            resolved = await self._resolve(path, True, missing_ok=parents)
            if parents:
                await self._makedirs(paths.parent_of(resolved), 0o755, True)
            open_mode = OpenMode(read=False, write=True, append=append, truncate=not append)
            caller = Caller(*owner) if owner else Caller()
            handle = await self._root.create(
                resolved, 0o644 if mode is None else mode, open_mode, caller
            )
        except _Outside as out:
            return await self._guest.write(
                out.path, data, mode=mode, append=append, parents=parents, user=user
            )
        except VfsError as exc:
            raise _file_error(exc, "open", path) from None
        total = 0
        try:
            if mode is not None or owner is not None:
                uid, gid = owner if owner else (None, None)
                await handle.setattr(SetAttr(mode=mode, uid=uid, gid=gid))
            if append:
                total_base = (await handle.getattr()).size
            else:
                total_base = 0
            async for chunk in _chunks(data):
                view = memoryview(chunk)
                while view:
                    piece = view[:MAX_IO]
                    written = await handle.write(total_base + total, bytes(piece))
                    if written <= 0:
                        raise VfsError(LINUX_ERRNO["EIO"], "short write")
                    total += written
                    view = view[written:]
        except VfsError as exc:
            raise _file_error(exc, "write", path) from None
        finally:
            await handle.release()
            self._invalidate(resolved)
        return total

    async def _owner(self, user: str | int) -> tuple[int, int]:
        """(uid, gid) of a guest user, from the guest's /etc/passwd (names are the guest's)."""
        passwd = await self._guest.read_text("/etc/passwd")
        for line in passwd.splitlines():
            fields = line.split(":")
            if len(fields) < 4:
                continue
            if fields[0] == str(user) or (str(user).isdigit() and fields[2] == str(user)):
                return int(fields[2]), int(fields[3])
        if isinstance(user, int) or str(user).isdigit():
            return int(user), int(user)
        raise GuestFileError(f"no such user in the guest: {user!r}", errno=LINUX_ERRNO["EINVAL"],
                             errno_name="EINVAL")  # fmt: skip


async def _chunks(data: Any) -> AsyncIterator[bytes]:
    if isinstance(data, str):
        yield data.encode()
    elif isinstance(data, (bytes, bytearray, memoryview)):
        yield bytes(data)
    elif isinstance(data, AsyncIterable):
        async for chunk in data:
            yield chunk
    else:
        for chunk in data:
            yield chunk


__all__ = ["DirectFS", "mounted"]
