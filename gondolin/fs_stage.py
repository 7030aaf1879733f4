"""``vm.fs`` bulk copies through a virtiofs VM's shared memory.

A VM with the virtiofs device (``fs_transport="virtiofs"``) serves one more, hidden mount on
it: a small in-memory staging directory (:class:`Stage`), seen by the guest agent inside the
device's root (``/run/gondolin/fs/run/gondolin/stage``) and never bind-mounted where guest
programs look. A large ``vm.fs.write`` puts its data there piece by piece (a memory copy on
the host) and asks the agent to copy each piece into the target file (``sendfile``: the guest
kernel pulls the pages over the virtqueues); a large read is the reverse. The bytes never cross
the control channel's virtio-serial port, whose 4 KiB buffers cap the default path.

Bounds: the directory holds at most :data:`STAGE_MAX_BYTES` (a guest that writes junk there
only makes its own staged copies fail over to the default path), pieces are
:data:`STAGE_PIECE` bytes and one piece per VM is staged at a time.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio

from .errors import GuestFileError, ProtocolError
from .protocol import T
from .vfs.errors import VfsError
from .vfs.memory import MemoryProvider
from .vfs.provider import OpenMode, Provider
from .vfs.wire import MAX_IO

STAGE_MOUNT = "/run/gondolin/stage"  # its mount point in the device's tree
GUEST_FS_ROOT = "/run/gondolin/fs"  # where the guest agent mounts the device's root
STAGE_MIN = 1 << 20  # smaller copies keep the control channel (no extra round trips)
STAGE_PIECE = 16 << 20  # bytes staged per agent copy (bounds host memory and the agent's pause)
STAGE_MAX_BYTES = 2 * STAGE_PIECE
STAGE_MAX_FILES = 64
_WRITE_ONLY = OpenMode(read=False, write=True, exclusive=True)


class Stage:
    """One VM's staging directory (served by its virtiofs device)."""

    def __init__(self) -> None:
        self.provider = MemoryProvider(max_bytes=STAGE_MAX_BYTES, max_nodes=STAGE_MAX_FILES, root_mode=0o700)
        self.lock = anyio.Lock()

    @staticmethod
    def fits(mounts: Mapping[str, Provider]) -> bool:
        """Whether the staging mount point is free (no user mount at or above it)."""
        return not any(STAGE_MOUNT == m.rstrip("/") or STAGE_MOUNT.startswith(m.rstrip("/") + "/")
                       for m in mounts)

    @staticmethod
    def new_name() -> str:
        return f"s-{os.urandom(8).hex()}"

    async def put(self, name: str, data: memoryview) -> bool:
        """Write a staged file; False (and nothing left behind) when the directory is full."""
        try:
            handle = await self.provider.create("/" + name, 0o600, _WRITE_ONLY)
        except VfsError:
            return False
        try:
            for at in range(0, len(data), MAX_IO):
                await handle.write(at, bytes(data[at:at + MAX_IO]))
        except VfsError:
            await handle.release()
            await self.discard(name)
            return False
        await handle.release()
        return True

    async def take(self, name: str, size: int, chunk: int) -> list[bytes]:
        """The first ``size`` bytes of a staged file, in ``chunk``-sized pieces; the file goes."""
        try:
            handle = await self.provider.open("/" + name, OpenMode())
            try:
                out = []
                step = max(1, min(chunk, MAX_IO))
                for at in range(0, size, step):
                    piece = await handle.read(at, min(step, size - at))
                    if not piece:
                        break
                    out.append(piece)
                return out
            finally:
                await handle.release()
        except VfsError as exc:
            raise ProtocolError(f"the guest's staged copy is unreadable ({exc})") from None
        finally:
            await self.discard(name)

    async def discard(self, name: str) -> None:
        try:
            await self.provider.unlink("/" + name)
        except VfsError:
            pass


def _error(msg: Any, path: str) -> None:
    if msg.t == T.ERROR:
        code = str(msg.p.get("code") or "EIO")
        num = int(msg.p.get("errno") or 0)
        text = str(msg.p.get("message") or code)
        if num:
            raise GuestFileError(f"guest {text}", errno=num, errno_name=code, path=path)
        raise ProtocolError(f"guest refused the file operation: {text}", code=code)
    if msg.t != T.FILE_STAGE:
        raise ProtocolError(f"unexpected {msg.type_name} answering a staged copy of {path}")


async def staged_piece_in(stage: Stage, channel: Any, inbox: Any, path: str, piece: memoryview,
                          timeout: float) -> bool:
    """Append ``piece`` to the guest file a FILE_WRITE on ``inbox`` opened, through the
    staging directory. False when it could not be staged (send it the default way)."""
    async with stage.lock:
        name = stage.new_name()
        if not await stage.put(name, piece):
            return False
        try:
            await channel.send_message(T.FILE_STAGE, inbox.id, op="in", name=name)
            while True:
                msg = await inbox.get(timeout, what=f"staged copy into {path}")
                if msg.t != T.CREDIT:
                    break
            _error(msg, path)
        finally:
            await stage.discard(name)  # the agent removed it; a failed copy may have left it
        if int(msg.p.get("size", -1)) != len(piece):
            raise ProtocolError(f"the guest copied {msg.p.get('size')} of {len(piece)} staged bytes into {path}")
        return True


async def staged_read(stage: Stage, channel_of: Any, path: str, offset: int, length: int | None,
                      chunk: int, timeout: float,
                      fallback: Callable[[str, int, int | None, int], Awaitable[AsyncIterator[bytes]]]
                      ) -> AsyncIterator[bytes]:
    """Stream a guest file through the staging directory, one piece at a time; the rest goes
    through ``fallback`` (the control channel) when the directory is full (a guest filled it)."""
    remaining = length
    full = False
    while remaining is None or remaining > 0:
        want = STAGE_PIECE if remaining is None else min(STAGE_PIECE, remaining)
        async with stage.lock:
            name = stage.new_name()
            channel = channel_of()
            inbox = channel.open()
            try:
                await channel.send_message(T.FILE_STAGE, inbox.id, op="out", name=name, path=path,
                                           offset=offset, length=want)
                msg = await inbox.get(timeout, what=f"staged copy of {path}")
                _error(msg, path)
            except GuestFileError as exc:
                await stage.discard(name)
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                msg = None
            except BaseException:
                await stage.discard(name)
                raise
            finally:
                inbox.close()
            if msg is None:  # full: the rest over the control channel
                full = True
                break
            size = int(msg.p.get("size", 0))
            if not 0 <= size <= want:
                await stage.discard(name)
                raise ProtocolError(f"the guest staged {size} bytes of {path} for a piece of {want}")
            pieces = await stage.take(name, size, chunk)
        got = sum(len(p) for p in pieces)
        if got != size:
            raise ProtocolError(f"the guest staged {got} bytes of {path} but reported {size}")
        for p in pieces:
            yield p
        offset += size
        if remaining is not None:
            remaining -= size
        if size < want:
            return
    if full:
        async for rest in await fallback(path, offset, remaining, chunk):
            yield rest


__all__ = ["GUEST_FS_ROOT", "STAGE_MIN", "STAGE_MOUNT", "STAGE_PIECE", "Stage", "staged_piece_in", "staged_read"]
