"""FsRpcService, driven the way the guest daemon drives it: encoded requests in, responses out."""

from __future__ import annotations

import errno as E
import stat

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gondolin.vfs import Attr, FsRpcService, HookedProvider, HookEvent, MemoryProvider
from gondolin.vfs import wire as w
from gondolin.vfs.nodes import ROOT_NODE

from .support import read_file, write_file

pytestmark = pytest.mark.anyio

O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_EXCL = 0, 1, 2, 0o100, 0o200


class Client:
    """Speaks to the service through the codec, like the guest daemon."""

    def __init__(self, service: FsRpcService) -> None:
        self.service = service
        self.next_id = 1

    async def call(self, body: w.Body, uid: int = 0, gid: int = 0) -> w.Response:
        self.next_id += 1
        raw = await self.service.handle(
            w.encode_request(w.Request(self.next_id, body, uid=uid, gid=gid, pid=99))
        )
        assert raw is not None
        resp = w.decode_response(raw)
        assert resp.id == self.next_id and resp.op == body.OP
        return resp

    async def ok(self, body: w.Body, **kw: int) -> object:
        resp = await self.call(body, **kw)
        assert resp.errno == 0, f"{body} failed with {E.errorcode.get(resp.errno)}"
        return resp.body

    async def err(self, body: w.Body, **kw: int) -> int:
        resp = await self.call(body, **kw)
        assert resp.errno != 0, f"{body} succeeded"
        return resp.errno

    async def entry(self, body: w.Body) -> w.EntryReply:
        reply = await self.ok(body)
        assert isinstance(reply, w.EntryReply)
        return reply


@pytest.fixture
def fs() -> MemoryProvider:
    return MemoryProvider(clock=lambda: 5_000)


@pytest.fixture
def service(fs: MemoryProvider) -> FsRpcService:
    return FsRpcService(fs, clock=lambda: 7_000, max_handles=8)


@pytest.fixture
def client(service: FsRpcService) -> Client:
    return Client(service)


async def test_hello(client: Client) -> None:
    reply = await client.ok(w.Hello(max_io=128 * 1024))
    assert reply == w.HelloReply(max_io=128 * 1024, entry_ttl_ms=1000, attr_ttl_ms=1000)
    assert await client.err(w.Hello(version=99)) == E.EPROTO


async def test_file_lifecycle(client: Client, service: FsRpcService, fs: MemoryProvider) -> None:
    d = await client.entry(w.Mkdir(ROOT_NODE, 0o755, b"d"))
    assert stat.S_ISDIR(d.attr.mode) and d.entry_ttl_ms == 1000
    created = await client.ok(w.Create(d.node, 0o644, O_RDWR | O_CREAT | O_EXCL, b"f"))
    assert isinstance(created, w.CreateReply)
    fh = created.open.fh
    assert await client.ok(w.Write(fh, 0, b"hello world")) == w.SizeReply(11)
    assert await client.ok(w.Read(fh, 6, 100)) == w.DataReply(b"world")
    assert await client.ok(w.Flush(fh)) == w.EmptyReply()
    assert await client.ok(w.Fsync(fh, 1)) == w.EmptyReply()
    await client.ok(w.Release(fh))
    assert await client.err(w.Read(fh, 0, 1)) == E.EBADF
    assert await client.err(w.Create(d.node, 0o644, O_RDWR | O_CREAT | O_EXCL, b"f")) == E.EEXIST
    f = await client.entry(w.Lookup(d.node, b"f"))
    assert f.node == created.entry.node and f.attr.size == 11
    attr = await client.ok(w.Getattr(f.node))
    assert isinstance(attr, w.AttrReply) and attr.attr.size == 11
    opened = await client.ok(w.Open(f.node, O_RDONLY))
    assert isinstance(opened, w.OpenReply)
    assert await client.err(w.Write(opened.fh, 0, b"x")) == E.EBADF
    await client.ok(w.Release(opened.fh))
    assert service.stats.bytes_read == 5 and service.stats.bytes_written == 11
    assert await read_file(fs, "/d/f") == b"hello world"
    assert service.open_files == 0


async def test_lookup_errors(client: Client) -> None:
    assert await client.err(w.Lookup(ROOT_NODE, b"missing")) == E.ENOENT
    assert await client.err(w.Lookup(999, b"x")) == E.ESTALE
    assert await client.err(w.Getattr(999)) == E.ESTALE


@pytest.mark.parametrize(
    ("name", "errno"),
    [
        (b"a/b", E.EINVAL),
        (b"a\0b", E.EINVAL),
        (b".", E.EINVAL),
        (b"..", E.EINVAL),
        (b"", E.EINVAL),
        (b"x" * 256, E.ENAMETOOLONG),
    ],
)
async def test_bad_names(client: Client, name: bytes, errno: int) -> None:
    for body in (
        w.Lookup(ROOT_NODE, name),
        w.Mkdir(ROOT_NODE, 0o755, name),
        w.Create(ROOT_NODE, 0o644, O_RDWR | O_CREAT, name),
        w.Symlink(ROOT_NODE, name, b"t"),
        w.Unlink(ROOT_NODE, name),
        w.Rename(ROOT_NODE, ROOT_NODE, 0, b"a", name),
    ):
        assert await client.err(body) == errno


async def test_symlink_readlink_link(client: Client) -> None:
    assert await client.err(w.Symlink(ROOT_NODE, b"l", b"x" * 4096)) == E.ENAMETOOLONG
    assert await client.err(w.Symlink(ROOT_NODE, b"l", b"a\0b")) == E.EINVAL
    link = await client.entry(w.Symlink(ROOT_NODE, b"l", b"../\xfftarget"))
    assert stat.S_ISLNK(link.attr.mode)
    assert await client.ok(w.Readlink(link.node)) == w.DataReply(b"../\xfftarget")
    created = await client.ok(w.Create(ROOT_NODE, 0o644, O_WRONLY | O_CREAT, b"f"))
    assert isinstance(created, w.CreateReply)
    await client.ok(w.Release(created.open.fh))
    hard = await client.entry(w.Link(created.entry.node, ROOT_NODE, b"hard"))
    assert hard.attr.nlink == 2 and hard.node != created.entry.node


async def test_setattr(client: Client) -> None:
    created = await client.ok(w.Create(ROOT_NODE, 0o644, O_RDWR | O_CREAT, b"f"))
    assert isinstance(created, w.CreateReply)
    node, fh = created.entry.node, created.open.fh
    reply = await client.ok(w.Setattr(node, 0, w.FATTR_MODE, mode=0o100700))
    assert isinstance(reply, w.AttrReply) and reply.attr.mode == 0o100700
    reply = await client.ok(w.Setattr(node, fh, w.FATTR_SIZE, size=10))
    assert isinstance(reply, w.AttrReply) and reply.attr.size == 10
    valid = w.FATTR_ATIME | w.FATTR_MTIME_NOW | w.FATTR_UID | w.FATTR_GID
    reply = await client.ok(w.Setattr(node, 0, valid, uid=5, gid=6, atime_ns=123))
    assert isinstance(reply, w.AttrReply)
    assert (reply.attr.atime_ns, reply.attr.mtime_ns, reply.attr.uid, reply.attr.gid) == (
        123,
        7_000,
        5,
        6,
    )
    reply = await client.ok(w.Setattr(node, 0, 1 << 10))  # only bits we ignore (FATTR_CTIME)
    assert isinstance(reply, w.AttrReply) and reply.attr.size == 10


async def test_unlinked_open_file_keeps_working(client: Client, service: FsRpcService) -> None:
    created = await client.ok(w.Create(ROOT_NODE, 0o644, O_RDWR | O_CREAT, b"f"))
    assert isinstance(created, w.CreateReply)
    node, fh = created.entry.node, created.open.fh
    await client.ok(w.Write(fh, 0, b"data"))
    await client.ok(w.Unlink(ROOT_NODE, b"f"))
    assert await client.err(w.Getattr(node)) == E.ESTALE
    reply = await client.ok(w.Getattr(node, fh=fh))
    assert isinstance(reply, w.AttrReply) and reply.attr.size == 4
    await client.ok(w.Setattr(node, fh, w.FATTR_SIZE, size=2))
    assert await client.ok(w.Read(fh, 0, 10)) == w.DataReply(b"da")
    await client.ok(w.Release(fh))
    assert await service.handle(w.encode_request(w.Request(1, w.Forget(((node, 1),))))) is None
    assert len(service.nodes) == 1


async def test_rename_keeps_node_ids(client: Client, service: FsRpcService) -> None:
    d = await client.entry(w.Mkdir(ROOT_NODE, 0o755, b"d"))
    e = await client.entry(w.Mkdir(ROOT_NODE, 0o755, b"e"))
    f = await client.ok(w.Create(d.node, 0o644, O_WRONLY | O_CREAT, b"f"))
    assert isinstance(f, w.CreateReply)
    await client.ok(w.Release(f.open.fh))
    await client.ok(w.Rename(ROOT_NODE, e.node, 0, b"d", b"moved"))
    assert service.nodes.path(f.entry.node) == "/e/moved/f"
    await client.ok(w.Getattr(f.entry.node))
    # Onto an ancestor: the ancestor is not empty (as Linux reports it).
    assert await client.err(w.Rename(e.node, ROOT_NODE, 0, b"moved", b"e")) == E.ENOTEMPTY
    assert await client.err(w.Rename(e.node, ROOT_NODE, w.RENAME_EXCHANGE, b"moved", b"e")) == (
        E.EINVAL
    )
    x = await client.entry(w.Mkdir(ROOT_NODE, 0o755, b"x"))
    await client.ok(w.Rename(e.node, ROOT_NODE, w.RENAME_EXCHANGE, b"moved", b"x"))
    assert service.nodes.path(d.node) == "/x" and service.nodes.path(x.node) == "/e/moved"
    assert service.nodes.path(f.entry.node) == "/x/f"
    assert await client.err(w.Rmdir(ROOT_NODE, b"x")) == E.ENOTEMPTY
    await client.ok(w.Unlink(d.node, b"f"))
    await client.ok(w.Rmdir(ROOT_NODE, b"x"))
    assert await client.err(w.Getattr(d.node)) == E.ESTALE


async def test_forget_bounds_the_table(client: Client, service: FsRpcService) -> None:
    await client.ok(w.Mkdir(ROOT_NODE, 0o755, b"d"))
    for _ in range(5):
        d = await client.entry(w.Lookup(ROOT_NODE, b"d"))
    assert service.nodes.lookups(d.node) == 6
    for i in range(20):
        await client.ok(w.Mkdir(d.node, 0o755, b"sub%d" % i))
    assert len(service.nodes) == 22
    forget = [(d.node, 6)] + [(n, 1) for n in range(d.node + 1, d.node + 21)]
    assert await service.handle(w.encode_request(w.Request(9, w.Forget(tuple(forget))))) is None
    assert len(service.nodes) == 1


async def test_readdir_and_readdirplus(client: Client, service: FsRpcService) -> None:
    d = await client.entry(w.Mkdir(ROOT_NODE, 0o755, b"d"))
    for name in (b"a", b"bb", b"ccc"):
        await client.ok(w.Mkdir(d.node, 0o700, name))
    base = len(service.nodes)
    dh = await client.ok(w.Opendir(d.node))
    assert isinstance(dh, w.OpenReply)
    listing = await client.ok(w.Readdir(dh.fh, 0, 4096, 0))
    assert isinstance(listing, w.ReaddirReply) and not listing.plus
    assert [e.name for e in listing.entries] == [b".", b"..", b"a", b"bb", b"ccc"]
    assert [e.offset for e in listing.entries] == [1, 2, 3, 4, 5]
    assert listing.entries[2].dtype == 4 and listing.entries[0].ino == d.attr.ino
    # A small buffer takes a page of entries; the offset continues from there.
    size = sum(w.fuse_dirent_size(n, True) for n in (1, 2, 1))
    page = await client.ok(w.Readdir(dh.fh, 0, size, 1))
    assert isinstance(page, w.ReaddirReply)
    assert [e.name for e in page.entries] == [b".", b"..", b"a"]
    assert page.entries[0].entry is None and page.entries[2].entry is not None
    rest = await client.ok(w.Readdir(dh.fh, page.entries[-1].offset, 4096, 1))
    assert isinstance(rest, w.ReaddirReply)
    assert [e.name for e in rest.entries] == [b"bb", b"ccc"]
    nodes = [e.entry.node for e in page.entries[2:] + rest.entries if e.entry]
    assert all(service.nodes.lookups(n) == 2 for n in nodes)  # mkdir + readdirplus
    done = await client.ok(w.Readdir(dh.fh, 5, 4096, 1))
    assert done == w.ReaddirReply(True, ())
    await client.ok(w.Releasedir(dh.fh))
    assert await client.err(w.Readdir(dh.fh, 0, 4096, 0)) == E.EBADF
    assert len(service.nodes) == base
    f = await client.ok(w.Create(d.node, 0o644, O_WRONLY | O_CREAT, b"file"))
    assert isinstance(f, w.CreateReply)
    assert await client.err(w.Opendir(f.entry.node)) == E.ENOTDIR


async def test_statfs_access_fallocate_copy(client: Client, fs: MemoryProvider) -> None:
    info = await client.ok(w.Statfs(ROOT_NODE))
    assert isinstance(info, w.StatFs) and info.blocks > 0
    await write_file(fs, "/src", b"0123456789", mode=0o600)
    src = await client.entry(w.Lookup(ROOT_NODE, b"src"))
    await client.ok(w.Access(src.node, 4 | 2))
    assert await client.err(w.Access(src.node, 4), uid=1000, gid=1000) == E.EACCES
    a = await client.ok(w.Open(src.node, O_RDONLY))
    b = await client.ok(w.Create(ROOT_NODE, 0o644, O_RDWR | O_CREAT, b"dst"))
    assert isinstance(a, w.OpenReply) and isinstance(b, w.CreateReply)
    await client.ok(w.Fallocate(b.open.fh, 0, 20))
    assert await client.err(w.Fallocate(b.open.fh, 0, 20, mode=3)) == E.EOPNOTSUPP
    copied = await client.ok(w.CopyFileRange(a.fh, 2, b.open.fh, 0, 100))
    assert copied == w.SizeReply(8)
    assert await client.err(w.CopyFileRange(a.fh, 0, b.open.fh, 0, 1, flags=1)) == E.EINVAL
    data = await client.ok(w.Read(b.open.fh, 0, 100))
    assert data == w.DataReply(b"23456789" + bytes(12))


async def test_handle_table_is_bounded(client: Client, fs: MemoryProvider) -> None:
    await write_file(fs, "/f", b"")
    f = await client.entry(w.Lookup(ROOT_NODE, b"f"))
    fhs = []
    for _ in range(8):
        reply = await client.ok(w.Open(f.node, O_RDONLY))
        assert isinstance(reply, w.OpenReply)
        fhs.append(reply.fh)
    assert await client.err(w.Open(f.node, O_RDONLY)) == E.ENFILE
    assert await client.err(w.Create(ROOT_NODE, 0o644, O_RDWR | O_CREAT, b"g")) == E.ENFILE
    for fh in fhs:
        await client.ok(w.Release(fh))
    await fs.unlink("/f")
    await fs.unlink("/g")
    assert fs.used_nodes == 1  # every refused handle was released


async def test_bad_messages_are_answered_or_dropped(service: FsRpcService) -> None:
    assert await service.handle(b"") is None
    assert await service.handle(b"\x07garbage") is None
    unknown = w._REQ_HDR.pack(1, 200, 0, 77, 0, 0, 0)
    reply = await service.handle(unknown)
    assert reply is not None and w.decode_response(reply).errno == E.ENOSYS
    truncated = w._REQ_HDR.pack(1, w.Op.LOOKUP, 0, 78, 0, 0, 0) + b"\x01"
    reply = await service.handle(truncated)
    assert reply is not None and w.decode_response(reply) == w.Response(78, w.Op.LOOKUP, E.EINVAL)
    assert service.stats.bad_messages == 4


class Broken(MemoryProvider):
    async def getattr(self, path: str) -> Attr:
        raise RuntimeError("provider bug")


async def test_provider_bug_is_eio() -> None:
    service = FsRpcService(Broken())
    client = Client(service)
    assert await client.err(w.Lookup(ROOT_NODE, b"x")) == E.EIO
    assert service.stats.internal_errors == 1 and service.stats.errors == 1


async def test_caller_reaches_hooks(fs: MemoryProvider) -> None:
    seen: list[HookEvent] = []

    def before(event: HookEvent) -> int | None:
        seen.append(event)
        return E.EPERM if event.caller.uid == 666 else None

    client = Client(FsRpcService(HookedProvider(fs, before=before)))
    assert await client.err(w.Mkdir(ROOT_NODE, 0o755, b"x"), uid=666) == E.EPERM
    await client.ok(w.Mkdir(ROOT_NODE, 0o755, b"x"), uid=1000, gid=50)
    assert (seen[-1].op, seen[-1].path, seen[-1].caller.uid, seen[-1].caller.pid) == (
        "mkdir",
        "/x",
        1000,
        99,
    )
    assert (await fs.getattr("/x")).uid == 1000  # owned by the guest process that made it


async def test_invalidate(client: Client, service: FsRpcService) -> None:
    d = await client.entry(w.Mkdir(ROOT_NODE, 0o755, b"d"))
    f = await client.ok(w.Create(d.node, 0o644, O_WRONLY | O_CREAT, b"f"))
    assert isinstance(f, w.CreateReply)
    service.invalidate("/d/f")
    service.invalidate("/d/unknown")
    service.invalidate("/nope/deeper")  # only "nope" may be cached (as absent)
    notes = [w.decode_notify(n).body for n in service.pending_notifications()]
    assert notes == [
        w.InvalEntry(d.node, b"f"),
        w.InvalInode(f.entry.node, 0, 0),
        w.InvalEntry(d.node, b"unknown"),
        w.InvalEntry(ROOT_NODE, b"nope"),
    ]
    for _ in range(2000):
        service.invalidate("/")
    assert service.stats.notifications_dropped > 0
    assert len(service.pending_notifications()) <= 1024


class Slow(MemoryProvider):
    """getattr of /slow waits until released; counts concurrent calls."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = anyio.Event()
        self.running = 0
        self.peak = 0

    async def getattr(self, path: str) -> Attr:
        if path.startswith("/slow"):
            self.running += 1
            self.peak = max(self.peak, self.running)
            try:
                await self.gate.wait()
            finally:
                self.running -= 1
        return await super().getattr(path)


async def test_concurrent_requests_complete_out_of_order() -> None:
    provider = Slow()
    await provider.mkdir("/slow", 0o755)
    await provider.mkdir("/fast", 0o755)
    service = FsRpcService(provider)
    to_service, service_in = anyio.create_memory_object_stream[bytes](100)
    service_out, from_service = anyio.create_memory_object_stream[bytes](100)
    got: list[w.Response] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                async with service_in, service_out:
                    await service.serve(service_in, service_out)

            tg.start_soon(run)
            await to_service.send(w.encode_request(w.Request(1, w.Lookup(ROOT_NODE, b"slow"))))
            await to_service.send(w.encode_request(w.Request(2, w.Lookup(ROOT_NODE, b"fast"))))
            got.append(w.decode_response(await from_service.receive()))
            assert got[0].id == 2 and got[0].errno == 0  # the fast one overtook the slow one
            service.invalidate("/fast")
            for _ in range(2):  # InvalEntry, InvalInode
                note = await from_service.receive()
                assert w.message_kind(note) == w.Kind.NOTIFY
            provider.gate.set()
            got.append(w.decode_response(await from_service.receive()))
            assert got[1].id == 1 and got[1].errno == 0
            await to_service.aclose()  # serve() returns once input ends and all answered
    await from_service.aclose()


async def test_in_flight_limit() -> None:
    provider = Slow()
    for i in range(6):
        await provider.mkdir(f"/slow{i}", 0o755)
    service = FsRpcService(provider, max_in_flight=2)
    to_service, service_in = anyio.create_memory_object_stream[bytes](100)
    service_out, from_service = anyio.create_memory_object_stream[bytes](100)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                async with service_in, service_out:
                    await service.serve(service_in, service_out)

            tg.start_soon(run)
            for i in range(6):
                body = w.Lookup(ROOT_NODE, b"slow%d" % i)
                await to_service.send(w.encode_request(w.Request(i + 1, body)))
            await to_service.aclose()
            await anyio.wait_all_tasks_blocked()
            assert provider.running == 2
            provider.gate.set()
            ids = sorted([w.decode_response(m).id async for m in from_service])
    await from_service.aclose()
    assert ids == [1, 2, 3, 4, 5, 6] and provider.peak == 2


async def test_many_concurrent_writers(fs: MemoryProvider) -> None:
    service = FsRpcService(fs)
    client = Client(service)
    fhs = []
    for i in range(10):
        reply = await client.ok(w.Create(ROOT_NODE, 0o644, O_RDWR | O_CREAT, b"f%d" % i))
        assert isinstance(reply, w.CreateReply)
        fhs.append(reply.open.fh)

    async def writer(i: int) -> None:
        for chunk in range(20):
            req = w.Request(1000 + i, w.Write(fhs[i], chunk * 100, bytes([i]) * 100))
            raw = await service.handle(w.encode_request(req))
            assert raw is not None and w.decode_response(raw).errno == 0
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(writer, i)
    for i in range(10):
        assert await read_file(fs, f"/f{i}") == bytes([i]) * 2000


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_service_never_raises(data: bytes) -> None:
    service = FsRpcService(MemoryProvider())

    async def go() -> None:
        reply = await service.handle(data)
        if reply is not None:
            w.decode_response(reply)
        # A request whose header decodes gets a well-formed reply too.
        header = w._REQ_HDR.pack(1, data[0] if data else 2, 0, 5, 0, 0, 0)
        await service.handle(header + data)

    anyio.run(go)


async def test_open_directory_snapshots_are_bounded_by_bytes(fs: MemoryProvider) -> None:
    from gondolin.vfs.rpc import DIR_ENTRY_OVERHEAD

    for i in range(4):
        await fs.mkdir(f"/d{i}", 0o755)
    one = 6 * DIR_ENTRY_OVERHEAD + len(b".") + len(b"..") + 4 * len(b"d0")  # ".", "..", 4 entries
    service = FsRpcService(fs, max_dir_bytes=one + one // 2)
    client = Client(service)
    first = await client.ok(w.Opendir(ROOT_NODE))
    assert isinstance(first, w.OpenReply) and service.dir_bytes == one
    assert await client.err(w.Opendir(ROOT_NODE)) == E.ENOMEM
    await client.ok(w.Releasedir(first.fh))
    assert service.dir_bytes == 0
    await client.ok(w.Opendir(ROOT_NODE))
    # Long names cost what they hold: fewer of them fit.
    await fs.mkdir("/" + "n" * 200, 0o755)
    assert await client.err(w.Opendir(ROOT_NODE)) == E.ENOMEM


async def test_opendir_flood_holds_bounded_host_memory(fs: MemoryProvider) -> None:
    """Issue 11 item 6: a 2,000-entry directory opened over and over, never read or released."""
    import tracemalloc

    from gondolin.vfs.rpc import DEFAULT_MAX_DIR_BYTES

    await fs.mkdir("/big", 0o755)
    for i in range(2000):
        await fs.mkdir(f"/big/entry-{i:05d}", 0o755)
    service = FsRpcService(fs)
    client = Client(service)
    node = (await client.ok(w.Lookup(ROOT_NODE, b"big"))).node
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        refused = 0
        for _ in range(100):
            refused += (await client.call(w.Opendir(node))).errno == E.ENOMEM
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert refused > 30  # ~60 snapshots of ~1 MiB fit in 64 MiB; the rest are refused
    assert service.dir_bytes <= DEFAULT_MAX_DIR_BYTES
    assert held < 2 * DEFAULT_MAX_DIR_BYTES


class Weird(MemoryProvider):
    async def getattr(self, path: str) -> Attr:
        attr = await super().getattr(path)
        return Attr(ino=attr.ino, mode=attr.mode, uid=-5)  # not representable on the wire


async def test_unencodable_reply_is_eio() -> None:
    service = FsRpcService(Weird())
    client = Client(service)
    await service.provider.mkdir("/d", 0o755)
    assert await client.err(w.Lookup(ROOT_NODE, b"d")) == E.EIO
    assert service.stats.internal_errors == 1


async def test_ids_of_an_earlier_session_are_unknown_not_reused(fs: MemoryProvider) -> None:
    """A resumed guest still holds the previous host session's node and handle ids."""
    old = Client(FsRpcService(fs))
    f = await old.ok(w.Create(ROOT_NODE, 0o644, O_RDWR | O_CREAT, b"f"))
    assert isinstance(f, w.CreateReply)
    new = Client(FsRpcService(fs, id_offset=1 << 20))
    g = await new.ok(w.Create(ROOT_NODE, 0o644, O_RDWR | O_CREAT, b"g"))
    assert isinstance(g, w.CreateReply) and g.entry.node > 1 << 20 and g.open.fh > 1 << 20
    assert await new.err(w.Getattr(f.entry.node)) == E.ESTALE
    assert await new.err(w.Read(f.open.fh, 0, 10)) == E.EBADF
