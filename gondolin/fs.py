"""Host-driven file operations on the guest (``vm.fs``).

Contents stream in chunks under credit-based flow control both ways: a 1 GiB file moves
through a bounded window and is never held in memory. Each operation has its own request id,
so file operations run concurrently with execs and with each other.
"""

from __future__ import annotations

import collections
import errno as _errno
import os
import posixpath
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import Any, Protocol

from ._log import get_logger
from .channel import ControlLink, Inbox
from .errors import GondolinError, GuestFileError, ProtocolError
from .fs_stage import STAGE_MIN, STAGE_PIECE, Stage, staged_piece_in, staged_read
from .fstypes import DirEntry, FileStat
from .protocol import DATA_CHUNK, DEFAULT_WINDOW, Message, T
from .vfs.direct import DirectFS, mounted
from .vfs.provider import Provider

log = get_logger("fs")
WriteSource = bytes | bytearray | memoryview | str | Iterable[bytes] | AsyncIterable[bytes]


def stat_is_reg(mode: int) -> bool:
    return (mode & 0o170000) == 0o100000


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


class MountAccess(Protocol):
    """What ``vm.fs`` needs to serve mounted paths on the host side."""

    @property
    def mounts(self) -> Mapping[str, Provider]: ...

    def vfs_root(self) -> Provider | None: ...

    def vfs_invalidate(self, path: str) -> None: ...


class GuestFS:
    """File operations on the guest's file system. Obtain it as ``vm.fs``.

    Every wait on the guest has a host-side deadline: ``timeouts.call`` seconds for each
    answer (a streamed transfer may take longer in total; each chunk resets it)."""

    def __init__(self, link: ControlLink, mounts: MountAccess | None = None) -> None:
        self._link = link
        self._mounts = mounts
        self._direct_fs: DirectFS | None = None

    def _direct(self, path: str) -> DirectFS | None:
        """The host-side route when ``path`` lies on a mount: straight to its provider."""
        access = self._mounts
        if access is None or not access.mounts or not mounted(access.mounts, path):
            return None
        if self._direct_fs is None:
            self._direct_fs = DirectFS(access.mounts, self, access.vfs_root, access.vfs_invalidate)
        return self._direct_fs

    def _stage(self) -> Stage | None:
        """The VM's staging directory on its virtiofs device (large copies), or None."""
        stage_of = getattr(self._mounts, "vfs_stage", None)  # a Machine with the virtiofs device has one
        stage = stage_of() if stage_of is not None else None
        return stage if isinstance(stage, Stage) else None

    async def _request(self, t: int, err_path: str | None, **p: Any) -> dict[str, Any]:
        channel = self._link.control()
        inbox = channel.open()
        try:
            await channel.send_message(t, inbox.id, **p)
            msg = await inbox.get(self._link.timeouts.call, what=f"answer to {T(t).name}")
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
        stage = self._stage()
        if stage is not None and (length is None or length >= STAGE_MIN):
            st = await self.stat(path)
            if stat_is_reg(st.mode) and st.size - offset >= STAGE_MIN:  # through shared memory
                return staged_read(stage, self._link.control, path, offset, length, chunk_size,
                                   self._link.timeouts.call, self._open_read_port)
        return await self._open_read_port(path, offset, length, chunk_size)

    async def _open_read_port(self, path: str, offset: int, length: int | None,
                              chunk_size: int = DATA_CHUNK) -> AsyncIterator[bytes]:
        """:meth:`open_read` over the control channel."""
        channel = self._link.control()
        inbox = channel.open()
        window = DEFAULT_WINDOW
        inbox.grant(T.FILE_DATA, window)
        await channel.send_message(T.FILE_READ, inbox.id, path=path, offset=offset, length=length,
                                   window=window, chunk=chunk_size)
        try:
            first = await inbox.get(self._link.timeouts.call, what=f"answer to reading {path}")
        except BaseException:
            inbox.close()
            raise
        if first.t != T.FILE_DONE:
            inbox.close()
            _raise_for(first, path)
            raise ProtocolError(f"unexpected {first.type_name} opening {path}")
        return self._read_stream(inbox, path, window)

    async def _read_stream(self, inbox: Inbox, path: str, window: int) -> AsyncIterator[bytes]:
        channel = self._link.control()
        unreturned = 0
        try:
            while True:
                msg = await inbox.get(self._link.timeouts.call, what=f"data of {path}")
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
        channel = self._link.control()
        call = self._link.timeouts.call
        inbox = channel.open()
        try:
            req: dict[str, Any] = {"path": path, "append": append, "parents": parents}
            if mode is not None:
                req["mode"] = mode
            if user is not None:
                req["user"] = user
            await channel.send_message(T.FILE_WRITE, inbox.id, **req)
            inbox.add_credit(DEFAULT_WINDOW)

            stage = self._stage()
            held: list[bytes] = []  # with a stage: data not sent yet (less than a piece)
            held_size = 0

            async def send(chunk: bytes) -> None:
                nonlocal held_size
                if stage is not None:
                    view = memoryview(chunk)
                    if held:
                        held.append(bytes(view))
                        held_size += len(view)
                        if held_size < STAGE_PIECE:
                            return
                        view = memoryview(b"".join(held))
                        held.clear()
                        held_size = 0
                    while len(view) >= STAGE_PIECE:
                        await stage_or_send(view[:STAGE_PIECE])
                        view = view[STAGE_PIECE:]
                    if view:
                        held.append(bytes(view))
                        held_size = len(view)
                    return
                await send_data(chunk)

            async def stage_or_send(piece: memoryview) -> None:
                assert stage is not None
                if not await staged_piece_in(stage, channel, inbox, path, piece, call):
                    await send_data(piece)

            async def send_data(chunk: bytes | memoryview) -> None:
                view = memoryview(chunk)
                while view:
                    while inbox.credit <= 0:
                        if inbox.finished:
                            self._check_early_error(inbox, path)
                        await inbox.wait_credit(call)
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
            if held:  # the tail: staged when large enough, else over the control channel
                tail = memoryview(b"".join(held))
                await (stage_or_send(tail) if held_size >= STAGE_MIN else send_data(tail))
            await channel.send_message(T.FILE_EOF, inbox.id)
            while True:
                msg = await inbox.get(call, what=f"end of writing {path}")
                _raise_for(msg, path)
                if msg.t == T.FILE_DONE:
                    return int(msg.p.get("size", 0))
        finally:
            inbox.close()

    @staticmethod
    def _check_early_error(inbox: Inbox, path: str) -> None:
        """An open() failure arrives as ERROR while we wait for credit: raise it right away."""
        msg = inbox.take_nowait()
        if msg is not None:
            _raise_for(msg, path)

    async def walk(self, top: str, *, max_entries: int | None = None,
                   include_hidden: bool = True) -> AsyncGenerator[tuple[str, list[DirEntry]], None]:
        """Breadth-first directory walk: yields ``(directory, entries)`` with entries sorted by
        name, then descends into the subdirectories (symlinks are not followed). Unreadable
        subdirectories are skipped; an unreadable ``top`` raises. ``max_entries`` stops the walk
        after that many entries in all (the last batch is cut to fit)."""
        top = _check_path(top)
        queue: collections.deque[str] = collections.deque([top])
        seen = 0
        while queue:
            directory = queue.popleft()
            try:
                items = await self.scandir(directory)
            except GuestFileError:
                if directory == top:
                    raise
                continue
            items = sorted((e for e in items if include_hidden or not e.name.startswith(".")),
                           key=lambda e: e.name)
            if max_entries is not None and seen + len(items) > max_entries:
                items = items[:max(0, max_entries - seen)]
                queue.clear()
            seen += len(items)
            yield directory, items
            queue.extend(posixpath.join(directory, e.name) for e in items if e.kind == "dir")
            if max_entries is not None and seen >= max_entries:
                return

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


__all__ = ["DirEntry", "FileStat", "GondolinError", "GuestFS", "MountAccess"]
