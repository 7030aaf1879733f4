"""Split virtqueues over a fake guest memory: the driver side is written here by hand."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gondolin.vhost.memory import GuestMemory, GuestMemoryError, MemoryRegion
from gondolin.vhost.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    SplitQueue,
    VirtqueueError,
)

BASE = 0x10000
SIZE = 0x40000
QSIZE = 8
DESC, AVAIL, USED = BASE, BASE + 0x1000, BASE + 0x2000
DATA = BASE + 0x10000


class Driver:
    """Plays the guest: fills the descriptor table and the available ring."""

    def __init__(self, qsize: int = QSIZE, event_idx: bool = False, **kw: int) -> None:
        self.buf = bytearray(SIZE)
        self.memory = GuestMemory([(MemoryRegion(BASE, SIZE, 0x7F0000000000), memoryview(self.buf))])
        self.qsize = qsize
        self.avail_idx = 0
        self.queue = SplitQueue(self.memory, qsize, DESC, AVAIL, USED, event_idx=event_idx, **kw)

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int = DESC) -> None:
        struct.pack_into("<QIHH", self.buf, table - BASE + 16 * i, addr, length, flags, nxt)

    def offer(self, head: int) -> None:
        struct.pack_into("<H", self.buf, AVAIL - BASE + 4 + 2 * (self.avail_idx % self.qsize), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.buf, AVAIL - BASE + 2, self.avail_idx)

    def used(self) -> tuple[int, list[tuple[int, int]]]:
        idx = struct.unpack_from("<H", self.buf, USED - BASE + 2)[0]
        elems = [struct.unpack_from("<II", self.buf, USED - BASE + 4 + 8 * (i % self.qsize)) for i in range(idx)]
        return idx, elems


def test_request_and_reply_round_trip() -> None:
    d = Driver()
    d.buf[DATA - BASE:DATA - BASE + 5] = b"hello"
    d.desc(0, DATA, 5, DESC_F_NEXT, 1)
    d.desc(1, DATA + 0x100, 3, DESC_F_NEXT | DESC_F_WRITE, 2)
    d.desc(2, DATA + 0x200, 4, DESC_F_WRITE)
    d.offer(0)
    assert d.queue.pending() == 1
    chain = d.queue.pop()
    assert chain is not None and chain.head == 0
    assert chain.read() == b"hello" and chain.writable_len == 7
    assert chain.write(b"abcdef") == 6
    d.queue.push(chain, 6)
    assert d.buf[DATA + 0x100 - BASE:DATA + 0x103 - BASE] == b"abc"
    assert d.buf[DATA + 0x200 - BASE:DATA + 0x203 - BASE] == b"def"
    assert d.used() == (1, [(0, 6)])
    assert d.queue.pop() is None
    assert d.queue.should_notify() is True
    assert d.queue.should_notify() is False  # nothing new since


def test_reply_larger_than_the_buffers_is_refused() -> None:
    d = Driver()
    d.desc(0, DATA, 4, DESC_F_WRITE)
    d.offer(0)
    chain = d.queue.pop()
    assert chain is not None
    with pytest.raises(VirtqueueError, match="does not fit"):
        chain.write(b"12345")


def test_indirect_table() -> None:
    d = Driver()
    table = DATA + 0x1000
    d.desc(0, DATA, 2, DESC_F_NEXT, 1, table=table)
    d.desc(1, DATA + 0x10, 8, DESC_F_WRITE, table=table)
    d.desc(3, table, 32, DESC_F_INDIRECT)
    d.offer(3)
    chain = d.queue.pop()
    assert chain is not None and chain.head == 3
    assert chain.readable_len == 2 and chain.writable_len == 8


@pytest.mark.parametrize("setup, message", [
    (lambda d: (d.desc(0, DATA, 4, DESC_F_NEXT, 1), d.desc(1, DATA, 4, DESC_F_NEXT, 0)), "loops"),
    (lambda d: d.desc(0, DATA, 4, DESC_F_NEXT, 99), "outside"),
    (lambda d: d.desc(0, BASE + SIZE - 2, 4), "runs past"),
    (lambda d: d.desc(0, 0x10, 4), "outside guest memory"),
    (lambda d: d.desc(0, DATA, 1 << 31), "over"),
    (lambda d: (d.desc(0, DATA, 4, DESC_F_WRITE | DESC_F_NEXT, 1), d.desc(1, DATA, 4)), "readable buffer follows"),
    (lambda d: d.desc(0, DATA, 17, DESC_F_INDIRECT), "16-byte"),
    (lambda d: d.desc(0, DATA, 0, DESC_F_INDIRECT), "16-byte"),
    (lambda d: d.desc(0, DATA, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1), "both INDIRECT and NEXT"),
    (lambda d: (d.desc(0, DATA + 0x1000, 16, DESC_F_INDIRECT),
                d.desc(0, DATA, 16, DESC_F_INDIRECT, table=DATA + 0x1000)), "inside an indirect"),
    (lambda d: (d.desc(0, DATA + 0x1000, 32, DESC_F_INDIRECT),
                d.desc(0, DATA, 4, DESC_F_NEXT, 1, table=DATA + 0x1000),
                d.desc(1, DATA, 4, DESC_F_NEXT, 0, table=DATA + 0x1000)), "loops"),
    (lambda d: d.desc(0, BASE + SIZE - 8, 16, DESC_F_INDIRECT), "indirect table"),
])
def test_malformed_chains_are_refused(setup, message) -> None:  # type: ignore[no-untyped-def]
    d = Driver(max_chain_bytes=1 << 20)
    setup(d)
    d.offer(0)
    with pytest.raises(VirtqueueError, match=message):
        d.queue.pop()


def test_available_index_running_ahead_is_refused() -> None:
    d = Driver()
    struct.pack_into("<H", d.buf, AVAIL - BASE + 2, QSIZE + 1)
    with pytest.raises(VirtqueueError, match="ahead"):
        d.queue.pop()


def test_head_index_outside_table_is_refused() -> None:
    d = Driver()
    d.offer(QSIZE + 3)
    with pytest.raises(VirtqueueError, match="outside"):
        d.queue.pop()


def test_ring_areas_must_lie_in_memory_and_size_must_be_a_power_of_two() -> None:
    buf = bytearray(0x1000)
    memory = GuestMemory([(MemoryRegion(0, 0x1000, 0), memoryview(buf))])
    with pytest.raises(GuestMemoryError):
        SplitQueue(memory, 256, 0, 0x800, 0xF00)
    with pytest.raises(VirtqueueError, match="power of two"):
        SplitQueue(memory, 6, 0, 0x100, 0x200)


def test_index_wraps_around() -> None:
    d = Driver()
    d.desc(0, DATA, 4, DESC_F_WRITE)
    d.queue.next_avail = 0xFFFE
    d.avail_idx = 0xFFFE
    for _ in range(4):
        d.offer(0)
        chain = d.queue.pop()
        assert chain is not None
        d.queue.push(chain, 4)
    assert d.queue.next_avail == 2


def test_event_idx_suppresses_and_requests_notifications() -> None:
    d = Driver(event_idx=True)
    d.desc(0, DATA, 4, DESC_F_WRITE)
    used_event_off = AVAIL - BASE + 4 + 2 * QSIZE
    struct.pack_into("<H", d.buf, used_event_off, 1)  # the guest wants an interrupt after used idx 2
    notified = []
    for _ in range(2):
        d.offer(0)
        chain = d.queue.pop()
        assert chain is not None
        d.queue.push(chain, 0)
        notified.append(d.queue.should_notify())
    assert notified == [False, True]
    # avail_event tells the driver where we are
    assert struct.unpack_from("<H", d.buf, USED - BASE + 4 + 8 * QSIZE)[0] == 2


@settings(max_examples=300, deadline=None)
@given(table=st.binary(min_size=16 * QSIZE, max_size=16 * QSIZE), head=st.integers(0, 0xFFFF))
def test_random_descriptor_tables_never_crash(table: bytes, head: int) -> None:
    d = Driver(max_chain_bytes=1 << 16)
    d.buf[DESC - BASE:DESC - BASE + len(table)] = table
    d.offer(head)
    try:
        chain = d.queue.pop()
    except VirtqueueError:
        return
    assert chain is not None
    assert chain.readable_len + chain.writable_len <= 1 << 16
