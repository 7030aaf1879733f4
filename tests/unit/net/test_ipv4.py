import struct

import pytest

from gondolin.net.errors import PacketError
from gondolin.net.ipv4 import PROTO_UDP, Ipv4Packet, build_packet, checksum

# RFC 1071 section 3 worked example: words 0001 f203 f4f5 f6f7 sum to ddf2, checksum 220d.
RFC1071_DATA = bytes.fromhex("0001f203f4f5f6f7")
# A real IPv4 header (Wikipedia "IPv4 header checksum" example) with checksum b861.
REAL_HEADER = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (RFC1071_DATA, 0x220D),
        (REAL_HEADER, 0xB861),
        (b"", 0xFFFF),
        (b"\x00\x00", 0xFFFF),
        (b"\xff\xff", 0x0000),
        (b"\x01", 0xFEFF),  # odd length: padded with a zero byte
    ],
)
def test_checksum_known_values(data: bytes, expected: int) -> None:
    assert checksum(data) == expected


def test_checksum_of_data_with_its_checksum_is_zero() -> None:
    header = bytearray(REAL_HEADER)
    struct.pack_into("!H", header, 10, checksum(header))
    assert checksum(header) == 0


def test_build_then_parse_roundtrip() -> None:
    raw = build_packet(b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", PROTO_UDP, b"hello", ident=9)
    packet = Ipv4Packet.parse(raw + b"\x00" * 6)  # Ethernet padding is tolerated
    assert (packet.src, packet.dst, packet.proto, packet.payload) == (
        b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", PROTO_UDP, b"hello")


def _header(**overrides: int) -> bytearray:
    fields = {"ver_ihl": 0x45, "total": 25, "flags": 0x4000, "proto": PROTO_UDP}
    fields.update(overrides)
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", fields["ver_ihl"], 0, fields["total"], 1,
                                fields["flags"], 64, fields["proto"], 0, b"\x01\x02\x03\x04",
                                b"\x05\x06\x07\x08"))
    ihl = (fields["ver_ihl"] & 0xF) * 4
    hdr += b"\x00" * (ihl - 20)  # options (all zero: end-of-list)
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return hdr


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x45" * 10, "ip-short"),
        (bytes(_header(ver_ihl=0x65)) + b"12345", "ip-version"),
        (bytes(_header(ver_ihl=0x44)) + b"12345", "ip-bad-ihl"),
        (bytes(_header(total=200)) + b"12345", "ip-bad-length"),
        (bytes(_header(total=10)) + b"12345", "ip-bad-length"),
        (bytes(_header(flags=0x2000)) + b"12345", "ip-fragment"),  # more fragments
        (bytes(_header(flags=0x0010)) + b"12345", "ip-fragment"),  # non-zero offset
    ],
)
def test_parse_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as info:
        Ipv4Packet.parse(raw)
    assert info.value.reason == reason


def test_bad_header_checksum_rejected() -> None:
    hdr = _header()
    hdr[8] ^= 0xFF  # TTL changed after the checksum was computed
    with pytest.raises(PacketError, match="ip-checksum"):
        Ipv4Packet.parse(bytes(hdr) + b"12345")


def test_options_are_skipped() -> None:
    hdr = _header(ver_ihl=0x46, total=29)
    packet = Ipv4Packet.parse(bytes(hdr) + b"12345")
    assert packet.payload == b"12345"
