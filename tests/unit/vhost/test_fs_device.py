"""The vhost-user-fs device end to end without QEMU: this test plays the frontend (QEMU) and
the driver (the guest kernel) over a real socket, a real memfd and real eventfds."""

from __future__ import annotations

import errno
import json
import mmap
import os
import socket
import struct
import threading
import tracemalloc
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from gondolin.errors import GondolinError
from gondolin.vfs import CopyOnWriteProvider, MemoryProvider, ReadonlyProvider
from gondolin.vfs.port import VfsServer
from gondolin.vfs.provider import (
    DirectIO,
    FileHandle,
    HandleWrapper,
    OpenMode,
    Provider,
    ProviderWrapper,
)
from gondolin.vfs.realfs import RealFSProvider
from gondolin.vhost.fs_device import MAX_HANDED_OFF, VirtioFsDevice
from gondolin.vhost.protocol import HEADER, Request, encode
from gondolin.vhost.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from guest.fuse import (
    CREATE,
    CREATE_IN,
    ENTRY_OUT,
    FLUSH,
    FOPEN_DIRECT_IO,
    FOPEN_KEEP_CACHE,
    IN_HEADER,
    INIT,
    INIT_IN,
    LOOKUP,
    OPEN,
    OPEN_IN,
    OPENDIR,
    OUT_HEADER,
    READ,
    READ_IN,
    READDIRPLUS,
    RELEASE,
    RELEASE_IN,
    RELEASEDIR,
    UNLINK,
    WRITE,
)

MEM = 8 << 20
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

    def offer(self, descs: list[tuple[int, int, int]], kick: bool = True) -> None:
        """One chain of ``(addr, length, flags)`` descriptors from table entry 0 (NEXT added)."""
        desc = RINGS[1][0]
        if len(descs) > QSIZE:  # longer than the ring: an indirect table, as the kernel does
            table = self._buf(16 * len(descs))
            struct.pack_into("<QIHH", self.mem, desc, table, 16 * len(descs), DESC_F_INDIRECT, 0)
            desc = table
        for i, (addr, length, flags) in enumerate(descs):
            nxt = i + 1 if i + 1 < len(descs) else 0
            struct.pack_into("<QIHH", self.mem, desc + 16 * i, addr, length,
                             flags | (DESC_F_NEXT if i + 1 < len(descs) else 0), nxt)
        self.post(0, kick)

    def post(self, head: int, kick: bool = True) -> None:
        """Make the chain at table entry ``head`` available (again: a guest may reuse it)."""
        avail = RINGS[1][1]
        struct.pack_into("<H", self.mem, avail + 4 + 2 * (self.avail_idx % QSIZE), head)
        self.avail_idx += 1
        struct.pack_into("<H", self.mem, avail + 2, self.avail_idx & 0xFFFF)
        if kick:
            os.eventfd_write(self.kick[1], 1)

    def used_idx(self) -> int:
        return int(struct.unpack_from("<H", self.mem, RINGS[1][2] + 2)[0])

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

    def request(self, op: int, node: int, body: bytes, data: bytes = b"") -> bytes:
        self.unique += 2
        size = IN_HEADER.size + len(body) + len(data)
        return IN_HEADER.pack(size, op, self.unique, node, 0, 0, 1, 0, 0) + body + data

    async def fuse(self, op: int, node: int, body: bytes, reply_size: int = 4096, data: bytes = b"",
                   page_split: bool = False) -> tuple[int, bytes]:
        """One request; ``page_split`` lays it out as the kernel's virtiofs driver does: the
        header, the arguments and each 4 KiB page of data (or of the reply's data) in their own
        descriptors."""
        request = self.request(op, node, body, data)
        head = IN_HEADER.size + len(body)
        out = self._buf(len(request))
        self.mem[out:out + len(request)] = request
        reply = self._buf(reply_size)
        if page_split:
            descs = [(out, IN_HEADER.size, 0), (out + IN_HEADER.size, len(body), 0)]
            descs += [(out + i, min(4096, len(request) - i), 0) for i in range(head, len(request), 4096)]
            descs.append((reply, OUT_HEADER.size, DESC_F_WRITE))
            descs += [(reply + i, min(4096, reply_size - i), DESC_F_WRITE)
                      for i in range(OUT_HEADER.size, reply_size, 4096)]
        else:
            descs = [(out, len(request), 0), (reply, reply_size, DESC_F_WRITE)]
        self.offer(descs)
        written = await self.wait_used()
        size, error, unique = OUT_HEADER.unpack_from(self.mem, reply)
        assert unique == self.unique and size == written
        return error, bytes(self.mem[reply + OUT_HEADER.size:reply + written])


@asynccontextmanager
async def device(root: Path | Provider, cache: str = "auto",
                 **service_options: Any) -> AsyncIterator[tuple[Frontend, VirtioFsDevice]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    vfs = VfsServer({"/": root if isinstance(root, Provider) else RealFSProvider(str(root))}, **service_options)
    dev = VirtioFsDevice(vfs, cache=cache)
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


# --- the data path: READ and WRITE straight between guest pages and the host file ----------------

def _open(front: Frontend, name: bytes, flags: int):  # type: ignore[no-untyped-def]
    async def go() -> tuple[int, int]:
        error, body = await front.fuse(LOOKUP, 1, name + b"\0")
        assert error == 0, error
        node = struct.unpack_from("<Q", body)[0]
        error, body = await front.fuse(OPEN, node, OPEN_IN.pack(flags, 0))
        return error, (struct.unpack_from("<Q", body)[0] if not error else 0)
    return go()


async def _init(front: Frontend) -> None:
    error, _ = await front.fuse(INIT, 0, INIT_IN.pack(7, 38, 1 << 17, 0))
    assert error == 0


def _no_workers(dev: VirtioFsDevice) -> None:
    assert dev.threads == []
    assert not [t for t in threading.enumerate() if t.name.startswith("virtiofs-queue")]


async def test_read_and_write_move_between_guest_pages_and_the_host_file(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(b"")
    payload = os.urandom(256 * 1024 + 100)
    async with device(tmp_path) as (front, dev):
        await _init(front)
        error, fh = await _open(front, b"big.bin", os.O_RDWR)
        assert error == 0
        # Laid out as the kernel does: header, arguments, then one descriptor per page.
        error, body = await front.fuse(WRITE, 2, READ_IN.pack(fh, 0, len(payload), 0, 0, 0, 0),
                                       data=payload, page_split=True)
        assert error == 0 and struct.unpack_from("<I", body)[0] == len(payload)
        assert (tmp_path / "big.bin").read_bytes() == payload
        error, data = await front.fuse(READ, 2, READ_IN.pack(fh, 4096, 200_000, 0, 0, 0, 0),
                                       reply_size=OUT_HEADER.size + 200_000, page_split=True)
        assert error == 0 and data == payload[4096:4096 + 200_000]
        # At the end of the file: a short read; a read larger than max_io is cut to max_io.
        error, data = await front.fuse(READ, 2, READ_IN.pack(fh, len(payload) - 10, 4096, 0, 0, 0, 0))
        assert (error, data) == (0, payload[-10:])
        (tmp_path / "big.bin").write_bytes(b"z" * (3 << 20))
        error, data = await front.fuse(READ, 2, READ_IN.pack(fh, 0, 0xFFFFFFFF, 0, 0, 0, 0),
                                       reply_size=(2 << 20) + OUT_HEADER.size)
        assert error == 0 and len(data) == dev.max_io
        assert dev.direct_requests == 4 and dev.bytes_written == len(payload)
        assert dev.bad_requests == 0
    _no_workers(dev)


async def test_a_read_only_mount_refuses_writes_on_the_direct_path(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_bytes(b"host data")
    async with device(ReadonlyProvider(RealFSProvider(str(tmp_path)))) as (front, dev):
        await _init(front)
        error, _ = await _open(front, b"f.txt", os.O_RDWR)
        assert error == -errno.EROFS
        error, fh = await _open(front, b"f.txt", os.O_RDONLY)
        assert error == 0
        error, data = await front.fuse(READ, 2, READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
        assert (error, data) == (0, b"host data")
        # A guest kernel that writes through a read-only handle anyway:
        error, _ = await front.fuse(WRITE, 2, READ_IN.pack(fh, 0, 3, 0, 0, 0, 0), data=b"bad")
        assert error == -errno.EROFS
        assert dev.direct_requests == 2
    assert (tmp_path / "f.txt").read_bytes() == b"host data"


async def test_providers_without_host_files_keep_their_own_read_and_write(tmp_path: Path) -> None:
    memory = MemoryProvider(max_bytes=64 * 1024)
    async with device(memory) as (front, dev):
        await _init(front)
        error, body = await front.fuse(CREATE, 1, CREATE_IN.pack(os.O_RDWR, 0o644, 0, 0) + b"m.txt\0")
        assert error == 0
        fh = struct.unpack_from("<Q", body, ENTRY_OUT.size)[0]
        error, body = await front.fuse(WRITE, 2, READ_IN.pack(fh, 0, 5, 0, 0, 0, 0), data=b"hello")
        assert error == 0 and struct.unpack_from("<I", body)[0] == 5
        error, _ = await front.fuse(WRITE, 2, READ_IN.pack(fh, 0, 100_000, 0, 0, 0, 0), data=bytes(100_000))
        assert error == -errno.ENOSPC  # the memory provider's size limit holds
        error, data = await front.fuse(READ, 2, READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
        assert (error, data) == (0, b"hello")
        assert dev.direct_requests == 0
    (tmp_path / "lower.txt").write_bytes(b"lower layer")
    async with device(CopyOnWriteProvider(tmp_path)) as (front, dev):
        await _init(front)
        error, fh = await _open(front, b"lower.txt", os.O_RDONLY)
        error, data = await front.fuse(READ, 2, READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
        assert (error, data) == (0, b"lower layer")
        assert dev.direct_requests == 1  # an unmodified file is read from the host directly
        error, fh = await _open(front, b"lower.txt", os.O_RDWR)
        assert error == 0
        error, _ = await front.fuse(WRITE, 2, READ_IN.pack(fh, 0, 5, 0, 0, 0, 0), data=b"UPPER")
        assert error == 0
        error, data = await front.fuse(READ, 2, READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
        assert (error, data) == (0, b"UPPER layer")
    assert (tmp_path / "lower.txt").read_bytes() == b"lower layer"  # copied up, not written


@pytest.mark.parametrize("cache", ["auto", "none"])
async def test_which_opens_get_direct_io(tmp_path: Path, cache: str) -> None:
    """cache="none": every file. cache="auto": none (direct I/O through the 6.1 guest driver
    corrupted guest memory; every open keeps the guest page cache)."""
    (tmp_path / "f.txt").write_bytes(b"x")
    async with device(tmp_path, cache=cache) as (front, _):
        await _init(front)
        error, body = await front.fuse(LOOKUP, 1, b"f.txt\0")
        node = struct.unpack_from("<Q", body)[0]
        for mode in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY, os.O_WRONLY | os.O_APPEND):
            error, body = await front.fuse(OPEN, node, OPEN_IN.pack(mode, 0))
            assert error == 0
            flags = struct.unpack_from("<I", body, 8)[0]
            direct = cache == "none"
            assert flags == (FOPEN_DIRECT_IO if direct else FOPEN_KEEP_CACHE), mode
        error, body = await front.fuse(CREATE, 1, CREATE_IN.pack(os.O_WRONLY | os.O_CREAT, 0o644, 0, 0) + b"new\0")
        assert error == 0
        assert struct.unpack_from("<I", body, ENTRY_OUT.size + 8)[0] == (
            FOPEN_DIRECT_IO if cache == "none" else FOPEN_KEEP_CACHE)


def test_an_unknown_cache_mode_is_refused() -> None:
    with pytest.raises(GondolinError, match="'auto'"):
        VirtioFsDevice(VfsServer({"/": MemoryProvider()}), cache="writeback")


class _BrokenDirect(DirectIO):
    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> int:
        raise RuntimeError("provider bug")

    def writefrom(self, offset: int, buffers: Sequence[memoryview]) -> int:
        raise RuntimeError("provider bug")


class _BrokenHandle(HandleWrapper):
    def direct_io(self) -> DirectIO | None:
        return _BrokenDirect()


class _Broken(ProviderWrapper):
    async def open(self, path: str, mode: OpenMode) -> FileHandle:
        return _BrokenHandle(await self.inner.open(path, mode))


async def test_a_provider_bug_on_the_direct_path_is_an_eio_not_a_dead_queue(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_bytes(b"data")
    async with device(_Broken(RealFSProvider(str(tmp_path)))) as (front, dev):
        await _init(front)
        error, fh = await _open(front, b"f.txt", os.O_RDWR)
        error, _ = await front.fuse(READ, 2, READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
        assert error == -errno.EIO
        error, _ = await front.fuse(WRITE, 2, READ_IN.pack(fh, 0, 1, 0, 0, 0, 0), data=b"x")
        assert error == -errno.EIO
        error, _ = await front.fuse(LOOKUP, 1, b"f.txt\0")  # the queue still answers
        assert error == 0 and len(dev.threads) == 2


# --- a hostile driver --------------------------------------------------------------------------

def _raw(front: Frontend, entries: list[tuple[int, int, int, int]], base: int | None = None) -> None:
    """Descriptor table entries ``(addr, length, flags, next)`` as written, then head 0 posted."""
    desc = RINGS[1][0] if base is None else base
    for i, (addr, length, flags, nxt) in enumerate(entries):
        struct.pack_into("<QIHH", front.mem, desc + 16 * i, addr, length, flags, nxt)


@pytest.mark.parametrize("case", ["loop", "outside memory", "oversized", "indirect outside memory",
                                  "indirect inside indirect", "readable after writable"])
async def test_malformed_chains_are_refused_and_the_device_stays_up(tmp_path: Path, case: str) -> None:
    async with device(tmp_path) as (front, dev):
        table = DATA + 0x10000
        entries = {
            "loop": [(DATA, 64, DESC_F_NEXT, 1), (DATA, 64, DESC_F_NEXT, 0)],
            "outside memory": [(MEM - 8, 64, 0, 0)],
            "oversized": [(DATA, 0xFFFFFFFF, 0, 0)],
            "indirect outside memory": [(MEM + 0x1000, 64, DESC_F_INDIRECT, 0)],
            "indirect inside indirect": [(table, 32, DESC_F_INDIRECT, 0)],
            "readable after writable": [(DATA, 64, DESC_F_WRITE | DESC_F_NEXT, 1), (DATA, 64, 0, 0)],
        }[case]
        _raw(front, entries)
        if case == "indirect inside indirect":
            _raw(front, [(table, 32, DESC_F_INDIRECT, 0), (DATA, 64, 0, 0)], base=table)
        front.post(0)
        with anyio.fail_after(10):
            while dev.threads:  # the queue's worker stops on the bad chain  # noqa: ASYNC110
                await anyio.sleep(0.01)
        answer = await front.send(Request.GET_VRING_BASE, struct.pack("<II", 1, 0), reply=True)
        assert struct.unpack("<II", answer) == (1, 0)  # the bad chain was not consumed
        assert dev.requests == 0 and front.used_idx() == 0
    _no_workers(dev)


async def test_a_request_claiming_to_be_huge_is_answered_without_copying_it(tmp_path: Path) -> None:
    async with device(tmp_path) as (front, dev):
        await _init(front)
        size = 3 << 20  # over the largest FUSE request (a WRITE of max_write plus headers)
        out = front._buf(size)
        front.mem[out:out + IN_HEADER.size] = IN_HEADER.pack(size, LOOKUP, 99, 1, 0, 0, 1, 0, 0)
        reply = front._buf(4096)
        front.offer([(out, size, 0), (reply, 4096, DESC_F_WRITE)])
        assert await front.wait_used() == OUT_HEADER.size
        assert OUT_HEADER.unpack_from(front.mem, reply) == (OUT_HEADER.size, -errno.EINVAL, 99)
        assert dev.bad_requests == 1


class _SlowHandle(HandleWrapper):
    async def read(self, offset: int, size: int) -> bytes:
        await anyio.sleep(0.01)
        return await self.inner.read(offset, size)


class _Slow(ProviderWrapper):
    async def open(self, path: str, mode: OpenMode) -> FileHandle:
        return _SlowHandle(await self.inner.open(path, mode))


async def test_a_guest_flooding_the_queue_holds_bounded_host_memory(tmp_path: Path) -> None:
    """The driver re-posts one chain as fast as the device pops it (never waiting for the used
    ring), each a READ of 256 KiB from a provider that answers slowly: without a bound every
    request popped would hold its data on the host at once."""
    (tmp_path / "f.bin").write_bytes(os.urandom(256 * 1024))
    flood = 600
    async with device(_Slow(RealFSProvider(str(tmp_path)))) as (front, dev):
        await _init(front)
        error, fh = await _open(front, b"f.bin", os.O_RDONLY)
        assert error == 0
        request = front.request(READ, 2, READ_IN.pack(fh, 0, 256 * 1024, 0, 0, 0, 0))
        out, reply = front._buf(len(request)), front._buf(4096)  # too small: each answer is EIO
        front.mem[out:out + len(request)] = request
        front.offer([(out, len(request), 0), (reply, 4096, DESC_F_WRITE)], kick=False)
        front.avail_idx -= 1  # offer() posted it; the loop below posts it ``flood`` times
        ring = dev._rings[1]
        start_used = front.used_idx()
        tracemalloc.start()
        try:
            posted, most = 0, 0
            with anyio.fail_after(60):
                while front.used_idx() - start_used < flood:
                    while posted < flood and front.avail_idx - ring.queue.next_avail < QSIZE:
                        front.post(0, kick=False)
                        posted += 1
                    os.eventfd_write(front.kick[1], 1)
                    await anyio.sleep(0.002)
                    most = max(most, ring.handed_off)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert most == MAX_HANDED_OFF  # the bound, not the guest, limited what was held
        assert peak < 3 * MAX_HANDED_OFF * 256 * 1024  # ~24 MiB, where 600 x 256 KiB is 150 MiB
        assert dev.bad_requests == flood  # every reply was too big for its buffer: EIO, no crash
    _no_workers(dev)


# --- a session as the kernel lays it out ----------------------------------------------------------

async def test_a_kernel_shaped_session_replays_cleanly(tmp_path: Path) -> None:
    """The requests a guest's `echo hi > f; cat f; ls; rm f` sends, in the layout of the
    virtiofs driver (header, arguments and pages in separate descriptors)."""
    async with device(tmp_path) as (front, dev):
        await _init(front)
        error, body = await front.fuse(LOOKUP, 1, b"f\0", page_split=True)
        assert error == 0 and struct.unpack_from("<Q", body)[0] == 0  # negative entry
        error, body = await front.fuse(CREATE, 1, CREATE_IN.pack(os.O_WRONLY | os.O_TRUNC, 0o644, 0o022, 0) + b"f\0",
                                       page_split=True)
        assert error == 0
        node = struct.unpack_from("<Q", body)[0]
        fh = struct.unpack_from("<Q", body, ENTRY_OUT.size)[0]
        error, body = await front.fuse(WRITE, node, READ_IN.pack(fh, 0, 3, 0, 0, 0, 0), data=b"hi\n",
                                       page_split=True)
        assert error == 0 and struct.unpack_from("<I", body)[0] == 3
        error, _ = await front.fuse(FLUSH, node, struct.pack("<QIIQ", fh, 0, 0, 0))
        assert error == -errno.ENOSYS  # writes are already on the host
        error, _ = await front.fuse(RELEASE, node, RELEASE_IN.pack(fh, 0, 0, 0))
        assert error == 0
        error, fh = await _open(front, b"f", os.O_RDONLY)
        error, data = await front.fuse(READ, node, READ_IN.pack(fh, 0, 131072, 0, 0, 0, 0),
                                       reply_size=OUT_HEADER.size + 131072, page_split=True)
        assert (error, data) == (0, b"hi\n")
        error, _ = await front.fuse(RELEASE, node, RELEASE_IN.pack(fh, 0, 0, 0))
        error, body = await front.fuse(OPENDIR, 1, OPEN_IN.pack(os.O_RDONLY, 0))
        dh = struct.unpack_from("<Q", body)[0]
        error, body = await front.fuse(READDIRPLUS, 1, READ_IN.pack(dh, 0, 4096, 0, 0, 0, 0))
        assert error == 0 and b"f" in body
        error, _ = await front.fuse(RELEASEDIR, 1, RELEASE_IN.pack(dh, 0, 0, 0))
        error, _ = await front.fuse(UNLINK, 1, b"f\0")
        assert error == 0 and not (tmp_path / "f").exists()
        assert dev.bad_requests == 0 and dev.direct_requests == 2
        assert dev.vfs.service.open_files == 0 and dev.vfs.service.open_dirs == 0
    _no_workers(dev)


# --- recorded traffic --------------------------------------------------------------------------

SESSION = Path(__file__).with_name("virtiofs_session.json")


async def test_recorded_guest_traffic_replays_with_the_same_answers(tmp_path: Path) -> None:
    """Every chain a real guest (kernel 6.1's virtiofs driver) sent for a small shell workload
    (SESSION["workload"]), with its descriptor layout, replayed in the order it was answered:
    each gets the reply size and errno it got then. The recording's service numbered nodes and
    handles from SESSION["id_offset"], so the ids inside the requests mean the same here."""
    session = json.loads(SESSION.read_text())
    records = session["records"]
    assert len(records) > 50
    ttls = {"entry_ttl_ms": 1000, "attr_ttl_ms": 1000, "negative_ttl_ms": 1000}
    async with device(tmp_path, id_offset=session["id_offset"], **ttls) as (front, dev):
        for rec in records:
            request = bytes.fromhex(rec["request"])
            out = front._buf(len(request))
            front.mem[out:out + len(request)] = request
            descs, pos = [], out
            for length in rec["readable"]:
                descs.append((pos, length, 0))
                pos += length
            reply = front._buf(sum(rec["writable"]))
            pos = reply
            for length in rec["writable"]:
                descs.append((pos, length, DESC_F_WRITE))
                pos += length
            front.offer(descs)
            written = await front.wait_used()
            assert written == rec["written"], rec
            if written >= OUT_HEADER.size:
                length, error, unique = OUT_HEADER.unpack_from(front.mem, reply)
                assert (length, error) == (written, rec["error"])
                assert unique == IN_HEADER.unpack_from(request)[2]
        assert dev.bad_requests == 0 and dev.direct_requests > 0
    assert list(tmp_path.iterdir()) == []  # the workload ends with rm -r
    _no_workers(dev)
