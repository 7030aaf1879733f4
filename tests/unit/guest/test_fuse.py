"""The guest FUSE daemon's translation, driven like the kernel drives it, against a real host.

Each test plays the kernel: it packs FUSE requests, hands them to :class:`FuseSession`, carries
the frames it emits to an :class:`FsRpcService` over a MemoryProvider, carries the responses
back, and decodes the FUSE replies.
"""

from __future__ import annotations

import errno as E
import stat
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gondolin.vfs import FsRpcService, MemoryProvider
from gondolin.vfs import wire as w
from guest import fuse as F

pytestmark = pytest.mark.anyio

O_RDONLY, O_WRONLY, O_RDWR, O_CREAT = 0, 1, 2, 0o100
ATTR = struct.Struct("<" + F._ATTR_FMT)
HELLO = w.HelloReply(entry_ttl_ms=1500, attr_ttl_ms=2500, negative_ttl_ms=250)


@dataclass
class Reply:
    error: int
    data: bytes

    def entry(self) -> tuple[int, int, dict[str, int]]:
        """(node, entry_valid_ms, attr) of a fuse_entry_out."""
        v = F.ENTRY_OUT.unpack(self.data[: F.ENTRY_OUT.size])
        return v[0], v[2] * 1000 + v[4] // 1_000_000, _attr(v[6:])

    def attr(self) -> dict[str, int]:
        v = F.ATTR_OUT.unpack(self.data)
        return _attr(v[3:])

    def open_out(self, pos: int = 0) -> tuple[int, int]:
        fh, flags, _ = F.OPEN_OUT.unpack_from(self.data, pos)
        return fh, flags


def _attr(v: tuple[int, ...]) -> dict[str, int]:
    names = ("ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid "
             "rdev blksize flags").split()  # fmt: skip
    return dict(zip(names, v, strict=True))


def dirents(data: bytes, plus: bool) -> list[tuple[bytes, int, int]]:
    """(name, offset, node or 0) of each entry in a READDIR(PLUS) buffer."""
    out, pos = [], 0
    while pos < len(data):
        node = 0
        if plus:
            node = F.ENTRY_OUT.unpack_from(data, pos)[0]
            pos += F.ENTRY_OUT.size
        _ino, off, namelen, _type = F.DIRENT.unpack_from(data, pos)
        name = data[pos + F.DIRENT.size : pos + F.DIRENT.size + namelen]
        pos += (F.DIRENT.size + namelen + 7) & ~7
        out.append((name, off, node))
    return out


class Kernel:
    def __init__(self, service: FsRpcService) -> None:
        self.service = service
        self.session = F.FuseSession(HELLO)
        self.unique = 100
        self.notes: list[bytes] = []
        self.frames: list[bytes] = []

    async def pump(self, outs: list[F.Out]) -> list[bytes]:
        replies: list[bytes] = []
        queue = list(outs)
        while queue:
            dest, pieces = queue.pop(0)
            data = b"".join(bytes(p) for p in pieces)
            if dest == F.TO_PORT:
                (size,) = w.FRAME_HEADER.unpack_from(data)
                assert size == len(data) - 4
                self.frames.append(data[4:])
                resp = await self.service.handle(data[4:])
                if resp is not None:
                    queue.extend(self.session.port_message(resp))
            elif dest == F.TO_FUSE:
                replies.append(data)
            else:
                self.notes.append(data)
        return replies

    async def send(self, op: int, node: int = 1, body: bytes = b"", uid: int = 0) -> list[bytes]:
        self.unique += 1
        head = F.IN_HEADER.pack(F.IN_HEADER.size + len(body), op, self.unique, node, uid, uid,
                                42, 0, 0)  # fmt: skip
        return await self.pump(self.session.fuse_request(head + body))

    async def call(self, op: int, node: int = 1, body: bytes = b"", uid: int = 0) -> Reply:
        replies = await self.send(op, node, body, uid)
        assert len(replies) == 1, replies
        size, error, unique = F.OUT_HEADER.unpack_from(replies[0])
        assert size == len(replies[0]) and unique == self.unique
        return Reply(-error, replies[0][F.OUT_HEADER.size :])

    async def ok(self, op: int, node: int = 1, body: bytes = b"", uid: int = 0) -> Reply:
        reply = await self.call(op, node, body, uid)
        assert reply.error == 0, E.errorcode.get(reply.error)
        return reply

    # the requests tests use most
    async def create(self, name: bytes, parent: int = 1, mode: int = 0o644) -> tuple[int, int]:
        r = await self.ok(F.CREATE, parent, F.CREATE_IN.pack(O_RDWR | O_CREAT, mode, 0o22, 0)
                          + name + b"\0")  # fmt: skip
        node, _, _ = r.entry()
        fh, _ = r.open_out(F.ENTRY_OUT.size)
        return node, fh

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        body = F.READ_IN.pack(fh, offset, len(data), 0, 0, 0, 0) + data
        size, _ = F.WRITE_OUT.unpack((await self.ok(F.WRITE, 2, body)).data)
        return int(size)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return (await self.ok(F.READ, 2, F.READ_IN.pack(fh, offset, size, 0, 0, 0, 0))).data

    async def lookup(self, name: bytes, parent: int = 1) -> Reply:
        return await self.call(F.LOOKUP, parent, name + b"\0")


@pytest.fixture
def fs() -> MemoryProvider:
    return MemoryProvider(clock=lambda: 1_700_000_000_123_456_789)


@pytest.fixture
def service(fs: MemoryProvider) -> FsRpcService:
    return FsRpcService(fs, entry_ttl_ms=1500, attr_ttl_ms=2500, negative_ttl_ms=250)


@pytest.fixture
def kernel(service: FsRpcService) -> Kernel:
    return Kernel(service)


async def test_init_negotiates_big_io_and_caching(kernel: Kernel) -> None:
    offered = 0xFFFFFFFF
    r = await kernel.ok(F.INIT, 0, F.INIT_IN.pack(7, 38, 128 * 1024, offered) + bytes(48))
    major, minor, readahead, flags, bg, _cong, max_write, gran, pages, _align, flags2 = (
        F.INIT_OUT.unpack(r.data)
    )
    assert (major, minor, readahead, gran) == (7, 38, 128 * 1024, 1)
    assert flags == F.WANTED_FLAGS | F.INIT_EXT and flags2 == 0
    assert max_write == w.MAX_IO >= 128 * 1024 and pages == w.MAX_IO // 4096
    assert bg == F.MAX_BACKGROUND and kernel.session.initialized


async def test_init_grants_only_what_the_kernel_offers(kernel: Kernel) -> None:
    offered = F.ASYNC_READ | F.DO_READDIRPLUS
    r = await kernel.ok(F.INIT, 0, F.INIT_IN.pack(7, 31, 65536, offered))
    major, minor, _ra, flags, *_ = F.INIT_OUT.unpack(r.data)
    assert (major, minor, flags) == (7, 31, offered)


async def test_init_from_another_major_names_ours(kernel: Kernel) -> None:
    r = await kernel.ok(F.INIT, 0, F.INIT_IN.pack(8, 0, 0, 0))
    assert F.INIT_OUT.unpack(r.data)[:2] == (7, 38) and not kernel.session.initialized


async def test_create_write_read_getattr(kernel: Kernel, fs: MemoryProvider) -> None:
    node, fh = await kernel.create(b"f")
    data = bytes(range(256)) * 1024  # 256 KiB: one request, as the kernel sends with max_write
    assert await kernel.write(fh, 0, data) == len(data)
    assert await kernel.read(fh, 0, 300_000) == data
    assert await kernel.read(fh, len(data), 4096) == b""
    attr = (await kernel.ok(F.GETATTR, node, F.GETATTR_IN.pack(0, 0, 0))).attr()
    assert attr["size"] == len(data) and stat.S_IFMT(attr["mode"]) == stat.S_IFREG
    assert (attr["mtime"], attr["mtimensec"]) == (1_700_000_000, 123_456_789)
    by_fh = (await kernel.ok(F.GETATTR, node, F.GETATTR_IN.pack(F.GETATTR_FH, 0, fh))).attr()
    assert by_fh["size"] == len(data)
    await kernel.ok(F.RELEASE, node, F.RELEASE_IN.pack(fh, 0, 0, 0))
    assert kernel.service.open_files == 0


async def test_entry_carries_the_hosts_ttls(kernel: Kernel) -> None:
    await kernel.create(b"f")
    node, entry_ms, attr = (await kernel.lookup(b"f")).entry()
    assert node > 1 and entry_ms == 1500 and attr["mode"] & 0o777 == 0o644
    v = F.ENTRY_OUT.unpack((await kernel.lookup(b"f")).data)
    assert (v[3], v[5]) == (2, 500_000_000)  # attr_valid 2.5 s


async def test_missing_name_is_cached_as_negative(kernel: Kernel) -> None:
    r = await kernel.lookup(b"nope")
    node, entry_ms, _ = r.entry()
    assert r.error == 0 and node == 0 and entry_ms == 250


async def test_no_negative_caching_when_the_host_says_so(service: FsRpcService) -> None:
    kernel = Kernel(service)
    kernel.session = F.FuseSession(w.HelloReply(negative_ttl_ms=0))
    assert (await kernel.lookup(b"nope")).error == E.ENOENT


@pytest.mark.parametrize(
    ("op", "body", "errno"),
    [
        (F.UNLINK, b"missing\0", E.ENOENT),
        (F.RMDIR, b"missing\0", E.ENOENT),
        (F.MKDIR, F.MKDIR_IN.pack(0o755, 0) + b"a/b\0", E.EINVAL),
        (F.LOOKUP, b"x" * 300 + b"\0", E.ENAMETOOLONG),
        (F.OPEN, F.OPEN_IN.pack(O_RDONLY, 0), E.ESTALE),  # node 99 was never looked up
        (F.READ, F.READ_IN.pack(77, 0, 10, 0, 0, 0, 0), E.EBADF),
    ],
)
async def test_host_errors_reach_the_kernel(
    kernel: Kernel, op: int, body: bytes, errno: int
) -> None:
    assert (await kernel.call(op, 99 if op == F.OPEN else 1, body)).error == errno


async def test_mkdir_symlink_readlink_link_unlink_rmdir(kernel: Kernel, fs: MemoryProvider) -> None:
    d, _, attr = (await kernel.ok(F.MKDIR, 1, F.MKDIR_IN.pack(0o750, 0o22) + b"d\0")).entry()
    assert stat.S_ISDIR(attr["mode"]) and attr["mode"] & 0o777 == 0o750
    link, _, attr = (await kernel.ok(F.SYMLINK, d, b"l\0../target\0")).entry()
    assert stat.S_ISLNK(attr["mode"])
    assert (await kernel.ok(F.READLINK, link)).data == b"../target"
    f, fh = await kernel.create(b"f", d)
    _, _, attr = (await kernel.ok(F.LINK, 1, F.LINK_IN.pack(f) + b"hard\0")).entry()
    assert attr["nlink"] == 2
    assert (await kernel.call(F.RMDIR, 1, b"d\0")).error == E.ENOTEMPTY
    for name in (b"l", b"f"):
        await kernel.ok(F.UNLINK, d, name + b"\0")
    await kernel.ok(F.RMDIR, 1, b"d\0")
    assert [e.name for e in await fs.readdir("/")] == ["hard"]


async def test_rename_and_rename2_flags(kernel: Kernel, fs: MemoryProvider) -> None:
    for name in (b"a", b"b"):
        _, fh = await kernel.create(name)
        await kernel.write(fh, 0, name)
    await kernel.ok(F.RENAME, 1, F.RENAME_IN.pack(1) + b"a\0c\0")
    noreplace = F.RENAME2_IN.pack(1, w.RENAME_NOREPLACE, 0) + b"c\0b\0"
    assert (await kernel.call(F.RENAME2, 1, noreplace)).error == E.EEXIST
    await kernel.ok(F.RENAME2, 1, F.RENAME2_IN.pack(1, w.RENAME_EXCHANGE, 0) + b"c\0b\0")
    assert sorted(e.name for e in await fs.readdir("/")) == ["b", "c"]
    fh = (await kernel.ok(F.OPEN, (await kernel.lookup(b"b")).entry()[0],
                          F.OPEN_IN.pack(O_RDONLY, 0))).open_out()[0]  # fmt: skip
    assert await kernel.read(fh, 0, 10) == b"a"


async def test_setattr_mode_owner_size_times(kernel: Kernel, fs: MemoryProvider) -> None:
    node, _ = await kernel.create(b"f")
    valid = w.FATTR_MODE | w.FATTR_UID | w.FATTR_GID | w.FATTR_SIZE | w.FATTR_ATIME | w.FATTR_MTIME
    body = F.SETATTR_IN.pack(valid, 0, 0, 1234, 0, 10, 20, 0, 5, 6, 0, 0o100600, 0, 1000, 1001, 0)
    attr = (await kernel.ok(F.SETATTR, node, body)).attr()
    assert (attr["size"], attr["mode"] & 0o7777, attr["uid"], attr["gid"]) == (
        1234,
        0o600,
        1000,
        1001,
    )
    host = await fs.getattr("/f")
    assert (host.atime_ns, host.mtime_ns, host.size) == (10_000_000_005, 20_000_000_006, 1234)


async def test_setattr_through_an_open_file(kernel: Kernel, fs: MemoryProvider) -> None:
    node, fh = await kernel.create(b"f")
    await kernel.ok(F.UNLINK, 1, b"f\0")
    body = F.SETATTR_IN.pack(w.FATTR_SIZE | F.FATTR_FH, 0, fh, 77, *bytes(12))
    assert (await kernel.ok(F.SETATTR, node, body)).attr()["size"] == 77


async def test_readdir_and_readdirplus_page_through(kernel: Kernel) -> None:
    names = {f"file-{i:03}".encode() for i in range(150)}
    for name in names:
        await kernel.create(name)
    for op, plus in ((F.READDIR, False), (F.READDIRPLUS, True)):
        dh = (await kernel.ok(F.OPENDIR, 1, F.OPEN_IN.pack(O_RDONLY, 0))).open_out()[0]
        seen, offset = [], 0
        while True:
            data = (await kernel.ok(op, 1, F.READ_IN.pack(dh, offset, 4096, 0, 0, 0, 0))).data
            assert len(data) <= 4096
            if not data:
                break
            entries = dirents(data, plus)
            seen.extend(entries)
            offset = entries[-1][1]
        await kernel.ok(F.RELEASEDIR, 1, F.RELEASE_IN.pack(dh, 0, 0, 0))
        assert {n for n, _, _ in seen} == names | {b".", b".."}
        nodes = [node for n, _, node in seen if n not in (b".", b"..")]
        assert all(nodes) if plus else not any(nodes)
        assert all(node == 0 for n, _, node in seen if n in (b".", b".."))


async def test_statfs_fallocate_copy_file_range_fsync(kernel: Kernel) -> None:
    blocks, *_rest, bsize, namelen, _frsize, _pad = F.KSTATFS.unpack(
        (await kernel.ok(F.STATFS)).data
    )
    assert blocks > 0 and bsize == 4096 and namelen == 255
    src, fh_in = await kernel.create(b"src")
    await kernel.write(fh_in, 0, b"0123456789")
    dst, fh_out = await kernel.create(b"dst")
    await kernel.ok(F.FALLOCATE, dst, F.FALLOCATE_IN.pack(fh_out, 0, 8192, 0, 0))
    body = F.COPY_RANGE_IN.pack(fh_in, 2, dst, fh_out, 100, 5, 0)
    assert F.WRITE_OUT.unpack((await kernel.ok(F.COPY_FILE_RANGE, src, body)).data)[0] == 5
    assert await kernel.read(fh_out, 100, 5) == b"23456"
    await kernel.ok(F.FSYNC, dst, F.FSYNC_IN.pack(fh_out, 1, 0))


async def test_open_keeps_the_page_cache_unless_direct_io(kernel: Kernel) -> None:
    node, _ = await kernel.create(b"f")
    _fh, flags = (await kernel.ok(F.OPEN, node, F.OPEN_IN.pack(O_RDONLY, 0))).open_out()
    assert flags == F.FOPEN_KEEP_CACHE
    dh, flags = (await kernel.ok(F.OPENDIR, 1, F.OPEN_IN.pack(O_RDONLY, 0))).open_out()
    assert flags == 0
    assert F._open_out(5, w.FOPEN_DIRECT_IO, F.OPEN) == F.OPEN_OUT.pack(5, F.FOPEN_DIRECT_IO, 0)


async def test_forgets_shrink_the_host_node_table(kernel: Kernel) -> None:
    nodes = [(await kernel.create(f"f{i}".encode()))[0] for i in range(20)]
    before = len(kernel.service.nodes)
    assert await kernel.send(F.FORGET, nodes[0], F.FORGET_IN.pack(1)) == []
    batch = F.BATCH_FORGET_IN.pack(19, 0) + b"".join(F.FORGET_ONE.pack(n, 1) for n in nodes[1:])
    assert await kernel.send(F.BATCH_FORGET, 0, batch) == []
    assert len(kernel.service.nodes) == before - 20


@pytest.mark.parametrize(
    ("op", "errno"),
    [
        (F.FLUSH, E.ENOSYS),  # writes are synchronous: nothing to flush, never ask again
        (22, E.ENOSYS),  # GETXATTR
        (21, E.ENOSYS),  # SETXATTR
        (46, E.ENOSYS),  # LSEEK: the kernel's generic llseek
        (9999, E.ENOSYS),
        (F.FSYNCDIR, 0),
    ],
)
async def test_answered_in_the_guest(kernel: Kernel, op: int, errno: int) -> None:
    assert (await kernel.call(op, 1, bytes(64))).error == errno
    assert kernel.frames == []


async def test_interrupt_and_destroy(kernel: Kernel) -> None:
    assert await kernel.send(F.INTERRUPT, 0, struct.pack("<Q", 5)) == []
    assert (await kernel.call(F.DESTROY, 1)).error == 0 and kernel.session.destroyed


async def test_mknod_regular_file_only(kernel: Kernel) -> None:
    r = await kernel.ok(F.MKNOD, 1, F.MKNOD_IN.pack(stat.S_IFREG | 0o640, 0, 0, 0) + b"n\0")
    assert stat.S_ISREG(r.entry()[2]["mode"])
    assert kernel.service.open_files == 0  # the host handle behind it was released
    fifo = F.MKNOD_IN.pack(stat.S_IFIFO | 0o640, 0, 0, 0) + b"p\0"
    assert (await kernel.call(F.MKNOD, 1, fifo)).error == E.EPERM


@pytest.mark.parametrize(
    ("op", "body"),
    [
        (F.LOOKUP, b"unterminated"),
        (F.SYMLINK, b"name\0target"),
        (F.GETATTR, b"\x00"),
        (F.WRITE, F.READ_IN.pack(1, 0, 100, 0, 0, 0, 0) + b"short"),
        (F.RENAME2, F.RENAME2_IN.pack(1, 0, 0) + b"a\0"),
    ],
)
async def test_malformed_requests_get_einval(kernel: Kernel, op: int, body: bytes) -> None:
    assert (await kernel.call(op, 1, body)).error == E.EINVAL
    assert kernel.session.bad_messages == 1 and not kernel.session.pending


async def test_short_or_broken_forgets_are_dropped(kernel: Kernel) -> None:
    assert kernel.session.fuse_request(b"\x01\x02") == []
    assert await kernel.send(F.BATCH_FORGET, 0, F.BATCH_FORGET_IN.pack(3, 0)) == []
    assert kernel.session.bad_messages == 2


async def test_invalidations_become_fuse_notifications(
    kernel: Kernel, service: FsRpcService
) -> None:
    node, _ = await kernel.create(b"f")
    service.invalidate("/f")
    assert await kernel.pump([o for n in service.pending_notifications()
                              for o in kernel.session.port_message(n)]) == []  # fmt: skip
    entry, inode = kernel.notes
    size, code, unique = F.OUT_HEADER.unpack_from(entry)
    assert (size, code, unique) == (len(entry), F.NOTIFY_INVAL_ENTRY, 0)
    assert F.INVAL_ENTRY_OUT.unpack_from(entry, 16) == (1, 1, 0) and entry[32:] == b"f\0"
    assert F.OUT_HEADER.unpack_from(inode)[1] == F.NOTIFY_INVAL_INODE
    assert F.INVAL_INODE_OUT.unpack_from(inode, 16) == (node, 0, 0)


async def test_stray_and_garbled_responses(kernel: Kernel) -> None:
    stray = w.encode_response(
        w.Response(12345, w.Op.GETATTR, 0, w.AttrReply(1, w.Attr(1, 0o40755)))
    )
    assert kernel.session.port_message(stray) == []
    assert kernel.session.port_message(b"\x07garbage") == []
    assert kernel.session.bad_messages == 2
    # A reply too short for its op fails the request with EIO instead of killing the daemon.
    outs = kernel.session.fuse_request(F.IN_HEADER.pack(56, F.GETATTR, 9, 1, 0, 0, 0, 0, 0)
                                       + F.GETATTR_IN.pack(0, 0, 0))  # fmt: skip
    rid = next(iter(kernel.session.pending))
    short = w.RESPONSE_HEADER.pack(w.Kind.RESPONSE, w.Op.GETATTR, 0, rid, 0) + b"\x01"
    [(dest, pieces)] = kernel.session.port_message(short)
    assert dest == F.TO_FUSE and F.OUT_HEADER.unpack(b"".join(pieces))[1:] == (-E.EIO, 9)
    assert len(outs) == 1


async def test_fail_all_answers_everything_pending(kernel: Kernel) -> None:
    for unique in (5, 6):
        kernel.session.fuse_request(F.IN_HEADER.pack(46, F.LOOKUP, unique, 1, 0, 0, 0, 0, 0)
                                    + b"name\0")  # fmt: skip
    answers = kernel.session.fail_all()
    assert sorted(F.OUT_HEADER.unpack(b"".join(p))[2] for _, p in answers) == [5, 6]
    assert not kernel.session.pending


def test_negative_entry_layout() -> None:
    v = F.ENTRY_OUT.unpack(F.negative_entry(1250))
    assert (v[0], v[2], v[4]) == (0, 1, 250_000_000) and not any(v[6:])


def test_write_pieces_respect_the_port_limit() -> None:
    pieces = F._pieces([b"head", memoryview(bytes(100_000)), b""])
    assert [len(p) for p in pieces] == [4, 32768, 32768, 32768, 1696]


@settings(max_examples=300, deadline=None)
@given(op=st.integers(0, 60), body=st.binary(max_size=200), length=st.integers(0, 400))
def test_fuzz_fuse_requests_never_raise(op: int, body: bytes, length: int) -> None:
    session = F.FuseSession(HELLO)
    head = F.IN_HEADER.pack(length, op, 7, 1, 0, 0, 0, 0, 0)
    for dest, pieces in session.fuse_request(head + body):
        assert dest in (F.TO_PORT, F.TO_FUSE)
        if dest == F.TO_PORT:
            w.decode_request(b"".join(bytes(p) for p in pieces)[4:])  # always a valid request


@settings(max_examples=300, deadline=None)
@given(op=st.sampled_from(sorted(F.FuseSession(HELLO)._ops)), tail=st.binary(max_size=300),
       err=st.integers(-5, 5000))  # fmt: skip
def test_fuzz_host_replies_never_raise(op: int, tail: bytes, err: int) -> None:
    session = F.FuseSession(HELLO)
    session.pending[1] = (9, op)
    msg = w.RESPONSE_HEADER.pack(w.Kind.RESPONSE, 0, 0, 1, err) + tail
    for dest, _pieces in session.port_message(msg):
        assert dest in (F.TO_FUSE, F.TO_PORT)
    assert not session.pending or session.pending.keys() != {1}
