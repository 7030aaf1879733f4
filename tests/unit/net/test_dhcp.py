import struct

import pytest

from gondolin.net import dhcp
from gondolin.net.errors import PacketError

MAC = bytes.fromhex("525400123456")
GW = bytes([192, 168, 127, 1])
GUEST = bytes([192, 168, 127, 3])
SERVER = dhcp.DhcpServer(GW, GUEST, bytes([255, 255, 255, 0]), (GW,))


def client_message(msg_type: int, *, options: bytes = b"", flags: int = 0x8000,
                   ciaddr: bytes = bytes(4), xid: int = 0xCAFEF00D) -> bytes:
    fixed = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, flags, ciaddr,
                        bytes(4), bytes(4), bytes(4), MAC.ljust(16, b"\0"), b"", b"")
    return fixed + b"\x63\x82\x53\x63" + bytes([53, 1, msg_type]) + options + b"\xff"


def reply_options(payload: bytes) -> dict[int, bytes]:
    return dhcp._parse_options(payload[240:])


def test_discover_gets_offer_with_everything_the_guest_needs() -> None:
    reply = SERVER.handle(dhcp.DhcpMessage.parse(client_message(dhcp.DISCOVER)))
    assert reply is not None and reply.broadcast and reply.client_mac == MAC
    payload = reply.payload
    assert payload[0] == 2  # BOOTREPLY
    assert struct.unpack_from("!I", payload, 4)[0] == 0xCAFEF00D  # xid echoed
    assert payload[16:20] == GUEST  # yiaddr
    opts = reply_options(payload)
    assert opts[dhcp.OPT_MESSAGE_TYPE] == bytes([dhcp.OFFER])
    assert opts[dhcp.OPT_SERVER_ID] == GW
    assert opts[dhcp.OPT_ROUTER] == GW
    assert opts[dhcp.OPT_DNS] == GW
    assert opts[dhcp.OPT_SUBNET_MASK] == bytes([255, 255, 255, 0])
    assert opts[dhcp.OPT_BROADCAST] == bytes([192, 168, 127, 255])
    assert struct.unpack("!I", opts[dhcp.OPT_LEASE_TIME])[0] == dhcp.DEFAULT_LEASE_SECONDS
    assert dhcp.OPT_INTERFACE_MTU not in opts  # the guest keeps its default unless configured


def test_mtu_is_advertised_when_configured() -> None:
    server = dhcp.DhcpServer(GW, GUEST, bytes([255, 255, 255, 0]), (GW,), mtu=65520)
    for msg_type in (dhcp.DISCOVER, dhcp.REQUEST):
        reply = server.handle(dhcp.DhcpMessage.parse(client_message(msg_type)))
        assert reply is not None
        assert reply_options(reply.payload)[dhcp.OPT_INTERFACE_MTU] == struct.pack("!H", 65520)


@pytest.mark.parametrize(("options", "ciaddr", "expected"), [
    (bytes([50, 4]) + GUEST + bytes([54, 4]) + GW, bytes(4), dhcp.ACK),
    (b"", GUEST, dhcp.ACK),  # renewing: address in ciaddr
    (b"", bytes(4), dhcp.ACK),
    (bytes([50, 4, 10, 0, 0, 9]), bytes(4), dhcp.NAK),  # asks for an address we never gave
])
def test_request(options: bytes, ciaddr: bytes, expected: int) -> None:
    msg = dhcp.DhcpMessage.parse(client_message(dhcp.REQUEST, options=options, ciaddr=ciaddr))
    reply = SERVER.handle(msg)
    assert reply is not None
    assert reply_options(reply.payload)[dhcp.OPT_MESSAGE_TYPE] == bytes([expected])


def test_request_for_another_server_is_ignored() -> None:
    msg = dhcp.DhcpMessage.parse(
        client_message(dhcp.REQUEST, options=bytes([54, 4, 10, 0, 0, 1])))
    assert SERVER.handle(msg) is None


def test_unicast_reply_when_client_can_receive_it() -> None:
    reply = SERVER.handle(dhcp.DhcpMessage.parse(client_message(dhcp.DISCOVER, flags=0)))
    assert reply is not None and not reply.broadcast


@pytest.mark.parametrize("msg_type", [dhcp.RELEASE, dhcp.DECLINE, dhcp.OFFER, 99])
def test_messages_needing_no_reply(msg_type: int) -> None:
    assert SERVER.handle(dhcp.DhcpMessage.parse(client_message(msg_type))) is None


@pytest.mark.parametrize(("raw", "reason"), [
    (b"\x01" * 100, "dhcp-short"),
    (client_message(1)[:236] + b"\x00\x00\x00\x00\x35\x01\x01\xff", "dhcp-magic"),
    (client_message(1)[:240] + b"\xff", "dhcp-no-type"),
    (client_message(1)[:240] + b"\x35\x05\x01", "dhcp-options"),  # length past the end
    (client_message(1)[:240] + b"\x35", "dhcp-options"),
    (b"\x01\x06" + client_message(1)[2:], "dhcp-hardware"),
])
def test_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as info:
        dhcp.DhcpMessage.parse(raw)
    assert info.value.reason == reason
