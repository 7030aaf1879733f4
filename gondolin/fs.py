"""Host-driven file operations on the guest (``vm.fs``).

Contents stream in chunks under credit-based flow control both ways: a 1 GiB file moves
through a bounded window and is never held in memory. Each operation has its own request id,
so file operations run concurrently with execs and with each other.
"""

from __future__ import annotations

import errno as _errno
import os
import posixpath
import stat as _stat
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._log import get_logger
from .channel import Inbox
from .errors import GondolinError, GuestFileError, ProtocolError
from .protocol import DATA_CHUNK, DEFAULT_WINDOW, Message, T

if TYPE_CHECKING:
    from .vfs.direct import DirectFS
    from .vm import VM

log = get_logger("fs")
WriteSource = bytes | bytearray | memoryview | str | Iterable[bytes] | AsyncIterable[bytes]


@dataclass(frozen=True)
class FileStat:
    mode: int
    size: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    nlink: int
    ino: int

    @property
    def is_dir(self) -> bool:
        return _stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return _stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return _stat.S_ISLNK(self.mode)

    @property
    def permissions(self) -> int:
        return _stat.S_IMODE(self.mode)


@dataclass(frozen=True)
class DirEntry:
    name: str
    kind: str  # file | dir | symlink | other


def _check_path(path: str) -> str:
    if not isinstance(path, str) or not path:
        raise ValueError("path must be a non-empty string")
    if not path.startswith("/"):
        raise ValueError(f"guest paths must be absolute, got {path!r}")
    if "\0" in path:
        raise ValueError("path contains a NUL byte")
    return posixpath.normpath(path)


def _raise_for(msg: Message, path: str | None) -> None:
    if msg.t == T.ERROR:
        code = str(msg.p.get("code") or "EIO")
        num = int(msg.p.get("errno") or 0)
        text = str(msg.p.get("message") or code)
        if num:
            raise GuestFileError(f"guest {text}", errno=num, errno_name=code, path=path)
        raise ProtocolError(f"guest refused the file operation: {text}", code=code)


class GuestFS:
    """File operations on the guest's file system. Obtain it as ``vm.fs``."""

    def __init__(self, vm: VM) -> None:
        self._vm = vm

    def _direct(self, path: str) -> DirectFS | None:
        """The host-side route when ``path`` lies on a mount: straight to its provider."""
        if not getattr(self._vm, "mounts", None):
            return None
        from .vfs.direct import DirectFS

        direct = DirectFS(self._vm.mounts, self, self._vm._vfs_root, self._vm._vfs_invalidate)
        return direct if direct.handles(path) else None

    async def _request(self, t: int, err_path: str | None, **p: Any) -> dict[str, Any]:
        channel = self._vm._require_channel()
        inbox = channel.open()
        try:
            await channel.send_message(t, inbox.id, **p)
            msg = await inbox.get()
            _raise_for(msg, err_path)
            if msg.t != T.FILE_DONE:
                raise ProtocolError(f"unexpected {msg.type_name} answering {T(t).name}")
            return msg.p
        finally:
            inbox.close()

    # -- metadata ------------------------------------------------------------
    async def stat(self, path: str, *, follow_symlinks: bool = True) -> FileStat:
        path = _check_path(path)
        if (direct := self._direct(path)) is not None:
            return await direct.stat(path, follow_symlinks=follow_symlinks)
        p = await self._request(T.STAT, path, path=path, follow=follow_symlinks)
        return FileStat(**{k: int(p[k]) for k in FileStat.__dataclass_fields__})

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path, follow_symlinks=False)
        except GuestFileError as exc:
            if exc.errno in (_errno.ENOENT, _errno.ENOTDIR):
                return False
            raise
        return True

    async def listdir(self, path: str) -> list[str]:
        return [e.name for e in await self.scandir(path)]

    async def scandir(self, path: str) -> list[DirEntry]:
        path = _check_path(path)
        if (direct := self._direct(path)) is not None:
            return await direct.scandir(path)
        p = await self._request(T.LISTDIR, path, path=path)
        return [DirEntry(str(name), str(kind)) for name, kind in p.get("entries", [])]

    async def mkdir(self, path: str, *, parents: bool = True, exist_ok: bool = True, mode: int = 0o755) -> None:
        path = _check_path(path)
        if (direct := self._direct(path)) is not None:
            return await direct.mkdir(path, parents=parents, exist_ok=exist_ok, mode=mode)
        await self._request(T.MKDIR, path, path=path, parents=parents, exist_ok=exist_ok, mode=mode)

    async def rename(self, src: str, dst: str) -> None:
        src, dst = _check_path(src), _check_path(dst)
        if (direct := self._direct(src) or self._direct(dst)) is not None:
            return await direct.rename(src, dst)
        await self._request(T.RENAME, src, src=src, dst=dst)

    async def remove(self, path: str, *, recursive: bool = False, force: bool = False) -> bool:
        """Delete a file, or a directory (``recursive=True`` for a non-empty one).
        Returns False when ``force=True`` and nothing was there."""
        path = _check_path(path)
        if recursive and path == "/":
            raise ValueError("refusing to remove / recursively")
        if (direct := self._direct(path)) is not None:
            return await direct.remove(path, recursive=recursive, force=force)
        p = await self._request(T.REMOVE, path, path=path, recursive=recursive, force=force)
        return bool(p.get("removed", True))

    # -- contents ------------------------------------------------------------
    async def open_read(self, path: str, *, offset: int = 0, length: int | None = None,
                        chunk_size: int = DATA_CHUNK) -> AsyncIterator[bytes]:
        """Stream a guest file in chunks. The guest reads ahead at most one window."""
        path = _check_path(path)
        if (direct := self._direct(path)) is not None:
            return await direct.open_read(path, offset=offset, length=length, chunk_size=chunk_size)
        channel = self._vm._require_channel()
        inbox = channel.open()
        window = DEFAULT_WINDOW
        inbox.grant(T.FILE_DATA, window)
        await channel.send_message(T.FILE_READ, inbox.id, path=path, offset=offset, length=length,
                                   window=window, chunk=chunk_size)
        try:
            first = await inbox.get()
        except BaseException:
            inbox.close()
            raise
        if first.t != T.FILE_DONE:
            inbox.close()
            _raise_for(first, path)
            raise ProtocolError(f"unexpected {first.type_name} opening {path}")
        return self._read_stream(inbox, path, window)

    async def _read_stream(self, inbox: Inbox, path: str, window: int) -> AsyncIterator[bytes]:
        channel = self._vm._require_channel()
        unreturned = 0
        try:
            while True:
                msg = await inbox.get()
                if msg.t == T.FILE_DATA:
                    yield msg.data
                    unreturned += len(msg.data)
                    if unreturned >= window // 4:
                        inbox.grant(T.FILE_DATA, unreturned)
                        await channel.send_message(T.CREDIT, inbox.id, file=unreturned)
                        unreturned = 0
                elif msg.t == T.FILE_EOF:
                    return
                else:
                    _raise_for(msg, path)
                    raise ProtocolError(f"unexpected {msg.type_name} while reading {path}")
        finally:
            inbox.close()

    async def read_bytes(self, path: str, *, max_size: int | None = None) -> bytes:
        parts = []
        total = 0
        async for chunk in await self.open_read(path):
            total += len(chunk)
            if max_size is not None and total > max_size:
                raise GuestFileError(f"{path} is larger than max_size={max_size} bytes",
                                     errno=_errno.EFBIG, errno_name="EFBIG", path=path)
            parts.append(chunk)
        return b"".join(parts)

    async def read_text(self, path: str, *, encoding: str = "utf-8", errors: str = "strict") -> str:
        return (await self.read_bytes(path)).decode(encoding, errors)

    async def write(self, path: str, data: WriteSource, *, mode: int | None = None, append: bool = False,
                    parents: bool = False, user: str | int | None = None) -> int:
        """Write (or append to) a guest file from bytes, str, or a (async) iterable of bytes.
        Returns the number of bytes written."""
        path = _check_path(path)
        if (direct := self._direct(path)) is not None:
            return await direct.write(path, data, mode=mode, append=append, parents=parents, user=user)
        channel = self._vm._require_channel()
        inbox = channel.open()
        try:
            req: dict[str, Any] = {"path": path, "append": append, "parents": parents}
            if mode is not None:
                req["mode"] = mode
            if user is not None:
                req["user"] = user
            await channel.send_message(T.FILE_WRITE, inbox.id, **req)
            inbox.add_credit(DEFAULT_WINDOW)

            async def send(chunk: bytes) -> None:
                view = memoryview(chunk)
                while view:
                    while inbox.credit <= 0:
                        if inbox.finished:
                            self._check_early_error(inbox, path)
                        await inbox.wait_credit()
                    n = min(len(view), inbox.credit, DATA_CHUNK)
                    inbox.credit -= n
                    await channel.send_message(T.FILE_DATA, inbox.id, bytes(view[:n]))
                    view = view[n:]

            if isinstance(data, str):
                await send(data.encode())
            elif isinstance(data, (bytes, bytearray, memoryview)):
                await send(bytes(data))
            elif isinstance(data, AsyncIterable):
                async for chunk in data:
                    await send(chunk)
            else:
                for chunk in data:
                    await send(chunk)
            await channel.send_message(T.FILE_EOF, inbox.id)
            while True:
                msg = await inbox.get()
                _raise_for(msg, path)
                if msg.t == T.FILE_DONE:
                    return int(msg.p.get("size", 0))
        finally:
            inbox.close()

    @staticmethod
    def _check_early_error(inbox: Inbox, path: str) -> None:
        """An open() failure arrives as ERROR while we wait for credit: raise it right away."""
        try:
            msg = inbox._recv.receive_nowait()
        except Exception:  # noqa: BLE001 - WouldBlock / closed: nothing queued
            return
        if isinstance(msg, BaseException):
            raise msg
        _raise_for(msg, path)

    async def upload(self, host_path: str | os.PathLike[str], guest_path: str, *, mode: int | None = None) -> int:
        """Copy a host file into the guest, streaming."""
        from anyio import open_file

        async def chunks() -> AsyncIterator[bytes]:
            async with await open_file(host_path, "rb") as f:
                while block := await f.read(DATA_CHUNK):
                    yield block

        return await self.write(guest_path, chunks(), mode=mode)

    async def download(self, guest_path: str, host_path: str | os.PathLike[str]) -> int:
        """Copy a guest file to the host, streaming."""
        from anyio import open_file

        total = 0
        async with await open_file(host_path, "wb") as f:
            async for chunk in await self.open_read(guest_path):
                await f.write(chunk)
                total += len(chunk)
        return total


__all__ = ["DirEntry", "FileStat", "GondolinError", "GuestFS"]
