import pytest

from gondolin.net.errors import PacketError
from gondolin.net.udp import UdpDatagram

SRC, DST = bytes([192, 168, 127, 3]), bytes([192, 168, 127, 1])


def test_roundtrip_with_checksum() -> None:
    raw = UdpDatagram(5353, 53, b"query").build(SRC, DST)
    assert raw[6:8] != b"\x00\x00"
    assert UdpDatagram.parse(raw, SRC, DST) == UdpDatagram(5353, 53, b"query")


def test_zero_checksum_means_none() -> None:
    raw = bytearray(UdpDatagram(1, 2, b"x").build(SRC, DST))
    raw[6:8] = b"\x00\x00"
    assert UdpDatagram.parse(bytes(raw), SRC, DST).payload == b"x"


def test_checksum_covers_pseudo_header() -> None:
    raw = UdpDatagram(1, 2, b"x").build(SRC, DST)
    with pytest.raises(PacketError, match="udp-checksum"):
        UdpDatagram.parse(raw, SRC, bytes([192, 168, 127, 9]))


@pytest.mark.parametrize(("raw", "reason"), [
    (b"\x00" * 7, "udp-short"),
    (b"\x00\x01\x00\x02\x00\x04\x00\x00", "udp-bad-length"),
    (b"\x00\x01\x00\x02\x00\x20\x00\x00", "udp-bad-length"),
])
def test_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as info:
        UdpDatagram.parse(raw, SRC, DST)
    assert info.value.reason == reason
