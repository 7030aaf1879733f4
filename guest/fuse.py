"""Gondolin guest FUSE daemon: the kernel's FUSE requests, served by the host over the fs port.

Stdlib only; speaks the raw ``/dev/fuse`` protocol (include/uapi/linux/fuse.h, protocol 7.x)
and the FS RPC wire format of ``vfs_wire.py`` (a copy of ``gondolin/vfs/wire.py``).

Layout: one FUSE filesystem is mounted at :data:`HIDDEN_ROOT`; its root is the host's mount
router, whose paths are guest paths, and each mount point is a bind mount of its directory in
there. One FUSE connection means one wire stream, one host node table and one daemon for any
number of mounts; renames and links between mount points fail with EXDEV in the guest VFS
(they are different vfsmounts) before they reach the host.

Shape: :class:`FuseSession` is sans-IO: FUSE request bytes in, wire frames out; wire messages
in, FUSE replies out. It works on raw structs (layouts taken from the wire module's classes)
rather than the codec's dataclasses: under emulation every Python object costs, and this is
the path every file operation takes. :class:`Daemon` drives it with three threads, which
keeps each request to about five system calls and lets many be in flight:

- the main thread reads ``/dev/fuse`` (blocking) and writes requests to the port;
- the port thread reads replies from the port and writes them to ``/dev/fuse``;
- the notify thread writes cache invalidations from the host to ``/dev/fuse``. The kernel
  may block such a write on a lock that a request still waiting for its reply holds, so the
  threads that deliver replies must never make it.

Kernel caching: entries and attributes live for the TTLs the host gives (negative lookups
too); file pages are kept across opens (``FOPEN_KEEP_CACHE``) and dropped when a refreshed
attribute shows another mtime or size (``FUSE_AUTO_INVAL_DATA``) or when the host says so
(``FUSE_NOTIFY_INVAL_INODE`` / ``INVAL_ENTRY``). Permission checks are the kernel's
(``default_permissions``), so ``access(2)`` never costs a round trip.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import queue
import select
import stat
import struct
import sys
import threading
import time
from collections.abc import Sequence

try:  # in the guest: the copy next to this file
    import vfs_wire as wire  # type: ignore[import-not-found]
except ImportError:  # on the host (tests)
    from gondolin.vfs import wire

try:  # the agent's port lookup and region mapping, one implementation for both guest daemons
    from agent import SharedRegion, find_port  # type: ignore[import-not-found]
except ImportError:  # on the host (tests)
    from guest.agent import SharedRegion, find_port

HIDDEN_ROOT = "/run/gondolin/fs"
FUSE_DEVICE = "/dev/fuse"

# --- FUSE protocol 7.38 (include/uapi/linux/fuse.h) -------------------------------------------
FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR = 38
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
_ATTR_FMT = "QQQqqqIIIIIIIIII"  # fuse_attr: ino size blocks a/m/ctime a/m/ctimensec mode ... flags
ATTR_SIZE = struct.calcsize("<" + _ATTR_FMT)  # 88
ENTRY_OUT = struct.Struct("<QQQQII" + _ATTR_FMT)  # nodeid gen entry_valid attr_valid nsecs attr
ATTR_OUT = struct.Struct("<QII" + _ATTR_FMT)  # attr_valid nsec dummy attr
OPEN_OUT = struct.Struct("<QII")
WRITE_OUT = struct.Struct("<II")
KSTATFS = struct.Struct("<QQQQQIIII24x")
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (flags2 from 7.36 on)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
READ_IN = struct.Struct("<QQIIQII")  # fuse_write_in has the same 40-byte layout
RELEASE_IN = struct.Struct("<QIIQ")
FSYNC_IN = struct.Struct("<QII")
ACCESS_IN = struct.Struct("<II")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
FALLOCATE_IN = struct.Struct("<QQQII")
COPY_RANGE_IN = struct.Struct("<QQQQQQQ")
DIRENT = struct.Struct("<QQII")  # ino off namelen type, then the name padded to 8
INVAL_INODE_OUT = struct.Struct("<Qqq")
INVAL_ENTRY_OUT = struct.Struct("<QII")

# enum fuse_opcode
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE = 8, 9, 10, 11, 12, 13, 14, 15, 16
STATFS, RELEASE, FSYNC, FLUSH, INIT, OPENDIR, READDIR = 17, 18, 20, 25, 26, 27, 28
RELEASEDIR, FSYNCDIR, ACCESS, CREATE, INTERRUPT, DESTROY = 29, 30, 34, 35, 36, 38
BATCH_FORGET, FALLOCATE, READDIRPLUS, RENAME2, COPY_FILE_RANGE = 42, 43, 44, 45, 47

# FUSE_INIT flags we ask for; the kernel grants those it knows.
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13  # always: not READDIRPLUS_AUTO, which lists pages after the
# first without attributes, so `ls -l` / `git status` then look every name up one by one
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19  # the host drops setuid/setgid itself: no GETATTR before each chown
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
INIT_EXT = 1 << 30
WANTED_FLAGS = (
    ASYNC_READ | ATOMIC_O_TRUNC | BIG_WRITES | AUTO_INVAL_DATA | DO_READDIRPLUS
    | ASYNC_DIO | PARALLEL_DIROPS | HANDLE_KILLPRIV | MAX_PAGES | CACHE_SYMLINKS
)  # fmt: skip
FATTR_FH = 1 << 6
GETATTR_FH = 1 << 0
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
NOTIFY_INVAL_INODE, NOTIFY_INVAL_ENTRY = 2, 3
WIRE_FATTR = (
    wire.FATTR_MODE | wire.FATTR_UID | wire.FATTR_GID | wire.FATTR_SIZE | wire.FATTR_ATIME
    | wire.FATTR_MTIME | wire.FATTR_ATIME_NOW | wire.FATTR_MTIME_NOW
)  # fmt: skip

# --- wire replies, read without the codec's dataclasses ----------------------------------------
_fmt = wire.body_format
_ATTR_W = _fmt(wire.Attr)[1:]
W_ENTRY = struct.Struct(_fmt(wire.EntryReply) + _ATTR_W)  # node gen ttls, then Attr
W_ATTR = struct.Struct(_fmt(wire.AttrReply) + _ATTR_W)
W_OPEN = struct.Struct(_fmt(wire.OpenReply))
W_SIZE = struct.Struct(_fmt(wire.SizeReply))
W_STATFS = struct.Struct(_fmt(wire.StatFs))
W_RESPONSE = wire.RESPONSE_HEADER
W_BODY = W_RESPONSE.size
_OP_READ = int(wire.Op.READ)

PAGE = 4096
MAX_BACKGROUND = 64  # async requests (readahead, release) the kernel keeps in flight
CONGESTION = 48
READ_AHEAD_KB = 1024  # set through the bdi after mounting; INIT cannot raise it past 128 KiB
_O_WRONLY, _O_CREAT, _O_EXCL = 0o1, 0o100, 0o200
_NS = 1_000_000_000
_MS_NS = 1_000_000

# One /dev/fuse read must be able to take a write request of max_write bytes.
FUSE_BUFFER = wire.MAX_IO + 2 * PAGE
# The virtio-console driver hands out one 4 KiB buffer per read() and takes at most 32 KiB
# per write(); readv/writev with many pieces moves many buffers per system call.
PORT_READ_PIECE = 4096
PORT_READ_PIECES = 256
PORT_WRITE_PIECE = 32 * 1024
PORT_WRITE_PIECES = 64
NOTIFY_LIMIT = 4096  # invalidations waiting for the notify thread; more are dropped
HELLO_TIMEOUT = 20.0

TO_PORT, TO_FUSE, TO_NOTIFY = 1, 2, 3
Piece = bytes | memoryview
Out = tuple[int, Sequence[Piece]]


def log(msg: str) -> None:
    try:
        os.write(2, f"gondolin-fuse: {msg}\n".encode())
    except OSError:
        pass


def fuse_entry(
    node: int, gen: int, entry_ms: int, attr_ms: int, ino: int, mode: int, nlink: int,
    uid: int, gid: int, rdev: int, blksize: int, size: int, blocks: int,
    atime: int, mtime: int, ctime: int,
) -> bytes:  # fmt: skip
    """fuse_entry_out from the values of a wire EntryReply (W_ENTRY order)."""
    return ENTRY_OUT.pack(
        node, gen, entry_ms // 1000, attr_ms // 1000, entry_ms % 1000 * _MS_NS,
        attr_ms % 1000 * _MS_NS, ino, size, blocks, atime // _NS, mtime // _NS, ctime // _NS,
        atime % _NS, mtime % _NS, ctime % _NS, mode, nlink, uid, gid, rdev, blksize, 0,
    )  # fmt: skip


def fuse_attr_out(
    attr_ms: int, ino: int, mode: int, nlink: int, uid: int, gid: int, rdev: int,
    blksize: int, size: int, blocks: int, atime: int, mtime: int, ctime: int,
) -> bytes:  # fmt: skip
    """fuse_attr_out from the values of a wire AttrReply (W_ATTR order)."""
    return ATTR_OUT.pack(
        attr_ms // 1000, attr_ms % 1000 * _MS_NS, 0, ino, size, blocks, atime // _NS,
        mtime // _NS, ctime // _NS, atime % _NS, mtime % _NS, ctime % _NS, mode, nlink,
        uid, gid, rdev, blksize, 0,
    )  # fmt: skip


NO_ENTRY = bytes(ENTRY_OUT.size)  # readdirplus "." and "..": no attributes, no reference


def negative_entry(ttl_ms: int) -> bytes:
    """A lookup reply that makes the kernel cache "no such name" for ``ttl_ms``."""
    return ENTRY_OUT.pack(0, 0, ttl_ms // 1000, 0, ttl_ms % 1000 * _MS_NS, 0, *bytes(16))


def _names(body: memoryview, pos: int, count: int) -> list[bytes]:
    """``count`` NUL-terminated strings from ``pos`` on."""
    parts = bytes(body[pos:]).split(b"\0", count)
    if len(parts) <= count:
        raise ValueError("unterminated name")
    return parts[:count]


class FuseSession:
    """Sans-IO translation between FUSE and the FS RPC wire format.

    :meth:`fuse_request` takes one request read from ``/dev/fuse``; :meth:`port_message` one
    message from the host. Both return ``(destination, pieces)`` pairs: ``TO_PORT`` pieces
    make one frame for the host, ``TO_FUSE`` pieces one ``writev`` to ``/dev/fuse``,
    ``TO_NOTIFY`` pieces one notification for ``/dev/fuse`` (to be written from a thread
    that answers no requests). ``fuse_request`` runs on one thread and ``port_message`` on
    another: they share only :attr:`pending` (single dict operations, atomic in CPython).
    """

    def __init__(self, hello: wire.HelloReply, shm: memoryview | None = None) -> None:
        self.negative_ttl_ms = hello.negative_ttl_ms
        self.max_io = min(hello.max_io, wire.MAX_IO)
        # wire id -> (FUSE unique, FUSE opcode); unique 0: the reply goes to nobody
        self.pending: dict[int, tuple[int, int]] = {}
        # The shared region's FUSE area, when the host serves it: read and write payloads go
        # through one of its spans instead of the port (free_spans: list.pop/append are atomic).
        usable = shm is not None and hello.flags & wire.HELLO_SHM and len(shm) >= wire.SHM_SPANS * wire.MAX_IO
        self.shm = shm if usable else None
        self.free_spans = list(range(wire.SHM_SPANS)) if usable else []
        self.spans: dict[int, int] = {}  # wire id -> the span its payload is in
        self._reply_buf = bytearray(wire.MAX_IO if usable else 0)  # port thread only: see _span_reply
        self._reply_view = memoryview(self._reply_buf)
        self._ids = itertools.count(1)
        self.initialized = False
        self.destroyed = False
        self.bad_messages = 0
        self._ops = {
            LOOKUP: self._lookup, FORGET: self._forget, BATCH_FORGET: self._batch_forget,
            GETATTR: self._getattr, SETATTR: self._setattr, READLINK: self._readlink,
            SYMLINK: self._symlink, MKNOD: self._mknod, MKDIR: self._mkdir,
            UNLINK: self._unlink, RMDIR: self._rmdir, RENAME: self._rename,
            RENAME2: self._rename, LINK: self._link, OPEN: self._open, READ: self._read,
            WRITE: self._write, STATFS: self._statfs, RELEASE: self._release,
            RELEASEDIR: self._release, FSYNC: self._fsync,
            OPENDIR: self._opendir, READDIR: self._readdir, READDIRPLUS: self._readdir,
            ACCESS: self._access, CREATE: self._create, FALLOCATE: self._fallocate,
            COPY_FILE_RANGE: self._copy_file_range, INIT: self._init,
        }  # fmt: skip

    # --- FUSE -> host ------------------------------------------------------------------------

    def fuse_request(self, data: bytes | bytearray | memoryview) -> list[Out]:
        buf = memoryview(data)
        if len(buf) < IN_HEADER.size:
            self.bad_messages += 1
            return []
        length, op, unique, node, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(buf, 0)
        handler = self._ops.get(op)
        if handler is None:
            return self._local(op, unique)
        try:
            return handler(op, unique, node, uid, gid, pid, buf[IN_HEADER.size : length])
        except (struct.error, ValueError):
            self.bad_messages += 1
            if op in (FORGET, BATCH_FORGET):
                return []
            return [_error(unique, errno.EINVAL)]

    def _local(self, op: int, unique: int) -> list[Out]:
        if op == INTERRUPT:
            return []  # every request completes soon anyway; late replies are fine
        if op == FSYNCDIR:
            return [_reply(unique)]  # directory changes are synchronous on the host
        if op == FLUSH:
            # Writes reach the host before write(2) returns, so close(2) has nothing to push;
            # ENOSYS makes the kernel skip FLUSH from now on (and saves a round trip per close).
            return [_error(unique, errno.ENOSYS)]
        if op == DESTROY:
            self.destroyed = True
            return [_reply(unique)]
        # xattrs, locks (kernel-local without POSIX_LOCKS), ioctl, poll, lseek, bmap, tmpfile:
        # ENOSYS makes the kernel stop asking or fall back to its generic code.
        return [_error(unique, errno.ENOSYS)]

    def _req(
        self,
        unique: int,
        op: int,
        cls: type[wire.Body],
        fixed: tuple[int, ...],
        variables: tuple[bytes, ...] = (),
        tail: Piece = b"",
        uid: int = 0,
        gid: int = 0,
        pid: int = 0,
        span: int | None = None,
    ) -> list[Out]:
        rid = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        if span is not None:
            self.spans[rid] = span
        self.pending[rid] = (unique, op)
        return [(TO_PORT, wire.request_frame(rid, cls, fixed, variables, tail, uid, gid, pid))]

    def _lookup(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                body: memoryview) -> list[Out]:  # fmt: skip
        (name,) = _names(body, 0, 1)
        return self._req(unique, op, wire.Lookup, (node,), (name,), b"", uid, gid, pid)

    def _forget(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                body: memoryview) -> list[Out]:  # fmt: skip
        return self._forget_items(((node, FORGET_IN.unpack_from(body, 0)[0]),))

    def _batch_forget(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                      body: memoryview) -> list[Out]:  # fmt: skip
        count, _ = BATCH_FORGET_IN.unpack_from(body, 0)
        base = BATCH_FORGET_IN.size
        items = [FORGET_ONE.unpack_from(body, base + FORGET_ONE.size * i) for i in range(count)]
        return self._forget_items(items)

    def _forget_items(self, items: Sequence[tuple[int, int]]) -> list[Out]:
        out: list[Out] = []
        for start in range(0, len(items), wire.MAX_FORGET):
            chunk = items[start : start + wire.MAX_FORGET]
            payload = struct.pack("<I", len(chunk)) + b"".join(
                FORGET_ONE.pack(n, c) for n, c in chunk
            )
            rid = next(self._ids) & 0xFFFFFFFF or next(self._ids)  # FORGET has no reply
            out.append((TO_PORT, wire.request_frame(rid, wire.Forget, (), (), payload)))
        return out

    def _getattr(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                 body: memoryview) -> list[Out]:  # fmt: skip
        flags, _, fh = GETATTR_IN.unpack_from(body, 0)
        fixed = (node, fh if flags & GETATTR_FH else 0)
        return self._req(unique, op, wire.Getattr, fixed, (), b"", uid, gid, pid)

    def _setattr(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                 body: memoryview) -> list[Out]:  # fmt: skip
        (valid, _, fh, size, _owner, atime, mtime, _ctime, atimensec, mtimensec, _cn, mode, _u4,
         new_uid, new_gid, _u5) = SETATTR_IN.unpack_from(body, 0)  # fmt: skip
        fixed = (
            node, fh if valid & FATTR_FH else 0, valid & WIRE_FATTR, mode, new_uid, new_gid,
            size, atime * _NS + atimensec, mtime * _NS + mtimensec,
        )  # fmt: skip
        return self._req(unique, op, wire.Setattr, fixed, (), b"", uid, gid, pid)

    def _readlink(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                  body: memoryview) -> list[Out]:  # fmt: skip
        return self._req(unique, op, wire.Readlink, (node,), (), b"", uid, gid, pid)

    def _symlink(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                 body: memoryview) -> list[Out]:  # fmt: skip
        name, target = _names(body, 0, 2)
        return self._req(unique, op, wire.Symlink, (node,), (name, target), b"", uid, gid, pid)

    def _mknod(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
               body: memoryview) -> list[Out]:  # fmt: skip
        mode, _rdev, _umask, _ = MKNOD_IN.unpack_from(body, 0)
        (name,) = _names(body, MKNOD_IN.size, 1)
        if not stat.S_ISREG(mode):
            return [_error(unique, errno.EPERM)]  # no FIFOs, sockets or devices on host storage
        fixed = (node, mode, _O_WRONLY | _O_CREAT | _O_EXCL)
        return self._req(unique, op, wire.Create, fixed, (name,), b"", uid, gid, pid)

    def _mkdir(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
               body: memoryview) -> list[Out]:  # fmt: skip
        mode, _umask = MKDIR_IN.unpack_from(body, 0)  # umask applied: no FUSE_DONT_MASK
        (name,) = _names(body, MKDIR_IN.size, 1)
        return self._req(unique, op, wire.Mkdir, (node, mode), (name,), b"", uid, gid, pid)

    def _unlink(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                body: memoryview) -> list[Out]:  # fmt: skip
        (name,) = _names(body, 0, 1)
        return self._req(unique, op, wire.Unlink, (node,), (name,), b"", uid, gid, pid)

    def _rmdir(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
               body: memoryview) -> list[Out]:  # fmt: skip
        (name,) = _names(body, 0, 1)
        return self._req(unique, op, wire.Rmdir, (node,), (name,), b"", uid, gid, pid)

    def _rename(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                body: memoryview) -> list[Out]:  # fmt: skip
        if op == RENAME:
            (newdir,) = RENAME_IN.unpack_from(body, 0)
            flags, pos = 0, RENAME_IN.size
        else:
            newdir, flags, _ = RENAME2_IN.unpack_from(body, 0)
            pos = RENAME2_IN.size
        old, new = _names(body, pos, 2)
        fixed = (node, newdir, flags)
        return self._req(unique, op, wire.Rename, fixed, (old, new), b"", uid, gid, pid)

    def _link(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
              body: memoryview) -> list[Out]:  # fmt: skip
        (old,) = LINK_IN.unpack_from(body, 0)
        (name,) = _names(body, LINK_IN.size, 1)
        return self._req(unique, op, wire.Link, (old, node), (name,), b"", uid, gid, pid)

    def _open(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
              body: memoryview) -> list[Out]:  # fmt: skip
        flags, _ = OPEN_IN.unpack_from(body, 0)
        return self._req(unique, op, wire.Open, (node, flags), (), b"", uid, gid, pid)

    def _opendir(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                 body: memoryview) -> list[Out]:  # fmt: skip
        return self._req(unique, op, wire.Opendir, (node,), (), b"", uid, gid, pid)

    def _create(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                body: memoryview) -> list[Out]:  # fmt: skip
        flags, mode, _umask, _ = CREATE_IN.unpack_from(body, 0)
        (name,) = _names(body, CREATE_IN.size, 1)
        fixed = (node, mode, flags)
        return self._req(unique, op, wire.Create, fixed, (name,), b"", uid, gid, pid)

    def _read(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
              body: memoryview) -> list[Out]:  # fmt: skip
        fh, offset, size, *_ = READ_IN.unpack_from(body, 0)
        size = min(size, self.max_io)
        span = self._take_span()
        if span is not None:  # the host places the data in the span
            return self._req(unique, op, wire.ReadShm, (fh, offset, size, span), (), b"", uid, gid, pid, span)
        return self._req(unique, op, wire.Read, (fh, offset, size), (), b"", uid, gid, pid)

    def _take_span(self) -> int | None:
        try:
            return self.free_spans.pop()
        except IndexError:  # no region, or every span in flight: the port carries it
            return None

    def release_span(self, span: int) -> None:
        self.free_spans.append(span)

    def _span_reply(self, unique: int, span: int, msg: bytes) -> Out:
        """A READ_SHM's reply: the data the host placed in ``span``. Copied out first: the
        kernel will not take a /dev/fuse write from the BAR mapping (a PFN map it cannot pin)."""
        try:
            try:
                (size,) = W_SIZE.unpack_from(msg, W_BODY)
            except struct.error:
                size = -1
            if not 0 <= size <= self.max_io or self.shm is None:
                self.bad_messages += 1
                return _error(unique, errno.EIO)
            # Into one reused buffer: a fresh 1 MiB allocation per reply costs more in page faults
            # under emulation than the copy itself. The reply is written to /dev/fuse before the
            # next port message is handled (port_loop), so one buffer is enough.
            self._reply_buf[:size] = self.shm[span * wire.MAX_IO : span * wire.MAX_IO + size]
            return _reply(unique, self._reply_view[:size])
        finally:
            self.release_span(span)

    def _readdir(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                 body: memoryview) -> list[Out]:  # fmt: skip
        fh, offset, size, *_ = READ_IN.unpack_from(body, 0)
        fixed = (fh, offset, min(size, wire.MAX_IO), int(op == READDIRPLUS))
        return self._req(unique, op, wire.Readdir, fixed, (), b"", uid, gid, pid)

    def _write(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
               body: memoryview) -> list[Out]:  # fmt: skip
        fh, offset, size, *_ = READ_IN.unpack_from(body, 0)
        data = body[READ_IN.size : READ_IN.size + size]
        if len(data) != size or size > wire.MAX_IO:
            raise ValueError("bad write size")
        span = self._take_span() if size else None
        if span is not None:  # one copy into the span; only the request crosses the port
            assert self.shm is not None
            self.shm[span * wire.MAX_IO : span * wire.MAX_IO + size] = data
            return self._req(unique, op, wire.WriteShm, (fh, offset, size, span), (), b"", uid, gid, pid, span)
        # ``data`` points into the read buffer: the caller sends it before the next read.
        return self._req(unique, op, wire.Write, (fh, offset), (), data, uid, gid, pid)

    def _statfs(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                body: memoryview) -> list[Out]:  # fmt: skip
        return self._req(unique, op, wire.Statfs, (node,), (), b"", uid, gid, pid)

    def _release(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                 body: memoryview) -> list[Out]:  # fmt: skip
        (fh,) = RELEASE_IN.unpack_from(body, 0)[:1]
        cls = wire.Release if op == RELEASE else wire.Releasedir
        return self._req(unique, op, cls, (fh,), (), b"", uid, gid, pid)

    def _fsync(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
               body: memoryview) -> list[Out]:  # fmt: skip
        fh, flags, _ = FSYNC_IN.unpack_from(body, 0)
        return self._req(unique, op, wire.Fsync, (fh, flags & 1), (), b"", uid, gid, pid)

    def _access(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                body: memoryview) -> list[Out]:  # fmt: skip
        mask, _ = ACCESS_IN.unpack_from(body, 0)
        return self._req(unique, op, wire.Access, (node, mask), (), b"", uid, gid, pid)

    def _fallocate(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                   body: memoryview) -> list[Out]:  # fmt: skip
        fh, offset, length, mode, _ = FALLOCATE_IN.unpack_from(body, 0)
        fixed = (fh, offset, length, mode)
        return self._req(unique, op, wire.Fallocate, fixed, (), b"", uid, gid, pid)

    def _copy_file_range(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
                         body: memoryview) -> list[Out]:  # fmt: skip
        fh_in, off_in, _node_out, fh_out, off_out, length, flags = COPY_RANGE_IN.unpack_from(
            body, 0
        )
        fixed = (fh_in, off_in, fh_out, off_out, length, flags)
        return self._req(unique, op, wire.CopyFileRange, fixed, (), b"", uid, gid, pid)

    def _init(self, op: int, unique: int, node: int, uid: int, gid: int, pid: int,
              body: memoryview) -> list[Out]:  # fmt: skip
        major, minor, max_readahead, flags = INIT_IN.unpack_from(body, 0)
        if major != FUSE_KERNEL_VERSION:
            # Name our major version; the kernel retries with it or gives up.
            return [_reply(unique, INIT_OUT.pack(FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR,
                                                 *bytes(9)))]  # fmt: skip
        want = WANTED_FLAGS & flags
        if flags & INIT_EXT:
            want |= INIT_EXT
        out = INIT_OUT.pack(
            FUSE_KERNEL_VERSION, min(minor, FUSE_KERNEL_MINOR), max_readahead, want,
            MAX_BACKGROUND, CONGESTION, self.max_io, 1, self.max_io // PAGE, 0, 0,
        )  # fmt: skip
        self.initialized = True
        return [_reply(unique, out)]

    # --- host -> FUSE ------------------------------------------------------------------------

    def port_message(self, msg: bytes) -> list[Out]:
        if len(msg) < W_BODY or msg[0] != wire.Kind.RESPONSE:
            return self._other_message(msg)
        _kind, wop, _flags, rid, err = W_RESPONSE.unpack_from(msg, 0)
        waiting = self.pending.pop(rid, None)
        span = self.spans.pop(rid, None)
        if waiting is None:
            self.bad_messages += 1
            return []
        unique, op = waiting
        if span is not None:  # the host is done with the span once it replied
            if op == READ and unique and not err:
                return [self._span_reply(unique, span, msg)]
            self.release_span(span)
        if not unique:
            return []
        if err:
            if op == LOOKUP and err == errno.ENOENT and self.negative_ttl_ms:
                return [_reply(unique, negative_entry(self.negative_ttl_ms))]
            return [_error(unique, err if 0 < err < 4096 else errno.EIO)]
        try:
            return self._answer(unique, op, msg)
        except (struct.error, ValueError, IndexError):
            self.bad_messages += 1
            return [_error(unique, errno.EIO)]

    def _answer(self, unique: int, op: int, msg: bytes) -> list[Out]:
        if op == READ:
            return [_reply(unique, memoryview(msg)[W_BODY:])]  # data passes through uncopied
        if op in (LOOKUP, MKDIR, SYMLINK, LINK):
            return [_reply(unique, fuse_entry(*W_ENTRY.unpack_from(msg, W_BODY)))]
        if op in (GETATTR, SETATTR):
            return [_reply(unique, fuse_attr_out(*W_ATTR.unpack_from(msg, W_BODY)))]
        if op in (READDIR, READDIRPLUS):
            return [_reply(unique, fuse_dirents(msg, W_BODY))]
        if op in (OPEN, OPENDIR):
            fh, flags = W_OPEN.unpack_from(msg, W_BODY)
            return [_reply(unique, _open_out(fh, flags, op))]
        if op in (CREATE, MKNOD):
            entry = W_ENTRY.unpack_from(msg, W_BODY)
            fh, flags = W_OPEN.unpack_from(msg, W_BODY + W_ENTRY.size)
            if op == MKNOD:
                # mknod(S_IFREG) is a create without an open file: let the host close it.
                release = self._req(0, RELEASE, wire.Release, (fh,))
                return [*release, _reply(unique, fuse_entry(*entry))]
            return [_reply(unique, fuse_entry(*entry), _open_out(fh, flags, op))]
        if op in (WRITE, COPY_FILE_RANGE):
            (size,) = W_SIZE.unpack_from(msg, W_BODY)
            return [_reply(unique, WRITE_OUT.pack(min(size, 0xFFFFFFFF), 0))]
        if op == READLINK:
            return [_reply(unique, msg[W_BODY:])]
        if op == STATFS:
            return [_reply(unique, KSTATFS.pack(*W_STATFS.unpack_from(msg, W_BODY), 0))]
        return [_reply(unique)]  # unlink rmdir rename release flush fsync access fallocate ...

    def _other_message(self, msg: bytes) -> list[Out]:
        try:
            note = wire.decode_notify(msg)
        except wire.WireError:
            self.bad_messages += 1
            return []
        body = note.body
        if isinstance(body, wire.InvalInode):
            out = INVAL_INODE_OUT.pack(body.node, body.offset, body.length)
            code = NOTIFY_INVAL_INODE
        elif isinstance(body, wire.InvalEntry):
            out = INVAL_ENTRY_OUT.pack(body.parent, len(body.name), 0) + body.name + b"\0"
            code = NOTIFY_INVAL_ENTRY
        else:
            return []
        return [(TO_NOTIFY, (OUT_HEADER.pack(OUT_HEADER.size + len(out), code, 0), out))]

    def fail_all(self, err: int = errno.EIO) -> list[Out]:
        """Answer every request still waiting for the host (it went away)."""
        waiting = list(self.pending.values())
        self.pending.clear()
        spans = list(self.spans.values())
        self.spans.clear()
        for span in spans:
            self.release_span(span)
        return [_error(unique, err) for unique, _ in waiting if unique]


def _reply(unique: int, *pieces: Piece) -> Out:
    size = OUT_HEADER.size + sum(len(p) for p in pieces)
    return TO_FUSE, (OUT_HEADER.pack(size, 0, unique), *pieces)


def _error(unique: int, err: int) -> Out:
    return TO_FUSE, (OUT_HEADER.pack(OUT_HEADER.size, -err, unique),)


def _open_out(fh: int, flags: int, op: int) -> bytes:
    flags &= FOPEN_DIRECT_IO | FOPEN_KEEP_CACHE
    if op != OPENDIR and not flags & FOPEN_DIRECT_IO:
        flags |= FOPEN_KEEP_CACHE  # AUTO_INVAL_DATA drops the pages when mtime or size change
    return OPEN_OUT.pack(fh, flags, 0)


def fuse_dirents(msg: bytes, pos: int) -> bytes:
    """The kernel's READDIR / READDIRPLUS buffer from a wire ReaddirReply at ``pos``."""
    plus, count = wire.READDIR_HEAD.unpack_from(msg, pos)
    pos += wire.READDIR_HEAD.size
    ent, ent_size = wire.READDIR_ENTRY, wire.READDIR_ENTRY.size
    entry, entry_size = W_ENTRY, W_ENTRY.size
    dirent, base = DIRENT.pack, DIRENT.size
    out: list[bytes] = []
    for _ in range(count):
        offset, ino, dtype, name_len = ent.unpack_from(msg, pos)
        pos += ent_size
        name = msg[pos : pos + name_len]
        if len(name) != name_len:
            raise ValueError("truncated readdir entry")
        pos += name_len
        if plus:
            values = entry.unpack_from(msg, pos)
            pos += entry_size
            out.append(fuse_entry(*values) if values[0] else NO_ENTRY)
        out.append(dirent(ino, offset, name_len, dtype))
        out.append(name)
        pad = -(base + name_len) % 8
        if pad:
            out.append(b"\0" * pad)
    return b"".join(out)


# ---------------------------------------------------------------------------------------------
# Driver


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND = 1, 2, 4, 4096
MNT_DETACH = 2


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    rc = _libc().mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def umount(target: str) -> None:
    _libc().umount2(target.encode(), MNT_DETACH)


def _pieces(parts: Sequence[Piece]) -> list[memoryview]:
    """``parts`` cut into slices the port driver takes whole (at most 32 KiB each)."""
    out = []
    for part in parts:
        view = memoryview(part)
        if len(view) <= PORT_WRITE_PIECE:
            if len(view):
                out.append(view)
            continue
        for i in range(0, len(view), PORT_WRITE_PIECE):
            out.append(view[i : i + PORT_WRITE_PIECE])
    return out


class Daemon:
    def __init__(self, port_name: str, mounts: list[str]) -> None:
        self.mounts = sorted({m.rstrip("/") or "/" for m in mounts}, key=len)
        self.port = os.open(find_port(port_name), os.O_RDWR | os.O_CLOEXEC)
        self.port_lock = threading.Lock()
        self.splitter = wire.FrameSplitter()
        self._port_buf = bytearray(PORT_READ_PIECE * PORT_READ_PIECES)
        view = memoryview(self._port_buf)
        self._port_pieces = [
            view[i : i + PORT_READ_PIECE] for i in range(0, len(view), PORT_READ_PIECE)
        ]
        self.fuse = -1
        self.notify_queue: queue.SimpleQueue[Sequence[Piece]] = queue.SimpleQueue()
        self.notes_dropped = 0

    # --- start-up ----------------------------------------------------------------------------

    def hello(self) -> wire.HelloReply:
        self.port_write(wire.request_frame(0, wire.Hello, (wire.VERSION, wire.MAX_IO, 0)))
        deadline = time.monotonic() + HELLO_TIMEOUT
        while time.monotonic() < deadline:
            if not select.select([self.port], [], [], 0.1)[0]:
                continue
            messages, closed = self.read_port()
            if closed:
                time.sleep(0.01)
            for msg in messages:
                resp = wire.decode_response(msg)
                if resp.errno:
                    raise RuntimeError(f"host refused the fs session: errno {resp.errno}")
                if resp.id == 0 and isinstance(resp.body, wire.HelloReply):
                    return resp.body
        raise RuntimeError("the host did not answer on the fs port")

    def mount_fuse(self, hello: wire.HelloReply) -> None:
        os.makedirs(HIDDEN_ROOT, exist_ok=True)
        self.fuse = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        opts = f"fd={self.fuse},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
        flags = MS_NOSUID | MS_NODEV
        if hello.flags & wire.HELLO_READONLY:
            flags |= MS_RDONLY
        mount("gondolin", HIDDEN_ROOT, "fuse.gondolin", flags, opts)

    def bind_all(self) -> None:
        """Runs on its own thread: each bind looks paths up, which the main thread answers."""
        try:
            for m in self.mounts:
                os.makedirs(m, exist_ok=True)
                mount(HIDDEN_ROOT + m, m, None, MS_BIND, None)
        except OSError as exc:
            log(f"cannot bind the mount points: {exc}")
            self.cleanup()
            os._exit(1)
        dev = os.stat(HIDDEN_ROOT).st_dev
        try:
            with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
                f.write(str(READ_AHEAD_KB))
        except OSError as exc:
            log(f"read-ahead stays at the default: {exc}")

    # --- port --------------------------------------------------------------------------------

    def port_write(self, parts: Sequence[Piece]) -> None:
        views = _pieces(parts)
        with self.port_lock:
            while views:
                try:
                    n = os.writev(self.port, views[:PORT_WRITE_PIECES])
                except InterruptedError:
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.ENXIO, errno.EPIPE):
                        raise
                    n = 0
                if n == 0:
                    time.sleep(0.01)  # host not connected (between a snapshot and its restore)
                    continue
                while n:
                    if n >= len(views[0]):
                        n -= len(views[0])
                        views.pop(0)
                    else:
                        views[0] = views[0][n:]
                        n = 0

    def read_port(self) -> tuple[list[bytes], bool]:
        """Whole messages (blocks for the first byte), and whether the host end is closed.

        Between frames one piece is read (whatever the port holds, up to 4 KiB); inside a
        frame exactly its missing bytes, which are on their way: a blocking ``readv`` moves on
        to its next piece only after filling one, so asking for more could wait forever.
        """
        out: list[bytes] = []
        missing = 0
        while True:
            pieces = self._port_pieces[:1] if not missing else self._pieces_for(missing)
            try:
                n = os.readv(self.port, pieces)
            except InterruptedError:
                continue
            except OSError as exc:
                log(f"fs port read: {exc}")
                time.sleep(0.05)
                return out, False
            if n == 0:
                return out, True
            try:
                with memoryview(self._port_buf) as view:
                    out.extend(self.splitter.feed(view[:n]))
            except wire.WireError as exc:  # the host is trusted; still, never stop serving
                log(f"fs port: {exc}; resynchronising")
                self.splitter = wire.FrameSplitter()
                return out, False
            missing = self.splitter.missing
            if not missing:
                return out, False

    def _pieces_for(self, size: int) -> list[memoryview]:
        count, rest = divmod(min(size, len(self._port_buf)), PORT_READ_PIECE)
        pieces = self._port_pieces[:count]
        if rest:
            pieces = [*pieces, self._port_pieces[count][:rest]]
        return pieces

    # --- threads -----------------------------------------------------------------------------

    def deliver(self, outs: list[Out]) -> None:
        for dest, pieces in outs:
            if dest == TO_FUSE:
                try:
                    os.writev(self.fuse, pieces)
                except OSError as exc:
                    # ENOENT: the request was interrupted and is gone; anything else is a bug.
                    if exc.errno != errno.ENOENT:
                        log(f"reply rejected by the kernel: {exc}")
            elif dest == TO_PORT:
                self.port_write(pieces)
            elif self.notify_queue.qsize() < NOTIFY_LIMIT:
                self.notify_queue.put(pieces)
            else:
                self.notes_dropped += 1  # the attribute TTL still bounds staleness

    def port_loop(self, session: FuseSession) -> None:
        while True:
            messages, closed = self.read_port()
            for msg in messages:
                self.deliver(session.port_message(msg))
            if closed:
                # Host end gone: nobody will answer what is pending. Wait for a reconnect.
                self.deliver(session.fail_all())
                time.sleep(0.01)

    def notify_loop(self) -> None:
        while True:
            pieces = self.notify_queue.get()
            try:
                os.writev(self.fuse, pieces)
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    return
                # ENOENT: the kernel no longer caches that inode or name.

    def run(self) -> int:
        hello = self.hello()
        shm = None
        if hello.flags & wire.HELLO_SHM:
            region = SharedRegion()
            try:
                if region.map() >= wire.SHM_FUSE_OFFSET + wire.SHM_SPANS * wire.MAX_IO and region.view is not None:
                    shm = region.view[wire.SHM_FUSE_OFFSET : wire.SHM_FUSE_OFFSET + wire.SHM_SPANS * wire.MAX_IO]
            except (OSError, ValueError) as exc:
                log(f"shared region unavailable, payloads use the port: {exc}")
        session = FuseSession(hello, shm)
        self.mount_fuse(hello)
        for target, args in ((self.port_loop, (session,)), (self.notify_loop, ()),
                             (self.bind_all, ())):  # fmt: skip
            threading.Thread(target=target, args=args, daemon=True).start()
        buf = bytearray(FUSE_BUFFER)
        view = memoryview(buf)
        while not session.destroyed:
            n = self.read_fuse(self.fuse, buf)
            if n < 0:
                return 0
            self.deliver(session.fuse_request(view[:n]))
        return 0

    def read_fuse(self, fd: int, buf: bytearray) -> int:
        """One request into ``buf`` (blocking): its size, or -1 once unmounted.

        Measured and dropped: draining further requests from a cloned non-blocking descriptor
        to send them in one port write changed nothing (2,000 stats from 8 threads: 3.2 s
        either way); the guest's CPU, not the number of notifications, is the limit."""
        while True:
            try:
                return os.readv(fd, [buf])
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # interrupted before we read it
                    continue
                if exc.errno == errno.ENODEV:
                    return -1
                raise

    def cleanup(self) -> None:
        for m in reversed(self.mounts):
            umount(m)
        umount(HIDDEN_ROOT)


def main(argv: list[str]) -> int:
    port = "gondolin.fs"
    mounts: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--port":
            port = next(args, port)
        elif arg.startswith("--port="):
            port = arg.split("=", 1)[1]
        elif arg.startswith("--mount="):
            mounts.append(arg.split("=", 1)[1])
        else:
            log(f"unknown argument {arg!r}")
            return 2
    if not mounts:
        log("nothing to mount")
        return 2
    daemon = Daemon(port, mounts)
    try:
        return daemon.run()
    except (OSError, RuntimeError, wire.WireError) as exc:
        log(f"fatal: {exc}")
        daemon.cleanup()
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
