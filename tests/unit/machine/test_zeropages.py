"""Dropping the zero-page records nothing needs from a QEMU 7.2 migration stream (synthetic
streams in QEMU's format; a tiny loader checks that both streams load the same memory)."""

import struct
from pathlib import Path

import pytest

from gondolin.machine.zeropages import (
    FLAG_CONTINUE,
    FLAG_EOS,
    FLAG_MEM_SIZE,
    FLAG_PAGE,
    FLAG_ZERO,
    PAGE,
    StreamFormatError,
    drop_untouched_zero_pages,
)

BLOCKS = {b"mem": 64 * PAGE, b"pc.rom": 4 * PAGE}
DEVICES = b"\x04\x00\x00\x00\x03\x05timer" + bytes(range(40)) + b"\x00"  # a FULL section and EOF, opaque


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


class Writer:
    """Writes records the way QEMU's ram_save_page_header does (CONTINUE for the same block)."""

    def __init__(self) -> None:
        self.out = bytearray(struct.pack(">II", 0x5145564D, 3) + b"\x07" + struct.pack(">I", 13) + b"pc-i440fx-7.2")
        self.last: bytes | None = None

    def section(self, kind: int, first: bool = False) -> None:
        self.out += bytes([kind]) + struct.pack(">I", 2)
        if first:
            self.out += b"\x03ram" + struct.pack(">II", 0, 4)
            self.out += be64(sum(BLOCKS.values()) | FLAG_MEM_SIZE)
            for name, size in BLOCKS.items():
                self.out += bytes([len(name)]) + name + be64(size)
            self.end()

    def record(self, block: bytes, page: int, flag: int, payload: bytes) -> None:
        cont = FLAG_CONTINUE if block == self.last else 0
        self.out += be64(page * PAGE | flag | cont)
        if not cont:
            self.out += bytes([len(block)]) + block
        self.out += payload
        self.last = block

    def zero(self, block: bytes, page: int, fill: int = 0) -> None:
        self.record(block, page, FLAG_ZERO, bytes([fill]))

    def page(self, block: bytes, page: int, byte: int) -> None:
        self.record(block, page, FLAG_PAGE, bytes([byte]) * PAGE)

    def end(self) -> None:
        self.out += be64(FLAG_EOS)

    def footer(self) -> None:
        self.out += b"\x7e" + struct.pack(">I", 2)


def load(stream: bytes) -> tuple[dict[tuple[bytes, int], bytes], bytes, int]:
    """The memory a stream leaves in zeroed RAM, the bytes after the RAM sections, and how
    many zero-page records it holds (a loader as strict as QEMU's about CONTINUE)."""
    mem: dict[tuple[bytes, int], bytes] = {}
    pos = 8
    assert stream[pos] == 7
    pos += 5 + struct.unpack_from(">I", stream, pos + 1)[0]
    block = None
    zeros = 0
    while stream[pos] in (1, 2, 3):
        kind = stream[pos]
        pos += 5
        if kind == 1:
            pos += 1 + stream[pos] + 8
        while True:
            word = struct.unpack_from(">Q", stream, pos)[0]
            pos += 8
            flags, addr = word & (PAGE - 1), word & ~(PAGE - 1)
            if flags & FLAG_EOS:
                break
            if flags & FLAG_MEM_SIZE:
                for _ in BLOCKS:
                    pos += 1 + stream[pos] + 8
                continue
            if not flags & FLAG_CONTINUE:
                block = bytes(stream[pos + 1:pos + 1 + stream[pos]])
                pos += 1 + stream[pos]
            assert block is not None, "CONTINUE with no block"
            if flags & FLAG_ZERO:
                zeros += 1
                mem[(block, addr // PAGE)] = bytes([stream[pos]]) * PAGE
                pos += 1
            else:
                mem[(block, addr // PAGE)] = bytes(stream[pos:pos + PAGE])
                pos += PAGE
        assert stream[pos] == 0x7E
        pos += 5
    zeroed = {k: v for k, v in mem.items() if v != bytes(PAGE)}
    return zeroed, stream[pos:], zeros


def sample() -> bytes:
    w = Writer()
    w.section(1, first=True)  # the block list only, as QEMU's ram_save_setup writes it
    w.footer()
    w.section(2)
    for p in range(64):  # the bulk pass: most pages zero
        if p in (3, 4, 10):
            w.page(b"mem", p, p)
        else:
            w.zero(b"mem", p)
    w.zero(b"pc.rom", 0)
    w.page(b"pc.rom", 1, 0xAA)
    w.end()
    w.footer()
    w.section(2)  # a later pass: page 3 became zero (must stay), page 20 written, 21 zero again
    w.zero(b"mem", 3)
    w.page(b"mem", 20, 7)
    w.zero(b"mem", 21)
    w.zero(b"pc.rom", 1, fill=0x55)
    w.end()
    w.footer()
    w.section(3)
    w.zero(b"mem", 20)
    w.zero(b"mem", 30)
    w.end()
    w.footer()
    w.out += DEVICES
    return bytes(w.out)


def test_the_rewritten_stream_loads_the_same_memory(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(sample())
    stats = drop_untouched_zero_pages(src, dst)
    before, tail_before, zeros_before = load(src.read_bytes())
    after, tail_after, zeros_after = load(dst.read_bytes())
    assert after == before and tail_after == tail_before == DEVICES
    # Kept: page 3 and 20 zeroed after a write, pc.rom page 1 filled with 0x55.
    assert zeros_after == 3 and stats.dropped == zeros_before - zeros_after
    assert stats.size_out == dst.stat().st_size < stats.size_in


@pytest.mark.parametrize("damage", ["magic", "flag", "section", "footer", "truncated", "block"])
def test_streams_it_does_not_know_are_refused(tmp_path: Path, damage: str) -> None:
    data = bytearray(sample())
    first_record = data.index(b"\x03mem", 60) - 8
    if damage == "magic":
        data[0] = 0
    elif damage == "flag":
        data[first_record + 7] |= 0x40  # XBZRLE
    elif damage == "section":
        data[data.index(b"\x03ram") - 5 + 0] = 1
        data[data.index(b"\x03ram") + 1:data.index(b"\x03ram") + 4] = b"blk"
    elif damage == "footer":
        data[data.index(b"\x7e\x00\x00\x00\x02")] = 0x7D
    elif damage == "truncated":
        del data[first_record + 20:]
    elif damage == "block":
        data[first_record + 9:first_record + 12] = b"xyz"
    src = tmp_path / "in.bin"
    src.write_bytes(bytes(data))
    with pytest.raises(StreamFormatError):
        drop_untouched_zero_pages(src, tmp_path / "out.bin")
