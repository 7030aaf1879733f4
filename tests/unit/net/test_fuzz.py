"""Property-based fuzzing of every parser of guest bytes and of the stack as a whole: nothing
but PacketError escapes a parser, nothing escapes the stack, and no buffer grows unbounded."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gondolin.net import arp, classify, dhcp, dns, ethernet, icmp, ipv4, tcp
from gondolin.net.errors import PacketError
from gondolin.net.stack import NetworkStack, StackConfig
from gondolin.net.udp import UdpDatagram

from .fakeguest import GW_IP, GW_MAC, FakeGuest, ip, pump
from .test_dns import query

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
HEAVY = settings(max_examples=100, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])
SRC, DST = bytes([192, 168, 127, 3]), bytes([1, 2, 3, 4])


def only_packet_errors(parse, data: bytes) -> None:  # type: ignore[no-untyped-def]
    try:
        parse(data)
    except PacketError as exc:
        assert exc.reason and " " not in exc.reason


@SETTINGS
@given(st.binary(max_size=1600))
def test_ethernet(data: bytes) -> None:
    only_packet_errors(ethernet.EthernetFrame.parse, data)


@SETTINGS
@given(st.binary(max_size=64))
def test_arp(data: bytes) -> None:
    only_packet_errors(arp.ArpPacket.parse, data)


@SETTINGS
@given(st.binary(max_size=200))
def test_ipv4(data: bytes) -> None:
    only_packet_errors(ipv4.Ipv4Packet.parse, data)


@SETTINGS
@given(st.binary(max_size=200))
def test_ipv4_with_valid_checksum(data: bytes) -> None:
    """Random headers that pass the checksum reach the deeper checks."""
    if len(data) >= 20:
        hdr = bytearray(data)
        ihl = min(15, max(5, hdr[0] & 0xF)) * 4
        if ihl <= len(hdr):
            hdr[10:12] = b"\x00\x00"
            hdr[10:12] = ipv4.checksum(hdr[:ihl]).to_bytes(2, "big")
        data = bytes(hdr)
    only_packet_errors(ipv4.Ipv4Packet.parse, data)


@SETTINGS
@given(st.binary(max_size=200))
def test_icmp(data: bytes) -> None:
    only_packet_errors(icmp.IcmpEcho.parse, data)


@SETTINGS
@given(st.binary(max_size=200))
def test_udp(data: bytes) -> None:
    only_packet_errors(lambda d: UdpDatagram.parse(d, SRC, DST), data)


SERVER = dhcp.DhcpServer(GW_IP, SRC, bytes([255, 255, 255, 0]), (GW_IP,))


@SETTINGS
@given(st.binary(max_size=120), st.binary(max_size=120))
def test_dhcp(fixed_tail: bytes, options: bytes) -> None:
    base = bytearray(240)
    base[1], base[2] = 1, 6
    base[236:240] = b"\x63\x82\x53\x63"
    base[:len(fixed_tail)] = fixed_tail[:236]
    for data in (bytes(base) + options, fixed_tail + options):
        try:
            msg = dhcp.DhcpMessage.parse(data)
        except PacketError:
            continue
        reply = SERVER.handle(msg)
        assert reply is None or len(reply.payload) < 600


@SETTINGS
@given(st.binary(max_size=600))
def test_dns_query_parser(data: bytes) -> None:
    only_packet_errors(dns.parse_query, data)


labels = st.lists(st.binary(min_size=0, max_size=70), max_size=6)


@SETTINGS
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 6), labels,
       st.integers(0, 0xFFFF), st.binary(max_size=40))
def test_dns_structured(qid: int, flags: int, qdcount: int, name_labels: list[bytes],
                        qtype: int, tail: bytes) -> None:
    """Header fields and label lengths chosen to hit the parser's edge cases."""
    name = b"".join(bytes([len(label) & 0xFF]) + label for label in name_labels) + b"\x00"
    data = struct.pack("!HHHHHH", qid, flags, qdcount, 0, 0, 0) + name + struct.pack(
        "!HH", qtype, 1) + tail
    resolver = dns.DnsResolver(dns.DnsMode.SYNTHETIC, dns.SyntheticNames(8))
    try:
        action = resolver.handle(data, GW_IP, GW_IP)
    except PacketError:
        return
    assert isinstance(action, dns.DnsAnswer) and len(action.payload) <= dns.MAX_REPLY_LEN
    assert len(resolver.names) <= 8


@SETTINGS
@given(st.binary(max_size=120))
def test_tcp_segment(data: bytes) -> None:
    only_packet_errors(lambda d: tcp.TcpSegment.parse(d, SRC, DST), data)


def syn_with_options(options: bytes) -> tcp.TcpSegment:
    """Parse a SYN carrying ``options`` (padded to a multiple of 4 bytes with end-of-list)."""
    options = options.ljust((len(options) + 3) // 4 * 4, b"\x00")
    header = struct.pack("!HHIIHHHH", 1, 2, 3, 4, ((20 + len(options)) // 4) << 12 | tcp.SYN,
                         5, 0, 0) + options
    seg = bytearray(header)
    seg[16:18] = ipv4.checksum(ipv4.pseudo_header(SRC, DST, ipv4.PROTO_TCP, len(seg)) + seg
                               ).to_bytes(2, "big")
    return tcp.TcpSegment.parse(bytes(seg), SRC, DST)


@SETTINGS
@given(st.binary(max_size=60))
def test_tcp_options(options: bytes) -> None:
    parsed = syn_with_options(options[:40])
    if parsed.mss is not None:  # an MSS is only ever read from an MSS option in the bytes
        assert b"\x02\x04" + parsed.mss.to_bytes(2, "big") in options[:40]
    if parsed.wscale is not None:
        assert b"\x03\x03" + bytes([parsed.wscale]) in options[:40]


tcp_option = st.one_of(
    st.just(b"\x01"),  # NOP
    st.integers(0, 0xFFFF).map(lambda v: b"\x02\x04" + v.to_bytes(2, "big")),  # MSS
    st.integers(0, 255).map(lambda v: b"\x03\x03" + bytes([v])),  # window scale
    st.tuples(st.integers(4, 255), st.binary(max_size=6)).map(  # any other kind, well formed
        lambda kb: bytes([kb[0], len(kb[1]) + 2]) + kb[1]),
)


@SETTINGS
@given(st.lists(tcp_option, max_size=10), st.binary(max_size=8))
def test_tcp_options_well_formed_are_all_read(options: list[bytes], after_end: bytes) -> None:
    data = b"".join(options)
    if len(data) + 1 + len(after_end) > 40:
        data = b""
    parsed = syn_with_options(data + b"\x00" + after_end)  # nothing after end-of-list counts
    mss = [int.from_bytes(o[2:], "big") for o in options if o[:2] == b"\x02\x04"] if data else []
    wscale = [o[2] for o in options if o[:2] == b"\x03\x03"] if data else []
    assert parsed.mss == (mss[-1] if mss else None)
    assert parsed.wscale == (wscale[-1] if wscale else None)


@SETTINGS
@given(st.binary(max_size=300), st.booleans(), st.booleans())
def test_classifier(data: bytes, ssh: bool, eof: bool) -> None:
    result = classify.classify(data, ssh_allowed=ssh, eof=eof)
    assert isinstance(result, classify.NeedMore | classify.Classified | classify.Rejected)
    if eof:
        assert not isinstance(result, classify.NeedMore)


@SETTINGS
@given(st.sampled_from([b"\x16\x03\x01", b"\x16\x03\x03"]), st.binary(max_size=400))
def test_classifier_tls_like(prefix: bytes, body: bytes) -> None:
    data = prefix + len(body).to_bytes(2, "big") + body
    result = classify.classify(data)
    assert not isinstance(result, classify.NeedMore)
    if isinstance(result, classify.Classified) and result.sni is not None:
        assert result.sni.isascii() and len(result.sni) <= 253


# -- the stack as a whole -------------------------------------------------------------------

@HEAVY
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_stack_random_frames(frames: list[bytes]) -> None:
    stack = NetworkStack()
    for frame in frames:
        stack.feed_frame(frame, 0.0)
        stack.feed_frame(GW_MAC + b"\x02" * 6 + frame, 0.0)  # past the Ethernet check
    stack.frames_to_send(0.0)
    stack.events()
    assert stack.flow_count == 0


segment_ops = st.lists(
    st.tuples(
        st.integers(0, 0x3F),  # flags
        st.integers(-70000, 70000),  # seq offset from what the guest should send
        st.integers(-70000, 70000),  # ack offset
        st.integers(0, 0xFFFF),  # window
        st.integers(0, 1460),  # payload length
        st.sampled_from(["none", "consume", "send", "close", "timer", "reset"]),
    ),
    max_size=40,
)


@HEAVY
@given(segment_ops)
def test_stack_hostile_tcp_peer(ops: list[tuple[int, int, int, int, int, str]]) -> None:
    """A connected flow bombarded with arbitrary segments and app calls keeps its bounds."""
    stack = NetworkStack(StackConfig(max_flows=4))
    g = FakeGuest()
    conn = g.connect(ip("93.184.216.34"), 80)
    pump(stack, g, 0.0)
    conn.send(b"GET / HTTP/1.1\r\n\r\n")
    pump(stack, g, 0.0)
    flow_id = next((e.flow_id for e in stack.events() if hasattr(e, "flow_id")), 1)
    now = 0.0
    for flags, dseq, dack, window, length, op in ops:
        now += 0.5
        seg = tcp.TcpSegment(conn.src_port, 80, (conn.snd_nxt + dseq) & 0xFFFFFFFF,
                             (conn.snd_una + dack) & 0xFFFFFFFF, flags, window, b"p" * length)
        g.send_tcp(conn.dst, seg)
        if op == "consume":
            stack.flow_consumed(flow_id, 5000)
        elif op == "send":
            stack.flow_send(flow_id, b"s" * 70000)
        elif op == "close":
            stack.flow_close(flow_id)
        elif op == "timer":
            stack.on_timer(stack.next_timer() or now)
        elif op == "reset":
            stack.flow_reset(flow_id)
        for frame in g.take_outbox():
            stack.feed_frame(frame, now)
        for frame in stack.frames_to_send(now):  # output stays well-formed
            packet = ipv4.Ipv4Packet.parse(ethernet.EthernetFrame.parse(frame).payload)
            if packet.proto == ipv4.PROTO_TCP:
                tcp.TcpSegment.parse(packet.payload, packet.src, packet.dst)
        stack.events()
        for flow in stack._flows.values():
            c = flow.conn
            assert c.unconsumed <= c.recv_buffer
            assert c.queued <= c.send_buffer
            assert len(c._ooo) <= tcp.MAX_OOO_SEGMENTS
            assert c.ooo_bytes <= c.recv_buffer
            assert len(flow.classify_buf) <= classify.CLASSIFY_LIMIT + 1460
        assert stack.flow_count <= 4


@HEAVY
@given(st.lists(st.text(alphabet="abcdefghij.-", min_size=1, max_size=20), max_size=50))
def test_dns_table_bounded(names: list[str]) -> None:
    stack = NetworkStack(StackConfig(synthetic_capacity=16))
    g = FakeGuest()
    for name in names:
        try:
            payload = query(name.strip(".").replace("..", ".") or "x")
        except ValueError:
            continue
        g.send_udp(GW_IP, 1000, 53, payload)
    pump(stack, g, 0.0)
    assert len(stack.names) <= 16
