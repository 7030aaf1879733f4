import pytest

from gondolin.net.arp import OP_REPLY, OP_REQUEST, ArpPacket, reply_for
from gondolin.net.errors import PacketError

GW_MAC = bytes.fromhex("5a94efe40cdd")
GUEST_MAC = bytes.fromhex("525400123456")
REQUEST = bytes.fromhex(
    "0001080006040001" "525400123456" "c0a87f03" "000000000000" "c0a87f01")


def test_parse_request_from_the_wire() -> None:
    packet = ArpPacket.parse(REQUEST + b"\x00" * 18)  # with Ethernet minimum-size padding
    assert packet.op == OP_REQUEST
    assert packet.sender_mac == GUEST_MAC
    assert packet.target_ip == bytes([192, 168, 127, 1])


def test_reply_swaps_roles() -> None:
    reply = reply_for(ArpPacket.parse(REQUEST), GW_MAC)
    raw = reply.build()
    assert raw == bytes.fromhex(
        "0001080006040002" "5a94efe40cdd" "c0a87f01" "525400123456" "c0a87f03")
    assert ArpPacket.parse(raw).op == OP_REPLY


@pytest.mark.parametrize(("raw", "reason"), [
    (REQUEST[:27], "arp-short"),
    (b"\x00\x06" + REQUEST[2:], "arp-unsupported"),  # token ring
    (REQUEST[:6] + b"\x00\x09" + REQUEST[8:], "arp-bad-op"),
])
def test_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as info:
        ArpPacket.parse(raw)
    assert info.value.reason == reason
