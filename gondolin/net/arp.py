"""ARP for IPv4 over Ethernet (RFC 826): the stack answers requests for the gateway only."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gondolin.net.errors import PacketError

PACKET_LEN = 28
OP_REQUEST = 1
OP_REPLY = 2
_HTYPE_ETHERNET = 1
_PTYPE_IPV4 = 0x0800

_PACKET = struct.Struct("!HHBBH6s4s6s4s")


@dataclass(frozen=True, slots=True)
class ArpPacket:
    op: int
    sender_mac: bytes
    sender_ip: bytes  # 4 raw bytes
    target_mac: bytes
    target_ip: bytes

    @classmethod
    def parse(cls, data: bytes) -> ArpPacket:
        # Ethernet pads short frames, so trailing bytes are allowed.
        if len(data) < PACKET_LEN:
            raise PacketError("arp-short")
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _PACKET.unpack_from(data)
        if htype != _HTYPE_ETHERNET or ptype != _PTYPE_IPV4 or hlen != 6 or plen != 4:
            raise PacketError("arp-unsupported")
        if op not in (OP_REQUEST, OP_REPLY):
            raise PacketError("arp-bad-op")
        return cls(op, sha, spa, tha, tpa)

    def build(self) -> bytes:
        return _PACKET.pack(
            _HTYPE_ETHERNET, _PTYPE_IPV4, 6, 4, self.op,
            self.sender_mac, self.sender_ip, self.target_mac, self.target_ip,
        )


def reply_for(request: ArpPacket, our_mac: bytes) -> ArpPacket:
    """The reply telling the requester that ``request.target_ip`` is at ``our_mac``."""
    return ArpPacket(OP_REPLY, our_mac, request.target_ip, request.sender_mac, request.sender_ip)
