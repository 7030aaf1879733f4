"""Take the zero-page records of pages nothing wrote out of a saved QEMU 7.2 migration stream.

A virtiofs VM's guest RAM is a shared memfd (the vhost-user backend maps it). Loading a
migration stream into it is slow and expensive: for every zero-page record QEMU checks that the
destination page is zero by reading it, and a shared memfd has no zero page to map, so each read
allocates a page. A 512 MiB guest then takes 0.4-0.6 s longer to restore and holds all 512 MiB
(anonymous RAM maps the shared zero page instead). The destination's RAM starts zeroed, so a
zero-page record for a page no earlier record of the stream wrote changes nothing: this module
drops those, once, when a template is saved.

Only the stream format QEMU 7.2 writes for a precopy save with no migration capabilities is
understood (magic, version 3, the configuration section, the ``ram`` section's start, part and
end records with footers, then device sections, which are copied as they are). Anything else
(compression, XBZRLE, another iterative section, an unknown flag) raises
:class:`StreamFormatError` and the caller keeps the original stream.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3
SECTION_START, SECTION_PART, SECTION_END, SECTION_FULL = 0x01, 0x02, 0x03, 0x04
CONFIGURATION, FOOTER = 0x07, 0x7E
FLAG_ZERO, FLAG_MEM_SIZE, FLAG_PAGE, FLAG_EOS, FLAG_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
KNOWN_FLAGS = FLAG_ZERO | FLAG_MEM_SIZE | FLAG_PAGE | FLAG_EOS | FLAG_CONTINUE
PAGE = 4096
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class StreamFormatError(ValueError):
    """The stream is not one this module understands; keep it as it is."""


@dataclass(frozen=True)
class DropStats:
    records: int  # page records read
    dropped: int  # zero-page records left out
    size_in: int
    size_out: int


class _Reader:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise StreamFormatError("the stream ends inside a record")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def be32(self) -> int:
        return int(_BE32.unpack(self.take(4))[0])

    def be64(self) -> int:
        return int(_BE64.unpack(self.take(8))[0])

    def name(self) -> bytes:
        return bytes(self.take(self.byte()))


def drop_untouched_zero_pages(src: Path, dst: Path) -> DropStats:
    """Write ``src`` to ``dst`` without the zero-page records of pages no earlier record wrote."""
    data = src.read_bytes()  # once per template: ~100 MB for a 512 MiB guest
    out, stats = _rewrite(memoryview(data))
    with open(dst, "wb") as g:
        for piece in out:
            g.write(piece)
    return stats


def _rewrite(buf: memoryview) -> tuple[list[bytes | memoryview], DropStats]:
    r = _Reader(buf)
    if r.be32() != MAGIC or r.be32() != VERSION:
        raise StreamFormatError("not a version 3 QEMU migration stream")
    out: list[bytes | memoryview] = []
    if r.byte() != CONFIGURATION:
        raise StreamFormatError("no configuration section")
    r.take(r.be32())  # the machine type
    if buf[r.pos] not in (SECTION_START,):
        raise StreamFormatError("the configuration section has subsections")
    out.append(buf[:r.pos])
    blocks: dict[bytes, bytearray] = {}  # block -> one byte per page: 1 once a record wrote it
    ram_id: int | None = None
    last_out: bytes | None = None  # the block of the last record written (CONTINUE is relative to it)
    block: bytes | None = None  # the block of the last record read
    records = dropped = 0
    while True:
        kind = r.byte()
        if kind not in (SECTION_START, SECTION_PART, SECTION_END):
            out.append(buf[r.pos - 1:])  # device state: as it is
            break
        head = r.pos - 1
        section = r.be32()
        if kind == SECTION_START:
            if r.name() != b"ram" or ram_id is not None:
                raise StreamFormatError("an iterative section other than ram")
            ram_id = section
            r.be32(), r.be32()  # instance, version
        elif section != ram_id:
            raise StreamFormatError("a part of a section other than ram")
        out.append(buf[head:r.pos])
        while True:
            start = r.pos
            word = r.be64()
            flags, addr = word & (PAGE - 1), word & ~(PAGE - 1)
            if flags & ~KNOWN_FLAGS:
                raise StreamFormatError(f"unsupported RAM record flags {flags:#x}")
            if flags & FLAG_EOS:
                out.append(buf[start:r.pos])
                break
            if flags & FLAG_MEM_SIZE:
                total = addr
                while total > 0:
                    name = r.name()
                    length = r.be64()
                    blocks[name] = bytearray((length + PAGE - 1) // PAGE)
                    total -= length
                if total != 0:
                    raise StreamFormatError("RAM block sizes do not add up")
                out.append(buf[start:r.pos])
                continue
            if flags & FLAG_CONTINUE:
                if block is None:
                    raise StreamFormatError("a continued record with no block before it")
            else:
                block = r.name()
            assert block is not None
            pages = blocks.get(block)
            index = addr // PAGE
            if pages is None or index >= len(pages):
                raise StreamFormatError("a page record outside the RAM blocks")
            records += 1
            payload: bytes | memoryview
            if flags & FLAG_ZERO:
                fill = r.byte()
                if fill == 0 and not pages[index]:
                    dropped += 1
                    continue
                payload = bytes([fill])
                pages[index] = 1
            elif flags & FLAG_PAGE:
                payload = r.take(PAGE)
                pages[index] = 1
            else:
                raise StreamFormatError(f"unsupported RAM record flags {flags:#x}")
            kept = (flags & ~FLAG_CONTINUE) | (FLAG_CONTINUE if block == last_out else 0)
            header = _BE64.pack(addr | kept)
            if not kept & FLAG_CONTINUE:
                header += bytes([len(block)]) + block
            out.append(header)
            out.append(payload)
            last_out = block
        if r.byte() != FOOTER or r.be32() != section:
            raise StreamFormatError("a RAM section without its footer")
        out.append(buf[r.pos - 5:r.pos])
    size_out = sum(len(p) for p in out)
    return out, DropStats(records, dropped, len(buf), size_out)


__all__ = ["DropStats", "StreamFormatError", "drop_untouched_zero_pages"]
