"""UDP (RFC 768). Only DHCP and DNS are served; every other datagram is dropped."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gondolin.net.errors import PacketError
from gondolin.net.ipv4 import PROTO_UDP, checksum, pseudo_header

HEADER_LEN = 8
_HEADER = struct.Struct("!HHHH")


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    src_port: int
    dst_port: int
    payload: bytes

    @classmethod
    def parse(cls, data: bytes, src_ip: bytes, dst_ip: bytes) -> UdpDatagram:
        if len(data) < HEADER_LEN:
            raise PacketError("udp-short")
        src_port, dst_port, length, csum = _HEADER.unpack_from(data)
        if length < HEADER_LEN or length > len(data):
            raise PacketError("udp-bad-length")
        datagram = data[:length]
        # A zero checksum means the sender did not compute one (allowed over IPv4).
        if csum != 0 and checksum(pseudo_header(src_ip, dst_ip, PROTO_UDP, length) + datagram):
            raise PacketError("udp-checksum")
        return cls(src_port, dst_port, bytes(datagram[HEADER_LEN:]))

    def build(self, src_ip: bytes, dst_ip: bytes) -> bytes:
        length = HEADER_LEN + len(self.payload)
        body = bytearray(_HEADER.pack(self.src_port, self.dst_port, length, 0) + self.payload)
        csum = checksum(pseudo_header(src_ip, dst_ip, PROTO_UDP, length) + body) or 0xFFFF
        struct.pack_into("!H", body, 6, csum)
        return bytes(body)
