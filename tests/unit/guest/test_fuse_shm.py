"""Mounted-directory payloads through the shared region: the FUSE daemon's READ_SHM/WRITE_SHM
against a real FsRpcService sharing one buffer (as guest and host share the ivshmem pages)."""

from __future__ import annotations

import errno as E
import os

import pytest

from gondolin.vfs import FsRpcService, MemoryProvider
from gondolin.vfs import wire as w
from guest import fuse as F

from .test_fuse import Kernel

pytestmark = pytest.mark.anyio
AREA = w.SHM_SPANS * w.MAX_IO


class ShmKernel(Kernel):
    def __init__(self, service: FsRpcService, shm: memoryview) -> None:
        super().__init__(service)
        hello = w.HelloReply(entry_ttl_ms=1500, attr_ttl_ms=2500, flags=w.HELLO_SHM)
        self.session = F.FuseSession(hello, shm)


@pytest.fixture
def area() -> memoryview:
    return memoryview(bytearray(AREA))


@pytest.fixture
def shm_kernel(area: memoryview) -> ShmKernel:
    service = FsRpcService(MemoryProvider(), shm=area)
    return ShmKernel(service, area)


async def test_hello_offers_the_region_only_when_the_host_has_one(area: memoryview) -> None:
    with_shm = await FsRpcService(MemoryProvider(), shm=area).dispatch(w.Request(1, w.Hello()))
    without = await FsRpcService(MemoryProvider()).dispatch(w.Request(1, w.Hello()))
    short = await FsRpcService(MemoryProvider(), shm=area[:w.MAX_IO]).dispatch(w.Request(1, w.Hello()))
    assert with_shm.body.flags & w.HELLO_SHM
    assert not without.body.flags & w.HELLO_SHM and not short.body.flags & w.HELLO_SHM
    assert F.FuseSession(w.HelloReply(), area).shm is None  # the host did not offer it
    assert F.FuseSession(w.HelloReply(flags=w.HELLO_SHM), None).free_spans == []


async def test_payloads_cross_in_spans_and_only_small_frames_cross_the_port(shm_kernel: ShmKernel) -> None:
    _node, fh = await shm_kernel.create(b"f")
    data = os.urandom(w.MAX_IO)
    shm_kernel.frames.clear()
    assert await shm_kernel.write(fh, 0, data) == len(data)
    assert await shm_kernel.read(fh, 0, w.MAX_IO) == data
    assert await shm_kernel.read(fh, 100, 50) == data[100:150]
    ops = [w.decode_request(f).body for f in shm_kernel.frames]
    assert [type(b) for b in ops] == [w.WriteShm, w.ReadShm, w.ReadShm]
    assert all(len(f) < 100 for f in shm_kernel.frames)
    assert sorted(shm_kernel.session.free_spans) == list(range(w.SHM_SPANS))
    assert not shm_kernel.session.spans


async def test_failures_free_the_span_and_without_spans_the_port_carries_data(shm_kernel: ShmKernel) -> None:
    bad = await shm_kernel.call(F.READ, 2, F.READ_IN.pack(999, 0, 4096, 0, 0, 0, 0))
    assert bad.error == E.EBADF
    assert len(shm_kernel.session.free_spans) == w.SHM_SPANS
    _node, fh = await shm_kernel.create(b"g")
    taken = [shm_kernel.session.free_spans.pop() for _ in range(w.SHM_SPANS)]  # all in flight
    shm_kernel.frames.clear()
    assert await shm_kernel.write(fh, 0, b"inline") == 6
    assert await shm_kernel.read(fh, 0, 10) == b"inline"
    assert [type(w.decode_request(f).body) for f in shm_kernel.frames] == [w.Write, w.Read]
    for span in taken:
        shm_kernel.session.release_span(span)
    # a request in flight when the host goes away gives its span back
    outs = shm_kernel.session.fuse_request(
        F.IN_HEADER.pack(F.IN_HEADER.size + F.READ_IN.size, F.READ, 7, 2, 0, 0, 0, 0, 0)
        + F.READ_IN.pack(fh, 0, 10, 0, 0, 0, 0))
    assert outs and len(shm_kernel.session.free_spans) == w.SHM_SPANS - 1
    assert shm_kernel.session.fail_all()[0][0] == F.TO_FUSE
    assert len(shm_kernel.session.free_spans) == w.SHM_SPANS


async def test_a_host_reply_larger_than_a_span_is_an_io_error(shm_kernel: ShmKernel) -> None:
    _node, fh = await shm_kernel.create(b"h")
    session = shm_kernel.session
    [(_dest, frame)] = session.fuse_request(
        F.IN_HEADER.pack(F.IN_HEADER.size + F.READ_IN.size, F.READ, 9, 2, 0, 0, 0, 0, 0)
        + F.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
    rid = w.decode_request(b"".join(bytes(p) for p in frame)[4:]).id
    lie = w.encode_response(w.Response(rid, w.Op.READ_SHM, body=w.SizeReply(w.MAX_IO + 1)))
    [(dest, pieces)] = session.port_message(lie)
    assert dest == F.TO_FUSE and F.OUT_HEADER.unpack_from(b"".join(bytes(p) for p in pieces))[1] == -E.EIO
    assert len(session.free_spans) == w.SHM_SPANS


async def test_the_host_refuses_spans_out_of_range(area: memoryview) -> None:
    service = FsRpcService(MemoryProvider(), shm=area)
    for body in (w.ReadShm(1, 0, 10, w.SHM_SPANS), w.WriteShm(1, 0, w.MAX_IO + 1, 0)):
        frame = w.encode_request(w.Request(5, body))
        assert w.decode_response(await service.handle(frame)).errno == E.EINVAL
    no_region = FsRpcService(MemoryProvider())
    reply = w.decode_response(await no_region.handle(w.encode_request(w.Request(6, w.ReadShm(1, 0, 10, 0)))))
    assert reply.errno == E.EINVAL
