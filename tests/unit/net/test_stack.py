"""NetworkStack end to end through crafted Ethernet frames (a fake guest, no QEMU)."""

from __future__ import annotations

import struct

import pytest

from gondolin.net import arp, dhcp, dns, ethernet, ipv4, stack, tcp
from gondolin.net.flow import FlowProtocol
from gondolin.net.stack import (
    DnsRequest,
    FlowClosed,
    FlowData,
    FlowEof,
    FlowOpened,
    FlowWritable,
    NetworkStack,
    StackConfig,
)

from .fakeguest import G_IP, GUEST_MAC, GW_IP, GW_MAC, FakeGuest, GuestTcp, ip, pump, tcp_flags
from .test_classify import real_client_hello
from .test_dns import parse_answer, query

HTTP_GET = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
PUBLIC = ip("93.184.216.34")


def make(**kwargs: object) -> tuple[NetworkStack, FakeGuest]:
    return NetworkStack(StackConfig(**kwargs), rng=lambda: 0x12345678), FakeGuest()  # type: ignore[arg-type]


def open_http(st: NetworkStack, g: FakeGuest, dst: bytes = PUBLIC, port: int = 80,
              now: float = 0.0, **kwargs: object) -> tuple[GuestTcp, int]:
    conn = g.connect(dst, port, **kwargs)
    pump(st, g, now)
    assert conn.state == "established"
    conn.send(HTTP_GET)
    pump(st, g, now)
    events = st.events()
    assert isinstance(events[0], FlowOpened) and events[1] == FlowData(events[0].flow_id,
                                                                        HTTP_GET)
    return conn, events[0].flow_id


def resolve(st: NetworkStack, g: FakeGuest, name: str) -> bytes:
    g.send_udp(GW_IP, 33333, 53, query(name))
    pump(st, g, 0.0)
    return parse_answer(g.udp.pop().payload)[2][0]


# -- ARP, DHCP, ICMP, UDP -----------------------------------------------------------------

def test_arp_reply_for_gateway_only() -> None:
    st, g = make()
    for target in (GW_IP, ip("192.168.127.77")):
        request = arp.ArpPacket(arp.OP_REQUEST, GUEST_MAC, G_IP, bytes(6), target)
        g.send_frame(ethernet.ETHERTYPE_ARP, request.build(), dst_mac=ethernet.BROADCAST_MAC)
    pump(st, g, 0.0)
    assert len(g.arp) == 1
    reply = arp.ArpPacket.parse(g.arp[0])
    assert (reply.op, reply.sender_mac, reply.sender_ip) == (arp.OP_REPLY, GW_MAC, GW_IP)
    assert reply.target_mac == GUEST_MAC
    assert st.guest_mac == GUEST_MAC  # learned


def dhcp_message(msg_type: int, options: bytes = b"") -> bytes:
    fixed = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 42, 0, 0x8000, bytes(4),
                        bytes(4), bytes(4), bytes(4), GUEST_MAC.ljust(16, b"\0"), b"", b"")
    return fixed + b"\x63\x82\x53\x63" + bytes([53, 1, msg_type]) + options + b"\xff"


def test_dhcp_exchange() -> None:
    st, g = make()
    bcast = b"\xff" * 4
    g.send_udp(bcast, 68, 67, dhcp_message(dhcp.DISCOVER), src=bytes(4))
    g.outbox[-1] = ethernet.BROADCAST_MAC + g.outbox[-1][6:]
    pump(st, g, 0.0)
    (offer,) = g.udp
    assert (offer.src_ip, offer.src_port, offer.dst_port) == (GW_IP, 67, 68)
    assert offer.payload[16:20] == G_IP
    assert g.frames[-1][:6] == ethernet.BROADCAST_MAC  # client asked for broadcast
    g.send_udp(bcast, 68, 67, dhcp_message(dhcp.REQUEST, bytes([50, 4]) + G_IP + bytes([54, 4])
                                          + GW_IP), src=bytes(4))
    pump(st, g, 0.0)
    ack = g.udp[-1]
    assert dhcp._parse_options(ack.payload[240:])[dhcp.OPT_MESSAGE_TYPE] == bytes([dhcp.ACK])
    assert st.stats.dhcp_replies == 2


def test_configured_mtu_reaches_dhcp_and_is_validated() -> None:
    st, g = make(mtu=ethernet.JUMBO_MTU)
    g.send_udp(b"\xff" * 4, 68, 67, dhcp_message(dhcp.DISCOVER), src=bytes(4))
    pump(st, g, 0.0)
    (offer,) = g.udp
    opts = dhcp._parse_options(offer.payload[240:])
    assert opts[dhcp.OPT_INTERFACE_MTU] == struct.pack("!H", ethernet.JUMBO_MTU)
    for bad in (67, 65536):
        with pytest.raises(ValueError, match="mtu"):
            make(mtu=bad)


def test_ping_anywhere_gets_synthetic_reply() -> None:
    st, g = make()
    from gondolin.net.icmp import TYPE_ECHO_REPLY, TYPE_ECHO_REQUEST, IcmpEcho
    g.send_ip(ip("1.2.3.4"), ipv4.PROTO_ICMP, IcmpEcho(TYPE_ECHO_REQUEST, 9, 1, b"ping").build())
    pump(st, g, 0.0)
    ((src, echo),) = g.icmp
    assert src == ip("1.2.3.4")
    assert (echo.type, echo.ident, echo.seq, echo.payload) == (TYPE_ECHO_REPLY, 9, 1, b"ping")


def test_udp_other_than_dns_goes_nowhere() -> None:
    st, g = make()
    g.send_udp(ip("1.2.3.4"), 5000, 9999, b"hello")
    pump(st, g, 0.0)
    assert g.frames == [] and st.events() == []
    assert st.stats.drops["udp-port"] == 1


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda f: f[:12] + b"\x86\xdd" + f[14:], "ipv6"),
    (lambda f: b"\x02" * 6 + f[6:], "eth-not-for-us"),
    (lambda f: f[:6] + b"\x01" * 6 + f[12:], "eth-multicast-src"),
    (lambda f: f[:12] + b"\x88\xcc" + f[14:], "eth-unknown-type"),
    (lambda f: f[:40], "ip-bad-length"),
    (lambda f: f[:14 + 9] + b"\x63" + f[14 + 10:], "ip-checksum"),
])
def test_bad_frames_are_counted_and_dropped(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    st, g = make()
    g.send_udp(GW_IP, 1000, 53, query("a.test"))
    st.feed_frame(mutate(g.take_outbox()[0]), 0.0)
    assert st.frames_to_send(0.0) == []
    assert st.stats.drops[reason] == 1


def test_spoofed_source_address_is_dropped() -> None:
    st, g = make()
    g.send_udp(GW_IP, 1000, 53, query("a.test"), src=ip("10.9.9.9"))
    pump(st, g, 0.0)
    assert g.udp == [] and st.stats.drops["ip-bad-src"] == 1


# -- DNS ----------------------------------------------------------------------------------

def test_dns_synthetic_answer_and_flow_attribution() -> None:
    st, g = make()
    addr = resolve(st, g, "api.example.com")
    assert dns.is_synthetic(addr)
    conn, flow_id = open_http(st, g, addr)
    assert st.stats.flows_opened == 1
    assert st._flows_by_id[flow_id].hostname == "api.example.com"


def test_dns_reply_comes_from_the_server_asked() -> None:
    st, g = make()
    g.send_udp(ip("8.8.8.8"), 4444, 53, query("x.test"))
    pump(st, g, 0.0)
    (reply,) = g.udp
    assert (reply.src_ip, reply.src_port, reply.dst_port) == (ip("8.8.8.8"), 53, 4444)


def test_malformed_dns_is_dropped_silently() -> None:
    st, g = make()
    g.send_udp(GW_IP, 4444, 53, b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c")
    pump(st, g, 0.0)
    assert g.udp == [] and st.stats.drops["dns-pointer"] == 1


def test_trusted_dns_forward_and_reply() -> None:
    st, g = make(dns_mode="trusted", dns_upstreams=("9.9.9.9",))
    payload = query("example.org", qid=0x4242)
    g.send_udp(GW_IP, 4444, 53, payload)
    pump(st, g, 0.0)
    (request,) = st.events()
    assert request == DnsRequest(request.request_id, "9.9.9.9", payload)  # type: ignore[union-attr]
    assert isinstance(request, DnsRequest)
    st.dns_reply(request.request_id, b"\x42\x41\x81\x80" + bytes(8))  # wrong ID: dropped
    pump(st, g, 0.0)
    assert g.udp == [] and st.stats.drops["dns-reply-mismatch"] == 1
    g.send_udp(GW_IP, 4445, 53, payload)
    pump(st, g, 0.0)
    (request,) = st.events()
    assert isinstance(request, DnsRequest)
    response = b"\x42\x42\x81\x80" + bytes(8)
    st.dns_reply(request.request_id, response)
    st.dns_reply(request.request_id, response)  # a second reply is not passed on
    pump(st, g, 0.0)
    (reply,) = g.udp
    assert (reply.src_ip, reply.dst_port, reply.payload) == (GW_IP, 4445, response)


def test_trusted_dns_oversize_reply_is_truncated() -> None:
    st, g = make(dns_mode="trusted", dns_upstreams=("9.9.9.9",))
    g.send_udp(GW_IP, 4444, 53, query(qid=1))
    pump(st, g, 0.0)
    (request,) = st.events()
    assert isinstance(request, DnsRequest)
    st.dns_reply(request.request_id, b"\x00\x01\x81\x80\x00\x01\x00\x05" + b"\x00" * 3000)
    pump(st, g, 0.0)
    (reply,) = g.udp
    assert len(reply.payload) == 12 and reply.payload[2] & 0x02  # TC bit


def test_pending_dns_forwards_are_capped_and_expire() -> None:
    st, g = make(dns_mode="trusted", dns_upstreams=("9.9.9.9",))
    for i in range(stack.MAX_PENDING_DNS + 10):
        g.send_udp(GW_IP, 1000 + i, 53, query(qid=i))
    pump(st, g, 0.0)
    assert len(st.events()) == stack.MAX_PENDING_DNS
    assert st.stats.drops["dns-pending-full"] == 10
    assert st.next_timer() == stack.DNS_FORWARD_TIMEOUT
    st.on_timer(stack.DNS_FORWARD_TIMEOUT)
    assert len(st._dns_pending) == 0 and st.next_timer() is None


# -- TCP: classification ----------------------------------------------------------------------

def test_http_flow_both_ways_and_close() -> None:
    st, g = make()
    conn, flow_id = open_http(st, g)
    info = st.events() or None
    assert info is None
    st.flow_consumed(flow_id, len(HTTP_GET))
    body = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"b" * 100_000
    sent = 0
    while sent < len(body):
        sent += st.flow_send(flow_id, body[sent:])
        pump(st, g, 0.0)
    assert bytes(conn.received) == body
    conn.send(b"more")
    conn.fin()
    pump(st, g, 0.0)
    assert st.events() == [FlowData(flow_id, b"more"), FlowEof(flow_id)]
    st.flow_close(flow_id)
    pump(st, g, 0.0)
    assert conn.fin_received
    assert st.events() == [FlowClosed(flow_id, "closed")]
    assert st.flow_count == 0


def test_jumbo_mtu_guest_gets_large_segments_both_ways() -> None:
    st, g = make()
    mss = 60_000  # a guest with a 60040-byte MTU
    conn = g.connect(PUBLIC, 80, mss=mss, rcv_buffer=1 << 20)
    pump(st, g, 0.0)
    request = HTTP_GET[:-2] + b"X-Pad: " + b"p" * 8000 + b"\r\n\r\n"
    conn.send(request)
    pump(st, g, 0.0)
    events = st.events()
    assert isinstance(events[0], FlowOpened) and events[1] == FlowData(events[0].flow_id, request)
    assert st.stats.dropped == 0  # a 9 KB frame from the guest is not "oversize"
    flow_id = events[0].flow_id
    st.flow_consumed(flow_id, len(request))
    body = bytes(range(256)) * 600  # 153600 bytes
    sent = 0
    while sent < len(body):
        sent += st.flow_send(flow_id, body[sent:])
        pump(st, g, 0.0)
    assert bytes(conn.received) == body
    sizes = [len(s.payload) for s in conn.segments if s.payload]
    assert max(sizes) == mss  # not 1460: the guest's MSS decides


def test_flow_info() -> None:
    st, g = make()
    conn = g.connect(PUBLIC, 8080)
    pump(st, g, 0.0)
    conn.send(HTTP_GET)
    pump(st, g, 0.0)
    opened = st.events()[0]
    assert isinstance(opened, FlowOpened) and opened.target is None
    info = opened.info
    assert (info.protocol, info.src_ip, info.src_port, info.dst_ip, info.dst_port) == (
        FlowProtocol.HTTP, "192.168.127.3", conn.src_port, "93.184.216.34", 8080)
    assert info.hostname is None and info.sni is None


def test_tls_flow_carries_sni() -> None:
    st, g = make()
    conn = g.connect(PUBLIC, 443)
    pump(st, g, 0.0)
    hello = real_client_hello("secure.example.com")
    conn.send(hello)  # spans two segments
    pump(st, g, 0.0)
    opened, data = st.events()
    assert isinstance(opened, FlowOpened)
    assert opened.info.protocol is FlowProtocol.TLS and opened.info.sni == "secure.example.com"
    assert data == FlowData(opened.flow_id, hello)


def test_request_split_across_segments_classifies_when_complete() -> None:
    st, g = make()
    conn = g.connect(PUBLIC, 80)
    pump(st, g, 0.0)
    for piece in (b"G", b"ET /pa", b"th HTTP/1.1\r", b"\nHost: x\r\n\r\n"):
        assert st.events() == []
        conn.send(piece)
        pump(st, g, 0.0)
    opened, data = st.events()
    assert isinstance(opened, FlowOpened)
    assert data == FlowData(opened.flow_id, b"GET /path HTTP/1.1\r\nHost: x\r\n\r\n")


@pytest.mark.parametrize(("first", "reason"), [
    (b"\x00\x01\x02\x03 binary", "unknown-protocol"),
    (b"CONNECT evil.com:443 HTTP/1.1\r\n\r\n", "connect-refused"),
    (b"SSH-2.0-OpenSSH\r\n", "unknown-protocol"),
])
def test_unclassifiable_flows_are_reset(first: bytes, reason: str) -> None:
    st, g = make()
    conn = g.connect(PUBLIC, 22 if first.startswith(b"SSH") else 80)
    pump(st, g, 0.0)
    conn.send(first)
    pump(st, g, 0.0)
    assert conn.reset
    assert st.events() == []  # the app never heard of it
    assert st.stats.rejects[reason] == 1
    assert st.flow_count == 0


def test_ssh_classified_only_when_enabled_on_that_port() -> None:
    st, g = make(ssh_enabled=True)
    conn = g.connect(PUBLIC, 22)
    pump(st, g, 0.0)
    conn.send(b"SSH-2.0-OpenSSH_9.6\r\n")
    pump(st, g, 0.0)
    opened = st.events()[0]
    assert isinstance(opened, FlowOpened) and opened.info.protocol is FlowProtocol.SSH
    other = g.connect(PUBLIC, 2222)
    pump(st, g, 0.0)
    other.send(b"SSH-2.0-OpenSSH_9.6\r\n")
    pump(st, g, 0.0)
    assert other.reset


def test_eof_before_classification_resets() -> None:
    st, g = make()
    conn = g.connect(PUBLIC, 80)
    pump(st, g, 0.0)
    conn.send(b"GE")
    conn.fin()
    pump(st, g, 0.0)
    assert conn.reset and st.events() == []


def test_silent_flow_is_reset_after_classify_timeout() -> None:
    """A server-speaks-first protocol on an unmapped port does not hang forever."""
    st, g = make()
    conn = g.connect(PUBLIC, 80)
    pump(st, g, 0.0)
    assert st.next_timer() == stack.CLASSIFY_TIMEOUT
    st.on_timer(stack.CLASSIFY_TIMEOUT)
    pump(st, g, stack.CLASSIFY_TIMEOUT)
    assert conn.reset and st.stats.rejects["classify-timeout"] == 1
    assert st.flow_count == 0


# -- TCP: refusal at SYN time -----------------------------------------------------------------

@pytest.mark.parametrize(("dst", "reason"), [
    (GW_IP, "unroutable-destination"),
    (ip("192.168.127.50"), "unroutable-destination"),
    (ip("127.0.0.1"), "unroutable-destination"),
    (ip("169.254.169.254"), "unroutable-destination"),  # cloud metadata
    (ip("0.0.0.0"), "unroutable-destination"),
    (ip("198.19.200.200"), "unknown-synthetic-address"),
])
def test_unroutable_destinations_refused_at_syn(dst: bytes, reason: str) -> None:
    st, g = make()
    conn = g.connect(dst, 80)
    pump(st, g, 0.0)
    assert [tcp_flags(s) for s in conn.segments] == ["AR"]  # RST instead of SYN-ACK
    assert st.stats.rejects[reason] == 1


def test_multicast_and_class_e_destinations_are_dropped() -> None:
    st, g = make()
    for dst in ("224.0.0.1", "240.0.0.1", "255.255.255.255"):
        g.connect(ip(dst), 80)
    pump(st, g, 0.0)
    assert g.frames == [] and st.stats.drops["ip-multicast"] == 3


def test_no_handler_means_refused_at_syn() -> None:
    st, g = make(http_enabled=False)
    conn = g.connect(PUBLIC, 443)
    pump(st, g, 0.0)
    assert [tcp_flags(s) for s in conn.segments] == ["AR"]
    assert st.stats.rejects["no-handler"] == 1


def test_ports_not_served_refused_at_syn() -> None:
    st, g = make(flow_ports=frozenset({80, 443}))
    conn = g.connect(PUBLIC, 25)
    pump(st, g, 0.0)
    assert conn.reset and st.stats.rejects["port-not-served"] == 1


def test_segment_for_no_flow_gets_rst() -> None:
    st, g = make()
    conn = GuestTcp(g, PUBLIC, 80, 5555)
    g.conns[(5555, PUBLIC, 80)] = conn
    conn.state = "established"
    conn.send(b"hello")
    pump(st, g, 0.0)
    assert conn.reset and st.stats.drops["tcp-no-flow"] == 1


# -- TCP: mapped rules ------------------------------------------------------------------------

def test_mapped_rule_by_name_waits_for_accept() -> None:
    st, g = make(tcp_hosts={"db.internal:5432": "127.0.0.1:15432"})
    addr = resolve(st, g, "db.internal")
    conn = g.connect(addr, 5432)
    pump(st, g, 0.0)
    assert conn.segments == []  # no SYN-ACK before the upstream is connected
    (opened,) = st.events()
    assert isinstance(opened, FlowOpened)
    assert opened.info.protocol is FlowProtocol.MAPPED_TCP
    assert opened.info.hostname == "db.internal"
    assert opened.target == stack.MappedTarget("127.0.0.1", 15432)
    st.flow_accept(opened.flow_id)
    pump(st, g, 0.0)
    assert conn.state == "established"
    st.flow_send(opened.flow_id, b"server speaks first")
    pump(st, g, 0.0)
    assert conn.received == b"server speaks first"


def test_mapped_name_has_an_address_before_any_query() -> None:
    st, _ = make(tcp_hosts={"db.internal": "127.0.0.1:1"})
    assert st.names.address_for("db.internal") == bytes([198, 19, 0, 1])


def test_mapped_rule_by_ip_literal_and_port_mismatch() -> None:
    st, g = make(tcp_hosts={"10.1.2.3:6379": "127.0.0.1:6379"}, http_enabled=False)
    ok = g.connect(ip("10.1.2.3"), 6379)
    bad = g.connect(ip("10.1.2.3"), 6380)
    pump(st, g, 0.0)
    (opened,) = st.events()
    assert isinstance(opened, FlowOpened) and opened.info.src_port == ok.src_port
    assert bad.reset


def test_mapped_flow_refused_when_upstream_fails() -> None:
    st, g = make(tcp_hosts={"db.internal:5432": "127.0.0.1:15432"})
    conn = g.connect(resolve(st, g, "db.internal"), 5432)
    pump(st, g, 0.0)
    (opened,) = st.events()
    assert isinstance(opened, FlowOpened)
    st.flow_reset(opened.flow_id, "upstream-connect-failed")
    pump(st, g, 0.0)
    assert [tcp_flags(s) for s in conn.segments] == ["AR"]
    assert st.events() == [FlowClosed(opened.flow_id, "upstream-connect-failed")]


def test_mapped_names_need_synthetic_dns() -> None:
    with pytest.raises(ValueError):
        NetworkStack(StackConfig(dns_mode="trusted", dns_upstreams=("1.1.1.1",),
                                 tcp_hosts={"db.internal:1": "127.0.0.1:1"}))


# -- TCP: reliability, windows, bounds ----------------------------------------------------------

def test_out_of_order_segments_are_reassembled() -> None:
    st, g = make()
    conn, flow_id = open_http(st, g)
    base = conn.snd_nxt
    conn.send(b"second", seq=(base + 5) & 0xFFFFFFFF)
    conn.send(b"first", seq=base)
    conn.snd_nxt = (base + 11) & 0xFFFFFFFF
    pump(st, g, 0.0)
    assert st.events() == [FlowData(flow_id, b"firstsecond")]


def test_lost_segment_is_retransmitted_on_timeout() -> None:
    st, g = make()
    conn, flow_id = open_http(st, g)
    st.flow_send(flow_id, b"important")
    lost = st.frames_to_send(1.0)  # never delivered
    assert len(lost) == 1
    deadline = st.next_timer()
    assert deadline is not None and deadline > 1.0
    st.on_timer(deadline)
    pump(st, g, deadline)
    assert conn.received == b"important"


def test_guest_zero_window_is_honoured() -> None:
    st, g = make()
    conn, flow_id = open_http(st, g, rcv_buffer=4000, auto_read=False)
    payload = bytes(range(256)) * 100
    assert st.flow_send(flow_id, payload) == len(payload)
    pump(st, g, 0.0)
    assert len(conn.received) == 4000 and conn.window == 0
    now = 0.0
    for _ in range(3):  # persist timer: probes, no violations, no giving up
        now = st.next_timer()  # type: ignore[assignment]
        st.on_timer(now)
        pump(st, g, now)
    assert conn.probes >= 3 and conn.window_violations == 0
    assert st.flow_state(flow_id) is tcp.TcpState.ESTABLISHED
    while len(conn.received) < len(payload):
        conn.read()
        pump(st, g, now)
        now += 0.01
    assert conn.received == payload and conn.window_violations == 0


def test_slow_app_closes_the_guest_window() -> None:
    st, g = make()
    conn, flow_id = open_http(st, g)
    chunk = b"u" * 1460
    for _ in range(60):
        conn.send(chunk)
    pump(st, g, 0.0)
    delivered = sum(len(e.data) for e in st.events() if isinstance(e, FlowData))
    assert delivered + len(HTTP_GET) <= tcp.RECV_BUFFER
    assert conn.peer_window == 0
    st.flow_consumed(flow_id, delivered + len(HTTP_GET))
    pump(st, g, 0.0)
    assert conn.peer_window == tcp.RECV_BUFFER


def test_flow_limit() -> None:
    st, g = make(max_flows=3)
    conns = [g.connect(PUBLIC, 80) for _ in range(4)]
    pump(st, g, 0.0)
    assert [c.state for c in conns] == ["established"] * 3 + ["reset"]
    assert st.stats.rejects["flow-limit"] == 1


def test_time_wait_does_not_count_and_port_can_be_reused() -> None:
    st, g = make(max_flows=1)
    conn, flow_id = open_http(st, g)
    st.flow_close(flow_id)
    pump(st, g, 0.0)
    conn.fin()
    pump(st, g, 0.0)
    assert st.flow_state(flow_id) is tcp.TcpState.TIME_WAIT
    assert st.flow_count == 0
    again = GuestTcp(g, PUBLIC, 80, conn.src_port, isn=99999)
    g.conns[(conn.src_port, PUBLIC, 80)] = again
    again.connect()
    pump(st, g, 0.0)
    assert again.state == "established"


def test_guest_reset_closes_flow() -> None:
    st, g = make()
    conn, flow_id = open_http(st, g)
    conn.rst()
    pump(st, g, 0.0)
    assert st.events() == [FlowClosed(flow_id, "reset-by-guest")]
    assert st.flow_send(flow_id, b"x") == 0  # gone: a no-op, not an exception


def test_vm_wide_send_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack, "MAX_SEND_TOTAL", 100_000)
    st, g = make()
    (_, f1), (_, f2) = open_http(st, g), open_http(st, g)
    assert st.flow_send(f1, b"a" * 80_000) == 80_000
    assert st.flow_send(f2, b"b" * 80_000) == 20_000
    pump(st, g, 0.0)
    assert FlowWritable(f2) in st.events()


def test_memory_stays_bounded_under_a_flood() -> None:
    """Many flows, each pushing data nobody consumes, plus out-of-order junk."""
    st, g = make(max_flows=20)
    conns = [open_http(st, g)[0] for _ in range(20)]
    for conn in conns:
        for _ in range(60):
            conn.send(b"f" * 1460)
        for k in range(200):  # far-ahead segments: only what fits the window is kept
            conn.send(b"o" * 1000, seq=(conn.snd_nxt + 5000 + 3000 * k) & 0xFFFFFFFF)
    pump(st, g, 0.0)
    st.events()
    limit = 20 * tcp.RECV_BUFFER + 20 * tcp.MAX_OOO_SEGMENTS * 1500
    assert st.memory_in_use() <= limit
    assert all(len(f.conn._ooo) <= tcp.MAX_OOO_SEGMENTS for f in st._flows.values())
    assert len(st._timers) <= 4 * len(st._flows) + 64


def test_data_and_fin_in_one_segment_keep_order() -> None:
    st, g = make()
    conn = g.connect(PUBLIC, 80)
    pump(st, g, 0.0)
    conn._send(tcp.ACK | tcp.FIN | tcp.PSH, HTTP_GET)
    pump(st, g, 0.0)
    opened, data, eof = st.events()
    assert isinstance(opened, FlowOpened)
    assert data == FlowData(opened.flow_id, HTTP_GET) and eof == FlowEof(opened.flow_id)


def test_open_dns_relays_to_the_address_asked() -> None:
    st, g = make(dns_mode="open", dns_upstreams=("9.9.9.9",))
    g.send_udp(ip("1.1.1.1"), 4444, 53, b"\x00\x09" + b"\x00" * 14)
    g.send_udp(GW_IP, 4445, 53, b"\x00\x0a" + b"\x00" * 14)
    pump(st, g, 0.0)
    first, second = st.events()
    assert isinstance(first, DnsRequest) and isinstance(second, DnsRequest)
    assert (first.server, second.server) == ("1.1.1.1", "9.9.9.9")
    st.dns_reply(first.request_id, b"\x00\x09\x81\x80" + bytes(8))
    pump(st, g, 0.0)
    assert g.udp[0].src_ip == ip("1.1.1.1") and g.udp[0].dst_port == 4444


def test_time_wait_entries_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack, "MAX_TIME_WAIT", 2)
    st, g = make()
    closed = []
    for _ in range(4):
        conn = g.connect(PUBLIC, 80)
        pump(st, g, 0.0)
        conn.send(HTTP_GET)
        pump(st, g, 0.0)
        events = st.events()
        closed += [e.flow_id for e in events if isinstance(e, FlowClosed)]
        flow_id = next(e.flow_id for e in events if isinstance(e, FlowOpened))
        st.flow_close(flow_id)
        pump(st, g, 0.0)
        conn.fin()
        pump(st, g, 0.0)
    assert len(st._time_wait) == 2 and len(st._flows) == 2
    assert closed == [1, 2]  # the oldest were forgotten, and the app was told
