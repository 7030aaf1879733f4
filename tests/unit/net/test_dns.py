import struct

import pytest

from gondolin.net import dns
from gondolin.net.errors import PacketError

GW = bytes([192, 168, 127, 1])


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.split(".") if name else []:
        out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def query(name: str = "example.com", qtype: int = dns.TYPE_A, *, qid: int = 0xBEEF,
          flags: int = 0x0100, qdcount: int = 1, ancount: int = 0, arcount: int = 0,
          extra: bytes = b"") -> bytes:
    header = struct.pack("!HHHHHH", qid, flags, qdcount, ancount, 0, arcount)
    return header + encode_name(name) + struct.pack("!HH", qtype, dns.CLASS_IN) + extra


def parse_answer(payload: bytes) -> tuple[int, int, list[bytes]]:
    """(flags, rcode, A addresses) of a reply built by this module."""
    _qid, flags, qd, an, _ns, _ar = struct.unpack_from("!HHHHHH", payload)
    assert qd == 1
    pos = 12
    while payload[pos]:
        pos += payload[pos] + 1
    pos += 5
    addrs = []
    for _ in range(an):
        ptr, rtype, rclass, _ttl, rdlen = struct.unpack_from("!HHHIH", payload, pos)
        assert (ptr, rtype, rclass, rdlen) == (0xC00C, dns.TYPE_A, dns.CLASS_IN, 4)
        addrs.append(payload[pos + 12:pos + 16])
        pos += 16
    assert pos == len(payload)
    return flags, flags & 0xF, addrs


def synthetic(capacity: int = 16) -> dns.DnsResolver:
    return dns.DnsResolver(dns.DnsMode.SYNTHETIC, dns.SyntheticNames(capacity))


def answer(resolver: dns.DnsResolver, payload: bytes) -> bytes:
    action = resolver.handle(payload, GW, GW)
    assert isinstance(action, dns.DnsAnswer)
    return action.payload


def test_parse_query() -> None:
    q = dns.parse_query(query("WWW.Example.COM", extra=b""))
    assert q.id == 0xBEEF
    assert q.question.name == "www.example.com"
    assert q.question.qtype == dns.TYPE_A
    assert q.question.wire == encode_name("WWW.Example.COM") + b"\x00\x01\x00\x01"


def test_edns_additional_record_is_tolerated() -> None:
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    assert dns.parse_query(query(arcount=1, extra=opt)).question.name == "example.com"


HOSTILE = [
    (b"\x00" * 11, "dns-short"),
    (query(extra=b"\x00" * 600), "dns-oversize"),
    (query(flags=0x8100), "dns-not-query"),  # a response
    (query(flags=0x2800), "dns-not-query"),  # opcode UPDATE
    (query(qdcount=0), "dns-counts"),
    (query(qdcount=5), "dns-counts"),
    (query(ancount=1), "dns-counts"),
    (query(arcount=3), "dns-counts"),
    (query(qdcount=2), "dns-truncated"),  # claims two questions, carries one
    (query()[:-3], "dns-truncated"),
    (query()[:14], "dns-truncated"),
    # A compression pointer to itself: would loop forever in a naive parser.
    (struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01", "dns-pointer"),
    (struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x40abc\x00\x00\x01\x00\x01", "dns-pointer"),
    (query("a" * 64 + ".com"), "dns-pointer"),  # 64 = 0x40: a reserved label type
    (query("a b.com"), "dns-bad-label"),
    (query("evil\x00.com"), "dns-bad-label"),
    (query("é.com"), "dns-bad-label"),
    (query(".".join(["a" * 63] * 4)), "dns-name-too-long"),  # 4 * 64 + 1 > 255
]


@pytest.mark.parametrize(("raw", "reason"), HOSTILE)
def test_hostile_queries_rejected(raw: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as info:
        dns.parse_query(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize(("raw", "reason"), HOSTILE)
def test_trusted_mode_never_forwards_hostile_queries(raw: bytes, reason: str) -> None:
    resolver = dns.DnsResolver(dns.DnsMode.TRUSTED, dns.SyntheticNames(), (b"\x08\x08\x08\x08",))
    with pytest.raises(PacketError):
        resolver.handle(raw, GW, GW)


def test_synthetic_addresses_are_stable_and_distinct() -> None:
    r = synthetic()
    a1 = parse_answer(answer(r, query("a.example")))[2]
    b1 = parse_answer(answer(r, query("b.example")))[2]
    a2 = parse_answer(answer(r, query("A.Example")))[2]  # case does not matter
    assert a1 == a2 and a1 != b1
    assert a1[0][:2] == bytes([198, 19])
    assert r.names.name_for(a1[0]) == "a.example"


def test_answer_format() -> None:
    payload = answer(synthetic(), query("Example.com", qid=0x1234))
    assert payload[:2] == b"\x12\x34"
    flags, rcode, addrs = parse_answer(payload)
    assert flags & 0x8000 and flags & 0x0100 and flags & 0x0080  # QR, RD copied, RA
    assert rcode == dns.RCODE_NOERROR and len(addrs) == 1
    assert encode_name("Example.com") in payload  # guest's letter case preserved


@pytest.mark.parametrize("name", ["localhost", "foo.localhost"])
def test_localhost_is_loopback(name: str) -> None:
    assert parse_answer(answer(synthetic(), query(name)))[2] == [dns.LOOPBACK]


@pytest.mark.parametrize("qtype", [dns.TYPE_AAAA, 15, 16, 255])
def test_other_types_get_noerror_and_no_answers(qtype: int) -> None:
    r = synthetic()
    assert parse_answer(answer(r, query("example.com", qtype)))[1:] == (dns.RCODE_NOERROR, [])
    assert len(r.names) == 0  # no address allocated for a non-A query


def test_full_table_refuses_new_names_and_never_reuses_addresses() -> None:
    r = synthetic(capacity=2)
    first = parse_answer(answer(r, query("one.test")))[2]
    parse_answer(answer(r, query("two.test")))
    assert parse_answer(answer(r, query("three.test")))[1] == dns.RCODE_REFUSED
    assert parse_answer(answer(r, query("one.test")))[2] == first
    assert len(r.names) == 2


def test_address_allocation_layout() -> None:
    names = dns.SyntheticNames(dns.SYNTHETIC_CAPACITY_MAX)
    addrs = [names.address_for(f"h{i}.test") for i in range(300)]
    assert addrs[0] == bytes([198, 19, 0, 1])
    assert addrs[253] == bytes([198, 19, 0, 254])
    assert addrs[254] == bytes([198, 19, 1, 1])  # .0 and .255 are never handed out
    assert len(set(addrs)) == 300


def test_capacity_limits() -> None:
    with pytest.raises(ValueError):
        dns.SyntheticNames(dns.SYNTHETIC_CAPACITY_MAX + 1)


def test_trusted_mode_forwards_round_robin() -> None:
    ups = (b"\x01\x01\x01\x01", b"\x02\x02\x02\x02")
    r = dns.DnsResolver(dns.DnsMode.TRUSTED, dns.SyntheticNames(), ups)
    payload = query(qid=7)
    actions = [r.handle(payload, GW, GW) for _ in range(3)]
    assert all(isinstance(a, dns.DnsForward) for a in actions)
    assert [a.server for a in actions] == [ups[0], ups[1], ups[0]]  # type: ignore[union-attr]
    assert actions[0] == dns.DnsForward(payload, ups[0], 7)


def test_open_mode_relays_to_the_address_asked() -> None:
    r = dns.DnsResolver(dns.DnsMode.OPEN, dns.SyntheticNames(), (b"\x01\x01\x01\x01",))
    raw = b"\x00\x07" + b"\xff" * 20  # not validated, only size-checked
    assert r.handle(raw, b"\x09\x09\x09\x09", GW) == dns.DnsForward(raw, b"\x09\x09\x09\x09", 7)
    assert r.handle(raw, GW, GW) == dns.DnsForward(raw, b"\x01\x01\x01\x01", 7)
    with pytest.raises(PacketError):
        r.handle(b"\x00" * 5, GW, GW)


def test_forwarding_modes_need_a_resolver() -> None:
    with pytest.raises(ValueError):
        dns.DnsResolver(dns.DnsMode.TRUSTED, dns.SyntheticNames(), ())


@pytest.mark.parametrize(("payload", "ok"), [
    (b"\x00\x07\x81\x80" + bytes(8), True),
    (b"\x00\x08\x81\x80" + bytes(8), False),  # other ID
    (b"\x00\x07\x01\x00" + bytes(8), False),  # a query, not a response
    (b"\x00\x07", False),
])
def test_response_matches(payload: bytes, ok: bool) -> None:
    assert dns.response_matches(7, payload) is ok
