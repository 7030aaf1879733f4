"""The provider interface: what a mount's backing store implements.

Providers are path-based and never follow symlinks: every path names the entry itself, as
``lstat`` would. The guest kernel resolves symlinks and ``..`` on its own and asks the host
one component at a time, so a provider never needs to, and a host-side path can never be
redirected by something the guest planted. The FS RPC service keeps the FUSE node table and
turns node ids into paths; providers see only paths and open :class:`FileHandle` objects.

Every failure is a :class:`~gondolin.vfs.errors.VfsError` carrying a Linux errno.
"""

from __future__ import annotations

import stat
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass

from .errors import EACCES, EBADF, EFBIG, EINVAL, EOPNOTSUPP, EROFS, VfsError
from .wire import (
    MAX_IO,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Attr,
    StatFs,
)

__all__ = [
    "Attr",
    "Caller",
    "DirectIO",
    "Dirent",
    "FileHandle",
    "OpenMode",
    "Provider",
    "SetAttr",
    "StatFs",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
]

MAX_FILE_SIZE = (1 << 63) - 1  # largest offset + length a provider accepts
COPY_CHUNK = 256 * 1024  # generic copy_file_range moves this much per read/write
MAX_COPY = 64 * 1024 * 1024  # bytes one copy_file_range call copies at most (a short count)

R_OK, W_OK, X_OK = 4, 2, 1


@dataclass(frozen=True, slots=True)
class Caller:
    """The guest process behind a request (from the FUSE request header)."""

    uid: int = 0
    gid: int = 0
    pid: int = 0


ROOT = Caller()

# The guest process behind the request being served; the FS RPC service sets it per request
# so that wrappers (hooks, audit) can see who asked without every method carrying it.
current_caller: ContextVar[Caller] = ContextVar("gondolin_vfs_caller", default=ROOT)


# Linux open(2) flag values (include/uapi/asm-generic/fcntl.h); the guest is always Linux.
_O_ACCMODE = 0o3
_O_WRONLY = 0o1
_O_RDWR = 0o2
_O_CREAT = 0o100
_O_EXCL = 0o200
_O_TRUNC = 0o1000
_O_APPEND = 0o2000
_O_DSYNC = 0o10000
_O_SYNC = 0o4010000


@dataclass(frozen=True, slots=True)
class OpenMode:
    """How a file is opened, independent of the host's flag numbering."""

    read: bool = True
    write: bool = False
    append: bool = False
    truncate: bool = False
    exclusive: bool = False  # create only: fail with EEXIST if the name exists
    sync: bool = False

    @classmethod
    def from_linux_flags(cls, flags: int) -> OpenMode:
        acc = flags & _O_ACCMODE
        if acc == _O_ACCMODE:
            raise VfsError(EINVAL, "bad access mode")
        write = acc in (_O_WRONLY, _O_RDWR)
        return cls(
            read=acc != _O_WRONLY,
            write=write,
            append=bool(flags & _O_APPEND) and write,
            truncate=bool(flags & _O_TRUNC) and write,
            exclusive=bool(flags & _O_EXCL) and bool(flags & _O_CREAT),
            sync=bool(flags & (_O_DSYNC | _O_SYNC)),
        )

    @property
    def writes(self) -> bool:
        return self.write or self.truncate or self.append


READ_ONLY = OpenMode()
READ_WRITE = OpenMode(read=True, write=True)


@dataclass(frozen=True, slots=True)
class SetAttr:
    """Attribute changes; ``None`` leaves a field as it is. ``mode`` holds permission bits."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None

    @property
    def empty(self) -> bool:
        return all(
            v is None
            for v in (self.mode, self.uid, self.gid, self.size, self.atime_ns, self.mtime_ns)
        )


@dataclass(frozen=True, slots=True)
class Dirent:
    """One name of a provider's directory listing, with its attributes (what FUSE readdirplus
    returns). ``vm.fs.scandir`` gives users :class:`gondolin.DirEntry` values instead."""

    name: str
    attr: Attr


def dtype(mode: int) -> int:
    """DT_* value of a mode (DT_REG 8, DT_DIR 4, DT_LNK 10, ...)."""
    return (mode >> 12) & 0xF


def check_io(offset: int, size: int) -> None:
    if offset < 0 or size < 0:
        raise VfsError(EINVAL)
    if size > MAX_IO:
        raise VfsError(EINVAL, f"I/O of {size} bytes exceeds {MAX_IO}")
    if offset + size > MAX_FILE_SIZE:
        raise VfsError(EFBIG)


def check_size(size: int) -> None:
    if size < 0:
        raise VfsError(EINVAL)
    if size > MAX_FILE_SIZE:
        raise VfsError(EFBIG)


def check_permission(attr: Attr, mask: int, caller: Caller) -> None:
    """access(2) by mode bits; root passes except X on a file with no x bit at all."""
    mask &= R_OK | W_OK | X_OK
    if not mask:
        return
    if caller.uid == 0:
        if mask & X_OK and not stat.S_ISDIR(attr.mode) and not attr.mode & 0o111:
            raise VfsError(EACCES)
        return
    if caller.uid == attr.uid:
        bits = (attr.mode >> 6) & 7
    elif caller.gid == attr.gid:
        bits = (attr.mode >> 3) & 7
    else:
        bits = attr.mode & 7
    if mask & ~bits:
        raise VfsError(EACCES)


def check_rename_flags(flags: int) -> None:
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
        RENAME_NOREPLACE | RENAME_EXCHANGE
    ):
        raise VfsError(EINVAL, "bad rename flags")


class DirectIO(ABC):
    """Scatter/gather I/O between an open file and buffers the caller owns, with no copy in
    between: how a transport whose buffers are guest memory (virtiofs) moves READ and WRITE
    payloads. The same checks as the handle's :meth:`FileHandle.read` and
    :meth:`FileHandle.write` apply (open mode, offset and size bounds). Synchronous and
    possibly blocking: call it from a worker thread. Safe against the handle being released
    on another thread meanwhile (the call then fails with EBADF)."""

    @abstractmethod
    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Fill ``buffers`` in order from ``offset``; the number of bytes read (short at EOF)."""

    @abstractmethod
    def writefrom(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Write ``buffers`` in order at ``offset`` (at the end when opened for append)."""


class FileHandle(ABC):
    """An open file. Handles stay valid after their path is renamed or unlinked."""

    mode: OpenMode = READ_ONLY

    def direct_io(self) -> DirectIO | None:
        """This handle's :class:`DirectIO`, when reads and writes are plain file I/O on the
        host that nothing else needs to see; ``None`` (the default, and what wrappers return
        unless they say otherwise) means "use :meth:`read` and :meth:`write`"."""
        return None

    @abstractmethod
    async def read(self, offset: int, size: int) -> bytes: ...

    @abstractmethod
    async def write(self, offset: int, data: bytes) -> int:
        """Write at ``offset`` (at the end of the file when opened for append)."""

    @abstractmethod
    async def getattr(self) -> Attr: ...

    async def setattr(self, changes: SetAttr) -> Attr:
        raise VfsError(EOPNOTSUPP)

    async def flush(self) -> None:
        return None

    async def fsync(self, datasync: bool) -> None:
        return None

    async def fallocate(self, offset: int, length: int, mode: int) -> None:
        """Mode 0 only: make sure ``[offset, offset+length)`` is within the file."""
        if mode != 0:
            raise VfsError(EOPNOTSUPP)
        if not self.mode.write:
            raise VfsError(EBADF)
        check_size(offset + length)
        if offset < 0 or length <= 0:
            raise VfsError(EINVAL)
        if (await self.getattr()).size < offset + length:
            await self.setattr(SetAttr(size=offset + length))

    async def copy_to(
        self, offset: int, dst: FileHandle, dst_offset: int, length: int
    ) -> int | None:
        """Copy natively into ``dst`` when both ends allow it; ``None`` means "not here"."""
        return None

    async def release(self) -> None:
        return None


async def copy_range(
    src: FileHandle, src_offset: int, dst: FileHandle, dst_offset: int, length: int
) -> int:
    """copy_file_range(2) over any two handles: native when possible, else read/write."""
    if src_offset < 0 or dst_offset < 0 or length < 0:
        raise VfsError(EINVAL)
    if not src.mode.read or not dst.mode.write or dst.mode.append:
        raise VfsError(EBADF)
    length = min(length, MAX_COPY)
    check_size(dst_offset + length)
    native = await src.copy_to(src_offset, dst, dst_offset, length)
    if native is not None:
        return native
    done = 0
    while done < length:
        chunk = await src.read(src_offset + done, min(COPY_CHUNK, length - done))
        if not chunk:
            break
        written = await dst.write(dst_offset + done, chunk)
        done += written
        if written < len(chunk):
            break
    return done


class Provider(ABC):
    """A tree of files behind one mount. Subclasses implement what they support.

    Read operations are abstract. Mutations default to EROFS on a read-only provider and
    EOPNOTSUPP otherwise; ``statfs`` defaults to a synthetic 64 GiB filesystem; ``access``
    defaults to a mode-bit check.
    """

    @property
    def readonly(self) -> bool:
        return False

    # --- reading ---------------------------------------------------------------------------

    @abstractmethod
    async def getattr(self, path: str) -> Attr:
        """Attributes of the entry itself (``lstat``)."""

    @abstractmethod
    async def readdir(self, path: str) -> Sequence[Dirent]:
        """Entries of a directory, without ``.`` and ``..``."""

    @abstractmethod
    async def open(self, path: str, mode: OpenMode) -> FileHandle: ...

    async def readlink(self, path: str) -> str:
        raise VfsError(EINVAL)

    async def statfs(self, path: str) -> StatFs:
        return SYNTHETIC_STATFS

    async def access(self, path: str, mask: int, caller: Caller = ROOT) -> None:
        attr = await self.getattr(path)
        if mask & W_OK and self.readonly:
            raise VfsError(EROFS)
        check_permission(attr, mask, caller)

    # --- writing ---------------------------------------------------------------------------

    def _unsupported(self) -> VfsError:
        return VfsError(EROFS if self.readonly else EOPNOTSUPP)

    async def setattr(self, path: str, changes: SetAttr) -> Attr:
        raise self._unsupported()

    async def create(
        self, path: str, mode: int, open_mode: OpenMode, caller: Caller = ROOT
    ) -> FileHandle:
        """Open ``path``, creating a regular file with permission bits ``mode`` if absent."""
        raise self._unsupported()

    async def mkdir(self, path: str, mode: int, caller: Caller = ROOT) -> Attr:
        raise self._unsupported()

    async def symlink(self, path: str, target: str, caller: Caller = ROOT) -> Attr:
        raise self._unsupported()

    async def link(self, src: str, dst: str) -> Attr:
        raise self._unsupported()

    async def unlink(self, path: str) -> None:
        raise self._unsupported()

    async def rmdir(self, path: str) -> None:
        raise self._unsupported()

    async def rename(self, src: str, dst: str, flags: int = 0) -> None:
        raise self._unsupported()

    async def aclose(self) -> None:
        """Release host resources (file descriptors); the provider is unusable afterwards."""
        return None


SYNTHETIC_STATFS = StatFs(
    blocks=(64 << 30) // 4096,
    bfree=(64 << 30) // 4096,
    bavail=(64 << 30) // 4096,
    files=1 << 20,
    ffree=1 << 20,
)


def blocks_for(size: int) -> int:
    return (size + 511) // 512


class ProviderWrapper(Provider):
    """Forwards every operation to ``inner``; subclass it to change a few."""

    def __init__(self, inner: Provider) -> None:
        self.inner = inner

    @property
    def readonly(self) -> bool:
        return self.inner.readonly

    async def getattr(self, path: str) -> Attr:
        return await self.inner.getattr(path)

    async def readdir(self, path: str) -> Sequence[Dirent]:
        return await self.inner.readdir(path)

    async def open(self, path: str, mode: OpenMode) -> FileHandle:
        return await self.inner.open(path, mode)

    async def readlink(self, path: str) -> str:
        return await self.inner.readlink(path)

    async def statfs(self, path: str) -> StatFs:
        return await self.inner.statfs(path)

    async def access(self, path: str, mask: int, caller: Caller = ROOT) -> None:
        await self.inner.access(path, mask, caller)

    async def setattr(self, path: str, changes: SetAttr) -> Attr:
        return await self.inner.setattr(path, changes)

    async def create(
        self, path: str, mode: int, open_mode: OpenMode, caller: Caller = ROOT
    ) -> FileHandle:
        return await self.inner.create(path, mode, open_mode, caller)

    async def mkdir(self, path: str, mode: int, caller: Caller = ROOT) -> Attr:
        return await self.inner.mkdir(path, mode, caller)

    async def symlink(self, path: str, target: str, caller: Caller = ROOT) -> Attr:
        return await self.inner.symlink(path, target, caller)

    async def link(self, src: str, dst: str) -> Attr:
        return await self.inner.link(src, dst)

    async def unlink(self, path: str) -> None:
        await self.inner.unlink(path)

    async def rmdir(self, path: str) -> None:
        await self.inner.rmdir(path)

    async def rename(self, src: str, dst: str, flags: int = 0) -> None:
        await self.inner.rename(src, dst, flags)

    async def aclose(self) -> None:
        await self.inner.aclose()


class HandleWrapper(FileHandle):
    """Forwards every handle operation to ``inner``.

    ``copy_to`` is not forwarded: a native copy would bypass whatever the wrapper adds, so
    copies through wrappers fall back to read/write unless a subclass knows better.
    """

    def __init__(self, inner: FileHandle) -> None:
        self.inner = inner
        self.mode = inner.mode

    async def read(self, offset: int, size: int) -> bytes:
        return await self.inner.read(offset, size)

    async def write(self, offset: int, data: bytes) -> int:
        return await self.inner.write(offset, data)

    async def getattr(self) -> Attr:
        return await self.inner.getattr()

    async def setattr(self, changes: SetAttr) -> Attr:
        return await self.inner.setattr(changes)

    async def flush(self) -> None:
        await self.inner.flush()

    async def fsync(self, datasync: bool) -> None:
        await self.inner.fsync(datasync)

    async def fallocate(self, offset: int, length: int, mode: int) -> None:
        await self.inner.fallocate(offset, length, mode)

    async def release(self) -> None:
        await self.inner.release()
