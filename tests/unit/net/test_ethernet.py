import pytest

from gondolin.net.errors import PacketError
from gondolin.net.ethernet import (
    ETHERTYPE_ARP,
    MAX_FRAME_LEN,
    EthernetFrame,
    build_frame,
    mac_from_str,
    mac_to_str,
)


def test_roundtrip() -> None:
    dst, src = mac_from_str("5a:94:ef:e4:0c:dd"), mac_from_str("52:54:00:12:34:56")
    frame = EthernetFrame.parse(build_frame(dst, src, ETHERTYPE_ARP, b"payload"))
    assert (frame.dst, frame.src, frame.ethertype, frame.payload) == (
        dst, src, ETHERTYPE_ARP, b"payload")
    assert frame.build() == build_frame(dst, src, ETHERTYPE_ARP, b"payload")
    assert mac_to_str(dst) == "5a:94:ef:e4:0c:dd"


@pytest.mark.parametrize(("raw", "reason"), [
    (b"\x00" * 13, "eth-short"),
    (b"\x00" * (MAX_FRAME_LEN + 1), "eth-oversize"),
])
def test_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as info:
        EthernetFrame.parse(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize("text", ["", "1:2:3", "zz:00:00:00:00:00", "1:2:3:4:5:6:7"])
def test_bad_mac_text(text: str) -> None:
    with pytest.raises(ValueError):
        mac_from_str(text)
