"""The vhost-user-fs device end to end without QEMU: this test plays the frontend (QEMU) and
the driver (the guest kernel) over a real socket, a real memfd and real eventfds."""

from __future__ import annotations

import mmap
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from gondolin.vfs.port import VfsServer
from gondolin.vfs.realfs import RealFSProvider
from gondolin.vhost.fs_device import VirtioFsDevice
from gondolin.vhost.protocol import HEADER, Request, encode
from gondolin.vhost.virtqueue import DESC_F_NEXT, DESC_F_WRITE
from guest.fuse import (
    IN_HEADER,
    INIT,
    INIT_IN,
    LOOKUP,
    OPEN,
    OPEN_IN,
    OUT_HEADER,
    READ,
    READ_IN,
    WRITE,
)

MEM = 1 << 20
UADDR = 0x7F5500000000
QSIZE = 16
RINGS = {q: (0x1000 + q * 0x2000, 0x1000 + q * 0x2000 + 0x400, 0x1000 + q * 0x2000 + 0x800) for q in (0, 1)}
DATA = 0x10000

pytestmark = pytest.mark.anyio


class Frontend:
    """QEMU's side of the socket and the guest driver's side of request queue 1."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = os.memfd_create("guest-ram")
        os.ftruncate(self.fd, MEM)
        self.mem = mmap.mmap(self.fd, MEM)
        self.kick = {q: os.eventfd(0, os.EFD_NONBLOCK) for q in (0, 1)}
        self.call = {q: os.eventfd(0, os.EFD_NONBLOCK) for q in (0, 1)}
        self.avail_idx = 0
        self.used_seen = 0
        self.unique = 0
        self.next_data = DATA

    def close(self) -> None:
        self.mem.close()
        for fd in (self.fd, *self.kick.values(), *self.call.values()):
            os.close(fd)

    async def send(self, req: Request, payload: bytes = b"", fds: tuple[int, ...] = (), reply: bool = False) -> bytes:
        data = encode(req, payload, reply=False)
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)
        if not reply:
            return b""
        with anyio.fail_after(10):
            await anyio.wait_readable(self.sock)
        head = self.sock.recv(HEADER.size)
        _, _, size = HEADER.unpack(head)
        return self.sock.recv(size) if size else b""

    async def set_up(self) -> None:
        features = struct.unpack("<Q", await self.send(Request.GET_FEATURES, reply=True))[0]
        await self.send(Request.SET_FEATURES, struct.pack("<Q", features & ~(1 << 30) & ~(1 << 29)))
        await self.send(Request.SET_OWNER)
        region = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, MEM, UADDR, 0)
        await self.send(Request.SET_MEM_TABLE, region, (self.fd,))
        for q, (desc, avail, used) in RINGS.items():
            await self.send(Request.SET_VRING_NUM, struct.pack("<II", q, QSIZE))
            await self.send(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", q, 0, UADDR + desc, UADDR + used,
                                                                UADDR + avail, 0))
            await self.send(Request.SET_VRING_BASE, struct.pack("<II", q, 0))
            await self.send(Request.SET_VRING_CALL, struct.pack("<Q", q), (self.call[q],))
            await self.send(Request.SET_VRING_KICK, struct.pack("<Q", q), (self.kick[q],))

    def _buf(self, size: int) -> int:
        addr = self.next_data
        self.next_data += (size + 0xFFF) & ~0xFFF
        if self.next_data > MEM:
            self.next_data = DATA
            addr = DATA
            self.next_data += (size + 0xFFF) & ~0xFFF
        return addr

    def offer(self, descs: list[tuple[int, int, int]]) -> None:
        desc = RINGS[1][0]
        for i, (addr, length, flags) in enumerate(descs):
            nxt = i + 1 if i + 1 < len(descs) else 0
            struct.pack_into("<QIHH", self.mem, desc + 16 * i, addr, length,
                             flags | (DESC_F_NEXT if i + 1 < len(descs) else 0), nxt)
        avail = RINGS[1][1]
        struct.pack_into("<H", self.mem, avail + 4 + 2 * (self.avail_idx % QSIZE), 0)
        self.avail_idx += 1
        struct.pack_into("<H", self.mem, avail + 2, self.avail_idx)
        os.eventfd_write(self.kick[1], 1)

    async def wait_used(self) -> int:
        used = RINGS[1][2]
        with anyio.fail_after(10):
            while struct.unpack_from("<H", self.mem, used + 2)[0] == self.used_seen:
                await anyio.wait_readable(self.call[1])
                os.eventfd_read(self.call[1])
        slot = self.used_seen % QSIZE
        self.used_seen += 1
        head, written = struct.unpack_from("<II", self.mem, used + 4 + 8 * slot)
        assert head == 0
        return int(written)

    async def fuse(self, op: int, node: int, body: bytes, reply_size: int = 4096) -> tuple[int, bytes]:
        self.unique += 2
        request = IN_HEADER.pack(IN_HEADER.size + len(body), op, self.unique, node, 0, 0, 1, 0, 0) + body
        out = self._buf(len(request))
        self.mem[out:out + len(request)] = request
        reply = self._buf(reply_size)
        self.offer([(out, len(request), 0), (reply, reply_size, DESC_F_WRITE)])
        written = await self.wait_used()
        size, error, unique = OUT_HEADER.unpack_from(self.mem, reply)
        assert unique == self.unique and size == written
        return error, bytes(self.mem[reply + OUT_HEADER.size:reply + written])


@asynccontextmanager
async def device(root: Path) -> AsyncIterator[tuple[Frontend, VirtioFsDevice]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    vfs = VfsServer({"/": RealFSProvider(str(root))})
    dev = VirtioFsDevice(vfs)
    front = Frontend(theirs)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(dev.serve, ours)
            await front.set_up()
            yield front, dev
            theirs.shutdown(socket.SHUT_RDWR)  # QEMU going away ends the device
    finally:
        theirs.close()
        front.close()
        await vfs.service.aclose()


async def test_fuse_requests_through_the_virtqueue(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_bytes(b"hello from the host\n")
    async with device(tmp_path) as (front, dev):
        error, body = await front.fuse(INIT, 0, INIT_IN.pack(7, 38, 1 << 17, 0))
        assert error == 0 and struct.unpack_from("<II", body) == (7, 38)
        error, body = await front.fuse(LOOKUP, 1, b"hello.txt\0")
        assert error == 0
        node = struct.unpack_from("<Q", body)[0]
        error, body = await front.fuse(LOOKUP, 1, b"missing\0")
        assert error == 0 and struct.unpack_from("<Q", body)[0] == 0  # a cacheable negative entry
        error, body = await front.fuse(OPEN, node, OPEN_IN.pack(os.O_RDWR, 0))
        assert error == 0
        fh = struct.unpack_from("<Q", body)[0]
        error, data = await front.fuse(READ, node, READ_IN.pack(fh, 0, 4096, 0, 0, os.O_RDWR, 0))
        assert (error, data) == (0, b"hello from the host\n")
        payload = b"written by the guest"
        error, body = await front.fuse(WRITE, node, READ_IN.pack(fh, 6, len(payload), 0, 0, os.O_RDWR, 0) + payload)
        assert error == 0 and struct.unpack_from("<I", body)[0] == len(payload)
        assert (tmp_path / "hello.txt").read_bytes() == b"hello written by the guest"
        assert dev.bad_requests == 0


async def test_a_malformed_chain_stops_its_queue_not_the_device(tmp_path: Path) -> None:
    async with device(tmp_path) as (front, dev):
        front.offer([(MEM - 8, 64, 0)])  # runs past the end of guest memory
        await anyio.sleep(0.2)
        # the device still answers the frontend: stopping the ring reports where it got to
        answer = await front.send(Request.GET_VRING_BASE, struct.pack("<II", 1, 0), reply=True)
        assert struct.unpack("<II", answer) == (1, 0)
        assert dev.requests == 0


async def test_a_ring_stopped_and_started_again_resumes_where_it_was(tmp_path: Path) -> None:
    # What QEMU does when the VM is paused and resumed (QMP stop/cont): GET_VRING_BASE stops the
    # ring (its kick and call fds are closed, their numbers reused), then the ring is set up again.
    (tmp_path / "f.txt").write_bytes(b"data")
    async with device(tmp_path) as (front, dev):
        error, _ = await front.fuse(INIT, 0, INIT_IN.pack(7, 38, 1 << 17, 0))
        assert error == 0
        for _ in range(2):
            for _ in range(3):
                error, _ = await front.fuse(LOOKUP, 1, b"f.txt\0")
                assert error == 0
            answer = await front.send(Request.GET_VRING_BASE, struct.pack("<II", 1, 0), reply=True)
            assert struct.unpack("<II", answer) == (1, front.avail_idx)
            await front.send(Request.SET_VRING_BASE, struct.pack("<II", 1, front.avail_idx))
            await front.send(Request.SET_VRING_CALL, struct.pack("<Q", 1), (front.call[1],))
            await front.send(Request.SET_VRING_KICK, struct.pack("<Q", 1), (front.kick[1],))
        error, _ = await front.fuse(LOOKUP, 1, b"f.txt\0")
        assert error == 0 and dev.bad_requests == 0
