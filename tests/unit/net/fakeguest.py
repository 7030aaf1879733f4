"""A scriptable fake guest for network stack tests: builds the guest's frames, parses the
stack's, and runs hand-driven TCP clients. Transport-agnostic: frames go to ``outbox`` and come
back through :meth:`FakeGuest.deliver`, so the same guest works against the sans-IO stack
(:func:`pump`) and against the driver over a socket.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc

from gondolin.net import ethernet, icmp, ipv4
from gondolin.net.stack import GATEWAY_IP, GATEWAY_MAC, GUEST_IP, NetworkStack
from gondolin.net.tcp import ACK, FIN, PSH, RST, SYN, TcpSegment
from gondolin.net.udp import UdpDatagram

GUEST_MAC = bytes.fromhex("525400123456")
GW_MAC = ethernet.mac_from_str(GATEWAY_MAC)
GW_IP = ipv4.ip_from_str(GATEWAY_IP)
G_IP = ipv4.ip_from_str(GUEST_IP)


def ip(text: str) -> bytes:
    return ipv4.ip_from_str(text)


@dataclass
class UdpIn:
    src_ip: bytes
    src_port: int
    dst_port: int
    payload: bytes


class FakeGuest:
    def __init__(self, mac: bytes = GUEST_MAC, address: bytes = G_IP) -> None:
        self.mac = mac
        self.ip = address
        self.outbox: list[bytes] = []
        self.frames: list[bytes] = []  # everything received, raw
        self.arp: list[bytes] = []  # ARP payloads received
        self.udp: list[UdpIn] = []
        self.icmp: list[tuple[bytes, icmp.IcmpEcho]] = []
        self.stray_tcp: list[tuple[bytes, TcpSegment]] = []  # segments for no known client
        self.conns: dict[tuple[int, bytes, int], GuestTcp] = {}
        self._next_port = 40000

    # -- sending --------------------------------------------------------------------------

    def send_frame(self, ethertype: int, payload: bytes, dst_mac: bytes = GW_MAC) -> None:
        self.outbox.append(ethernet.build_frame(dst_mac, self.mac, ethertype, payload))

    def send_ip(self, dst: bytes, proto: int, payload: bytes, src: bytes | None = None) -> None:
        packet = ipv4.build_packet(src or self.ip, dst, proto, payload, ident=7)
        self.send_frame(ethernet.ETHERTYPE_IPV4, packet)

    def send_udp(self, dst: bytes, src_port: int, dst_port: int, payload: bytes,
                 src: bytes | None = None) -> None:
        datagram = UdpDatagram(src_port, dst_port, payload).build(src or self.ip, dst)
        self.send_ip(dst, ipv4.PROTO_UDP, datagram, src)

    def send_tcp(self, dst: bytes, seg: TcpSegment) -> None:
        self.send_ip(dst, ipv4.PROTO_TCP, seg.build(self.ip, dst))

    def take_outbox(self) -> list[bytes]:
        out, self.outbox = self.outbox, []
        return out

    def connect(self, dst: bytes, port: int, **kwargs: object) -> GuestTcp:
        self._next_port += 1
        conn = GuestTcp(self, dst, port, self._next_port, **kwargs)  # type: ignore[arg-type]
        self.conns[(conn.src_port, dst, port)] = conn
        conn.connect()
        return conn

    # -- receiving ------------------------------------------------------------------------

    def deliver(self, frame: bytes) -> None:
        self.frames.append(frame)
        eth = ethernet.EthernetFrame.parse(frame)
        assert eth.src == GW_MAC
        if eth.ethertype == ethernet.ETHERTYPE_ARP:
            self.arp.append(eth.payload)
            return
        assert eth.ethertype == ethernet.ETHERTYPE_IPV4
        packet = ipv4.Ipv4Packet.parse(eth.payload)  # also verifies the header checksum
        if packet.proto == ipv4.PROTO_UDP:
            d = UdpDatagram.parse(packet.payload, packet.src, packet.dst)
            self.udp.append(UdpIn(packet.src, d.src_port, d.dst_port, d.payload))
        elif packet.proto == ipv4.PROTO_ICMP:
            self.icmp.append((packet.src, icmp.IcmpEcho.parse(packet.payload)))
        elif packet.proto == ipv4.PROTO_TCP:
            assert packet.dst == self.ip and eth.dst == self.mac
            seg = TcpSegment.parse(packet.payload, packet.src, packet.dst)
            conn = self.conns.get((seg.dst_port, packet.src, seg.src_port))
            if conn is None:
                self.stray_tcp.append((packet.src, seg))
            else:
                conn.handle(seg)
        else:
            raise AssertionError(f"unexpected protocol {packet.proto}")


@dataclass
class GuestTcp:
    """A hand-driven TCP client. It ACKs what it receives (unless ``auto_ack`` is off).
    With ``auto_read`` off, received bytes stay unread and shrink its advertised window
    (``rcv_buffer - unread``) until :meth:`read`; data beyond the window is counted as a
    violation (a 1-byte segment into a zero window is a legal probe)."""

    guest: FakeGuest
    dst: bytes
    dst_port: int
    src_port: int
    isn: int = 1000
    rcv_buffer: int = 65535
    auto_read: bool = True
    unread: int = 0
    mss: int | None = 1460
    wscale: int | None = None
    auto_ack: bool = True
    state: str = "closed"
    received: bytearray = field(default_factory=bytearray)
    segments: list[TcpSegment] = field(default_factory=list)
    fin_received: bool = False
    reset: bool = False
    window_violations: int = 0
    probes: int = 0
    peer_mss: int | None = None
    peer_window: int = 0
    snd_una: int = 0

    def __post_init__(self) -> None:
        self.snd_nxt = self.isn
        self.rcv_nxt = 0

    def connect(self) -> None:
        self._send(SYN, seq=self.isn, ack=0, mss=self.mss, wscale=self.wscale)
        self.snd_nxt = (self.isn + 1) & 0xFFFFFFFF
        self.state = "syn-sent"

    def _send(self, flags: int, payload: bytes = b"", seq: int | None = None,
              ack: int | None = None, window: int | None = None, mss: int | None = None,
              wscale: int | None = None) -> None:
        win = self.window if window is None else window
        if self.wscale is not None and not flags & SYN:
            win >>= self.wscale
        seg = TcpSegment(self.src_port, self.dst_port, self.snd_nxt if seq is None else seq,
                         self.rcv_nxt if ack is None else ack, flags, min(win, 0xFFFF),
                         payload, mss, wscale)
        self.guest.send_tcp(self.dst, seg)

    def send(self, data: bytes, seq: int | None = None) -> None:
        """Send ``data`` in MSS-sized segments starting at ``seq`` (default: SND.NXT)."""
        start = self.snd_nxt if seq is None else seq
        step = min(self.mss or 536, self.peer_mss or 536)
        for i in range(0, len(data), step):
            chunk = data[i:i + step]
            self._send(ACK | PSH, chunk, seq=(start + i) & 0xFFFFFFFF)
        if seq is None:
            self.snd_nxt = (start + len(data)) & 0xFFFFFFFF

    @property
    def window(self) -> int:
        return max(0, self.rcv_buffer - self.unread)

    def ack(self) -> None:
        self._send(ACK)

    def fin(self) -> None:
        self._send(FIN | ACK)
        self.snd_nxt = (self.snd_nxt + 1) & 0xFFFFFFFF

    def rst(self) -> None:
        self._send(RST | ACK)
        self.state = "reset"

    def handle(self, seg: TcpSegment) -> None:
        self.segments.append(seg)
        if seg.flags & RST:
            self.reset = True
            self.state = "reset"
            return
        if seg.flags & SYN:
            assert seg.flags & ACK and seg.ack == (self.isn + 1) & 0xFFFFFFFF
            self.rcv_nxt = (seg.seq + 1) & 0xFFFFFFFF
            self.peer_mss = seg.mss
            self.peer_window = seg.window
            self.snd_una = seg.ack
            self.state = "established"
            self._send(ACK)
            return
        self.peer_window = seg.window
        self.snd_una = seg.ack
        if not seg.payload and not seg.flags & FIN:
            return
        if seg.payload:
            offset = (seg.seq - self.rcv_nxt) & 0xFFFFFFFF
            if offset == 0:
                if self.window == 0 and len(seg.payload) == 1:
                    self.probes += 1  # zero-window probe: legal, discarded
                elif len(seg.payload) > self.window:
                    self.window_violations += 1
                else:
                    self.received += seg.payload
                    self.rcv_nxt = (self.rcv_nxt + len(seg.payload)) & 0xFFFFFFFF
                    if not self.auto_read:
                        self.unread += len(seg.payload)
        if seg.flags & FIN and (seg.seq + len(seg.payload)) & 0xFFFFFFFF == self.rcv_nxt:
            self.rcv_nxt = (self.rcv_nxt + 1) & 0xFFFFFFFF
            self.fin_received = True
        if self.auto_ack:
            self._send(ACK)

    def read(self, n: int | None = None) -> None:
        """The guest app reads ``n`` (default: all) unread bytes; a window update follows."""
        self.unread = 0 if n is None else max(0, self.unread - n)
        self._send(ACK)


def pump(stack: NetworkStack, guest: FakeGuest, now: float, rounds: int = 10_000) -> None:
    """Move frames both ways until nothing moves (bounded)."""
    for _ in range(rounds):
        moved = False
        for frame in guest.take_outbox():
            stack.feed_frame(frame, now)
            moved = True
        for frame in stack.frames_to_send(now):
            guest.deliver(frame)
            moved = True
        if not moved:
            return
    raise AssertionError("pump did not settle")


def tcp_flags(seg: TcpSegment) -> str:
    names = [(SYN, "S"), (ACK, "A"), (FIN, "F"), (RST, "R"), (PSH, "P")]
    return "".join(n for bit, n in names if seg.flags & bit)




class SocketGuest:
    """A FakeGuest wired to the driver through a byte stream with QEMU's netdev framing."""

    def __init__(self, stream: anyio.abc.ByteStream, guest: FakeGuest | None = None) -> None:
        self.stream = stream
        self.guest = guest or FakeGuest()
        self._buf = bytearray()

    async def flush(self) -> None:
        out = b"".join(len(f).to_bytes(4, "big") + f for f in self.guest.take_outbox())
        if out:
            await self.stream.send(out)

    async def run_until(self, done: Callable[[], bool], limit: float = 10.0) -> None:
        """Exchange frames (the guest auto-ACKs) until ``done()`` holds; fails after
        ``limit`` seconds."""
        with anyio.fail_after(limit):
            await self._exchange(done)

    async def settle(self, seconds: float = 0.2) -> None:
        """Exchange frames for a while without a goal."""
        with anyio.move_on_after(seconds):
            await self._exchange(lambda: False)

    async def _exchange(self, done: Callable[[], bool]) -> None:
        while True:
            await self.flush()
            if done():
                await self.flush()  # done() may have queued frames
                return
            await self.flush()
            self._buf += await self.stream.receive()
            while len(self._buf) >= 4:
                n = int.from_bytes(self._buf[:4], "big")
                if len(self._buf) < 4 + n:
                    break
                self.guest.deliver(bytes(self._buf[4:4 + n]))
                del self._buf[:4 + n]
