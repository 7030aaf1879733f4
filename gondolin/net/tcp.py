"""TCP (RFC 9293) for connections the guest opens; the stack is always the passive side.

:class:`TcpSegment` parses and builds segments. :class:`TcpConnection` is one connection's
state machine: segments and app calls in, segments (from :meth:`~TcpConnection.poll_output`)
and :data:`ConnEvent` values out, time passed in. Memory per connection is bounded: at most
:data:`RECV_BUFFER` bytes received but not consumed by the app, :data:`MAX_OOO_SEGMENTS`
out-of-order segments (each inside the receive window), :data:`SEND_BUFFER` bytes queued.

Sequence numbers are tracked as unbounded offsets from the initial sequence number, so only
the wire conversion deals with 32-bit wrap-around.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from gondolin.net.errors import PacketError
from gondolin.net.ipv4 import PROTO_TCP, checksum, pseudo_header

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

HEADER_LEN = 20
# What we advertise: the largest IPv4 packet minus IP and TCP headers. The link is virtual, so
# the guest's MTU alone decides (1460 at the usual 1500; a jumbo MTU means far fewer segments).
MSS = 65495
MIN_MSS = 88  # a tiny peer MSS would turn our sends into a flood of tiny frames
DEFAULT_PEER_MSS = 536  # RFC 9293 section 3.7.1, when the SYN has no MSS option
MAX_WSCALE = 14  # RFC 7323 section 2.3
RECV_BUFFER = 65535  # no window scaling on our side: the largest window we can advertise
SEND_BUFFER = 256 * 1024
MAX_IN_FLIGHT = 256 * 1024
MAX_OOO_SEGMENTS = 64

RTO_INITIAL = 1.0  # RFC 6298 section 2
RTO_MIN = 0.2
RTO_MAX = 30.0
MAX_RETRANSMITS = 8  # about two minutes with backoff, like Linux's tcp_retries2 but shorter
MAX_SYNACK_RETRANSMITS = 5
PERSIST_MAX = 30.0
ACCEPT_TIMEOUT = 30.0  # a deferred accept (mapped flow connecting upstream) must finish by then
TIME_WAIT = 2.0  # short: the link is virtual and only the guest can send on it
FIN_WAIT_2_TIMEOUT = 60.0
_DUPACK_THRESHOLD = 3

_HEADER = struct.Struct("!HHIIHHHH")
_OPT_EOL = 0
_OPT_NOP = 1
_OPT_MSS = 2
_OPT_WSCALE = 3
_SEQ_MOD = 1 << 32


@dataclass(frozen=True, slots=True)
class TcpSegment:
    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes = b""
    mss: int | None = None  # MSS option (SYN only)
    wscale: int | None = None  # window scale option (SYN only)

    @classmethod
    def parse(cls, data: bytes, src_ip: bytes, dst_ip: bytes) -> TcpSegment:
        if len(data) < HEADER_LEN:
            raise PacketError("tcp-short")
        src_port, dst_port, seq, ack, off_flags, window, _csum, _urg = _HEADER.unpack_from(data)
        header_len = (off_flags >> 12) * 4
        if header_len < HEADER_LEN or header_len > len(data):
            raise PacketError("tcp-bad-offset")
        if checksum(pseudo_header(src_ip, dst_ip, PROTO_TCP, len(data)) + data):
            raise PacketError("tcp-checksum")
        flags = off_flags & 0x3F
        mss = wscale = None
        if flags & SYN and header_len > HEADER_LEN:
            mss, wscale = _parse_options(data[HEADER_LEN:header_len])
        return cls(src_port, dst_port, seq, ack, flags, window, bytes(data[header_len:]),
                   mss, wscale)

    def build(self, src_ip: bytes, dst_ip: bytes) -> bytes:
        options = b""
        if self.mss is not None:
            options += struct.pack("!BBH", _OPT_MSS, 4, self.mss)
        if self.wscale is not None:
            options += struct.pack("!BBBB", _OPT_NOP, _OPT_WSCALE, 3, self.wscale)
        header_len = HEADER_LEN + len(options)
        seg = bytearray(_HEADER.pack(self.src_port, self.dst_port, self.seq, self.ack,
                                     (header_len // 4) << 12 | self.flags, self.window, 0, 0))
        seg += options
        seg += self.payload
        struct.pack_into("!H", seg, 16,
                         checksum(pseudo_header(src_ip, dst_ip, PROTO_TCP, len(seg)) + seg))
        return bytes(seg)


def _parse_options(data: bytes) -> tuple[int | None, int | None]:
    """MSS and window scale; a malformed option list ends parsing (RFC 9293 section 3.1)."""
    mss = wscale = None
    i = 0
    while i < len(data):
        kind = data[i]
        if kind == _OPT_EOL:
            break
        if kind == _OPT_NOP:
            i += 1
            continue
        if i + 1 >= len(data) or data[i + 1] < 2 or i + data[i + 1] > len(data):
            break
        length = data[i + 1]
        if kind == _OPT_MSS and length == 4:
            mss = struct.unpack_from("!H", data, i + 2)[0]
        elif kind == _OPT_WSCALE and length == 3:
            wscale = data[i + 2]
        i += length
    return mss, wscale


class TcpState(enum.Enum):
    SYN_PENDING = "syn-pending"  # SYN seen, waiting for the app to accept (mapped flows)
    SYN_RECEIVED = "syn-received"
    ESTABLISHED = "established"
    CLOSE_WAIT = "close-wait"
    FIN_WAIT_1 = "fin-wait-1"
    FIN_WAIT_2 = "fin-wait-2"
    CLOSING = "closing"
    LAST_ACK = "last-ack"
    TIME_WAIT = "time-wait"
    CLOSED = "closed"


S = TcpState
# Close handshake transitions (RFC 9293 figure 5), one table per event.
_ON_PEER_FIN = {
    S.ESTABLISHED: S.CLOSE_WAIT,
    S.FIN_WAIT_1: S.CLOSING,
    S.FIN_WAIT_2: S.TIME_WAIT,
}
_ON_FIN_SENT = {S.ESTABLISHED: S.FIN_WAIT_1, S.CLOSE_WAIT: S.LAST_ACK}
_ON_FIN_ACKED = {S.FIN_WAIT_1: S.FIN_WAIT_2, S.CLOSING: S.TIME_WAIT, S.LAST_ACK: S.CLOSED}
_RECEIVES_DATA = frozenset({S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2})
_SENDS_DATA = frozenset({S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK})
_APP_CAN_SEND = frozenset({S.SYN_PENDING, S.SYN_RECEIVED, S.ESTABLISHED, S.CLOSE_WAIT})


@dataclass(frozen=True, slots=True)
class Established:
    pass


@dataclass(frozen=True, slots=True)
class Received:
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerFin:
    """The guest closed its sending side; no more data will be received."""


@dataclass(frozen=True, slots=True)
class Writable:
    """Send buffer space freed after a short :meth:`TcpConnection.send`."""


@dataclass(frozen=True, slots=True)
class Closed:
    reason: str


ConnEvent = Established | Received | PeerFin | Writable | Closed


class SendPool:
    """Bytes queued for sending across many connections (one VM), kept current by each
    connection so a VM-wide cap costs O(1) to check."""

    __slots__ = ("used",)

    def __init__(self) -> None:
        self.used = 0


def _unwrap(wire: int, ref: int, base: int) -> int:
    """The offset (from ``base``) whose 32-bit wire value is ``wire``, nearest to ``ref``."""
    delta = (wire - base - ref) % _SEQ_MOD
    if delta >= _SEQ_MOD // 2:
        delta -= _SEQ_MOD
    return ref + delta


class TcpConnection:
    """One guest-initiated connection, from its SYN to CLOSED."""

    def __init__(self, syn: TcpSegment, iss: int, now: float, *, accept: bool = True,
                 recv_buffer: int = RECV_BUFFER, send_buffer: int = SEND_BUFFER,
                 pool: SendPool | None = None) -> None:
        self.local_port = syn.dst_port
        self.remote_port = syn.src_port
        self.iss = iss
        self.irs = syn.seq
        self.state = S.SYN_RECEIVED if accept else S.SYN_PENDING
        self.events: list[ConnEvent] = []
        self.recv_buffer = recv_buffer
        self.send_buffer = send_buffer
        self.close_reason = ""
        self._pool = pool or SendPool()
        # Send side (offsets from iss; offset 0 is our SYN).
        self.snd_una = 0
        self.snd_nxt = 0
        self.snd_max = 0
        self._sbuf = bytearray()  # unacknowledged + unsent data, starting at _data_base
        self._data_base = 1
        self._fin_queued = False
        self.snd_mss = max(MIN_MSS, min(MSS, syn.mss if syn.mss else DEFAULT_PEER_MSS))
        self._snd_wscale = min(syn.wscale, MAX_WSCALE) if syn.wscale is not None else 0
        self._offer_wscale = syn.wscale is not None
        self.snd_wnd = syn.window  # never scaled in a SYN (RFC 7323 section 2.2)
        self._wnd_seq = 0  # SND.WL1 / SND.WL2 as offsets
        self._wnd_ack = 0
        self._dupacks = 0
        self._want_writable = False
        # Receive side (offsets from irs; offset 0 is the guest's SYN).
        self.rcv_nxt = 1
        self.unconsumed = 0
        self._ooo: dict[int, bytes] = {}
        self._ack_due = False
        self._adv_wnd = 0
        # Timers.
        self.rto = RTO_INITIAL
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rtt_offset: int | None = None
        self._rtt_start = 0.0
        self._retries = 0
        self._rto_at: float | None = None
        self._persist_at: float | None = None
        self._persist_backoff = 0
        self._probe_due = False
        self._state_at: float | None = now + ACCEPT_TIMEOUT if not accept else None
        self._syn_ack_due = accept

    # -- app side -----------------------------------------------------------------------

    def accept(self) -> None:
        """Send the SYN-ACK for a deferred (``accept=False``) connection."""
        if self.state is S.SYN_PENDING:
            self.state = S.SYN_RECEIVED
            self._syn_ack_due = True
            self._state_at = None

    def send(self, data: bytes | memoryview) -> int:
        """Queue bytes for the guest; returns how many fit in the send buffer."""
        if self.state not in _APP_CAN_SEND or self._fin_queued:
            return 0
        n = min(len(data), self.send_buffer - len(self._sbuf))
        if n < len(data):
            self._want_writable = True
        if n > 0:
            self._sbuf += data[:n]
            self._pool.used += n
        return n

    @property
    def send_space(self) -> int:
        if self.state not in _APP_CAN_SEND or self._fin_queued:
            return 0
        return self.send_buffer - len(self._sbuf)

    @property
    def queued(self) -> int:
        """Bytes in the send buffer (sent but unacknowledged, or not yet sent)."""
        return len(self._sbuf)

    def close(self) -> None:
        """Half-close: send FIN once everything queued has been sent."""
        if self.state is S.SYN_PENDING:
            self.abort("refused")
            return
        self._fin_queued = True

    def abort(self, reason: str) -> TcpSegment | None:
        """Drop the connection; returns the RST to send (None if nothing was ever sent)."""
        if self.state is S.CLOSED:
            return None
        rst = TcpSegment(self.local_port, self.remote_port, self._wire_snd(self.snd_nxt),
                         self._wire_rcv(self.rcv_nxt), RST | ACK, 0)
        if self.state is S.SYN_PENDING:  # we never sent a sequence number: refuse the SYN
            rst = TcpSegment(self.local_port, self.remote_port, 0,
                             self._wire_rcv(self.rcv_nxt), RST | ACK, 0)
        self._close(reason)
        return rst

    def consumed(self, n: int) -> None:
        """The app has processed ``n`` delivered bytes; reopens the receive window."""
        self.unconsumed = max(0, self.unconsumed - n)
        if self.state in _RECEIVES_DATA or self.state is S.SYN_RECEIVED:
            gained = self.window - self._adv_wnd
            if gained >= min(self.recv_buffer // 2, 2 * self.snd_mss) or (
                    self._adv_wnd == 0 and self.window >= min(self.snd_mss, self.recv_buffer // 2)):
                self._ack_due = True  # window update

    @property
    def window(self) -> int:
        return max(0, self.recv_buffer - self.unconsumed)

    @property
    def ooo_bytes(self) -> int:
        return sum(len(v) for v in self._ooo.values())

    # -- input ----------------------------------------------------------------------------

    def on_segment(self, seg: TcpSegment, now: float) -> None:
        if self.state is S.CLOSED:
            return
        if self.state is S.SYN_PENDING:
            if seg.flags & RST:
                self._close("reset-by-guest")
            return  # SYN retransmissions while the app decides: nothing to say yet
        seq = _unwrap(seg.seq, self.rcv_nxt, self.irs)
        if seg.flags & RST:
            # Accept a reset anywhere in the window (RFC 9293 section 3.10.7.4). The guest is
            # the only sender on this link, so blind-reset defences buy nothing.
            if self.rcv_nxt <= seq < self.rcv_nxt + max(self.window, 1) or (
                    self.state is S.SYN_RECEIVED and seq == self.rcv_nxt):
                self._close("reset-by-guest")
            return
        if seg.flags & SYN:
            if self.state is S.SYN_RECEIVED and seq == 0:
                self._syn_ack_due = True  # our SYN-ACK was lost
            else:
                self._ack_due = True  # challenge ACK (RFC 5961 section 4)
            return
        if not seg.flags & ACK:
            return
        if not self._on_ack(seg, seq, now):
            return
        if self.state is S.CLOSED:
            return
        self._on_data(seg, seq, now)

    def _on_ack(self, seg: TcpSegment, seq: int, now: float) -> bool:
        ack = _unwrap(seg.ack, self.snd_una, self.iss)
        if ack > self.snd_max:
            self._ack_due = True  # acknowledges something never sent
            return False
        if self.state is S.SYN_RECEIVED:
            if ack < 1:
                return False
            self.state = S.ESTABLISHED
            self.snd_una = self.snd_nxt = 1
            self._data_base = 1
            self._rto_at = None
            self._retries = 0
            self._wnd_seq, self._wnd_ack = seq, ack
            self.snd_wnd = seg.window << self._snd_wscale
            self.events.append(Established())
        window = seg.window << self._snd_wscale
        if ack > self.snd_una:
            self._acked(ack, now)
            self._dupacks = 0
        elif (ack == self.snd_una and not seg.payload and not seg.flags & FIN
              and window == self.snd_wnd and self.snd_max > self.snd_una):
            self._dupacks += 1
            if self._dupacks == _DUPACK_THRESHOLD:
                self._retransmit()
        # Window update rule (RFC 9293 section 3.10.7.4, SND.WL1/SND.WL2).
        if ack >= self.snd_una and (
                seq > self._wnd_seq or (seq == self._wnd_seq and ack >= self._wnd_ack)):
            opened = self.snd_wnd == 0 and window > 0
            self.snd_wnd = window
            self._wnd_seq, self._wnd_ack = seq, ack
            if opened:
                self._persist_at = None
                self._persist_backoff = 0
        return True

    def _acked(self, ack: int, now: float) -> None:
        data_end = self._data_base + len(self._sbuf)
        data_acked = min(ack, data_end) - self._data_base
        if data_acked > 0:
            del self._sbuf[:data_acked]
            self._pool.used -= data_acked
            self._data_base += data_acked
        self.snd_una = ack
        if self.snd_nxt < ack:
            self.snd_nxt = ack  # a window probe byte was accepted
        if self._rtt_offset is not None and ack >= self._rtt_offset:
            self._rtt_sample(now - self._rtt_start)
            self._rtt_offset = None
        self._retries = 0
        self._rto_at = None if self.snd_una >= self.snd_nxt else now + self.rto
        if self._fin_queued and ack == data_end + 1:
            new = _ON_FIN_ACKED.get(self.state)
            if new is not None:
                self._enter(new, now)
        if self._want_writable and len(self._sbuf) <= self.send_buffer // 2:
            self._want_writable = False
            self.events.append(Writable())

    def _on_data(self, seg: TcpSegment, seq: int, now: float) -> None:
        payload = seg.payload
        fin = bool(seg.flags & FIN)
        if not payload and not fin:
            return
        if self.state not in _RECEIVES_DATA:
            # After the guest's FIN: anything more is a retransmission; re-ACK it.
            self._ack_due = True
            return
        self._ack_due = True
        if seq < self.rcv_nxt:  # trim what we already have
            cut = self.rcv_nxt - seq
            if cut > len(payload):
                return  # pure duplicate (its FIN, if any, was already taken)
            payload = payload[cut:]
            seq = self.rcv_nxt
        limit = self.rcv_nxt + self.window
        if seq + len(payload) > limit:  # beyond the window: keep only what fits
            payload = payload[:max(0, limit - seq)]
            fin = False
        if seq == self.rcv_nxt:
            self._deliver(payload)
            if fin:
                self.rcv_nxt += 1
                self.events.append(PeerFin())
                new = _ON_PEER_FIN.get(self.state)
                if new is not None:
                    self._enter(new, now)
        elif payload and seq > self.rcv_nxt:
            if seq in self._ooo or len(self._ooo) < MAX_OOO_SEGMENTS:
                if len(payload) > len(self._ooo.get(seq, b"")):
                    self._ooo[seq] = payload

    def _deliver(self, payload: bytes) -> None:
        if payload:
            self.rcv_nxt += len(payload)
        chunks = [payload] if payload else []
        while self._ooo:  # pull now-contiguous out-of-order segments
            progressed = False
            for start in list(self._ooo):
                data = self._ooo[start]
                end = start + len(data)
                if end <= self.rcv_nxt:
                    del self._ooo[start]
                elif start <= self.rcv_nxt:
                    del self._ooo[start]
                    tail = data[self.rcv_nxt - start:]
                    chunks.append(tail)
                    self.rcv_nxt += len(tail)
                    progressed = True
            if not progressed:
                break
        data = b"".join(chunks)
        if data:
            self.unconsumed += len(data)
            self.events.append(Received(data))

    # -- output ---------------------------------------------------------------------------

    def poll_output(self, now: float, budget: int = MAX_IN_FLIGHT) -> list[TcpSegment]:
        """Segments to send now; roughly ``budget`` payload bytes at most."""
        out: list[TcpSegment] = []
        if self.state is S.CLOSED or self.state is S.SYN_PENDING:
            return out
        if self._syn_ack_due:
            self._syn_ack_due = False
            out.append(self._segment(self.iss, SYN | ACK, mss=MSS,
                                     wscale=0 if self._offer_wscale else None))
            self.snd_max = max(self.snd_max, 1)
            self.snd_nxt = max(self.snd_nxt, 1)
            if self._rto_at is None:
                self._rto_at = now + self.rto
            return out
        if self.state in _SENDS_DATA:
            self._output_data(now, budget, out)
        if self._ack_due and not out:
            out.append(self._segment(self._wire_snd(self.snd_nxt), ACK))
        return out

    def _output_data(self, now: float, budget: int, out: list[TcpSegment]) -> None:
        data_end = self._data_base + len(self._sbuf)
        window_end = self.snd_una + min(self.snd_wnd, MAX_IN_FLIGHT)
        sent = 0
        while self.snd_nxt < data_end and self.snd_nxt < window_end and sent < budget:
            n = min(self.snd_mss, data_end - self.snd_nxt, window_end - self.snd_nxt)
            start = self.snd_nxt - self._data_base
            end = self.snd_nxt + n
            flags = ACK | PSH if end == data_end else ACK
            out.append(self._segment(self._wire_snd(self.snd_nxt), flags,
                                     bytes(self._sbuf[start:start + n])))
            if self._rtt_offset is None and end > self.snd_max:
                self._rtt_offset, self._rtt_start = end, now
            self.snd_nxt = end
            self.snd_max = max(self.snd_max, end)
            sent += n
        if self._fin_queued and self.snd_nxt == data_end:
            out.append(self._segment(self._wire_snd(data_end), FIN | ACK))
            self.snd_nxt = data_end + 1
            self.snd_max = max(self.snd_max, self.snd_nxt)
            new = _ON_FIN_SENT.get(self.state)
            if new is not None:
                self._enter(new, now)
        if self._rto_at is None and self.snd_nxt > self.snd_una:
            self._rto_at = now + self.rto  # probes below never arm it: they are not data
        unsent = self.snd_nxt < data_end
        if unsent and self.snd_wnd == 0 and self.snd_una == self.snd_nxt:
            if self._probe_due:
                # Zero-window probe: one byte at SND.UNA, not counted as sent (RFC 9293 3.8.6.1).
                self._probe_due = False
                start = self.snd_una - self._data_base
                out.append(self._segment(self._wire_snd(self.snd_una), ACK,
                                         bytes(self._sbuf[start:start + 1])))
                self.snd_max = max(self.snd_max, self.snd_una + 1)
            if self._persist_at is None:
                delay = min(PERSIST_MAX, max(self.rto, RTO_MIN) * (1 << self._persist_backoff))
                self._persist_at = now + delay

    def _segment(self, seq: int, flags: int, payload: bytes = b"", mss: int | None = None,
                 wscale: int | None = None) -> TcpSegment:
        window = self.window
        if window < min(self.snd_mss, self.recv_buffer // 2):
            window = 0  # receiver-side silly window avoidance (RFC 9293 section 3.8.6.2.2)
        self._adv_wnd = window
        self._ack_due = False
        return TcpSegment(self.local_port, self.remote_port, seq, self._wire_rcv(self.rcv_nxt),
                          flags, min(window, 0xFFFF), payload, mss, wscale)

    # -- timers ---------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self._rto_at, self._persist_at, self._state_at) if d is not None]
        return min(deadlines) if deadlines else None

    def on_timer(self, now: float) -> TcpSegment | None:
        """Run expired timers; returns a RST to send when the connection is given up."""
        if self._state_at is not None and now >= self._state_at:
            self._state_at = None
            if self.state is S.SYN_PENDING:
                return self.abort("accept-timeout")
            if self.state is S.TIME_WAIT:
                self._close("closed")
                return None
            if self.state is S.FIN_WAIT_2:
                return self.abort("fin-wait-2-timeout")
        if self._rto_at is not None and now >= self._rto_at:
            self._rto_at = None
            self._retries += 1
            limit = MAX_SYNACK_RETRANSMITS if self.state is S.SYN_RECEIVED else MAX_RETRANSMITS
            if self._retries > limit:
                return self.abort("retransmit-timeout")
            self.rto = min(RTO_MAX, self.rto * 2)
            self._rtt_offset = None  # Karn's algorithm: no samples from retransmissions
            if self.state is S.SYN_RECEIVED:
                self._syn_ack_due = True
            else:
                self._retransmit()
        if self._persist_at is not None and now >= self._persist_at:
            self._persist_at = None
            self._persist_backoff = min(self._persist_backoff + 1, 16)
            self._probe_due = True
        return None

    def _retransmit(self) -> None:
        """Go back to SND.UNA; poll_output resends from there (data, then FIN if queued)."""
        self.snd_nxt = self.snd_una
        self._rtt_offset = None

    def _rtt_sample(self, rtt: float) -> None:
        # RFC 6298 section 2.
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        self.rto = min(RTO_MAX, max(RTO_MIN, self._srtt + 4 * self._rttvar))

    # -- state ----------------------------------------------------------------------------

    @property
    def ack_due(self) -> bool:
        return self._ack_due

    def wants_output(self) -> bool:
        """Whether :meth:`poll_output` would produce something now."""
        if self.state is S.CLOSED or self.state is S.SYN_PENDING:
            return False
        if self._ack_due or self._syn_ack_due or self._probe_due:
            return True
        if self.state not in _SENDS_DATA:
            return False
        data_end = self._data_base + len(self._sbuf)
        if self._fin_queued and self.snd_nxt == data_end:
            return True
        return self.snd_nxt < data_end and self.snd_nxt < self.snd_una + min(
            self.snd_wnd, MAX_IN_FLIGHT)

    def _enter(self, state: TcpState, now: float) -> None:
        if state is S.CLOSED:
            self._close("closed")
            return
        self.state = state
        if state is S.TIME_WAIT:
            self._rto_at = self._persist_at = None
            self._state_at = now + TIME_WAIT
        elif state is S.FIN_WAIT_2:
            self._state_at = now + FIN_WAIT_2_TIMEOUT

    def _close(self, reason: str) -> None:
        if self.state is S.CLOSED:
            return
        self.state = S.CLOSED
        self.close_reason = reason
        self._pool.used -= len(self._sbuf)
        self._sbuf = bytearray()
        self._ooo.clear()
        self._rto_at = self._persist_at = self._state_at = None
        self.events.append(Closed(reason))

    def _wire_snd(self, offset: int) -> int:
        return (self.iss + offset) % _SEQ_MOD

    def _wire_rcv(self, offset: int) -> int:
        return (self.irs + offset) % _SEQ_MOD
