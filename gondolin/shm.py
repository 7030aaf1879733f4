"""The bulk-transfer region: one file that this process and the VM's QEMU both map.

QEMU backs an ``ivshmem-plain`` device with it (``memory-backend-file,share=on``), so the guest
agent sees the same pages as the device's BAR 2 and maps them from sysfs. ``vm.fs`` moves large
files through it: the bytes are copied once on each side, and only ``{off, len}`` notices cross
the control channel (``FILE_SHM``). The region is ordinary guest RAM to QEMU, so it is saved
with templates, checkpoints and forks like the rest of memory (transfers are punched out when
they end, so an idle region costs nothing there).

Layout: the first half is ``vm.fs``'s, split into :data:`SLOT_COUNT` slots; one transfer holds
one slot and uses it as a ring, within the byte credit its receiver grants. A transfer that
finds no free slot uses the control channel as before. The guest is untrusted: every
``{off, len}`` it names is checked against the slot and the ring position the host expects
(:meth:`Slot.take_incoming`). The second half (:data:`gondolin.vfs.wire.SHM_FUSE_OFFSET`)
carries the payloads of mounted directories' reads and writes (``READ_SHM``/``WRITE_SHM`` on
the fs port): the guest's FUSE daemon names one of ``SHM_SPANS`` spans per request.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from .errors import ProtocolError
from .vfs.wire import MAX_IO, SHM_FUSE_OFFSET, SHM_SPANS

REGION_MB = 64  # a power of two (ivshmem BAR); guest-visible size
VMFS_BYTES = SHM_FUSE_OFFSET  # vm.fs slots below, FUSE spans above
SLOT_COUNT = 4
CHUNK = 1024 * 1024  # bytes announced by one FILE_SHM message at most
MIN_TRANSFER = 256 * 1024  # smaller transfers stay on the control channel


class SharedRegion:
    """The host's mapping of a VM's region file, and its slot allocator."""

    def __init__(self, path: str | os.PathLike[str], size: int = REGION_MB << 20) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if size < SHM_FUSE_OFFSET + SHM_SPANS * MAX_IO:
            self._map.close()
            raise ValueError(f"a shared region needs at least {(SHM_FUSE_OFFSET + SHM_SPANS * MAX_IO) >> 20} MiB")
        self.path = Path(path)
        self.size = size
        self.slot_size = VMFS_BYTES // SLOT_COUNT
        self.view = memoryview(self._map)
        self._free = list(range(SLOT_COUNT))
        self.usable = False  # set once the guest agent says it mapped the region (CONFIGURED)
        self.closed = False

    def fuse_area(self) -> memoryview:
        """The spans mounted directories' payloads travel in (served by FsRpcService)."""
        return self.view[SHM_FUSE_OFFSET:SHM_FUSE_OFFSET + SHM_SPANS * MAX_IO]

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def take(self) -> Slot | None:
        """A free slot, or None (region unused by the guest, closed, or every slot busy)."""
        if not self.usable or self.closed or not self._free:
            return None
        return Slot(self, self._free.pop())

    def _release(self, index: int) -> None:
        if self.closed:
            return
        start = index * self.slot_size
        try:  # give the pages back: an idle region adds nothing to checkpoints or RSS
            self._map.madvise(mmap.MADV_REMOVE, start, self.slot_size)
        except (OSError, ValueError):
            pass
        self._free.append(index)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.view.release()
            self._map.close()
        except BufferError:
            pass  # a transfer still holds a view: the mapping goes with the last reference

    def __repr__(self) -> str:
        return f"<SharedRegion {self.size >> 20} MiB, {len(self._free)}/{SLOT_COUNT} slots free>"


class Slot:
    """One transfer's share of the region, used as a ring of ``size`` bytes at ``offset``."""

    def __init__(self, region: SharedRegion, index: int) -> None:
        self.region = region
        self.index = index
        self.offset = index * region.slot_size
        self.size = region.slot_size
        self.pos = 0  # ring position (relative to offset) of the next byte
        self._released = False

    @property
    def spec(self) -> list[int]:
        """What the request tells the guest: ``[offset, size]``."""
        return [self.offset, self.size]

    def next_span(self, n: int) -> tuple[int, memoryview]:
        """Where the next ``<= n`` bytes go (host -> guest): ``(absolute offset, view)``; the
        span never wraps, so it may be shorter than ``n``."""
        n = min(n, self.size - self.pos, CHUNK)
        off = self.offset + self.pos
        self.pos = (self.pos + n) % self.size
        return off, self.region.view[off:off + n]

    def take_incoming(self, p: dict[str, object], outstanding: int) -> memoryview:
        """The bytes a guest ``FILE_SHM {off, len}`` announces, checked: they must start at the
        ring position and fit the slot and the credit granted (``outstanding``)."""
        off, n = p.get("off"), p.get("len")
        if (not isinstance(off, int) or isinstance(off, bool) or not isinstance(n, int) or isinstance(n, bool)
                or off != self.offset + self.pos or not 0 < n <= min(outstanding, self.size - self.pos)):
            raise ProtocolError(f"guest announced region bytes off={str(off)[:20]} len={str(n)[:20]}, outside "
                                f"its slot, ring position or credit")
        self.pos = (self.pos + n) % self.size
        return self.region.view[off:off + n]

    def release(self) -> None:
        """The transfer ended and the guest is done with the slot: free it."""
        if not self._released:
            self._released = True
            self.region._release(self.index)

    def retire(self) -> None:
        """The transfer stopped early and the guest may still touch the slot: never hand it
        out again in this VM (later transfers use the other slots, then the channel)."""
        self._released = True
