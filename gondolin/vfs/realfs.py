"""RealFSProvider: a host directory, with no way out of it.

Every operation starts from a descriptor of the root taken once at construction, opens the
parent directory of its target without following any symlink (``openat2`` with
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`` where the kernel has it, else one
``openat(O_NOFOLLOW | O_DIRECTORY)`` per component), and then acts on the last name with a
``*at`` call that does not follow it either. So ``..`` (refused by :mod:`.paths` anyway),
absolute or relative symlinks, symlinked parents, and a directory swapped for a symlink while
we walk all end in ELOOP/ENOTDIR/ENOENT inside the tree, never outside it. Hard links are
created with ``linkat`` from a name inside the tree, so they can only point at files already
inside. A hard link that already existed on the host (a file inside sharing its inode with a
file outside) is just a file: writing it changes both names, as it would on the host.

Special files (FIFOs, sockets, devices) are never opened for I/O. Blocking syscalls run in
worker threads bounded by a :class:`anyio.CapacityLimiter`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import anyio
import anyio.to_thread

from . import paths
from .errors import EACCES, EBADF, EBUSY, EINVAL, EISDIR, ENOSYS, EOPNOTSUPP, EXDEV, VfsError
from .provider import (
    ROOT,
    Attr,
    Caller,
    DirectIO,
    Dirent,
    FileHandle,
    OpenMode,
    Provider,
    SetAttr,
    StatFs,
    check_io,
    check_rename_flags,
    check_size,
)

T = TypeVar("T")

DEFAULT_THREADS = 8  # concurrent blocking syscalls per provider

_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = os.O_NOFOLLOW
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_DIR_FLAGS = _O_PATH | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC

# openat2(2), include/uapi/linux/openat2.h. 437 is the same number on every architecture.
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS

# renameat2(2) syscall numbers where libc lacks the wrapper.
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


_libc = _load_libc()


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def _openat2(dirfd: int, path: bytes, flags: int) -> int:
    if _libc is None:
        raise OSError(38, "no libc")
    how = _OpenHow(flags, 0, _RESOLVE)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        _raise_errno()
    return int(fd)


def _renameat2(sfd: int, sname: str, dfd: int, dname: str, flags: int) -> None:
    if _libc is None:
        raise VfsError(EINVAL, "rename flags unsupported on this host")
    args = (
        ctypes.c_int(sfd),
        ctypes.c_char_p(os.fsencode(sname)),
        ctypes.c_int(dfd),
        ctypes.c_char_p(os.fsencode(dname)),
        ctypes.c_uint(flags),
    )
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        rc = fn(*args)
    else:
        nr = _SYS_RENAMEAT2.get(platform.machine())
        if nr is None:
            raise VfsError(EINVAL, "rename flags unsupported on this host")
        rc = _libc.syscall(ctypes.c_long(nr), *args)
    if rc < 0:
        _raise_errno()


def _probe_openat2(root_fd: int) -> bool:
    try:
        os.close(_openat2(root_fd, b".", _DIR_FLAGS))
    except OSError:
        return False  # ENOSYS (kernel < 5.6), EPERM (seccomp), or no libc
    return True


class _Tree:
    """The synchronous core. Every method may block and raises OSError."""

    def __init__(self, root: str, use_openat2: bool | None) -> None:
        self.root_path = os.path.realpath(root)
        self.root_fd = os.open(self.root_path, _DIR_FLAGS)
        st = os.fstat(self.root_fd)
        if not stat.S_ISDIR(st.st_mode):
            os.close(self.root_fd)
            raise NotADirectoryError(self.root_path)
        self.dev = st.st_dev
        probe = _probe_openat2(self.root_fd)
        self.openat2 = probe if use_openat2 is None else (use_openat2 and probe)
        if use_openat2 and not probe:
            os.close(self.root_fd)
            raise OSError(38, "openat2 is not available")

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    # --- resolution ------------------------------------------------------------------------

    def open_dir(self, parts: Sequence[str]) -> int:
        """A new O_PATH descriptor of the directory ``parts``, never through a symlink."""
        if not parts:
            return os.dup(self.root_fd)
        if self.openat2:
            return _openat2(self.root_fd, os.fsencode("/".join(parts)), _DIR_FLAGS)
        fd = os.dup(self.root_fd)
        try:
            for name in parts:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def at(self, parts: Sequence[str], fn: Callable[[int, str], T]) -> T:
        """Run ``fn(parent_fd, name)``; the root itself is ``(root_fd, ".")``."""
        if not parts:
            return fn(self.root_fd, ".")
        pfd = self.open_dir(parts[:-1])
        try:
            return fn(pfd, parts[-1])
        finally:
            os.close(pfd)

    def attr(self, st: os.stat_result) -> Attr:
        ino = st.st_ino
        if st.st_dev != self.dev:  # another host filesystem mounted inside the tree
            ino ^= (st.st_dev & 0xFFFF) << 48
        return Attr(
            ino=ino,
            mode=st.st_mode,
            nlink=st.st_nlink,
            uid=st.st_uid,
            gid=st.st_gid,
            rdev=st.st_rdev,
            blksize=st.st_blksize,
            size=st.st_size,
            blocks=st.st_blocks,
            atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
        )

    def lstat(self, parts: Sequence[str]) -> Attr:
        return self.attr(self.at(parts, lambda d, n: os.stat(n, dir_fd=d, follow_symlinks=False)))

    # --- operations ------------------------------------------------------------------------

    def readdir(self, parts: Sequence[str]) -> list[Dirent]:
        def listing(d: int, n: str) -> list[Dirent]:
            fd = os.open(n, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=d)
            try:
                out = []
                with os.scandir(fd) as it:
                    for entry in it:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # removed while we listed
                        out.append(Dirent(entry.name, self.attr(st)))
                return out
            finally:
                os.close(fd)

        return self.at(parts, listing)

    def readlink(self, parts: Sequence[str]) -> str:
        if not parts:
            raise VfsError(EINVAL)
        return self.at(parts, lambda d, n: os.readlink(n, dir_fd=d))

    def open_file(self, parts: Sequence[str], mode: OpenMode, create: int | None) -> int:
        flags = _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
        if mode.write:
            flags |= os.O_RDWR if mode.read else os.O_WRONLY
        else:
            flags |= os.O_RDONLY
        if mode.append:
            flags |= os.O_APPEND
        if mode.sync:
            flags |= os.O_SYNC

        def opener(d: int, n: str) -> int:
            if create is None:
                fd = os.open(n, flags, dir_fd=d)
            else:
                fd = _create_at(d, n, flags, create, mode.exclusive)
            try:
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    if mode.writes:
                        raise VfsError(EISDIR)
                elif not stat.S_ISREG(st.st_mode):
                    raise VfsError(EACCES, "special files are not opened")
                if mode.writes:
                    _kill_priv(fd, st.st_mode)
                if mode.truncate:
                    os.ftruncate(fd, 0)
            except BaseException:
                os.close(fd)
                raise
            return fd

        if not parts:
            if mode.writes or create is not None:
                raise VfsError(EISDIR)
            return os.open(".", os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC, dir_fd=self.root_fd)
        return self.at(parts, opener)

    def mkdir(self, parts: Sequence[str], mode: int) -> Attr:
        perm = _host_mode(mode, stat.S_IFDIR)

        def make(d: int, n: str) -> None:
            os.mkdir(n, perm, dir_fd=d)
            # The guest applied its umask already; undo the host's.
            if os.stat(n, dir_fd=d, follow_symlinks=False).st_mode & 0o7777 != perm:
                _chmod_nofollow(d, n, perm)

        self.at(parts, make)
        return self.lstat(parts)

    def symlink(self, parts: Sequence[str], target: str) -> Attr:
        self.at(parts, lambda d, n: os.symlink(target, n, dir_fd=d))
        return self.lstat(parts)

    def link(self, src: Sequence[str], dst: Sequence[str]) -> Attr:
        if not src or not dst:
            raise VfsError(EBUSY)
        spfd = self.open_dir(src[:-1])
        try:
            self.at(
                dst,
                lambda d, n: os.link(
                    src[-1], n, src_dir_fd=spfd, dst_dir_fd=d, follow_symlinks=False
                ),
            )
        finally:
            os.close(spfd)
        return self.lstat(dst)

    def unlink(self, parts: Sequence[str]) -> None:
        if not parts:
            raise VfsError(EBUSY)
        self.at(parts, lambda d, n: os.unlink(n, dir_fd=d))

    def rmdir(self, parts: Sequence[str]) -> None:
        if not parts:
            raise VfsError(EBUSY)
        self.at(parts, lambda d, n: os.rmdir(n, dir_fd=d))

    def rename(self, src: Sequence[str], dst: Sequence[str], flags: int) -> None:
        if not src or not dst:
            raise VfsError(EBUSY)
        spfd = self.open_dir(src[:-1])
        try:

            def move(d: int, n: str) -> None:
                if flags:
                    _renameat2(spfd, src[-1], d, n, flags)
                else:
                    os.rename(src[-1], n, src_dir_fd=spfd, dst_dir_fd=d)

            self.at(dst, move)
        finally:
            os.close(spfd)

    def setattr(self, parts: Sequence[str], changes: SetAttr) -> Attr:
        def apply(d: int, n: str) -> None:
            if changes.size is not None:
                fd = os.open(n, os.O_WRONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, dir_fd=d)
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        raise VfsError(EINVAL)
                    _kill_priv(fd, st.st_mode)
                    os.ftruncate(fd, changes.size)
                finally:
                    os.close(fd)
            if changes.mode is not None:
                kind = os.stat(n, dir_fd=d, follow_symlinks=False).st_mode
                _chmod_nofollow(d, n, _host_mode(changes.mode, kind))
            if changes.uid is not None or changes.gid is not None:
                uid = -1 if changes.uid is None else changes.uid
                gid = -1 if changes.gid is None else changes.gid
                os.chown(n, uid, gid, dir_fd=d, follow_symlinks=False)
            if changes.atime_ns is not None or changes.mtime_ns is not None:
                cur = os.stat(n, dir_fd=d, follow_symlinks=False)
                times = (
                    cur.st_atime_ns if changes.atime_ns is None else changes.atime_ns,
                    cur.st_mtime_ns if changes.mtime_ns is None else changes.mtime_ns,
                )
                os.utime(n, ns=times, dir_fd=d, follow_symlinks=False)

        if changes.size is not None:
            check_size(changes.size)
        self.at(parts, apply)
        return self.lstat(parts)

    def statfs(self) -> StatFs:
        sv = os.fstatvfs(self.root_fd)
        return StatFs(
            blocks=sv.f_blocks,
            bfree=sv.f_bfree,
            bavail=sv.f_bavail,
            files=sv.f_files,
            ffree=sv.f_ffree,
            bsize=sv.f_bsize,
            namelen=sv.f_namemax,
            frsize=sv.f_frsize,
        )


def _create_at(dirfd: int, name: str, flags: int, perm: int, exclusive: bool) -> int:
    """open(O_CREAT) that knows whether it created the file, so the exact mode can be set."""
    for _ in range(16):
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, perm, dir_fd=dirfd)
        except FileExistsError:
            if exclusive:
                raise
        else:
            try:
                if os.fstat(fd).st_mode & 0o7777 != perm:
                    os.fchmod(fd, perm)  # the guest applied its umask already
            except BaseException:
                os.close(fd)
                raise
            return fd
        try:
            return os.open(name, flags, dir_fd=dirfd)
        except FileNotFoundError:
            continue  # removed between our two opens: try to create it again
    raise VfsError(EBUSY, "file keeps appearing and vanishing")


def _chmod_nofollow(dirfd: int, name: str, mode: int) -> None:
    """chmod the entry itself: pin it with O_PATH, refuse symlinks, chmod the pinned inode."""
    fd = os.open(name, _O_PATH | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dirfd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise VfsError(EOPNOTSUPP, "symlinks have no mode")
        proc = f"/proc/self/fd/{fd}"
        if os.path.exists(proc):
            os.chmod(proc, mode)
            return
        rfd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, dir_fd=dirfd)
        try:
            if os.fstat(rfd).st_ino != os.fstat(fd).st_ino:
                raise VfsError(EBUSY, "entry changed during chmod")
            os.fchmod(rfd, mode)
        finally:
            os.close(rfd)
    finally:
        os.close(fd)


class RealFSProvider(Provider):
    """A host directory. ``use_openat2=None`` probes the kernel; ``False`` forces the walk.

    ``inline_metadata=True`` runs ``getattr``/``readlink`` on the event loop instead of a
    worker thread: about 6 us instead of about 170 us per call on a local disk, but a hung
    network filesystem would then stall the loop. Use it for local directories.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        use_openat2: bool | None = None,
        max_threads: int = DEFAULT_THREADS,
        inline_metadata: bool = False,
    ) -> None:
        self._tree = _Tree(os.fspath(root), use_openat2)
        self._inline = inline_metadata
        self._limiter = anyio.CapacityLimiter(max_threads)
        self._users = 0  # calls in worker threads right now
        self._closing = False

    @property
    def root(self) -> str:
        return self._tree.root_path

    @property
    def uses_openat2(self) -> bool:
        return self._tree.openat2

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking call in a worker thread, translating host errors.

        The root descriptor stays open until every call that may use it has returned, so a
        close can never let a recycled descriptor number stand in for the root.
        """
        if self._closing:
            raise VfsError(EBADF, "provider is closed")
        self._users += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except OSError as exc:
            raise VfsError.from_os_error(exc) from None
        finally:
            self._users -= 1
            if self._closing and not self._users:
                self._tree.close()

    async def _meta(self, fn: Callable[..., T], *args: object) -> T:
        if not self._inline:
            return await self._run(fn, *args)
        if self._closing:
            raise VfsError(EBADF, "provider is closed")
        try:
            return fn(*args)
        except OSError as exc:
            raise VfsError.from_os_error(exc) from None

    async def _open_fd(self, *args: object) -> int:
        # Shielded: a cancelled caller must not lose a descriptor the thread already opened.
        with anyio.CancelScope(shield=True):
            fd = await self._run(self._tree.open_file, *args)
        return fd

    async def getattr(self, path: str) -> Attr:
        return await self._meta(self._tree.lstat, paths.split(path))

    async def readdir(self, path: str) -> list[Dirent]:
        return await self._run(self._tree.readdir, paths.split(path))

    async def readlink(self, path: str) -> str:
        return await self._meta(self._tree.readlink, paths.split(path))

    async def statfs(self, path: str) -> StatFs:
        return await self._run(self._tree.statfs)

    async def open(self, path: str, mode: OpenMode) -> FileHandle:
        fd = await self._open_fd(paths.split(path), mode, None)
        return _RealHandle(self, fd, mode)

    async def create(
        self, path: str, mode: int, open_mode: OpenMode, caller: Caller = ROOT
    ) -> FileHandle:
        fd = await self._open_fd(paths.split(path), open_mode, _host_mode(mode, stat.S_IFREG))
        return _RealHandle(self, fd, open_mode)

    async def mkdir(self, path: str, mode: int, caller: Caller = ROOT) -> Attr:
        return await self._run(self._tree.mkdir, paths.split(path), mode)

    async def symlink(self, path: str, target: str, caller: Caller = ROOT) -> Attr:
        paths.check_target(target)
        return await self._run(self._tree.symlink, paths.split(path), target)

    async def link(self, src: str, dst: str) -> Attr:
        return await self._run(self._tree.link, paths.split(src), paths.split(dst))

    async def unlink(self, path: str) -> None:
        await self._run(self._tree.unlink, paths.split(path))

    async def rmdir(self, path: str) -> None:
        await self._run(self._tree.rmdir, paths.split(path))

    async def rename(self, src: str, dst: str, flags: int = 0) -> None:
        check_rename_flags(flags)
        await self._run(self._tree.rename, paths.split(src), paths.split(dst), flags)

    async def setattr(self, path: str, changes: SetAttr) -> Attr:
        return await self._run(self._tree.setattr, paths.split(path), changes)

    async def aclose(self) -> None:
        self._closing = True
        if not self._users:
            self._tree.close()


class _Fd:
    """A descriptor closed only once no call is using it (a guest may RELEASE mid-READ).

    Thread-safe: :class:`_RealDirect` uses it from a transport's worker thread while the event
    loop may release the handle."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.closing = False
        self._lock = threading.Lock()

    @contextmanager
    def use(self) -> Iterator[int]:
        with self._lock:
            if self.closing:
                raise VfsError(EBADF)
            self.users += 1
        try:
            yield self.fd
        finally:
            with self._lock:
                self.users -= 1
                last = self.closing and not self.users
            if last:
                os.close(self.fd)

    def close(self) -> None:
        with self._lock:
            if self.closing:
                return
            self.closing = True
            last = not self.users
        if last:
            os.close(self.fd)


class _RealDirect(DirectIO):
    """preadv/pwritev on the handle's descriptor, straight into or out of the caller's buffers."""

    def __init__(self, fd: _Fd, mode: OpenMode) -> None:
        self._fd = fd
        self._mode = mode

    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> int:
        check_io(offset, sum(len(b) for b in buffers))
        if not self._mode.read:
            raise VfsError(EBADF)
        try:
            with self._fd.use() as fd:
                return _vectored(os.preadv, fd, buffers, offset)
        except OSError as exc:
            raise VfsError.from_os_error(exc) from None

    def writefrom(self, offset: int, buffers: Sequence[memoryview]) -> int:
        check_io(offset, sum(len(b) for b in buffers))
        if not self._mode.write:
            raise VfsError(EBADF)
        try:
            with self._fd.use() as fd:
                # With O_APPEND, Linux pwritev appends whatever the offset says.
                return _vectored(os.pwritev, fd, buffers, offset)
        except OSError as exc:
            raise VfsError.from_os_error(exc) from None


def _vectored(call: Callable[[int, Sequence[memoryview], int], int], fd: int,
              buffers: Sequence[memoryview], offset: int) -> int:
    """``call`` over ``buffers`` in IOV_MAX-sized slices, stopping at the first short count."""
    done = 0
    for i in range(0, len(buffers), _IOV_MAX):
        part = buffers[i:i + _IOV_MAX]
        n = call(fd, part, offset + done)
        done += n
        if n < sum(len(b) for b in part):
            break
    return done


class _RealHandle(FileHandle):
    def __init__(self, fs: RealFSProvider, fd: int, mode: OpenMode) -> None:
        self._fs = fs
        self._fd = _Fd(fd)
        self.mode = mode
        self._direct = _RealDirect(self._fd, mode)

    def direct_io(self) -> DirectIO | None:
        return self._direct

    async def read(self, offset: int, size: int) -> bytes:
        check_io(offset, size)
        if not self.mode.read:
            raise VfsError(EBADF)
        with self._fd.use() as fd:
            return await self._fs._run(os.pread, fd, size, offset)

    async def write(self, offset: int, data: bytes) -> int:
        check_io(offset, len(data))
        if not self.mode.write:
            raise VfsError(EBADF)
        with self._fd.use() as fd:
            # With O_APPEND, Linux pwrite appends whatever the offset says.
            return await self._fs._run(os.pwrite, fd, data, offset)

    async def getattr(self) -> Attr:
        with self._fd.use() as fd:
            return self._fs._tree.attr(await self._fs._run(os.fstat, fd))

    async def setattr(self, changes: SetAttr) -> Attr:
        if changes.size is not None:
            if not self.mode.write:
                raise VfsError(EBADF)
            check_size(changes.size)
        with self._fd.use() as fd:
            return self._fs._tree.attr(await self._fs._run(_fsetattr, fd, changes))

    async def fsync(self, datasync: bool) -> None:
        with self._fd.use() as fd:
            await self._fs._run(os.fdatasync if datasync else os.fsync, fd)

    async def fallocate(self, offset: int, length: int, mode: int) -> None:
        if mode != 0:
            raise VfsError(EOPNOTSUPP)
        if offset < 0 or length <= 0:
            raise VfsError(EINVAL)
        check_size(offset + length)
        if not self.mode.write:
            raise VfsError(EBADF)
        with self._fd.use() as fd:
            await self._fs._run(os.posix_fallocate, fd, offset, length)

    async def copy_to(
        self, offset: int, dst: FileHandle, dst_offset: int, length: int
    ) -> int | None:
        if not isinstance(dst, _RealHandle) or not hasattr(os, "copy_file_range"):
            return None
        try:
            with self._fd.use() as src_fd, dst._fd.use() as dst_fd:
                return await self._fs._run(
                    os.copy_file_range, src_fd, dst_fd, length, offset, dst_offset
                )
        except VfsError as exc:
            if exc.errno in (EXDEV, ENOSYS, EOPNOTSUPP, EINVAL):
                return None  # not on this filesystem pair: read/write instead
            raise

    async def release(self) -> None:
        self._fd.close()


def _host_mode(mode: int, kind: int) -> int:
    """Permission bits the guest may set on the host: never setuid, and setgid on directories
    only (group inheritance). A setuid file written by the guest would be a way out of it."""
    return mode & (0o3777 if stat.S_ISDIR(kind) else 0o1777)


def _kill_priv(fd: int, st_mode: int) -> None:
    """Drop setuid/setgid before the guest changes a file's content, as Linux does for
    unprivileged writers (the host process may be privileged, so the kernel would not)."""
    if st_mode & (stat.S_ISUID | stat.S_ISGID) and stat.S_ISREG(st_mode):
        os.fchmod(fd, stat.S_IMODE(st_mode) & ~(stat.S_ISUID | stat.S_ISGID))


def _fsetattr(fd: int, changes: SetAttr) -> os.stat_result:
    if changes.size is not None:
        _kill_priv(fd, os.fstat(fd).st_mode)
        os.ftruncate(fd, changes.size)
    if changes.mode is not None:
        os.fchmod(fd, _host_mode(changes.mode, os.fstat(fd).st_mode))
    if changes.uid is not None or changes.gid is not None:
        os.fchown(
            fd,
            -1 if changes.uid is None else changes.uid,
            -1 if changes.gid is None else changes.gid,
        )
    if changes.atime_ns is not None or changes.mtime_ns is not None:
        cur = os.fstat(fd)
        os.utime(
            fd,
            ns=(
                cur.st_atime_ns if changes.atime_ns is None else changes.atime_ns,
                cur.st_mtime_ns if changes.mtime_ns is None else changes.mtime_ns,
            ),
        )
    return os.fstat(fd)


__all__ = ["RealFSProvider"]
