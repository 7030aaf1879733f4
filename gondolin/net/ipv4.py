"""IPv4 (RFC 791) and the Internet checksum (RFC 1071).

Fragments are dropped (the guest's TCP never needs them: it learns our MSS, and the virtual
link carries any packet size up to 65535 bytes; reassembly would be a memory sink the guest
controls). Options are skipped, never interpreted.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from gondolin.net.errors import PacketError

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

MIN_HEADER_LEN = 20
DEFAULT_TTL = 64
_FLAG_DF = 0x4000
_FLAG_MF = 0x2000
_OFFSET_MASK = 0x1FFF

_HEADER = struct.Struct("!BBHHHBBH4s4s")


def checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 one's-complement checksum; 0 when run over data that includes a valid checksum.

    The one's-complement sum of 16-bit words equals the big-endian integer modulo 0xFFFF
    (2**16 == 1 mod 0xFFFF), which CPython computes far faster than a word loop.
    """
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    n = int.from_bytes(data, "big")
    total = n % 0xFFFF
    if total == 0 and n != 0:
        total = 0xFFFF
    return ~total & 0xFFFF


def pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    """The TCP/UDP checksum pseudo-header (RFC 793 section 3.1, RFC 768)."""
    return src + dst + struct.pack("!BBH", 0, proto, length)


def ip_to_str(ip: bytes) -> str:
    return str(ipaddress.IPv4Address(ip))


def ip_from_str(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


@dataclass(frozen=True, slots=True)
class Ipv4Packet:
    src: bytes
    dst: bytes
    proto: int
    payload: bytes
    ttl: int = DEFAULT_TTL

    @classmethod
    def parse(cls, data: bytes) -> Ipv4Packet:
        if len(data) < MIN_HEADER_LEN:
            raise PacketError("ip-short")
        ver_ihl, _tos, total_len, _ident, flags_frag, ttl, proto, _csum, src, dst = (
            _HEADER.unpack_from(data)
        )
        if ver_ihl >> 4 != 4:
            raise PacketError("ip-version")
        header_len = (ver_ihl & 0x0F) * 4
        if header_len < MIN_HEADER_LEN or header_len > len(data):
            raise PacketError("ip-bad-ihl")
        # Ethernet may pad the frame past total_len; the rest must be present.
        if total_len < header_len or total_len > len(data):
            raise PacketError("ip-bad-length")
        if checksum(memoryview(data)[:header_len]) != 0:
            raise PacketError("ip-checksum")
        if flags_frag & _FLAG_MF or flags_frag & _OFFSET_MASK:
            raise PacketError("ip-fragment")
        return cls(src, dst, proto, bytes(data[header_len:total_len]), ttl)


def build_packet(src: bytes, dst: bytes, proto: int, payload: bytes, ident: int = 0,
                 ttl: int = DEFAULT_TTL) -> bytes:
    header = bytearray(
        _HEADER.pack(0x45, 0, MIN_HEADER_LEN + len(payload), ident & 0xFFFF, _FLAG_DF, ttl,
                     proto, 0, src, dst)
    )
    struct.pack_into("!H", header, 10, checksum(header))
    return bytes(header) + payload
