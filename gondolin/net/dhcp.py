"""A one-lease DHCP server (RFC 2131, options RFC 2132): the guest always gets the same address."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gondolin.net.errors import PacketError

SERVER_PORT = 67
CLIENT_PORT = 68

_FIXED = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")  # RFC 2131 section 2, 236 bytes
_MAGIC = b"\x63\x82\x53\x63"
_OPTIONS_AT = _FIXED.size + len(_MAGIC)
_BOOTREQUEST = 1
_BOOTREPLY = 2
_FLAG_BROADCAST = 0x8000

# Message types (option 53).
DISCOVER = 1
OFFER = 2
REQUEST = 3
DECLINE = 4
ACK = 5
NAK = 6
RELEASE = 7
INFORM = 8

OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_INTERFACE_MTU = 26  # RFC 2132 section 5.1
MIN_MTU = 68  # RFC 791: every IPv4 host must handle this
OPT_BROADCAST = 28
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_END = 255

DEFAULT_LEASE_SECONDS = 86400


@dataclass(frozen=True, slots=True)
class DhcpMessage:
    op: int
    xid: int
    flags: int
    ciaddr: bytes
    chaddr: bytes  # 6-byte client MAC
    message_type: int
    requested_ip: bytes | None
    server_id: bytes | None

    @classmethod
    def parse(cls, data: bytes) -> DhcpMessage:
        if len(data) < _OPTIONS_AT:
            raise PacketError("dhcp-short")
        (op, htype, hlen, _hops, xid, _secs, flags, ciaddr, _yiaddr, _siaddr, _giaddr, chaddr,
         _sname, _file) = _FIXED.unpack_from(data)
        if htype != 1 or hlen != 6:
            raise PacketError("dhcp-hardware")
        if data[_FIXED.size:_OPTIONS_AT] != _MAGIC:
            raise PacketError("dhcp-magic")
        options = _parse_options(data[_OPTIONS_AT:])
        msg_type = options.get(OPT_MESSAGE_TYPE)
        if msg_type is None or len(msg_type) != 1:
            raise PacketError("dhcp-no-type")
        requested = options.get(OPT_REQUESTED_IP)
        server_id = options.get(OPT_SERVER_ID)
        return cls(
            op, xid, flags, ciaddr, chaddr[:6], msg_type[0],
            requested if requested is not None and len(requested) == 4 else None,
            server_id if server_id is not None and len(server_id) == 4 else None,
        )


def _parse_options(data: bytes) -> dict[int, bytes]:
    """Options as code -> value; the first occurrence wins. Bounded by the datagram size."""
    options: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        code = data[i]
        if code == OPT_END:
            break
        if code == OPT_PAD:
            i += 1
            continue
        if i + 1 >= len(data):
            raise PacketError("dhcp-options")
        length = data[i + 1]
        value = data[i + 2:i + 2 + length]
        if len(value) != length:
            raise PacketError("dhcp-options")
        options.setdefault(code, bytes(value))
        i += 2 + length
    return options


@dataclass(frozen=True, slots=True)
class DhcpReply:
    payload: bytes
    broadcast: bool  # send to 255.255.255.255 / ff:ff:ff:ff:ff:ff instead of the client
    client_mac: bytes


@dataclass(frozen=True, slots=True)
class DhcpServer:
    server_ip: bytes
    client_ip: bytes
    netmask: bytes
    dns_servers: tuple[bytes, ...]
    lease_seconds: int = DEFAULT_LEASE_SECONDS
    mtu: int | None = None  # advertised when set (68..65535)

    def handle(self, msg: DhcpMessage) -> DhcpReply | None:
        """The server's answer to one client message, or None when it needs none."""
        if msg.op != _BOOTREQUEST:
            return None
        if msg.message_type == DISCOVER:
            return self._reply(msg, OFFER)
        if msg.message_type == REQUEST:
            if msg.server_id is not None and msg.server_id != self.server_ip:
                return None  # the client chose another server
            wanted = msg.requested_ip or (msg.ciaddr if msg.ciaddr != b"\0\0\0\0" else None)
            if wanted is not None and wanted != self.client_ip:
                return self._reply(msg, NAK)
            return self._reply(msg, ACK)
        if msg.message_type == INFORM:
            return self._reply(msg, ACK, lease=False)
        return None  # DECLINE / RELEASE: nothing to do with a single fixed lease

    def _reply(self, msg: DhcpMessage, msg_type: int, lease: bool = True) -> DhcpReply:
        yiaddr = self.client_ip if msg_type in (OFFER, ACK) and lease else b"\0\0\0\0"
        fixed = _FIXED.pack(
            _BOOTREPLY, 1, 6, 0, msg.xid, 0, msg.flags, msg.ciaddr, yiaddr, b"\0\0\0\0",
            b"\0\0\0\0", msg.chaddr.ljust(16, b"\0"), b"", b"",
        )
        opts = bytearray(_opt(OPT_MESSAGE_TYPE, bytes([msg_type])))
        opts += _opt(OPT_SERVER_ID, self.server_ip)
        if msg_type != NAK:
            if lease:
                opts += _opt(OPT_LEASE_TIME, struct.pack("!I", self.lease_seconds))
            opts += _opt(OPT_SUBNET_MASK, self.netmask)
            opts += _opt(OPT_ROUTER, self.server_ip)
            if self.dns_servers:
                opts += _opt(OPT_DNS, b"".join(self.dns_servers[:8]))
            opts += _opt(OPT_BROADCAST, _broadcast(self.client_ip, self.netmask))
            if self.mtu is not None:
                opts += _opt(OPT_INTERFACE_MTU, struct.pack("!H", self.mtu))
        opts.append(OPT_END)
        broadcast = bool(msg.flags & _FLAG_BROADCAST) or msg_type == NAK
        return DhcpReply(fixed + _MAGIC + bytes(opts), broadcast, msg.chaddr)


def _opt(code: int, value: bytes) -> bytes:
    return bytes([code, len(value)]) + value


def _broadcast(ip: bytes, mask: bytes) -> bytes:
    return bytes(a | (~m & 0xFF) for a, m in zip(ip, mask, strict=True))
