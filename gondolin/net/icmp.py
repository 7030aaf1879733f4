"""ICMP echo (RFC 792): every echo request gets a synthetic reply, whatever its destination."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gondolin.net.errors import PacketError
from gondolin.net.ipv4 import checksum

TYPE_ECHO_REPLY = 0
TYPE_ECHO_REQUEST = 8
_HEADER = struct.Struct("!BBHHH")  # type code checksum identifier sequence


@dataclass(frozen=True, slots=True)
class IcmpEcho:
    type: int
    ident: int
    seq: int
    payload: bytes

    @classmethod
    def parse(cls, data: bytes) -> IcmpEcho:
        if len(data) < _HEADER.size:
            raise PacketError("icmp-short")
        if checksum(data) != 0:
            raise PacketError("icmp-checksum")
        icmp_type, code, _csum, ident, seq = _HEADER.unpack_from(data)
        if icmp_type not in (TYPE_ECHO_REQUEST, TYPE_ECHO_REPLY) or code != 0:
            raise PacketError("icmp-unsupported")
        return cls(icmp_type, ident, seq, bytes(data[_HEADER.size:]))

    def build(self) -> bytes:
        body = bytearray(_HEADER.pack(self.type, 0, 0, self.ident, self.seq) + self.payload)
        struct.pack_into("!H", body, 2, checksum(body))
        return bytes(body)


def echo_reply(request: IcmpEcho) -> IcmpEcho:
    return IcmpEcho(TYPE_ECHO_REPLY, request.ident, request.seq, request.payload)
