"""VfsServer: the fs port's host end, over a real unix socket."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import ByteStream

from gondolin.vfs import MemoryProvider, ReadonlyProvider
from gondolin.vfs import wire as w
from gondolin.vfs.port import VfsServer, serve_vfs
from gondolin.vfs.router import MountRouter

pytestmark = pytest.mark.anyio
O_WRONLY, O_CREAT = 1, 0o100


class Guest:
    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.splitter = w.FrameSplitter()
        self.inbox: list[bytes] = []
        self.next_id = 0

    async def send(self, body: w.Body) -> int:
        self.next_id += 1
        await self.stream.send(w.encode_frame(w.encode_request(w.Request(self.next_id, body))))
        return self.next_id

    async def receive(self) -> bytes:
        while not self.inbox:
            self.inbox.extend(self.splitter.feed(await self.stream.receive()))
        return self.inbox.pop(0)

    async def call(self, body: w.Body) -> w.Response:
        rid = await self.send(body)
        resp = w.decode_response(await self.receive())
        assert resp.id == rid
        return resp


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[ByteStream, ByteStream]]:
    path = str(tmp_path / "fs.sock")
    async with await anyio.create_unix_listener(path) as listener:
        client = await anyio.connect_unix(path)
        server = await listener.accept()
        yield server, client
        await client.aclose()
        await server.aclose()


async def test_serves_the_router_and_reaches_the_guest_with_invalidations(
    pair: tuple[ByteStream, ByteStream],
) -> None:
    host_end, guest_end = pair
    scratch = MemoryProvider()
    server = VfsServer({"/scratch": scratch, "/ro": ReadonlyProvider(MemoryProvider())})
    assert isinstance(server.root, MountRouter)
    guest = Guest(guest_end)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, host_end)
        hello = await guest.call(w.Hello())
        assert isinstance(hello.body, w.HelloReply) and not hello.body.flags & w.HELLO_READONLY
        entry = (await guest.call(w.Lookup(1, b"scratch"))).body
        assert isinstance(entry, w.EntryReply)
        created = (await guest.call(w.Create(entry.node, 0o644, O_WRONLY | O_CREAT, b"f"))).body
        assert isinstance(created, w.CreateReply) and server.service.open_files == 1
        assert (await guest.call(w.Mkdir(1, 0o755, b"elsewhere"))).errno == errno.EROFS
        server.invalidate("/scratch/f")
        notes = [w.decode_notify(await guest.receive()).body for _ in range(2)]
        assert notes == [w.InvalEntry(entry.node, b"f"), w.InvalInode(created.entry.node, 0, 0)]
        await guest_end.aclose()  # the guest goes away with a file still open
    assert server.service.open_files == 0


async def test_garbage_on_the_port_ends_the_session(pair: tuple[ByteStream, ByteStream]) -> None:
    host_end, guest_end = pair
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_vfs, host_end, {"/m": MemoryProvider()})
            await guest_end.send(b"\xff\xff\xff\xff" + bytes(10))  # a 4 GiB frame: no way to resync
    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError)):
        await guest_end.receive()


async def test_undecodable_messages_are_answered_and_serving_goes_on(
    pair: tuple[ByteStream, ByteStream],
) -> None:
    host_end, guest_end = pair
    guest = Guest(guest_end)
    server = VfsServer({"/m": MemoryProvider()})
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, host_end)
        await guest_end.send(w.encode_frame(w.REQUEST_HEADER.pack(1, 200, 0, 77, 0, 0, 0)))
        bad = w.decode_response(await guest.receive())
        assert (bad.id, bad.errno) == (77, errno.ENOSYS)
        assert (await guest.call(w.Lookup(1, b"m"))).errno == 0
        tg.cancel_scope.cancel()
    assert server.service.stats.bad_messages == 1
