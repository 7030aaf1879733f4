import pytest

from gondolin.net.errors import PacketError
from gondolin.net.icmp import TYPE_ECHO_REPLY, TYPE_ECHO_REQUEST, IcmpEcho, echo_reply
from gondolin.net.ipv4 import checksum

# "ping" echo request, identifier 0x1234, sequence 1, payload "abcd", checksum 0x2104 by hand.
REQUEST = bytes.fromhex("080021041234000161626364")


def test_known_request_parses() -> None:
    assert checksum(REQUEST) == 0
    echo = IcmpEcho.parse(REQUEST)
    assert (echo.type, echo.ident, echo.seq, echo.payload) == (
        TYPE_ECHO_REQUEST, 0x1234, 1, b"abcd")


def test_reply_echoes_identifier_sequence_payload() -> None:
    reply = echo_reply(IcmpEcho.parse(REQUEST)).build()
    assert checksum(reply) == 0
    parsed = IcmpEcho.parse(reply)
    assert (parsed.type, parsed.ident, parsed.seq, parsed.payload) == (
        TYPE_ECHO_REPLY, 0x1234, 1, b"abcd")


@pytest.mark.parametrize(("raw", "reason"), [
    (REQUEST[:7], "icmp-short"),
    (REQUEST[:-1] + b"e", "icmp-checksum"),
    (IcmpEcho(3, 0, 0, b"").build(), "icmp-unsupported"),  # destination unreachable
])
def test_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as info:
        IcmpEcho.parse(raw)
    assert info.value.reason == reason
