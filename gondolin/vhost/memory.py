"""Guest memory shared by the vhost-user frontend, with bounds-checked translation.

QEMU describes guest RAM as regions: a guest-physical range, the address QEMU itself maps it
at (vring addresses arrive in that address space), and a file descriptor plus offset to map
it here. Every address the guest hands us (descriptor buffers, ring locations) goes through
:meth:`GuestMemory.view`, which refuses anything that is not wholly inside one region; nothing
here trusts the guest.
"""

from __future__ import annotations

import bisect
import mmap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import ProtocolError


class GuestMemoryError(ProtocolError):
    """A guest-supplied address or length does not lie inside guest memory."""


@dataclass(frozen=True)
class MemoryRegion:
    guest_phys_addr: int
    size: int
    user_addr: int  # where the frontend (QEMU) maps the region; vring addresses use these
    mmap_offset: int = 0

    @property
    def guest_end(self) -> int:
        return self.guest_phys_addr + self.size


class GuestMemory:
    """Regions of guest RAM, each backed by a writable buffer (an ``mmap`` or, in tests, a bytearray)."""

    def __init__(self, regions: Iterable[tuple[MemoryRegion, memoryview]]) -> None:
        pairs = sorted(regions, key=lambda rv: rv[0].guest_phys_addr)
        for (a, _), (b, _) in zip(pairs, pairs[1:], strict=False):
            if a.guest_end > b.guest_phys_addr:
                raise GuestMemoryError(f"memory regions overlap at guest address {b.guest_phys_addr:#x}")
        for region, view in pairs:
            if region.size <= 0 or len(view) != region.size:
                raise GuestMemoryError(f"memory region at {region.guest_phys_addr:#x}: size {region.size} "
                                       f"does not match its mapping ({len(view)} bytes)")
            if view.readonly:
                raise GuestMemoryError("guest memory must be mapped writable")
        self._regions = [r for r, _ in pairs]
        self._views = [v.cast("B") for _, v in pairs]
        self._starts = [r.guest_phys_addr for r in self._regions]
        self._last: tuple[int, int, memoryview] = (0, 0, memoryview(b""))  # (start, end, view)
        self._maps: list[mmap.mmap] = []

    @classmethod
    def map_fds(cls, regions: Sequence[MemoryRegion], fds: Sequence[int]) -> GuestMemory:
        """Map each region's file descriptor (shared, read-write). The fds stay the caller's to close."""
        if len(regions) != len(fds):
            raise GuestMemoryError(f"{len(regions)} memory regions but {len(fds)} file descriptors")
        for region in regions:
            if region.size <= 0 or region.mmap_offset < 0:
                raise GuestMemoryError(f"memory region at {region.guest_phys_addr:#x} has size {region.size}, "
                                       f"offset {region.mmap_offset}")
        maps: list[mmap.mmap] = []
        pairs: list[tuple[MemoryRegion, memoryview]] = []
        try:
            for region, fd in zip(regions, fds, strict=True):
                m = mmap.mmap(fd, region.mmap_offset + region.size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
                maps.append(m)
                pairs.append((region, memoryview(m)[region.mmap_offset:region.mmap_offset + region.size]))
            memory = cls(pairs)
        except (OSError, ValueError, GuestMemoryError) as exc:
            for _, view in pairs:
                view.release()
            for m in maps:
                m.close()
            raise GuestMemoryError(f"cannot map guest memory: {exc}") from exc
        memory._maps = maps
        return memory

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    def _index(self, gpa: int) -> int:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or gpa >= self._regions[i].guest_end:
            raise GuestMemoryError(f"guest address {gpa:#x} is outside guest memory")
        return i

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes at guest-physical ``gpa``, inside one region."""
        base, end, whole = self._last  # the region of the previous call: most hit the same one
        if base <= gpa and gpa + length <= end and length >= 0:
            return whole[gpa - base:gpa - base + length]
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length}")
        i = self._index(gpa)
        region = self._regions[i]
        start = gpa - region.guest_phys_addr
        if start + length > region.size:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length} runs past the end of its memory region")
        self._last = (region.guest_phys_addr, region.guest_end, self._views[i])
        return self._views[i][start:start + length]

    def views(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        """:meth:`view` of each ``(gpa, length)``, quicker for many ranges in one region."""
        out = []
        base, end, whole = self._last
        view = self.view
        for gpa, length in ranges:
            if base <= gpa and gpa + length <= end and length >= 0:
                out.append(whole[gpa - base:gpa - base + length])
            else:
                out.append(view(gpa, length))
                base, end, whole = self._last
        return out

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def guest_addr(self, user_addr: int) -> int:
        """Translate a frontend (QEMU) virtual address, as in VHOST_USER_SET_VRING_ADDR, to guest-physical."""
        for region in self._regions:
            if region.user_addr <= user_addr < region.user_addr + region.size:
                return region.guest_phys_addr + (user_addr - region.user_addr)
        raise GuestMemoryError(f"frontend address {user_addr:#x} is not in any shared memory region")

    def close(self) -> None:
        for view in self._views:
            view.release()
        self._views = []
        self._regions = []
        self._starts = []
        self._last = (0, 0, memoryview(b""))
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass  # a view handed out is still alive; the mapping goes when it does
        self._maps = []
