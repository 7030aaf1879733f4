"""The guest's whole network, as one sans-IO object per VM.

:class:`NetworkStack` takes Ethernet frames from the guest (:meth:`~NetworkStack.feed_frame`)
and answers ARP, DHCP, DNS and ICMP echo itself. It terminates the guest's TCP connections,
classifies each one (mapped rule at SYN time, else HTTP / TLS / SSH from the first bytes) and
reports the flows it accepts as :data:`StackEvent` values. The app (the driver) talks back with
``flow_*`` calls and pulls frames with :meth:`~NetworkStack.frames_to_send`. Time is an
argument everywhere; nothing here blocks, sleeps or opens a socket.

Every buffer the guest can fill is capped: flows per VM, TIME_WAIT entries, queued control
frames, pending DNS forwards, the synthetic name table, and per-flow TCP buffers.
"""

from __future__ import annotations

import heapq
import ipaddress
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gondolin.net import arp, classify, dhcp, dns, ethernet, icmp, ipv4, tcp
from gondolin.net.errors import PacketError
from gondolin.net.flow import FlowInfo, FlowProtocol
from gondolin.net.stats import NetworkStats
from gondolin.net.tcp_hosts import MappedTarget, TcpHostRules
from gondolin.net.udp import UdpDatagram

GATEWAY_IP = "192.168.127.1"
GATEWAY_MAC = "5a:94:ef:e4:0c:dd"
GUEST_IP = "192.168.127.3"
GUEST_MAC = "02:00:00:00:00:01"  # until the guest's first frame tells us its real one
NETMASK = "255.255.255.0"

MAX_FLOWS = 256  # live TCP flows per VM: bounds receive memory to MAX_FLOWS * tcp.RECV_BUFFER
MAX_TIME_WAIT = 1024  # closed flows remembered briefly; the oldest is forgotten first
MAX_SEND_TOTAL = 16 * 1024 * 1024  # bytes queued towards the guest, all flows together
# A flow that sends nothing classifiable by then is reset. Generous on purpose: clients connect
# first and build their TLS context afterwards (curl --parallel loads its CA bundle once per
# transfer, ~1.5 s each under TCG), and an unclassified flow holds at most CLASSIFY_LIMIT bytes
# while MAX_FLOWS bounds how many there are.
CLASSIFY_TIMEOUT = 60.0
MAX_CONTROL_FRAMES = 512  # queued ARP/DHCP/DNS/ICMP/RST frames awaiting the driver
MAX_PENDING_DNS = 128  # forwarded DNS queries awaiting an upstream reply
DNS_FORWARD_TIMEOUT = 5.0
OUTPUT_BUDGET = 256 * 1024  # payload bytes per frames_to_send() call, for fairness


@dataclass(frozen=True)
class StackConfig:
    gateway_ip: str = GATEWAY_IP
    gateway_mac: str = GATEWAY_MAC
    guest_ip: str = GUEST_IP
    guest_mac: str | None = None  # learned from the guest's frames when None
    netmask: str = NETMASK
    dns_mode: str = "synthetic"  # "synthetic" | "trusted" | "open"
    dns_upstreams: tuple[str, ...] = ()  # IPv4 resolvers for "trusted" / "open"
    dhcp_dns_servers: tuple[str, ...] | None = None  # advertised by DHCP; None: the gateway
    tcp_hosts: Mapping[str, str] = field(default_factory=dict)
    http_enabled: bool = True  # False: no HTTP/TLS handler, so such flows are refused at SYN
    ssh_enabled: bool = False
    ssh_ports: frozenset[int] = frozenset({22})
    flow_ports: frozenset[int] | None = None  # ports sniffed for HTTP/TLS; None: all
    max_flows: int = MAX_FLOWS
    synthetic_capacity: int = dns.DEFAULT_SYNTHETIC_CAPACITY
    mtu: int | None = None  # the guest's link MTU, advertised by DHCP; None: the guest's default


@dataclass(frozen=True, slots=True)
class FlowOpened:
    """A TCP flow the app must serve. Mapped flows (``target`` set) wait for
    :meth:`NetworkStack.flow_accept` before the guest sees its SYN-ACK."""

    flow_id: int
    info: FlowInfo
    target: MappedTarget | None = None


@dataclass(frozen=True, slots=True)
class FlowData:
    flow_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class FlowEof:
    """The guest half-closed the flow (FIN): no more FlowData will follow."""

    flow_id: int


@dataclass(frozen=True, slots=True)
class FlowWritable:
    """Send space is available again after a short :meth:`NetworkStack.flow_send`."""

    flow_id: int


@dataclass(frozen=True, slots=True)
class FlowClosed:
    """The flow is gone (closed, reset, timed out); ``flow_*`` calls on it are now no-ops."""

    flow_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class DnsRequest:
    """Forward ``payload`` to ``server``:53 over UDP; pass the reply to
    :meth:`NetworkStack.dns_reply` (no reply needed on failure: the entry expires)."""

    request_id: int
    server: str
    payload: bytes


StackEvent = FlowOpened | FlowData | FlowEof | FlowWritable | FlowClosed | DnsRequest


@dataclass(frozen=True, slots=True)
class _DataMarker:
    flow_id: int


class _Flow:
    __slots__ = ("id", "key", "conn", "dst_ip", "dst_port", "hostname", "announced",
                 "classify_buf", "classify_deadline", "ssh_allowed", "timer_at")

    def __init__(self, flow_id: int, key: tuple[int, bytes, int], conn: tcp.TcpConnection,
                 hostname: str | None, ssh_allowed: bool) -> None:
        self.id = flow_id
        self.key = key
        self.conn = conn
        self.dst_ip = key[1]
        self.dst_port = key[2]
        self.hostname = hostname
        self.announced = False
        self.classify_buf = bytearray()
        self.classify_deadline: float | None = None
        self.ssh_allowed = ssh_allowed
        self.timer_at: float | None = None  # the deadline this flow has in the timer heap

    def deadline(self) -> float | None:
        conn_deadline = self.conn.next_deadline()
        if self.classify_deadline is None:
            return conn_deadline
        if conn_deadline is None:
            return self.classify_deadline
        return min(conn_deadline, self.classify_deadline)


@dataclass(frozen=True, slots=True)
class _PendingDns:
    guest_port: int
    dst_ip: bytes  # the address the guest asked; the reply comes from it
    query_id: int
    deadline: float


class NetworkStack:
    def __init__(self, config: StackConfig | None = None, *,
                 rng: Callable[[], int] | None = None) -> None:
        self.config = cfg = config or StackConfig()
        self.stats = NetworkStats()
        self._rng = rng or (lambda: secrets.randbits(32))
        self.gateway_ip = ipv4.ip_from_str(cfg.gateway_ip)
        self.gateway_mac = ethernet.mac_from_str(cfg.gateway_mac)
        self.guest_ip = ipv4.ip_from_str(cfg.guest_ip)
        self.guest_mac = ethernet.mac_from_str(cfg.guest_mac or GUEST_MAC)
        self._learn_mac = cfg.guest_mac is None
        netmask = ipv4.ip_from_str(cfg.netmask)
        self._subnet = ipaddress.IPv4Network(f"{cfg.guest_ip}/{cfg.netmask}", strict=False)
        self._rules = TcpHostRules(cfg.tcp_hosts)
        mode = dns.DnsMode(cfg.dns_mode)
        if self._rules.hostnames and mode is not dns.DnsMode.SYNTHETIC:
            raise ValueError("tcp_hosts with hostnames needs dns mode 'synthetic'")
        self.names = dns.SyntheticNames(cfg.synthetic_capacity)
        for name in sorted(self._rules.hostnames):
            if self.names.address_for(name) is None:
                raise ValueError("more tcp_hosts names than synthetic addresses")
        self._resolver = dns.DnsResolver(
            mode, self.names, tuple(ipv4.ip_from_str(s) for s in cfg.dns_upstreams))
        dhcp_dns = (cfg.dhcp_dns_servers if cfg.dhcp_dns_servers is not None
                    else (cfg.gateway_ip,))
        if cfg.mtu is not None and not dhcp.MIN_MTU <= cfg.mtu <= ethernet.MAX_IP_PACKET:
            raise ValueError(f"mtu must be between {dhcp.MIN_MTU} and {ethernet.MAX_IP_PACKET}")
        self._dhcp = dhcp.DhcpServer(self.gateway_ip, self.guest_ip, netmask,
                                     tuple(ipv4.ip_from_str(s) for s in dhcp_dns), mtu=cfg.mtu)
        self._flows: dict[tuple[int, bytes, int], _Flow] = {}
        self._flows_by_id: dict[int, _Flow] = {}
        self._time_wait: OrderedDict[tuple[int, bytes, int], None] = OrderedDict()
        self._next_flow_id = 1
        self._dirty: dict[int, None] = {}  # flow ids that may have output, in FIFO order
        self._control: deque[bytes] = deque()
        self._events: list[StackEvent | _DataMarker] = []
        self._pending_data: dict[int, bytearray] = {}
        self._send_waiters: dict[int, None] = {}  # flows refused by MAX_SEND_TOTAL
        self._send_pool = tcp.SendPool()
        # (deadline, flow id); entries whose deadline is no longer the flow's timer_at are
        # stale and skipped, so re-arming a timer is a push, never a search.
        self._timers: list[tuple[float, int]] = []
        self._dns_pending: dict[int, _PendingDns] = {}
        self._next_dns_id = 1
        self._ip_ident = 0

    # -- input ------------------------------------------------------------------------------

    def feed_frame(self, frame: bytes, now: float) -> None:
        """Process one Ethernet frame from the guest. Never raises for bad input."""
        self.stats.frames_in += 1
        self.stats.bytes_in += len(frame)
        try:
            self._on_frame(frame, now)
        except PacketError as exc:
            self.stats.drop(exc.reason)

    def _on_frame(self, data: bytes, now: float) -> None:
        frame = ethernet.EthernetFrame.parse(data)
        if frame.dst != self.gateway_mac and frame.dst != ethernet.BROADCAST_MAC:
            raise PacketError("eth-not-for-us")
        if frame.src[0] & 1:
            raise PacketError("eth-multicast-src")
        if frame.ethertype == ethernet.ETHERTYPE_ARP:
            self._on_arp(frame)
        elif frame.ethertype == ethernet.ETHERTYPE_IPV4:
            self._on_ipv4(frame, now)
        elif frame.ethertype == ethernet.ETHERTYPE_IPV6:
            raise PacketError("ipv6")
        else:
            raise PacketError("eth-unknown-type")

    def _learn(self, mac: bytes) -> None:
        if self._learn_mac:
            self.guest_mac = mac

    def _on_arp(self, frame: ethernet.EthernetFrame) -> None:
        packet = arp.ArpPacket.parse(frame.payload)
        if packet.sender_ip == self.guest_ip:
            self._learn(frame.src)
        if packet.op != arp.OP_REQUEST or packet.target_ip != self.gateway_ip:
            return
        reply = arp.reply_for(packet, self.gateway_mac)
        self._queue_control(ethernet.build_frame(frame.src, self.gateway_mac,
                                                 ethernet.ETHERTYPE_ARP, reply.build()))
        self.stats.arp_replies += 1

    def _on_ipv4(self, frame: ethernet.EthernetFrame, now: float) -> None:
        packet = ipv4.Ipv4Packet.parse(frame.payload)
        datagram = None
        if packet.proto == ipv4.PROTO_UDP:
            datagram = UdpDatagram.parse(packet.payload, packet.src, packet.dst)
            if datagram.dst_port == dhcp.SERVER_PORT:
                self._on_dhcp(frame, datagram)
                return
        if packet.src != self.guest_ip:
            raise PacketError("ip-bad-src")
        if packet.dst[0] >= 224:
            raise PacketError("ip-multicast")
        self._learn(frame.src)
        if packet.proto == ipv4.PROTO_TCP:
            self._on_tcp(packet, now)
        elif datagram is not None:
            if datagram.dst_port != dns.PORT:
                raise PacketError("udp-port")
            self._on_dns(packet, datagram, now)
        elif packet.proto == ipv4.PROTO_ICMP:
            self._on_icmp(packet)
        else:
            raise PacketError("ip-unknown-proto")

    def _on_icmp(self, packet: ipv4.Ipv4Packet) -> None:
        echo = icmp.IcmpEcho.parse(packet.payload)
        if echo.type != icmp.TYPE_ECHO_REQUEST:
            raise PacketError("icmp-unsupported")
        self._queue_ip(packet.dst, ipv4.PROTO_ICMP, icmp.echo_reply(echo).build())
        self.stats.icmp_echo_replies += 1

    def _on_dhcp(self, frame: ethernet.EthernetFrame, datagram: UdpDatagram) -> None:
        reply = self._dhcp.handle(dhcp.DhcpMessage.parse(datagram.payload))
        if reply is None:
            return
        if reply.broadcast:
            dst_ip, dst_mac = b"\xff\xff\xff\xff", ethernet.BROADCAST_MAC
        else:
            dst_ip, dst_mac = self.guest_ip, reply.client_mac
        udp = UdpDatagram(dhcp.SERVER_PORT, dhcp.CLIENT_PORT, reply.payload)
        packet = self._ip_packet(self.gateway_ip, dst_ip, ipv4.PROTO_UDP,
                                 udp.build(self.gateway_ip, dst_ip))
        self._queue_control(ethernet.build_frame(dst_mac, self.gateway_mac,
                                                 ethernet.ETHERTYPE_IPV4, packet))
        self.stats.dhcp_replies += 1

    def _on_dns(self, packet: ipv4.Ipv4Packet, datagram: UdpDatagram, now: float) -> None:
        action = self._resolver.handle(datagram.payload, packet.dst, self.gateway_ip)
        if isinstance(action, dns.DnsAnswer):
            self._send_udp(packet.dst, dns.PORT, datagram.src_port, action.payload)
            self.stats.dns_answers += 1
            return
        self._expire_dns(now)
        if len(self._dns_pending) >= MAX_PENDING_DNS:
            raise PacketError("dns-pending-full")
        request_id = self._next_dns_id
        self._next_dns_id += 1
        self._dns_pending[request_id] = _PendingDns(
            datagram.src_port, packet.dst, action.query_id, now + DNS_FORWARD_TIMEOUT)
        self._events.append(DnsRequest(request_id, ipv4.ip_to_str(action.server),
                                       action.payload))
        self.stats.dns_forwards += 1

    def dns_reply(self, request_id: int, payload: bytes) -> None:
        """Hand an upstream resolver's reply to a :class:`DnsRequest` back to the guest."""
        pending = self._dns_pending.pop(request_id, None)
        if pending is None:
            self.stats.drop("dns-reply-late")
            return
        if not dns.response_matches(pending.query_id, payload):
            self.stats.drop("dns-reply-mismatch")
            return
        if len(payload) > dns.MAX_REPLY_LEN:
            # Too big for one unfragmented datagram: header only, truncated flag set, so the
            # client knows the answer exists but did not fit.
            header = bytearray(payload[:dns.HEADER_LEN])
            header[2] |= 0x02  # TC
            header[4:12] = bytes(8)
            payload = bytes(header)
        self._send_udp(pending.dst_ip, dns.PORT, pending.guest_port, payload)

    def _expire_dns(self, now: float) -> None:
        for request_id in [r for r, p in self._dns_pending.items() if p.deadline <= now]:
            del self._dns_pending[request_id]
            self.stats.drop("dns-forward-timeout")

    # -- TCP --------------------------------------------------------------------------------

    def _on_tcp(self, packet: ipv4.Ipv4Packet, now: float) -> None:
        seg = tcp.TcpSegment.parse(packet.payload, packet.src, packet.dst)
        key = (seg.src_port, packet.dst, seg.dst_port)
        flow = self._flows.get(key)
        is_syn = seg.flags & (tcp.SYN | tcp.ACK | tcp.RST | tcp.FIN) == tcp.SYN
        if flow is not None and is_syn and flow.conn.state is tcp.TcpState.TIME_WAIT:
            self._remove(flow)  # the guest reuses the port: the old incarnation is done
            flow = None
        if flow is None:
            if is_syn:
                self._on_syn(packet.dst, seg, now)
            elif not seg.flags & tcp.RST:
                self._send_rst_for(packet.dst, seg)
                self.stats.drop("tcp-no-flow")
            return
        flow.conn.on_segment(seg, now)
        self._after_conn(flow, now)

    def _on_syn(self, dst_ip: bytes, seg: tcp.TcpSegment, now: float) -> None:
        hostname = self.names.name_for(dst_ip)
        dst_text = ipv4.ip_to_str(dst_ip)
        target = self._rules.match(hostname, dst_text, seg.dst_port)
        ssh_allowed = self.config.ssh_enabled and seg.dst_port in self.config.ssh_ports
        reason = None if target is not None else self._refusal(dst_ip, seg.dst_port,
                                                               hostname, ssh_allowed)
        if reason is None and len(self._flows) - len(self._time_wait) >= self.config.max_flows:
            reason = "flow-limit"
        if reason is not None:
            self.stats.reject(reason)
            self._send_rst_for(dst_ip, seg)
            return
        if len(self._time_wait) >= MAX_TIME_WAIT:
            self._remove(self._flows[next(iter(self._time_wait))])
        conn = tcp.TcpConnection(seg, self._rng() & 0xFFFFFFFF, now, accept=target is None,
                                 pool=self._send_pool)
        flow = _Flow(self._next_flow_id, (seg.src_port, dst_ip, seg.dst_port), conn,
                     hostname, ssh_allowed)
        self._next_flow_id += 1
        self._flows[flow.key] = flow
        self._flows_by_id[flow.id] = flow
        if target is not None:
            self._announce(flow, FlowProtocol.MAPPED_TCP, None, target)
        else:
            flow.classify_deadline = now + CLASSIFY_TIMEOUT
        self._dirty[flow.id] = None
        self._rearm(flow)

    def _refusal(self, dst_ip: bytes, port: int, hostname: str | None,
                 ssh_allowed: bool) -> str | None:
        """Why a SYN can be refused from its destination alone, or None to accept it."""
        addr = ipaddress.IPv4Address(dst_ip)
        if addr in self._subnet or addr.is_loopback or addr.is_link_local or (
                addr.is_unspecified or addr.is_reserved or addr.is_multicast):
            return "unroutable-destination"
        if dns.is_synthetic(dst_ip) and hostname is None:
            return "unknown-synthetic-address"
        if ssh_allowed:
            return None
        if not self.config.http_enabled:
            return "no-handler"
        if self.config.flow_ports is not None and port not in self.config.flow_ports:
            return "port-not-served"
        return None

    def _after_conn(self, flow: _Flow, now: float) -> None:
        conn = flow.conn
        events, conn.events = conn.events, []
        for event in events:
            if isinstance(event, tcp.Received):
                if flow.announced:
                    self._queue_data(flow.id, event.data)
                else:
                    flow.classify_buf += event.data
                    self._try_classify(flow, eof=False)
            elif isinstance(event, tcp.PeerFin):
                if flow.announced:
                    self._events.append(FlowEof(flow.id))
                elif conn.state is not tcp.TcpState.CLOSED:
                    self._try_classify(flow, eof=True)
            elif isinstance(event, tcp.Writable):
                if flow.announced:
                    self._events.append(FlowWritable(flow.id))
            elif isinstance(event, tcp.Closed):
                self._remove(flow, event.reason)
            if self._flows_by_id.get(flow.id) is not flow:
                return  # removed (closed, or rejected by the classifier)
        if conn.state is tcp.TcpState.TIME_WAIT and flow.key not in self._time_wait:
            self._time_wait[flow.key] = None
        self._dirty[flow.id] = None
        self._rearm(flow)
        self._wake_send_waiters()

    def _wake_send_waiters(self) -> None:
        if self._send_waiters and self._send_total() <= MAX_SEND_TOTAL // 2:
            for flow_id in self._send_waiters:
                self._events.append(FlowWritable(flow_id))
            self._send_waiters.clear()

    def _try_classify(self, flow: _Flow, eof: bool) -> None:
        result = classify.classify(bytes(flow.classify_buf), ssh_allowed=flow.ssh_allowed,
                                   eof=eof)
        if isinstance(result, classify.NeedMore):
            return
        if isinstance(result, classify.Classified):
            if result.protocol is not FlowProtocol.SSH and not self.config.http_enabled:
                result = classify.Rejected("no-handler")
            else:
                self._announce(flow, result.protocol, result.sni, None)
                data, flow.classify_buf = bytes(flow.classify_buf), bytearray()
                self._queue_data(flow.id, data)
                return
        self.stats.reject(result.reason)
        self._abort(flow, result.reason)

    def _announce(self, flow: _Flow, protocol: FlowProtocol, sni: str | None,
                  target: MappedTarget | None) -> None:
        flow.announced = True
        flow.classify_deadline = None
        info = FlowInfo(protocol, self.config.guest_ip, flow.key[0],
                        ipv4.ip_to_str(flow.dst_ip), flow.dst_port, flow.hostname, sni)
        self._events.append(FlowOpened(flow.id, info, target))
        self.stats.flows_opened += 1

    def _abort(self, flow: _Flow, reason: str) -> None:
        rst = flow.conn.abort(reason)
        if rst is not None:
            self._queue_ip(flow.dst_ip, ipv4.PROTO_TCP, rst.build(flow.dst_ip, self.guest_ip))
        flow.conn.events.clear()
        self._remove(flow, reason)

    def _remove(self, flow: _Flow, reason: str = "closed") -> None:
        self._flows.pop(flow.key, None)
        self._flows_by_id.pop(flow.id, None)
        self._time_wait.pop(flow.key, None)
        self._dirty.pop(flow.id, None)
        self._send_waiters.pop(flow.id, None)
        if flow.announced:
            flow.announced = False
            self._events.append(FlowClosed(flow.id, reason))
            self.stats.flows_closed += 1
        self._wake_send_waiters()  # its send buffer was freed

    def _send_rst_for(self, dst_ip: bytes, seg: tcp.TcpSegment) -> None:
        """RST for a segment that matches no flow (RFC 9293 section 3.10.7.1)."""
        if seg.flags & tcp.ACK:
            rst = tcp.TcpSegment(seg.dst_port, seg.src_port, seg.ack, 0, tcp.RST, 0)
        else:
            length = len(seg.payload) + (1 if seg.flags & tcp.SYN else 0) + (
                1 if seg.flags & tcp.FIN else 0)
            rst = tcp.TcpSegment(seg.dst_port, seg.src_port, 0, (seg.seq + length) & 0xFFFFFFFF,
                                 tcp.RST | tcp.ACK, 0)
        self._queue_ip(dst_ip, ipv4.PROTO_TCP, rst.build(dst_ip, self.guest_ip))

    # -- app side ---------------------------------------------------------------------------

    def _live(self, flow_id: int) -> _Flow | None:
        flow = self._flows_by_id.get(flow_id)
        return flow if flow is not None and flow.announced else None

    def flow_accept(self, flow_id: int) -> None:
        """Let a mapped flow's handshake complete (its upstream is connected)."""
        flow = self._live(flow_id)
        if flow is not None:
            flow.conn.accept()
            self._dirty[flow_id] = None

    def flow_send(self, flow_id: int, data: bytes | memoryview) -> int:
        """Queue bytes for the guest; returns how many were taken (0: buffer full or flow
        gone). After a short count a :class:`FlowWritable` (or :class:`FlowClosed`) follows."""
        flow = self._live(flow_id)
        if flow is None or not data:
            return 0
        room = MAX_SEND_TOTAL - self._send_total()
        if room < len(data) and room < flow.conn.send_space:
            self._send_waiters[flow_id] = None
        n = flow.conn.send(data[:max(0, room)])
        if n:
            self._dirty[flow_id] = None
        return n

    def flow_send_space(self, flow_id: int) -> int:
        flow = self._live(flow_id)
        if flow is None:
            return 0
        return max(0, min(flow.conn.send_space, MAX_SEND_TOTAL - self._send_total()))

    def flow_consumed(self, flow_id: int, n: int) -> None:
        """The app processed ``n`` bytes of FlowData; the guest's window reopens."""
        flow = self._live(flow_id)
        if flow is not None and n > 0:
            flow.conn.consumed(n)
            if flow.conn.ack_due:
                self._dirty[flow_id] = None

    def flow_close(self, flow_id: int) -> None:
        """Half-close towards the guest: FIN after the queued data. Guest data still flows."""
        flow = self._live(flow_id)
        if flow is None:
            return
        if flow.conn.state is tcp.TcpState.SYN_PENDING:
            self._abort(flow, "refused")  # a mapped flow never accepted
            return
        flow.conn.close()
        self._dirty[flow_id] = None

    def flow_reset(self, flow_id: int, reason: str = "reset-by-host") -> None:
        flow = self._flows_by_id.get(flow_id)
        if flow is not None:
            self._abort(flow, reason)

    def flow_state(self, flow_id: int) -> tcp.TcpState | None:
        flow = self._flows_by_id.get(flow_id)
        return flow.conn.state if flow is not None else None

    @property
    def flow_count(self) -> int:
        """Live flows (TIME_WAIT excluded)."""
        return len(self._flows) - len(self._time_wait)

    def memory_in_use(self) -> int:
        """Bytes of guest-controlled data held across all flows (for bound checks)."""
        total = 0
        for flow in self._flows.values():
            total += flow.conn.queued + flow.conn.ooo_bytes + len(flow.classify_buf)
            total += flow.conn.unconsumed
        return total

    def _send_total(self) -> int:
        return self._send_pool.used

    # -- output -----------------------------------------------------------------------------

    def events(self) -> list[StackEvent]:
        """Drain the events produced since the last call, in order."""
        out: list[StackEvent] = []
        for event in self._events:
            if isinstance(event, _DataMarker):
                out.append(FlowData(event.flow_id, bytes(self._pending_data.pop(event.flow_id))))
            else:
                out.append(event)
        self._events = []
        return out

    def _queue_data(self, flow_id: int, data: bytes) -> None:
        if not data:
            return
        buf = self._pending_data.get(flow_id)
        if buf is None:
            self._pending_data[flow_id] = bytearray(data)
            self._events.append(_DataMarker(flow_id))
        else:
            buf += data

    def frames_to_send(self, now: float, budget: int = OUTPUT_BUDGET) -> list[bytes]:
        """Frames for the guest, control frames first, then TCP output round-robin."""
        out = list(self._control)
        self._control.clear()
        sent = 0
        while self._dirty and sent < budget:
            flow_id = next(iter(self._dirty))
            del self._dirty[flow_id]
            flow = self._flows_by_id.get(flow_id)
            if flow is None:
                continue
            for seg in flow.conn.poll_output(now, budget - sent):
                out.append(self._ip_frame(flow.dst_ip, ipv4.PROTO_TCP,
                                          seg.build(flow.dst_ip, self.guest_ip)))
                sent += len(seg.payload)
            self._rearm(flow)
            if flow.conn.wants_output():
                self._dirty[flow_id] = None  # back of the queue: others get their turn
        self.stats.frames_out += len(out)
        self.stats.bytes_out += sum(len(f) for f in out)
        return out

    def has_output(self) -> bool:
        """Whether :meth:`frames_to_send` may return frames now."""
        return bool(self._control or self._dirty)

    def _queue_control(self, frame: bytes) -> None:
        if len(self._control) >= MAX_CONTROL_FRAMES:
            self.stats.drop("tx-queue-full")
            return
        self._control.append(frame)

    def _ip_packet(self, src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
        self._ip_ident = (self._ip_ident + 1) & 0xFFFF
        return ipv4.build_packet(src, dst, proto, payload, self._ip_ident)

    def _ip_frame(self, src: bytes, proto: int, payload: bytes) -> bytes:
        return ethernet.build_frame(self.guest_mac, self.gateway_mac, ethernet.ETHERTYPE_IPV4,
                                    self._ip_packet(src, self.guest_ip, proto, payload))

    def _queue_ip(self, src: bytes, proto: int, payload: bytes) -> None:
        self._queue_control(self._ip_frame(src, proto, payload))

    def _send_udp(self, src_ip: bytes, src_port: int, dst_port: int, payload: bytes) -> None:
        udp = UdpDatagram(src_port, dst_port, payload)
        self._queue_ip(src_ip, ipv4.PROTO_UDP, udp.build(src_ip, self.guest_ip))

    # -- timers -----------------------------------------------------------------------------

    def _rearm(self, flow: _Flow) -> None:
        deadline = flow.deadline()
        if deadline != flow.timer_at:
            flow.timer_at = deadline
            if deadline is not None:
                heapq.heappush(self._timers, (deadline, flow.id))
                if len(self._timers) > 4 * len(self._flows) + 64:
                    self._timers = [(f.timer_at, f.id) for f in self._flows.values()
                                    if f.timer_at is not None]
                    heapq.heapify(self._timers)

    def _live_timer(self) -> tuple[float, _Flow] | None:
        while self._timers:
            deadline, flow_id = self._timers[0]
            flow = self._flows_by_id.get(flow_id)
            if flow is not None and flow.timer_at == deadline:
                return deadline, flow
            heapq.heappop(self._timers)  # stale
        return None

    def next_timer(self) -> float | None:
        """The earliest time :meth:`on_timer` has work to do, or None."""
        head = self._live_timer()
        best = head[0] if head is not None else None
        if self._dns_pending:  # insertion order is deadline order (fixed timeout)
            dns_deadline = next(iter(self._dns_pending.values())).deadline
            if best is None or dns_deadline < best:
                best = dns_deadline
        return best

    def on_timer(self, now: float) -> None:
        due: list[_Flow] = []
        while (head := self._live_timer()) is not None and head[0] <= now:
            heapq.heappop(self._timers)
            head[1].timer_at = None
            due.append(head[1])
        for flow in due:
            if self._flows_by_id.get(flow.id) is not flow:
                continue  # removed while handling an earlier one
            if flow.classify_deadline is not None and now >= flow.classify_deadline:
                self.stats.reject("classify-timeout")
                self._abort(flow, "classify-timeout")
                continue
            rst = flow.conn.on_timer(now)
            if rst is not None:
                self._queue_ip(flow.dst_ip, ipv4.PROTO_TCP, rst.build(flow.dst_ip, self.guest_ip))
            self._after_conn(flow, now)
        self._expire_dns(now)
