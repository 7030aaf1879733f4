"""The vhost-user conversation QEMU has with a vhost-user-fs backend, replayed without QEMU."""

from __future__ import annotations

import os
import struct

import pytest

from gondolin.vhost.memory import GuestMemory, GuestMemoryError, MemoryRegion
from gondolin.vhost.protocol import (
    F_PROTOCOL_FEATURES,
    F_VERSION_1,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    MAX_PAYLOAD,
    PF_REPLY_ACK,
    DeviceState,
    Message,
    MessageReader,
    Request,
    VhostUserError,
    encode,
)
from gondolin.vhost.virtqueue import SplitQueue

MEM = 1 << 20
UADDR = 0x7F1200000000


def msg(req: Request, payload: bytes = b"", fds: list[int] | None = None, flags: int = 0) -> Message:
    return Message(int(req), 0x1 | flags, payload, list(fds or []))


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def memfd() -> int:
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, MEM)
    return fd


def eventfd() -> int:
    return os.eventfd(0)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_framing_splits_and_joins_messages() -> None:
    reader = MessageReader()
    data = encode(Request.GET_FEATURES, reply=False) + encode(Request.SET_FEATURES, u64(5), reply=False)
    out = reader.feed(data[:5]) + reader.feed(data[5:20]) + reader.feed(data[20:])
    assert [(m.request, m.payload) for m in out] == [(1, b""), (2, u64(5))]


def test_framing_refuses_oversized_payloads_and_wrong_versions() -> None:
    with pytest.raises(VhostUserError, match="payload"):
        MessageReader().feed(HEADER.pack(5, 1, MAX_PAYLOAD + 1))
    with pytest.raises(VhostUserError, match="version"):
        MessageReader().feed(HEADER.pack(5, 2, 0))


def test_the_set_up_qemu_performs_maps_memory_and_starts_vrings() -> None:
    before = open_fds()
    dev = DeviceState(queues=2, features=0)
    closed: list[int] = []

    def run(m: Message) -> bytes:
        reply = dev.handle(m)
        for fd in reply.close_fds:
            os.close(fd)
            closed.append(fd)
        return reply.data

    features = struct.unpack("<Q", run(msg(Request.GET_FEATURES))[12:])[0]
    assert features & (1 << F_PROTOCOL_FEATURES) and features & (1 << F_VERSION_1)
    run(msg(Request.SET_FEATURES, u64(features)))
    proto = struct.unpack("<Q", run(msg(Request.GET_PROTOCOL_FEATURES))[12:])[0]
    run(msg(Request.SET_PROTOCOL_FEATURES, u64(proto)))
    run(msg(Request.SET_OWNER))
    region = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, MEM, UADDR, 0)
    ack = run(msg(Request.SET_MEM_TABLE, region, [memfd()], flags=FLAG_NEED_REPLY))
    request, flags, size = HEADER.unpack_from(ack)
    assert request == Request.SET_MEM_TABLE and flags & FLAG_REPLY and ack[12:] == u64(0)
    assert proto & (1 << PF_REPLY_ACK)
    assert dev.memory is not None
    started: list[int] = []
    for q in range(2):
        run(msg(Request.SET_VRING_NUM, struct.pack("<II", q, 128)))
        base = 0x1000 + q * 0x4000
        run(msg(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", q, 0, UADDR + base, UADDR + base + 0x2000,
                                                    UADDR + base + 0x800, 0)))
        run(msg(Request.SET_VRING_BASE, struct.pack("<II", q, 0)))
        run(msg(Request.SET_VRING_CALL, u64(q), [eventfd()]))
        reply = dev.handle(msg(Request.SET_VRING_KICK, u64(q), [eventfd()]))
        assert reply.started == []  # protocol features negotiated: waits for SET_VRING_ENABLE
        reply = dev.handle(msg(Request.SET_VRING_ENABLE, struct.pack("<II", q, 1)))
        started += reply.started
    assert started == [0, 1]
    addr = dev.vrings[1].addr
    assert addr is not None and dev.memory.guest_addr(addr.desc_user_addr) == 0x5000
    queue = SplitQueue(dev.memory, 128, dev.memory.guest_addr(addr.desc_user_addr),
                       dev.memory.guest_addr(addr.avail_user_addr), dev.memory.guest_addr(addr.used_user_addr))
    assert queue.pop() is None
    queue.release()
    # Stopping a ring reports where it got to and hands its eventfds back.
    stop = dev.handle(msg(Request.GET_VRING_BASE, struct.pack("<II", 0, 0)))
    assert stop.data[12:] == struct.pack("<II", 0, 0) and stop.stopped == [0] and len(stop.close_fds) == 2
    for fd in stop.close_fds + dev.close():
        os.close(fd)
    assert open_fds() == before  # every fd received was either kept and returned, or handed back


@pytest.mark.parametrize("m, match", [
    (msg(Request.SET_FEATURES, u64(1 << 5)), "not offered"),
    (msg(Request.SET_VRING_NUM, struct.pack("<II", 0, 100)), "power of two"),
    (msg(Request.SET_VRING_NUM, struct.pack("<II", 7, 128)), "does not exist"),
    (msg(Request.SET_MEM_TABLE, struct.pack("<II", 9, 0)), "regions"),
    (msg(Request.SET_MEM_TABLE, struct.pack("<II", 2, 0)), "payload"),
    (msg(Request.SET_VRING_ADDR, b"\0" * 8), "payload"),
    (msg(Request.SET_VRING_ERR, b""), "payload"),
    (msg(Request.SET_VRING_KICK, u64(0x100)), "without a kick fd"),
    (msg(Request.SET_VRING_CALL, u64(0)), "exactly one fd"),
    (Message(99, 1, b""), "not supported"),
])
def test_bad_requests_are_refused(m: Message, match: str) -> None:
    with pytest.raises(VhostUserError, match=match):
        DeviceState(queues=1, features=0).handle(m)


def test_a_refused_message_keeps_none_of_its_fds() -> None:
    before = open_fds()
    dev = DeviceState(queues=1, features=0)
    region = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, MEM, UADDR, 0)
    cases = [msg(Request.SET_MEM_TABLE, region, [memfd(), memfd()]),  # two fds for one region
             msg(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 0, UADDR, 0),
                 [memfd()]),  # a zero-sized region
             msg(Request.SET_VRING_KICK, u64(3), [eventfd()])]  # no such vring
    for m in cases:
        with pytest.raises((VhostUserError, GuestMemoryError)):
            dev.handle(m)
        for fd in m.fds:
            os.close(fd)
    assert dev.memory is None and dev.close() == []
    assert open_fds() == before


def test_memory_table_mapping_is_shared_with_the_frontend() -> None:
    fd = memfd()
    try:
        memory = GuestMemory.map_fds([MemoryRegion(0x100000, MEM - 0x1000, UADDR, 0x1000)], [fd])
        memory.write(0x100000, b"guest")
        assert os.pread(fd, 5, 0x1000) == b"guest"
        os.pwrite(fd, b"host", 0x2000)
        assert memory.read(0x101000, 4) == b"host"
        memory.close()
    finally:
        os.close(fd)


def test_fds_attach_to_the_message_they_arrived_with() -> None:
    reader = MessageReader()
    first = encode(Request.SET_OWNER, reply=False)
    second = encode(Request.SET_VRING_KICK, u64(0), reply=False)
    out = reader.feed(first[:4]) + reader.feed(first[4:]) + reader.feed(second, [7])
    assert [(m.request, m.fds) for m in out] == [(Request.SET_OWNER, []), (Request.SET_VRING_KICK, [7])]
    # data without fds glued before the message that carried them, in one read
    out = reader.feed(first + second, [8])
    assert [(m.request, m.fds) for m in out] == [(Request.SET_OWNER, []), (Request.SET_VRING_KICK, [8])]
    assert reader.take_fds() == []
