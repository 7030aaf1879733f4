"""FS RPC wire format between the guest FUSE daemon and the host (stdlib only, sans-IO).

The guest image carries a copy of this file, so it imports nothing but the standard library
and nothing from the ``gondolin`` package. One message per frame; a frame on the fs port is a
4-byte big-endian length plus the message (:func:`encode_frame`, :class:`FrameSplitter`).

Every integer is little-endian. Headers::

    request   u8 kind=1  u8 op  u16 flags=0  u32 id  u32 uid  u32 gid  u32 pid   (20 bytes)
    response  u8 kind=2  u8 op  u16 flags=0  u32 id  i32 errno                   (12 bytes)
    notify    u8 kind=3  u8 op  u16 flags=0  u32 seq                             (8 bytes)

The body follows the header: the fixed fields of the op's dataclass packed with its ``_FMT``,
then each variable field as ``u32 length + bytes``, then the tail field (file data, link
target) as the rest of the message. A response with ``errno != 0`` has no body. ``uid``,
``gid`` and ``pid`` are the calling guest process's, as FUSE reports them.

Node ids are the FUSE node ids (1 is the mount root); ``attr.ino`` is the inode number
``stat`` shows. Names and link targets are raw bytes. :func:`decode_request` and friends raise
:class:`WireError` (and only that) on anything malformed; when the header was readable the
error carries ``request_id`` and ``op`` so the receiver can still answer.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields
from typing import ClassVar

VERSION = 1
MAX_MESSAGE = 4 * 1024 * 1024  # bytes per frame, as on the control port (gondolin.protocol.MAX_FRAME)
MAX_IO = 1024 * 1024  # largest read/write payload (FUSE max_pages 256 x 4 KiB)
MAX_NAME = 255  # bytes in one path component (NAME_MAX)
MAX_TARGET = 4095  # bytes in a symlink target (PATH_MAX - 1)
MAX_FORGET = 8192  # node ids in one forget batch
MAX_DIRENTS = 65536  # entries in one readdir reply


class Kind(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    NOTIFY = 3


class Op(enum.IntEnum):
    HELLO = 1
    LOOKUP = 2
    FORGET = 3  # no response
    GETATTR = 4
    SETATTR = 5
    READLINK = 6
    SYMLINK = 7
    MKDIR = 8
    UNLINK = 9
    RMDIR = 10
    RENAME = 11
    LINK = 12
    OPEN = 13
    READ = 14
    WRITE = 15
    STATFS = 16
    RELEASE = 17
    FSYNC = 18
    FLUSH = 19
    OPENDIR = 20
    READDIR = 21
    RELEASEDIR = 22
    ACCESS = 23
    CREATE = 24
    FALLOCATE = 25
    COPY_FILE_RANGE = 26
    READ_SHM = 27  # READ whose data the host places in a span of the shared region
    WRITE_SHM = 28  # WRITE whose data the guest placed in a span of the shared region
    # host -> guest notifications
    INVAL_INODE = 64  # drop cached attributes (and page cache in [offset, offset+length))
    INVAL_ENTRY = 65  # drop the cached dentry parent/name


# Setattr.valid bits: the same values as FUSE's FATTR_* (include/uapi/linux/fuse.h).
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8

# rename(2) flags (include/uapi/linux/fs.h)
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1

# OpenReply.open_flags (FOPEN_* in fuse.h)
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1

# HelloReply.flags
HELLO_READONLY = 1 << 0
HELLO_SHM = 1 << 1  # the host maps the shared region: READ_SHM / WRITE_SHM may be used

# The FUSE payload area of the VM's shared region (an ivshmem BAR; gondolin/shm.py): SHM_SPANS
# spans of MAX_IO bytes from SHM_FUSE_OFFSET. The guest names a span per request; each side
# checks the span index and the size.
SHM_FUSE_OFFSET = 32 * 1024 * 1024
SHM_SPANS = 32

# struct fuse_dirent is 24 bytes + name, padded to 8; fuse_direntplus prepends a
# 128-byte fuse_entry_out. Both sides size readdir replies with this.
_FUSE_DIRENT_HEADER = 24
_FUSE_ENTRY_OUT = 128


def fuse_dirent_size(name_len: int, plus: bool) -> int:
    """Bytes one entry takes in the kernel's READDIR / READDIRPLUS reply buffer."""
    size = (_FUSE_DIRENT_HEADER + name_len + 7) & ~7
    return size + _FUSE_ENTRY_OUT if plus else size


class WireError(ValueError):
    """A message that does not decode. ``request_id``/``op`` are set when the header was read."""

    def __init__(self, message: str, request_id: int | None = None, op: int | None = None):
        super().__init__(message)
        self.request_id = request_id
        self.op = op


# ---------------------------------------------------------------------------------------------
# Field codec: fixed struct, then u32-length-prefixed variable fields, then an optional tail.


_U32 = struct.Struct("<I")


class _Codec:
    """Packs a frozen dataclass: ``_FMT`` fields first, ``_VARS`` next, ``_TAIL`` last."""

    __slots__ = ()
    _FMT: ClassVar[str] = "<"
    _VARS: ClassVar[tuple[str, ...]] = ()
    _TAIL: ClassVar[str | None] = None
    _struct: ClassVar[struct.Struct]
    _fixed: ClassVar[tuple[str, ...]]

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls._struct = struct.Struct(cls._FMT)

    @classmethod
    def _fixed_names(cls) -> tuple[str, ...]:
        cached = cls.__dict__.get("_fixed_cache")
        if cached is None:
            skip = set(cls._VARS) | ({cls._TAIL} if cls._TAIL else set())
            cached = tuple(f.name for f in fields(cls) if f.name not in skip)  # type: ignore[arg-type]
            cls._fixed_cache = cached  # type: ignore[attr-defined]
        return cached  # type: ignore[no-any-return]

    def pack(self) -> bytes:
        out = [self._struct.pack(*(getattr(self, n) for n in self._fixed_names()))]
        for name in self._VARS:
            value: bytes = getattr(self, name)
            out.append(_U32.pack(len(value)))
            out.append(value)
        if self._TAIL:
            out.append(getattr(self, self._TAIL))
        return b"".join(out)

    @classmethod
    def unpack_from(cls, buf: memoryview, pos: int, *, whole: bool = True) -> tuple[_Codec, int]:
        end = pos + cls._struct.size
        if end > len(buf):
            raise WireError(f"{cls.__name__}: truncated")
        values: dict[str, object] = dict(
            zip(cls._fixed_names(), cls._struct.unpack_from(buf, pos), strict=True)
        )
        pos = end
        for name in cls._VARS:
            if pos + 4 > len(buf):
                raise WireError(f"{cls.__name__}.{name}: truncated length")
            (length,) = _U32.unpack_from(buf, pos)
            pos += 4
            if length > len(buf) - pos:
                raise WireError(f"{cls.__name__}.{name}: length {length} past end")
            values[name] = bytes(buf[pos : pos + length])
            pos += length
        if cls._TAIL:
            values[cls._TAIL] = bytes(buf[pos:])
            pos = len(buf)
        if whole and pos != len(buf):
            raise WireError(f"{cls.__name__}: {len(buf) - pos} trailing bytes")
        return cls(**values), pos


# ---------------------------------------------------------------------------------------------
# Shared value types


@dataclass(frozen=True, slots=True)
class Attr(_Codec):
    """File attributes, as ``lstat`` reports them (times in nanoseconds since the epoch)."""

    _FMT = "<QIIIIIIQQqqq"
    ino: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    blksize: int = 4096
    size: int = 0
    blocks: int = 0  # 512-byte units
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0


@dataclass(frozen=True, slots=True)
class StatFs(_Codec):
    _FMT = "<QQQQQIII"
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int = 4096
    namelen: int = MAX_NAME
    frsize: int = 4096


_ZERO_ATTR = Attr(ino=0, mode=0, nlink=0)


# ---------------------------------------------------------------------------------------------
# Requests (guest -> host)


class Body(_Codec):
    __slots__ = ()
    OP: ClassVar[Op]


@dataclass(frozen=True, slots=True)
class Hello(Body):
    OP = Op.HELLO
    _FMT = "<III"
    version: int = VERSION
    max_io: int = MAX_IO
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Lookup(Body):
    OP = Op.LOOKUP
    _FMT = "<Q"
    _VARS = ("name",)
    parent: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Forget(Body):
    """Drop ``nlookup`` references from each node (FUSE FORGET / BATCH_FORGET)."""

    OP = Op.FORGET
    items: tuple[tuple[int, int], ...]  # (node, nlookup)

    _ITEM: ClassVar[struct.Struct] = struct.Struct("<QQ")

    def pack(self) -> bytes:
        return _U32.pack(len(self.items)) + b"".join(self._ITEM.pack(n, c) for n, c in self.items)

    @classmethod
    def unpack_from(cls, buf: memoryview, pos: int, *, whole: bool = True) -> tuple[Forget, int]:
        if pos + 4 > len(buf):
            raise WireError("Forget: truncated")
        (count,) = _U32.unpack_from(buf, pos)
        pos += 4
        if count > MAX_FORGET or pos + count * cls._ITEM.size != len(buf):
            raise WireError(f"Forget: bad count {count}")
        items = tuple(cls._ITEM.unpack_from(buf, pos + i * cls._ITEM.size) for i in range(count))
        return cls(items=items), len(buf)


@dataclass(frozen=True, slots=True)
class Getattr(Body):
    OP = Op.GETATTR
    _FMT = "<QQ"
    node: int
    fh: int = 0  # non-zero: answer from this open file (works after unlink)


@dataclass(frozen=True, slots=True)
class Setattr(Body):
    OP = Op.SETATTR
    _FMT = "<QQIIIIQqq"
    node: int
    fh: int = 0
    valid: int = 0  # FATTR_* bits
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0


@dataclass(frozen=True, slots=True)
class Readlink(Body):
    OP = Op.READLINK
    _FMT = "<Q"
    node: int


@dataclass(frozen=True, slots=True)
class Symlink(Body):
    OP = Op.SYMLINK
    _FMT = "<Q"
    _VARS = ("name", "target")
    parent: int
    name: bytes
    target: bytes


@dataclass(frozen=True, slots=True)
class Mkdir(Body):
    OP = Op.MKDIR
    _FMT = "<QI"
    _VARS = ("name",)
    parent: int
    mode: int  # permission bits, umask already applied
    name: bytes


@dataclass(frozen=True, slots=True)
class Unlink(Body):
    OP = Op.UNLINK
    _FMT = "<Q"
    _VARS = ("name",)
    parent: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Rmdir(Body):
    OP = Op.RMDIR
    _FMT = "<Q"
    _VARS = ("name",)
    parent: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Rename(Body):
    OP = Op.RENAME
    _FMT = "<QQI"
    _VARS = ("old_name", "new_name")
    old_parent: int
    new_parent: int
    flags: int  # RENAME_NOREPLACE | RENAME_EXCHANGE
    old_name: bytes
    new_name: bytes


@dataclass(frozen=True, slots=True)
class Link(Body):
    OP = Op.LINK
    _FMT = "<QQ"
    _VARS = ("new_name",)
    node: int
    new_parent: int
    new_name: bytes


@dataclass(frozen=True, slots=True)
class Open(Body):
    OP = Op.OPEN
    _FMT = "<QI"
    node: int
    flags: int  # Linux open(2) flags


@dataclass(frozen=True, slots=True)
class Create(Body):
    OP = Op.CREATE
    _FMT = "<QII"
    _VARS = ("name",)
    parent: int
    mode: int  # permission bits, umask already applied
    flags: int  # Linux open(2) flags
    name: bytes


@dataclass(frozen=True, slots=True)
class Read(Body):
    OP = Op.READ
    _FMT = "<QQI"
    fh: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Write(Body):
    OP = Op.WRITE
    _FMT = "<QQ"
    _TAIL = "data"
    fh: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Statfs(Body):
    OP = Op.STATFS
    _FMT = "<Q"
    node: int


@dataclass(frozen=True, slots=True)
class Release(Body):
    OP = Op.RELEASE
    _FMT = "<Q"
    fh: int


@dataclass(frozen=True, slots=True)
class Fsync(Body):
    OP = Op.FSYNC
    _FMT = "<QI"
    fh: int
    datasync: int = 0


@dataclass(frozen=True, slots=True)
class Flush(Body):
    OP = Op.FLUSH
    _FMT = "<Q"
    fh: int


@dataclass(frozen=True, slots=True)
class Opendir(Body):
    OP = Op.OPENDIR
    _FMT = "<Q"
    node: int


@dataclass(frozen=True, slots=True)
class Readdir(Body):
    """Entries from ``offset`` that fit ``size`` bytes of the kernel buffer (see fuse_dirent_size).

    With ``plus`` every returned entry except ``.`` and ``..`` counts as one lookup of its node.
    """

    OP = Op.READDIR
    _FMT = "<QQII"
    dh: int
    offset: int
    size: int
    plus: int = 0


@dataclass(frozen=True, slots=True)
class Releasedir(Body):
    OP = Op.RELEASEDIR
    _FMT = "<Q"
    dh: int


@dataclass(frozen=True, slots=True)
class Access(Body):
    OP = Op.ACCESS
    _FMT = "<QI"
    node: int
    mask: int  # R_OK 4 | W_OK 2 | X_OK 1; 0 = existence


@dataclass(frozen=True, slots=True)
class Fallocate(Body):
    OP = Op.FALLOCATE
    _FMT = "<QQQI"
    fh: int
    offset: int
    length: int
    mode: int = 0


@dataclass(frozen=True, slots=True)
class CopyFileRange(Body):
    OP = Op.COPY_FILE_RANGE
    _FMT = "<QQQQQI"
    fh_in: int
    off_in: int
    fh_out: int
    off_out: int
    length: int
    flags: int = 0


@dataclass(frozen=True, slots=True)
class ReadShm(Body):
    """:class:`Read` into span ``span`` of the shared region; the reply is a SizeReply."""

    OP = Op.READ_SHM
    _FMT = "<QQII"
    fh: int
    offset: int
    size: int
    span: int


@dataclass(frozen=True, slots=True)
class WriteShm(Body):
    """:class:`Write` of the ``size`` bytes the guest placed in span ``span``."""

    OP = Op.WRITE_SHM
    _FMT = "<QQII"
    fh: int
    offset: int
    size: int
    span: int


# ---------------------------------------------------------------------------------------------
# Replies (host -> guest)


@dataclass(frozen=True, slots=True)
class HelloReply(_Codec):
    _FMT = "<IIIIII"
    version: int = VERSION
    max_io: int = MAX_IO
    flags: int = 0  # HELLO_* bits
    entry_ttl_ms: int = 1000
    attr_ttl_ms: int = 1000
    negative_ttl_ms: int = 250  # how long the guest may cache an ENOENT lookup


@dataclass(frozen=True, slots=True)
class EntryReply(_Codec):
    """A node the guest now holds one more lookup reference to (lookup, mkdir, create, ...)."""

    _FMT = "<QQII"
    node: int
    generation: int
    entry_ttl_ms: int
    attr_ttl_ms: int
    attr: Attr

    def pack(self) -> bytes:
        return (
            self._struct.pack(self.node, self.generation, self.entry_ttl_ms, self.attr_ttl_ms)
            + self.attr.pack()
        )

    @classmethod
    def unpack_from(
        cls, buf: memoryview, pos: int, *, whole: bool = True
    ) -> tuple[EntryReply, int]:
        if pos + cls._struct.size > len(buf):
            raise WireError("EntryReply: truncated")
        node, generation, entry_ttl, attr_ttl = cls._struct.unpack_from(buf, pos)
        attr, pos = Attr.unpack_from(buf, pos + cls._struct.size, whole=whole)
        assert isinstance(attr, Attr)
        return cls(node, generation, entry_ttl, attr_ttl, attr), pos


@dataclass(frozen=True, slots=True)
class AttrReply(_Codec):
    _FMT = "<I"
    attr_ttl_ms: int
    attr: Attr

    def pack(self) -> bytes:
        return self._struct.pack(self.attr_ttl_ms) + self.attr.pack()

    @classmethod
    def unpack_from(cls, buf: memoryview, pos: int, *, whole: bool = True) -> tuple[AttrReply, int]:
        if pos + 4 > len(buf):
            raise WireError("AttrReply: truncated")
        (ttl,) = cls._struct.unpack_from(buf, pos)
        attr, pos = Attr.unpack_from(buf, pos + 4, whole=whole)
        assert isinstance(attr, Attr)
        return cls(ttl, attr), pos


@dataclass(frozen=True, slots=True)
class OpenReply(_Codec):
    _FMT = "<QI"
    fh: int
    open_flags: int = 0  # FOPEN_* bits


@dataclass(frozen=True, slots=True)
class CreateReply(_Codec):
    entry: EntryReply
    open: OpenReply

    def pack(self) -> bytes:
        return self.entry.pack() + self.open.pack()

    @classmethod
    def unpack_from(
        cls, buf: memoryview, pos: int, *, whole: bool = True
    ) -> tuple[CreateReply, int]:
        entry, pos = EntryReply.unpack_from(buf, pos, whole=False)
        opened, pos = OpenReply.unpack_from(buf, pos, whole=whole)
        assert isinstance(opened, OpenReply)
        return cls(entry, opened), pos


@dataclass(frozen=True, slots=True)
class DataReply(_Codec):
    _TAIL = "data"
    data: bytes


@dataclass(frozen=True, slots=True)
class SizeReply(_Codec):
    _FMT = "<Q"
    size: int


@dataclass(frozen=True, slots=True)
class EmptyReply(_Codec):
    pass


@dataclass(frozen=True, slots=True)
class Dirent:
    """One readdir entry. ``offset`` is the value to pass to continue after this entry."""

    offset: int
    ino: int
    dtype: int  # DT_* (file type bits >> 12)
    name: bytes
    entry: EntryReply | None = None  # readdirplus only; node 0 for "." and ".."


@dataclass(frozen=True, slots=True)
class ReaddirReply(_Codec):
    plus: bool
    entries: tuple[Dirent, ...]

    _HEAD: ClassVar[struct.Struct] = struct.Struct("<II")  # plus, count
    _ENT: ClassVar[struct.Struct] = struct.Struct("<QQIH")  # offset, ino, dtype, name_len

    def pack(self) -> bytes:
        out = [self._HEAD.pack(1 if self.plus else 0, len(self.entries))]
        for ent in self.entries:
            out.append(self._ENT.pack(ent.offset, ent.ino, ent.dtype, len(ent.name)))
            out.append(ent.name)
            if self.plus:
                entry = ent.entry or EntryReply(0, 0, 0, 0, _ZERO_ATTR)
                out.append(entry.pack())
        return b"".join(out)

    @classmethod
    def unpack_from(
        cls, buf: memoryview, pos: int, *, whole: bool = True
    ) -> tuple[ReaddirReply, int]:
        if pos + cls._HEAD.size > len(buf):
            raise WireError("ReaddirReply: truncated")
        plus, count = cls._HEAD.unpack_from(buf, pos)
        pos += cls._HEAD.size
        if plus not in (0, 1) or count > MAX_DIRENTS:
            raise WireError("ReaddirReply: bad header")
        entries = []
        for _ in range(count):
            if pos + cls._ENT.size > len(buf):
                raise WireError("ReaddirReply: truncated entry")
            offset, ino, dtype, name_len = cls._ENT.unpack_from(buf, pos)
            pos += cls._ENT.size
            if pos + name_len > len(buf):
                raise WireError("ReaddirReply: truncated name")
            name = bytes(buf[pos : pos + name_len])
            pos += name_len
            entry = None
            if plus:
                entry, pos = EntryReply.unpack_from(buf, pos, whole=False)
                if entry.node == 0:  # "." / "..": no attributes, no lookup reference
                    entry = None
            entries.append(Dirent(offset, ino, dtype, name, entry))
        if whole and pos != len(buf):
            raise WireError("ReaddirReply: trailing bytes")
        return cls(bool(plus), tuple(entries)), pos


# ---------------------------------------------------------------------------------------------
# Notifications (host -> guest)


@dataclass(frozen=True, slots=True)
class InvalInode(Body):
    OP = Op.INVAL_INODE
    _FMT = "<Qqq"
    node: int
    offset: int = 0  # page cache range to drop; offset < 0: attributes only
    length: int = 0  # 0 = to the end of the file


@dataclass(frozen=True, slots=True)
class InvalEntry(Body):
    OP = Op.INVAL_ENTRY
    _FMT = "<Q"
    _VARS = ("name",)
    parent: int
    name: bytes


# ---------------------------------------------------------------------------------------------
# Envelopes


REQUEST_TYPES: dict[Op, type[Body]] = {
    cls.OP: cls
    for cls in (
        Hello, Lookup, Forget, Getattr, Setattr, Readlink, Symlink, Mkdir, Unlink, Rmdir,
        Rename, Link, Open, Create, Read, Write, Statfs, Release, Fsync, Flush, Opendir,
        Readdir, Releasedir, Access, Fallocate, CopyFileRange, ReadShm, WriteShm,
    )
}  # fmt: skip

REPLY_TYPES: dict[Op, type[_Codec]] = {
    Op.HELLO: HelloReply,
    Op.LOOKUP: EntryReply,
    Op.GETATTR: AttrReply,
    Op.SETATTR: AttrReply,
    Op.READLINK: DataReply,
    Op.SYMLINK: EntryReply,
    Op.MKDIR: EntryReply,
    Op.UNLINK: EmptyReply,
    Op.RMDIR: EmptyReply,
    Op.RENAME: EmptyReply,
    Op.LINK: EntryReply,
    Op.OPEN: OpenReply,
    Op.CREATE: CreateReply,
    Op.READ: DataReply,
    Op.WRITE: SizeReply,
    Op.STATFS: StatFs,
    Op.RELEASE: EmptyReply,
    Op.FSYNC: EmptyReply,
    Op.FLUSH: EmptyReply,
    Op.OPENDIR: OpenReply,
    Op.READDIR: ReaddirReply,
    Op.RELEASEDIR: EmptyReply,
    Op.ACCESS: EmptyReply,
    Op.FALLOCATE: EmptyReply,
    Op.COPY_FILE_RANGE: SizeReply,
    Op.READ_SHM: SizeReply,
    Op.WRITE_SHM: SizeReply,
}

NOTIFY_TYPES: dict[Op, type[Body]] = {cls.OP: cls for cls in (InvalInode, InvalEntry)}

_REQ_HDR = struct.Struct("<BBHIIII")
_RESP_HDR = struct.Struct("<BBHIi")
_NOTIFY_HDR = struct.Struct("<BBHI")


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    body: Body
    uid: int = 0
    gid: int = 0
    pid: int = 0


_OP_VALUES = frozenset(int(op) for op in Op)


@dataclass(frozen=True, slots=True)
class Response:
    id: int
    op: int  # an Op, or an unknown number in an error response
    errno: int = 0
    body: _Codec | None = None  # None exactly when errno != 0


@dataclass(frozen=True, slots=True)
class Notify:
    body: Body
    seq: int = 0


def encode_request(req: Request) -> bytes:
    op = req.body.OP
    if REQUEST_TYPES.get(op) is not type(req.body):
        raise ValueError(f"not a request body: {type(req.body).__name__}")
    return _REQ_HDR.pack(Kind.REQUEST, op, 0, req.id, req.uid, req.gid, req.pid) + req.body.pack()


def encode_response(resp: Response) -> bytes:
    head = _RESP_HDR.pack(Kind.RESPONSE, resp.op, 0, resp.id, resp.errno)
    if resp.errno:
        return head
    expected = REPLY_TYPES.get(Op(resp.op)) if resp.op in _OP_VALUES else None
    if expected is None or type(resp.body) is not expected:
        raise ValueError(f"{resp.op!r} does not reply with {type(resp.body).__name__}")
    return head + resp.body.pack()


def encode_error(request_id: int, op: int, errno: int) -> bytes:
    """A failure response; ``op`` may be a number this side does not know."""
    return _RESP_HDR.pack(Kind.RESPONSE, op & 0xFF, 0, request_id & 0xFFFFFFFF, errno)


def encode_notify(note: Notify) -> bytes:
    op = note.body.OP
    if NOTIFY_TYPES.get(op) is not type(note.body):
        raise ValueError(f"not a notification body: {type(note.body).__name__}")
    return _NOTIFY_HDR.pack(Kind.NOTIFY, op, 0, note.seq) + note.body.pack()


def _check_limits(body: object, request_id: int | None, op: int) -> None:
    if isinstance(body, Write) and len(body.data) > MAX_IO:
        raise WireError("write larger than MAX_IO", request_id, op)
    if isinstance(body, Read) and body.size > MAX_IO:
        raise WireError("read larger than MAX_IO", request_id, op)
    if isinstance(body, (ReadShm, WriteShm)) and (body.size > MAX_IO or body.span >= SHM_SPANS):
        raise WireError("shared-region request beyond its span", request_id, op)


def decode_request(data: bytes | bytearray | memoryview) -> Request:
    buf = memoryview(data)
    if len(buf) > MAX_MESSAGE:
        raise WireError("message larger than MAX_MESSAGE")
    if len(buf) < _REQ_HDR.size:
        raise WireError("truncated request header")
    kind, op, _flags, rid, uid, gid, pid = _REQ_HDR.unpack_from(buf, 0)
    if kind != Kind.REQUEST:
        raise WireError(f"not a request (kind {kind})")
    try:
        cls = REQUEST_TYPES[Op(op)]
    except (ValueError, KeyError):
        raise WireError(f"unknown op {op}", rid, op) from None
    try:
        body, _ = cls.unpack_from(buf, _REQ_HDR.size)
    except WireError as exc:
        raise WireError(str(exc), rid, op) from None
    _check_limits(body, rid, op)
    assert isinstance(body, Body)
    return Request(id=rid, body=body, uid=uid, gid=gid, pid=pid)


def decode_response(data: bytes | bytearray | memoryview) -> Response:
    buf = memoryview(data)
    if len(buf) > MAX_MESSAGE:
        raise WireError("message larger than MAX_MESSAGE")
    if len(buf) < _RESP_HDR.size:
        raise WireError("truncated response header")
    kind, op, _flags, rid, err = _RESP_HDR.unpack_from(buf, 0)
    if kind != Kind.RESPONSE:
        raise WireError(f"not a response (kind {kind})")
    if err:
        if err < 0 or len(buf) != _RESP_HDR.size:
            raise WireError("bad error response", rid, op)
        # An op this side does not know can still fail (ENOSYS from a newer peer).
        return Response(id=rid, op=Op(op) if op in _OP_VALUES else op, errno=err)
    try:
        opv = Op(op)
    except ValueError:
        raise WireError(f"unknown op {op}", rid, op) from None
    cls = REPLY_TYPES.get(opv)
    if cls is None:
        raise WireError(f"op {op} has no reply", rid, op)
    try:
        body, _ = cls.unpack_from(buf, _RESP_HDR.size)
    except WireError as exc:
        raise WireError(str(exc), rid, op) from None
    return Response(id=rid, op=opv, errno=0, body=body)


def decode_notify(data: bytes | bytearray | memoryview) -> Notify:
    buf = memoryview(data)
    if len(buf) > MAX_MESSAGE or len(buf) < _NOTIFY_HDR.size:
        raise WireError("bad notification size")
    kind, op, _flags, seq = _NOTIFY_HDR.unpack_from(buf, 0)
    if kind != Kind.NOTIFY:
        raise WireError(f"not a notification (kind {kind})")
    try:
        cls = NOTIFY_TYPES[Op(op)]
    except (ValueError, KeyError):
        raise WireError(f"unknown notification {op}") from None
    body, _ = cls.unpack_from(buf, _NOTIFY_HDR.size)
    assert isinstance(body, Body)
    return Notify(body=body, seq=seq)


# ---------------------------------------------------------------------------------------------
# Raw access for hot paths (the guest daemon under emulation): the same bytes as the codec
# above without building a dataclass per message. Layouts come from the classes, so there is
# still one definition of each message.

REQUEST_HEADER = _REQ_HDR
RESPONSE_HEADER = _RESP_HDR
NOTIFY_HEADER = _NOTIFY_HDR


READDIR_HEAD = ReaddirReply._HEAD  # plus, count
READDIR_ENTRY = ReaddirReply._ENT  # offset, ino, dtype, name_len; then name (and EntryReply)


def body_format(cls: type[_Codec]) -> str:
    """The struct format of a message class's fixed fields (``<`` first)."""
    return cls._FMT


def request_frame(
    request_id: int,
    cls: type[Body],
    fixed: tuple[int, ...],
    variables: tuple[bytes, ...] = (),
    tail: bytes | memoryview = b"",
    uid: int = 0,
    gid: int = 0,
    pid: int = 0,
) -> tuple[bytes, bytes | memoryview]:
    """``encode_frame(encode_request(...))`` as (head, tail) pieces, for ``writev``.

    ``fixed`` are the values of ``cls``'s fixed fields in order, ``variables`` its
    length-prefixed fields, ``tail`` its tail field. Limits are not checked here beyond
    the frame size: the receiver checks them.
    """
    parts = [
        _REQ_HDR.pack(Kind.REQUEST, cls.OP, 0, request_id, uid, gid, pid),
        cls._struct.pack(*fixed),
    ]
    for value in variables:
        parts.append(_U32.pack(len(value)))
        parts.append(value)
    head = b"".join(parts)
    size = len(head) + len(tail)
    if size > MAX_MESSAGE:
        raise ValueError("message larger than MAX_MESSAGE")
    return _FRAME_LEN.pack(size) + head, tail


def message_kind(data: bytes | bytearray | memoryview) -> Kind:
    """Which decoder a received message needs."""
    if not data:
        raise WireError("empty message")
    try:
        return Kind(data[0])
    except ValueError:
        raise WireError(f"unknown message kind {data[0]}") from None


# ---------------------------------------------------------------------------------------------
# Framing on the fs port: u32 big-endian length + message.

_FRAME_LEN = struct.Struct(">I")
FRAME_HEADER = _FRAME_LEN


def encode_frame(message: bytes) -> bytes:
    if len(message) > MAX_MESSAGE:
        raise ValueError("message larger than MAX_MESSAGE")
    return _FRAME_LEN.pack(len(message)) + message


class FrameSplitter:
    """Incremental frame reader: ``feed()`` bytes as they arrive, get whole messages back.

    A length over :data:`MAX_MESSAGE` raises :class:`WireError`; the stream is then unusable
    (there is no way to resynchronise), so the caller should drop the connection.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        end = len(buf)
        with memoryview(buf) as view:
            while end - pos >= 4:
                (length,) = _FRAME_LEN.unpack_from(buf, pos)
                if length > MAX_MESSAGE:
                    raise WireError(f"frame of {length} bytes exceeds MAX_MESSAGE")
                if end - pos < 4 + length:
                    break
                out.append(bytes(view[pos + 4 : pos + 4 + length]))
                pos += 4 + length
        if pos:
            del buf[:pos]  # once per feed, not once per message
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def missing(self) -> int:
        """Bytes still to come for the frame begun in the buffer; 0 between frames or before
        its length is known. A reader may block for exactly this many: they are on their way."""
        if len(self._buf) < 4:
            return 0
        (length,) = _FRAME_LEN.unpack_from(self._buf, 0)
        return max(0, 4 + length - len(self._buf))
