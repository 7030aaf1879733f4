"""Split virtqueues (virtio 1.x, section 2.7) read from guest memory, guest fields all checked.

The driver (guest) owns the descriptor table and the available ring; the device (us) owns the
used ring. :meth:`SplitQueue.pop` takes the next available chain and turns it into views of
guest memory: device-readable buffers first, then device-writable ones. Everything that comes
from the guest is checked before use: the ring index distance, head and ``next`` indexes,
descriptor loops (a chain longer than its table), indirect tables (size, alignment, nesting,
``NEXT`` together with ``INDIRECT``), readable buffers after writable ones, the total length
of a chain, and every buffer's address range. A bad chain raises :class:`VirtqueueError`; the
caller marks the queue broken (virtio's NEEDS_RESET) rather than guessing.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

from ..errors import ProtocolError
from .memory import GuestMemory, GuestMemoryError

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768  # virtio's limit for split queues
DEFAULT_MAX_CHAIN_BYTES = 64 << 20

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class VirtqueueError(ProtocolError):
    """The guest put something in a virtqueue that breaks the virtio rules."""


@dataclass
class Chain:
    """One request: the head index (for the used ring) and its buffers as guest-memory views."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(len(b) for b in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(b) for b in self.writable)

    def read(self) -> bytes:
        """All device-readable bytes, joined (one copy)."""
        return b"".join(self.readable)

    def write(self, data: bytes | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the writable buffers from ``offset``; returns bytes written (all or error)."""
        data = memoryview(data).cast("B")
        if offset + len(data) > self.writable_len:
            raise VirtqueueError(f"reply of {len(data)} bytes at offset {offset} does not fit the guest's "
                                 f"{self.writable_len}-byte buffers")
        written = 0
        for buf in self.writable:
            if offset >= len(buf):
                offset -= len(buf)
                continue
            n = min(len(buf) - offset, len(data) - written)
            buf[offset:offset + n] = data[written:written + n]
            written += n
            offset = 0
            if written == len(data):
                break
        return written


def _ring_distance(new: int, old: int) -> int:
    return (new - old) & 0xFFFF


class SplitQueue:
    """The device side of one split virtqueue in :class:`GuestMemory`.

    ``desc``, ``avail`` and ``used`` are guest-physical addresses. ``next_avail`` is where to
    resume (VHOST_USER_SET_VRING_BASE); :attr:`next_avail` is what to report when stopped.
    """

    def __init__(self, memory: GuestMemory, size: int, desc: int, avail: int, used: int, *,
                 next_avail: int = 0, event_idx: bool = False,
                 max_chain_bytes: int = DEFAULT_MAX_CHAIN_BYTES) -> None:
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.size = size
        self.event_idx = event_idx
        self.max_chain_bytes = max_chain_bytes
        # Check the three areas once; later accesses only index inside them.
        self._desc = memory.view(desc, 16 * size)
        self._avail = memory.view(avail, 6 + 2 * size)
        self._used = memory.view(used, 6 + 8 * size)
        self.next_avail = next_avail & 0xFFFF
        self._used_idx = _U16.unpack_from(self._used, 2)[0]
        self._signalled_used = self._used_idx
        self._fence = threading.Lock()

    # -- the available side -------------------------------------------------------------

    def avail_idx(self) -> int:
        return int(_U16.unpack_from(self._avail, 2)[0])

    def pending(self) -> int:
        """How many chains the guest has made available that we have not popped."""
        n = _ring_distance(self.avail_idx(), self.next_avail)
        if n > self.size:
            raise VirtqueueError(f"available index moved {n} entries ahead of a {self.size}-entry queue")
        return n

    def pop(self, *, arm: bool = True) -> Chain | None:
        """The next available chain, or None. ``arm=False`` leaves the driver's kicks suppressed
        (a device draining the ring needs none); call :meth:`arm_kick` once it runs dry."""
        if not self.pending():
            return None
        head = _U16.unpack_from(self._avail, 4 + 2 * (self.next_avail % self.size))[0]
        chain = self._walk(head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        if arm and self.event_idx:  # avail_event: tell the driver when to kick us next
            _U16.pack_into(self._used, 4 + 8 * self.size, self.next_avail)
        return chain

    def arm_kick(self) -> bool:
        """Ask the driver to kick for its next chain; True if one arrived meanwhile (pop it).

        With event idx that is ``avail_event``; without, the used ring's NO_NOTIFY flag is
        cleared (:meth:`quiet` sets it). The ring is read again after a full barrier, so a chain
        the driver added just before seeing the new value is never left unnoticed."""
        if self.event_idx:
            _U16.pack_into(self._used, 4 + 8 * self.size, self.next_avail)
        else:
            _U16.pack_into(self._used, 0, 0)
        with self._fence:  # a locked instruction: stores above are visible before the load below
            pass
        return self.pending() > 0

    def quiet(self) -> None:
        """Tell a driver without event idx not to kick while the device drains (USED_F_NO_NOTIFY)."""
        if not self.event_idx:
            _U16.pack_into(self._used, 0, USED_F_NO_NOTIFY)

    def _walk(self, head: int) -> Chain:
        chain = Chain(head)
        table, table_size = self._desc, self.size
        index, seen, total, indirect = head, 0, 0, False
        entries: list[tuple[int, int, int, int]] | None = None  # an indirect table, decoded at once
        view = self.memory.view
        while True:
            if index >= table_size:
                raise VirtqueueError(f"descriptor index {index} is outside a {table_size}-entry table")
            seen += 1
            if seen > table_size:
                raise VirtqueueError(f"descriptor chain from head {head} loops")
            if entries is not None:
                addr, length, flags, nxt = entries[index]
            else:
                addr, length, flags, nxt = _DESC.unpack_from(table, 16 * index)
            if flags & DESC_F_INDIRECT:
                if indirect:
                    raise VirtqueueError("an indirect descriptor inside an indirect table")
                if flags & DESC_F_NEXT:
                    raise VirtqueueError("a descriptor has both INDIRECT and NEXT set")
                if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                    raise VirtqueueError(f"indirect table of {length} bytes is not 1..{MAX_QUEUE_SIZE} "
                                         "16-byte descriptors")
                try:
                    table = view(addr, length)
                except GuestMemoryError as exc:
                    raise VirtqueueError(f"indirect table: {exc}") from exc
                entries = list(_DESC.iter_unpack(table))  # a copy: the guest may change the table
                straight = self._straight(head, entries)
                if straight is not None:
                    return straight
                table_size, index, seen, indirect = length // 16, 0, 0, True
                continue
            total += length
            if total > self.max_chain_bytes:
                raise VirtqueueError(f"descriptor chain from head {head} is over {self.max_chain_bytes} bytes")
            try:
                buf = view(addr, length)
            except GuestMemoryError as exc:
                raise VirtqueueError(f"descriptor {index}: {exc}") from exc
            if flags & DESC_F_WRITE:
                chain.writable.append(buf)
            elif chain.writable:
                raise VirtqueueError("a device-readable buffer follows a device-writable one")
            else:
                chain.readable.append(buf)
            if not flags & DESC_F_NEXT:
                return chain
            index = nxt

    def _straight(self, head: int, entries: list[tuple[int, int, int, int]]) -> Chain | None:
        """An indirect table as the drivers lay it out (entry i chained to i+1, readable ones
        first, no nested table), turned into a chain in a few passes; None for anything else,
        which the general walk then checks (and refuses) entry by entry."""
        end = 0
        for i, (_addr, _length, flags, nxt) in enumerate(entries):
            if flags & DESC_F_INDIRECT:
                return None
            if not flags & DESC_F_NEXT:
                end = i + 1
                break
            if nxt != i + 1:
                return None
        else:
            return None
        used = entries[:end]
        flags_w = [e[2] & DESC_F_WRITE for e in used]
        first_w = flags_w.index(DESC_F_WRITE) if DESC_F_WRITE in flags_w else end
        if not all(flags_w[first_w:]):
            return None
        if sum(e[1] for e in used) > self.max_chain_bytes:
            return None
        try:
            views = self.memory.views([(e[0], e[1]) for e in used])
        except GuestMemoryError:
            return None
        return Chain(head, views[:first_w], views[first_w:])

    # -- the used side ------------------------------------------------------------------

    def push(self, chain: Chain | int, written: int) -> None:
        """Return a chain to the guest with ``written`` bytes filled in its writable buffers."""
        head = chain.head if isinstance(chain, Chain) else chain
        slot = self._used_idx % self.size
        _USED_ELEM.pack_into(self._used, 4 + 8 * slot, head, written)
        # The element is stored before the index that publishes it (x86 keeps store order;
        # Python issues the two stores in program order).
        self._used_idx = (self._used_idx + 1) & 0xFFFF
        _U16.pack_into(self._used, 2, self._used_idx)

    def should_notify(self) -> bool:
        """Whether the guest wants an interrupt for what was pushed since the last notification."""
        old, new = self._signalled_used, self._used_idx
        if old == new:
            return False
        self._signalled_used = new
        # A full barrier between publishing the used index (push) and reading what the driver
        # asked for: otherwise the load can pass the store (x86 store buffer), we see an old
        # used_event while the driver saw the old used index, and both wait for each other.
        with self._fence:
            pass
        if self.event_idx:
            used_event = _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
            return _ring_distance(new, (used_event + 1) & 0xFFFF) < _ring_distance(new, old)
        return not _U16.unpack_from(self._avail, 0)[0] & AVAIL_F_NO_INTERRUPT

    def release(self) -> None:
        """Drop the views into guest memory (before the memory is unmapped)."""
        for view in (self._desc, self._avail, self._used):
            view.release()
