"""Gondolin guest FUSE daemon: the kernel's FUSE requests, served by the host over the fs port.

Stdlib only; speaks the raw ``/dev/fuse`` protocol (include/uapi/linux/fuse.h, protocol 7.x)
and the FS RPC wire format in ``vfs_wire.py`` (a copy of ``gondolin/vfs/wire.py``).

Layout: one FUSE filesystem is mounted at :data:`HIDDEN_ROOT`; its root is the host's mount
router, whose paths are guest paths, and each mount point is a bind mount of its directory in
there. One FUSE connection means one wire stream, one host node table, and one daemon, for
any number of mounts; renames and links between mount points fail with EXDEV in the guest
VFS (they are different vfsmounts) before they reach the host.

Shape: :class:`FuseSession` is sans-IO (FUSE request bytes in, wire frames out; wire messages
in, FUSE reply bytes out). :class:`Daemon` is the driver: one selector loop moves bytes between
``/dev/fuse`` and the port with many requests in flight, and a second thread writes cache
invalidations to ``/dev/fuse`` (the kernel may block such a write on a lock held by a request
this loop has yet to answer, so the loop itself must never make it).

Kernel caching: entries and attributes are cached for the TTLs the host gives (negative
lookups too), file pages are kept across opens (``FOPEN_KEEP_CACHE``) and dropped when a
refreshed attribute shows another mtime or size (``FUSE_AUTO_INVAL_DATA``) or when the host
says so (``FUSE_NOTIFY_INVAL_INODE`` / ``INVAL_ENTRY``). Permission checks are the kernel's
(``default_permissions``), so ``access`` never costs a round trip.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import selectors
import stat
import struct
import sys
import threading
import time

try:  # in the guest: the copy next to this file
    import vfs_wire as wire  # type: ignore[import-not-found]
except ImportError:  # on the host (tests)
    from gondolin.vfs import wire

HIDDEN_ROOT = "/run/gondolin/fs"
FUSE_DEVICE = "/dev/fuse"

# Protocol 7.38 structures (include/uapi/linux/fuse.h). Times are signed on the wire here.
FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR = 38
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")  # fuse_attr, 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid + nsecs
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
OPEN_OUT = struct.Struct("<QII")
WRITE_OUT = struct.Struct("<II")
KSTATFS = struct.Struct("<QQQQQIIII24x")
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (flags2 follows from 7.36)
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
READ_IN = struct.Struct("<QQIIQII")  # also fuse_write_in, 40 bytes
RELEASE_IN = struct.Struct("<QIIQ")
FLUSH_IN = struct.Struct("<QIIQ")
FSYNC_IN = struct.Struct("<QII")
ACCESS_IN = struct.Struct("<II")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
FALLOCATE_IN = struct.Struct("<QQQII")
COPY_RANGE_IN = struct.Struct("<QQQQQQQ")
DIRENT = struct.Struct("<QQII")  # ino off namelen type
INVAL_INODE_OUT = struct.Struct("<Qqq")
INVAL_ENTRY_OUT = struct.Struct("<QII")

# enum fuse_opcode
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE = 8, 9, 10, 11, 12, 13, 14, 15, 16
STATFS, RELEASE, FSYNC, FLUSH, INIT, OPENDIR, READDIR = 17, 18, 20, 25, 26, 27, 28
RELEASEDIR, FSYNCDIR, ACCESS, CREATE, INTERRUPT, DESTROY = 29, 30, 34, 35, 36, 38
BATCH_FORGET, FALLOCATE, READDIRPLUS, RENAME2, COPY_FILE_RANGE = 42, 43, 44, 45, 47

# FUSE_INIT flags we ask for; the kernel grants the ones it knows.
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
INIT_EXT = 1 << 30
WANTED_FLAGS = (
    ASYNC_READ | ATOMIC_O_TRUNC | BIG_WRITES | AUTO_INVAL_DATA | DO_READDIRPLUS
    | READDIRPLUS_AUTO | ASYNC_DIO | PARALLEL_DIROPS | MAX_PAGES | CACHE_SYMLINKS
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

PAGE = 4096
MAX_BACKGROUND = 64  # async requests (readahead, release) the kernel keeps in flight
CONGESTION = 48
READ_AHEAD_KB = 1024  # set through the bdi after mounting; INIT cannot raise it past 128 KiB
_O_WRONLY, _O_CREAT, _O_EXCL = 0o1, 0o100, 0o200
_NS = 1_000_000_000

# How many bytes one /dev/fuse read must be able to take: a write request of max_write.
FUSE_BUFFER = wire.MAX_IO + 2 * PAGE
# The virtio-console driver hands out one 4 KiB buffer per read() and takes at most 32 KiB
# per write(); readv/writev with many pieces moves many buffers per system call.
PORT_READ_PIECE = 4096
PORT_READ_PIECES = 256
PORT_WRITE_PIECE = 32 * 1024
PORT_WRITE_PIECES = 32
PORT_OUT_LIMIT = 8 << 20  # stop taking FUSE requests while this much waits for the port
FUSE_BATCH = 64  # requests taken from /dev/fuse per wakeup before the port is flushed
NOTIFY_LIMIT = 4096  # invalidations waiting for the notifier thread; more are dropped
HELLO_TIMEOUT = 20.0


def log(msg: str) -> None:
    try:
        os.write(2, f"gondolin-fuse: {msg}\n".encode())
    except OSError:
        pass


def _split_ns(ns: int) -> tuple[int, int]:
    sec, nsec = divmod(ns, _NS)
    return sec, nsec


def _ttl(ms: int) -> tuple[int, int]:
    return ms // 1000, (ms % 1000) * 1_000_000


def pack_attr(a: wire.Attr) -> bytes:
    asec, ansec = _split_ns(a.atime_ns)
    msec, mnsec = _split_ns(a.mtime_ns)
    csec, cnsec = _split_ns(a.ctime_ns)
    return ATTR.pack(
        a.ino, a.size, a.blocks, asec, msec, csec, ansec, mnsec, cnsec, a.mode, a.nlink,
        a.uid, a.gid, a.rdev, a.blksize, 0,
    )  # fmt: skip


_ZERO_ATTR = bytes(ATTR.size)


def pack_entry(e: wire.EntryReply) -> bytes:
    esec, ensec = _ttl(e.entry_ttl_ms)
    asec, ansec = _ttl(e.attr_ttl_ms)
    return ENTRY_OUT.pack(e.node, e.generation, esec, asec, ensec, ansec) + pack_attr(e.attr)


def negative_entry(ttl_ms: int) -> bytes:
    """A lookup reply that makes the kernel cache "no such name" for ``ttl_ms``."""
    esec, ensec = _ttl(ttl_ms)
    return ENTRY_OUT.pack(0, 0, esec, 0, ensec, 0) + _ZERO_ATTR


def _cstr(body: memoryview, pos: int) -> tuple[bytes, int]:
    """A NUL-terminated string at ``pos`` and the position after its NUL."""
    raw = bytes(body[pos:])
    end = raw.find(b"\0")
    if end < 0:
        raise ValueError("unterminated name")
    return raw[:end], pos + end + 1


class FuseSession:
    """Sans-IO translation between FUSE and the FS RPC wire format.

    Feed :meth:`fuse_request` each request read from ``/dev/fuse`` and :meth:`port_message`
    each message from the host; take the frames to send to the host from :attr:`to_port`,
    the replies to write to ``/dev/fuse`` from :attr:`to_fuse` (each a list of pieces for
    one ``writev``) and cache invalidations from :attr:`notes`.
    """

    def __init__(self, hello: wire.HelloReply) -> None:
        self.hello = hello
        self.to_port: list[bytes] = []
        self.to_fuse: list[list[bytes | memoryview]] = []
        self.notes: list[list[bytes]] = []
        # wire id -> (FUSE unique, FUSE opcode); unique 0: answer nobody (mknod's release)
        self.pending: dict[int, tuple[int, int]] = {}
        self._next_id = 0
        self._forgets: list[tuple[int, int]] = []
        self.initialized = False
        self.destroyed = False
        self.max_write = min(hello.max_io, wire.MAX_IO)
        self.bad_messages = 0

    # --- FUSE -> host ------------------------------------------------------------------------

    def _send(
        self, unique: int, opcode: int, body: wire.Body, uid: int, gid: int, pid: int
    ) -> None:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        rid = self._next_id
        self.pending[rid] = (unique, opcode)
        self.to_port.append(
            wire.encode_frame(wire.encode_request(wire.Request(rid, body, uid, gid, pid)))
        )

    def reply(self, unique: int, *pieces: bytes | memoryview) -> None:
        size = OUT_HEADER.size + sum(len(p) for p in pieces)
        self.to_fuse.append([OUT_HEADER.pack(size, 0, unique), *pieces])

    def error(self, unique: int, err: int) -> None:
        self.to_fuse.append([OUT_HEADER.pack(OUT_HEADER.size, -err, unique)])

    def fuse_request(self, data: bytes | bytearray | memoryview) -> None:
        buf = memoryview(data)
        if len(buf) < IN_HEADER.size:
            self.bad_messages += 1
            return
        length, opcode, unique, node, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(buf, 0)
        body = buf[IN_HEADER.size : min(length, len(buf))]
        try:
            self._dispatch(opcode, unique, node, uid, gid, pid, body)
        except (struct.error, ValueError):
            self.bad_messages += 1
            if opcode not in (FORGET, BATCH_FORGET, INTERRUPT):
                self.error(unique, errno.EINVAL)

    def _dispatch(
        self, op: int, unique: int, node: int, uid: int, gid: int, pid: int, body: memoryview
    ) -> None:
        send = self._send
        if op == LOOKUP:
            name, _ = _cstr(body, 0)
            send(unique, op, wire.Lookup(node, name), uid, gid, pid)
        elif op == GETATTR:
            flags, _, fh = GETATTR_IN.unpack_from(body, 0)
            send(unique, op, wire.Getattr(node, fh if flags & GETATTR_FH else 0), uid, gid, pid)
        elif op in (READ, READDIR, READDIRPLUS):
            fh, offset, size, *_ = READ_IN.unpack_from(body, 0)
            if op == READ:
                req: wire.Body = wire.Read(fh, offset, min(size, self.max_write))
            else:
                req = wire.Readdir(fh, offset, min(size, wire.MAX_IO), int(op == READDIRPLUS))
            send(unique, op, req, uid, gid, pid)
        elif op == WRITE:
            fh, offset, size, *_ = READ_IN.unpack_from(body, 0)
            data = body[READ_IN.size : READ_IN.size + size]
            if len(data) != size or size > wire.MAX_IO:
                raise ValueError("bad write size")
            send(unique, op, wire.Write(fh, offset, bytes(data)), uid, gid, pid)
        elif op in (FORGET, BATCH_FORGET):
            if op == FORGET:
                self._forget(node, FORGET_IN.unpack_from(body, 0)[0])
            else:
                count, _ = BATCH_FORGET_IN.unpack_from(body, 0)
                for i in range(count):
                    self._forget(*FORGET_ONE.unpack_from(body, BATCH_FORGET_IN.size + 16 * i))
        elif op == OPEN:
            flags, _ = OPEN_IN.unpack_from(body, 0)
            send(unique, op, wire.Open(node, flags), uid, gid, pid)
        elif op == OPENDIR:
            send(unique, op, wire.Opendir(node), uid, gid, pid)
        elif op == RELEASE:
            send(unique, op, wire.Release(RELEASE_IN.unpack_from(body, 0)[0]), uid, gid, pid)
        elif op == RELEASEDIR:
            send(unique, op, wire.Releasedir(RELEASE_IN.unpack_from(body, 0)[0]), uid, gid, pid)
        elif op == FLUSH:
            send(unique, op, wire.Flush(FLUSH_IN.unpack_from(body, 0)[0]), uid, gid, pid)
        elif op == CREATE:
            flags, mode, _umask, _ = CREATE_IN.unpack_from(body, 0)
            name, _ = _cstr(body, CREATE_IN.size)
            send(unique, op, wire.Create(node, mode, flags, name), uid, gid, pid)
        elif op == SETATTR:
            self._setattr(unique, node, uid, gid, pid, body)
        elif op == MKDIR:
            mode, _umask = MKDIR_IN.unpack_from(body, 0)
            name, _ = _cstr(body, MKDIR_IN.size)
            send(unique, op, wire.Mkdir(node, mode, name), uid, gid, pid)
        elif op in (UNLINK, RMDIR):
            name, _ = _cstr(body, 0)
            cls = wire.Unlink if op == UNLINK else wire.Rmdir
            send(unique, op, cls(node, name), uid, gid, pid)
        elif op in (RENAME, RENAME2):
            if op == RENAME:
                (newdir,), flags, pos = RENAME_IN.unpack_from(body, 0), 0, RENAME_IN.size
            else:
                newdir, flags, _ = RENAME2_IN.unpack_from(body, 0)
                pos = RENAME2_IN.size
            old, pos = _cstr(body, pos)
            new, _ = _cstr(body, pos)
            send(unique, op, wire.Rename(node, newdir, flags, old, new), uid, gid, pid)
        elif op == SYMLINK:
            name, pos = _cstr(body, 0)
            target, _ = _cstr(body, pos)
            send(unique, op, wire.Symlink(node, name, target), uid, gid, pid)
        elif op == LINK:
            (old,) = LINK_IN.unpack_from(body, 0)
            name, _ = _cstr(body, LINK_IN.size)
            send(unique, op, wire.Link(old, node, name), uid, gid, pid)
        elif op == READLINK:
            send(unique, op, wire.Readlink(node), uid, gid, pid)
        elif op == STATFS:
            send(unique, op, wire.Statfs(node), uid, gid, pid)
        elif op == FSYNC:
            fh, flags, _ = FSYNC_IN.unpack_from(body, 0)
            send(unique, op, wire.Fsync(fh, flags & 1), uid, gid, pid)
        elif op == ACCESS:
            mask, _ = ACCESS_IN.unpack_from(body, 0)
            send(unique, op, wire.Access(node, mask), uid, gid, pid)
        elif op == FALLOCATE:
            fh, offset, length, mode, _ = FALLOCATE_IN.unpack_from(body, 0)
            send(unique, op, wire.Fallocate(fh, offset, length, mode), uid, gid, pid)
        elif op == COPY_FILE_RANGE:
            fh_in, off_in, _node_out, fh_out, off_out, length, flags = COPY_RANGE_IN.unpack_from(
                body, 0
            )
            req = wire.CopyFileRange(fh_in, off_in, fh_out, off_out, length, flags)
            send(unique, op, req, uid, gid, pid)
        elif op == MKNOD:
            mode, _rdev, _umask, _ = MKNOD_IN.unpack_from(body, 0)
            name, _ = _cstr(body, MKNOD_IN.size)
            if not stat.S_ISREG(mode):
                self.error(unique, errno.EPERM)  # no FIFOs, sockets or devices on host storage
                return
            flags = _O_WRONLY | _O_CREAT | _O_EXCL
            send(unique, op, wire.Create(node, mode, flags, name), uid, gid, pid)
        elif op == INIT:
            self._init(unique, body)
        elif op == FSYNCDIR:
            self.reply(unique)  # directory changes are synchronous on the host
        elif op == INTERRUPT:
            pass  # every request completes soon anyway; the kernel copes with late replies
        elif op == DESTROY:
            self.destroyed = True
            self.reply(unique)
        else:
            # xattrs, locks (kernel-local without POSIX_LOCKS), ioctl, poll, lseek, bmap, tmpfile:
            # ENOSYS makes the kernel stop asking or fall back to its generic code.
            self.error(unique, errno.ENOSYS)

    def _setattr(
        self, unique: int, node: int, uid: int, gid: int, pid: int, body: memoryview
    ) -> None:
        (valid, _, fh, size, _owner, atime, mtime, _ctime, atimensec, mtimensec, _cn, mode, _u4,
         new_uid, new_gid, _u5) = SETATTR_IN.unpack_from(body, 0)  # fmt: skip
        req = wire.Setattr(
            node,
            fh if valid & FATTR_FH else 0,
            valid & WIRE_FATTR,
            mode,
            new_uid,
            new_gid,
            size,
            atime * _NS + atimensec,
            mtime * _NS + mtimensec,
        )
        self._send(unique, SETATTR, req, uid, gid, pid)

    def _forget(self, node: int, count: int) -> None:
        self._forgets.append((node, count))
        if len(self._forgets) >= wire.MAX_FORGET:
            self.flush_forgets()

    def flush_forgets(self) -> None:
        """Send the FORGETs gathered so far as one message (call once per batch of requests)."""
        if not self._forgets:
            return
        items, self._forgets = tuple(self._forgets), []
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1  # FORGET has no reply
        msg = wire.encode_request(wire.Request(self._next_id, wire.Forget(items)))
        self.to_port.append(wire.encode_frame(msg))

    def _init(self, unique: int, body: memoryview) -> None:
        major, minor, max_readahead, flags = INIT_IN.unpack_from(body, 0)
        if major != FUSE_KERNEL_VERSION:
            # Tell the kernel our major; it retries with it or gives up.
            self.reply(unique, INIT_OUT.pack(FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR, 0, 0, 0,
                                             0, 0, 0, 0, 0, 0))  # fmt: skip
            return
        want = WANTED_FLAGS & flags
        if flags & INIT_EXT:
            want |= INIT_EXT
        pages = self.max_write // PAGE
        out = INIT_OUT.pack(
            FUSE_KERNEL_VERSION, min(minor, FUSE_KERNEL_MINOR), max_readahead, want,
            MAX_BACKGROUND, CONGESTION, self.max_write, 1, pages, 0, 0,
        )  # fmt: skip
        self.initialized = True
        self.reply(unique, out)

    # --- host -> FUSE ------------------------------------------------------------------------

    def port_message(self, msg: bytes) -> None:
        try:
            kind = wire.message_kind(msg)
            if kind == wire.Kind.NOTIFY:
                self._notify(wire.decode_notify(msg))
                return
            if kind != wire.Kind.RESPONSE:
                raise wire.WireError(f"unexpected message kind {kind}")
            if len(msg) >= 12 and msg[1] == wire.Op.READ and msg[8:12] == b"\0\0\0\0":
                self._read_reply(msg)  # the hot path: pass the data through without a copy
                return
            resp = wire.decode_response(msg)
        except wire.WireError:
            self.bad_messages += 1
            return
        waiting = self.pending.pop(resp.id, None)
        if waiting is None:
            self.bad_messages += 1
            return
        unique, opcode = waiting
        if unique == 0:
            return
        if resp.errno:
            if opcode == LOOKUP and resp.errno == errno.ENOENT and self.hello.negative_ttl_ms:
                self.reply(unique, negative_entry(self.hello.negative_ttl_ms))
            else:
                self.error(unique, resp.errno)
            return
        try:
            self._answer(unique, opcode, resp.body)
        except (TypeError, AttributeError, struct.error):
            self.bad_messages += 1
            self.error(unique, errno.EIO)

    def _read_reply(self, msg: bytes) -> None:
        (rid,) = struct.unpack_from("<I", msg, 4)
        waiting = self.pending.pop(rid, None)
        if waiting is None or waiting[1] != READ:
            self.bad_messages += 1
            if waiting is not None:
                self.error(waiting[0], errno.EIO)
            return
        self.reply(waiting[0], memoryview(msg)[12:])

    def _answer(self, unique: int, opcode: int, body: object) -> None:
        if isinstance(body, wire.EntryReply):
            self.reply(unique, pack_entry(body))
        elif isinstance(body, wire.AttrReply):
            sec, nsec = _ttl(body.attr_ttl_ms)
            self.reply(unique, ATTR_OUT.pack(sec, nsec, 0), pack_attr(body.attr))
        elif isinstance(body, wire.DataReply):
            self.reply(unique, body.data)
        elif isinstance(body, wire.OpenReply):
            self.reply(unique, self._open_out(body, opcode))
        elif isinstance(body, wire.CreateReply):
            if opcode == MKNOD:
                # mknod(S_IFREG) is create without an open file: let the host close it.
                self._send(0, RELEASE, wire.Release(body.open.fh), 0, 0, 0)
                self.reply(unique, pack_entry(body.entry))
            else:
                self.reply(unique, pack_entry(body.entry), self._open_out(body.open, opcode))
        elif isinstance(body, wire.SizeReply):
            self.reply(unique, WRITE_OUT.pack(min(body.size, 0xFFFFFFFF), 0))
        elif isinstance(body, wire.StatFs):
            self.reply(unique, KSTATFS.pack(body.blocks, body.bfree, body.bavail, body.files,
                                            body.ffree, body.bsize, body.namelen, body.frsize, 0))  # fmt: skip
        elif isinstance(body, wire.ReaddirReply):
            self.reply(unique, pack_dirents(body))
        elif isinstance(body, wire.EmptyReply):
            self.reply(unique)
        else:
            raise TypeError(f"no FUSE reply for {type(body).__name__}")

    @staticmethod
    def _open_out(body: wire.OpenReply, opcode: int) -> bytes:
        flags = body.open_flags & (FOPEN_DIRECT_IO | FOPEN_KEEP_CACHE)
        if opcode != OPENDIR and not flags & FOPEN_DIRECT_IO:
            flags |= FOPEN_KEEP_CACHE  # AUTO_INVAL_DATA drops pages when mtime/size change
        return OPEN_OUT.pack(body.fh, flags, 0)

    def _notify(self, note: wire.Notify) -> None:
        body = note.body
        if isinstance(body, wire.InvalInode):
            out = INVAL_INODE_OUT.pack(body.node, body.offset, body.length)
            self.notes.append(
                [OUT_HEADER.pack(OUT_HEADER.size + len(out), NOTIFY_INVAL_INODE, 0), out]
            )
        elif isinstance(body, wire.InvalEntry):
            out = INVAL_ENTRY_OUT.pack(body.parent, len(body.name), 0) + body.name + b"\0"
            self.notes.append(
                [OUT_HEADER.pack(OUT_HEADER.size + len(out), NOTIFY_INVAL_ENTRY, 0), out]
            )

    def fail_all(self, err: int = errno.EIO) -> None:
        """Answer every request still waiting for the host (it went away)."""
        for unique, _ in self.pending.values():
            if unique:
                self.error(unique, err)
        self.pending.clear()


def pack_dirents(body: wire.ReaddirReply) -> bytes:
    out = []
    for ent in body.entries:
        if body.plus:
            out.append(
                pack_entry(ent.entry)
                if ent.entry is not None
                else bytes(ENTRY_OUT.size + ATTR.size)
            )
        out.append(DIRENT.pack(ent.ino, ent.offset, len(ent.name), ent.dtype))
        out.append(ent.name)
        pad = -(DIRENT.size + len(ent.name)) % 8
        if pad:
            out.append(bytes(pad))
    return b"".join(out)


# ---------------------------------------------------------------------------------------------
# Driver


def find_port(name: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    base = "/sys/class/virtio-ports"
    while True:
        try:
            for entry in os.listdir(base):
                try:
                    with open(f"{base}/{entry}/name") as f:
                        if f.read().strip() == name:
                            return f"/dev/{entry}"
                except OSError:
                    continue
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio port {name!r} not found")
        time.sleep(0.01)


_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND = 1, 2, 4, 4096
MNT_DETACH = 2


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                     ctypes.c_ulong(flags), data.encode() if data else None)  # fmt: skip
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def umount(target: str) -> None:
    _libc.umount2(target.encode(), MNT_DETACH)


class Daemon:
    def __init__(self, port_name: str, mounts: list[str]) -> None:
        self.mounts = sorted({m.rstrip("/") or "/" for m in mounts}, key=len)
        self.port = os.open(find_port(port_name), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.port_out = bytearray()
        self.splitter = wire.FrameSplitter()
        self._port_buf = bytearray(PORT_READ_PIECE * PORT_READ_PIECES)
        view = memoryview(self._port_buf)
        self._port_pieces = [
            view[i : i + PORT_READ_PIECE] for i in range(0, len(view), PORT_READ_PIECE)
        ]
        self._fuse_buf = bytearray(FUSE_BUFFER)
        self.sel = selectors.DefaultSelector()
        self.fuse = -1
        self.session: FuseSession | None = None
        self.notify_queue: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self.notes_dropped = 0
        self.reading_fuse = False
        self.writing_port = False

    # --- start-up ----------------------------------------------------------------------------

    def hello(self) -> wire.HelloReply:
        frame = wire.encode_frame(wire.encode_request(wire.Request(0, wire.Hello())))
        self.port_out += frame
        deadline = time.monotonic() + HELLO_TIMEOUT
        while time.monotonic() < deadline:
            self.flush_port()
            for msg in self.read_port():
                resp = wire.decode_response(msg)
                if resp.id == 0 and isinstance(resp.body, wire.HelloReply):
                    return resp.body
                if resp.errno:
                    raise RuntimeError(f"host refused the fs session: errno {resp.errno}")
            time.sleep(0.002)
        raise RuntimeError("the host did not answer on the fs port")

    def mount_all(self, hello: wire.HelloReply) -> None:
        os.makedirs(HIDDEN_ROOT, exist_ok=True)
        self.fuse = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        opts = (f"fd={self.fuse},rootmode=40000,user_id=0,group_id=0,allow_other,"
                "default_permissions")  # fmt: skip
        flags = MS_NOSUID | MS_NODEV
        if hello.flags & wire.HELLO_READONLY:
            flags |= MS_RDONLY
        mount("gondolin", HIDDEN_ROOT, "fuse.gondolin", flags, opts)

    def bind_all(self) -> None:
        """Runs in its own thread: each bind looks paths up, which this daemon must answer."""
        try:
            for m in self.mounts:
                os.makedirs(m, exist_ok=True)
                mount(HIDDEN_ROOT + m, m, None, MS_BIND, None)
            self.tune_bdi()
        except OSError as exc:
            log(f"cannot bind the mount points: {exc}")
            os._exit(1)

    def tune_bdi(self) -> None:
        dev = os.stat(HIDDEN_ROOT).st_dev
        try:
            with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
                f.write(str(READ_AHEAD_KB))
        except OSError as exc:
            log(f"read-ahead stays at the default: {exc}")

    def notifier(self) -> None:
        while True:
            pieces = self.notify_queue.get()
            try:
                os.writev(self.fuse, pieces)
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    return
                # ENOENT: the kernel no longer caches that inode or name.

    # --- port --------------------------------------------------------------------------------

    def read_port(self) -> list[bytes]:
        out: list[bytes] = []
        for _ in range(16):
            try:
                n = os.readv(self.port, self._port_pieces)
            except BlockingIOError:
                break
            except OSError as exc:
                log(f"fs port read: {exc}")
                time.sleep(0.05)
                break
            if n == 0:
                if self.session is not None and self.session.pending:
                    self.session.fail_all()
                time.sleep(0.01)  # host not connected (between a snapshot and its restore)
                break
            with memoryview(self._port_buf) as view:
                out.extend(self.splitter.feed(view[:n]))
            if n < len(self._port_buf) // 2:
                break
        return out

    def flush_port(self) -> None:
        out = self.port_out
        while out:
            view = memoryview(out)
            pieces = [
                view[i : i + PORT_WRITE_PIECE]
                for i in range(
                    0, min(len(view), PORT_WRITE_PIECE * PORT_WRITE_PIECES), PORT_WRITE_PIECE
                )
            ]
            try:
                n = os.writev(self.port, pieces)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ENXIO, errno.EPIPE):
                    raise
                n = 0
            finally:
                del pieces
                view.release()
            if n <= 0:
                break
            del out[:n]

    # --- main loop ---------------------------------------------------------------------------

    def pump_fuse(self, session: FuseSession) -> bool:
        """Take up to FUSE_BATCH requests; False once the filesystem is gone."""
        buf = self._fuse_buf
        for _ in range(FUSE_BATCH):
            try:
                n = os.readv(self.fuse, [buf])
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # the request was interrupted before we read it
                    continue
                if exc.errno == errno.ENODEV:  # unmounted
                    return False
                raise
            with memoryview(buf) as view:
                session.fuse_request(view[:n])
            if session.to_fuse:
                self.write_fuse(session)
            if len(self.port_out) + sum(len(f) for f in session.to_port) > PORT_OUT_LIMIT:
                break
        session.flush_forgets()
        for frame in session.to_port:
            self.port_out += frame
        session.to_port.clear()
        return not session.destroyed

    def write_fuse(self, session: FuseSession) -> None:
        for pieces in session.to_fuse:
            try:
                os.writev(self.fuse, pieces)
            except OSError as exc:
                # ENOENT: the request was interrupted and is gone; anything else is our bug.
                if exc.errno != errno.ENOENT:
                    log(f"reply rejected by the kernel: {exc}")
        session.to_fuse.clear()

    def queue_notes(self, session: FuseSession) -> None:
        for note in session.notes:
            if self.notify_queue.qsize() >= NOTIFY_LIMIT:
                self.notes_dropped += 1  # the attribute TTL still bounds staleness
                continue
            self.notify_queue.put(note)
        session.notes.clear()

    def update_interest(self) -> None:
        want_fuse = len(self.port_out) < PORT_OUT_LIMIT
        if want_fuse != self.reading_fuse:
            self.reading_fuse = want_fuse
            if want_fuse:
                self.sel.register(self.fuse, selectors.EVENT_READ, "fuse")
            else:
                self.sel.unregister(self.fuse)
        want_write = bool(self.port_out)
        if want_write != self.writing_port:
            self.writing_port = want_write
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self.sel.modify(self.port, events, "port")

    def run(self) -> int:
        hello = self.hello()
        session = self.session = FuseSession(hello)
        self.mount_all(hello)
        threading.Thread(target=self.notifier, name="notify", daemon=True).start()
        threading.Thread(target=self.bind_all, name="bind", daemon=True).start()
        self.sel.register(self.port, selectors.EVENT_READ, "port")
        self.update_interest()
        while True:
            for key, mask in self.sel.select():
                if key.data == "fuse":
                    if not self.pump_fuse(session):
                        return 0
                elif key.data == "port" and mask & selectors.EVENT_READ:
                    for msg in self.read_port():
                        session.port_message(msg)
                    self.write_fuse(session)
                    self.queue_notes(session)
            self.flush_port()
            self.update_interest()

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
            port = next(args)
        elif arg.startswith("--port="):
            port = arg.split("=", 1)[1]
        elif arg.startswith("--mount="):
            mounts.append(arg.split("=", 1)[1])
        elif arg == "--mount":
            mounts.append(next(args))
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
