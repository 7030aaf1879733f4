"""TcpConnection driven directly with crafted segments and a fake clock."""

import pytest

from gondolin.net import tcp
from gondolin.net.errors import PacketError
from gondolin.net.tcp import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    ConnEvent,
    TcpConnection,
    TcpSegment,
    TcpState,
)

SRC, DST = bytes([192, 168, 127, 3]), bytes([1, 2, 3, 4])
IRS = 5000
ISS = 900


class Peer:
    """The guest end: crafts segments for a TcpConnection and tracks what it was sent."""

    def __init__(self, irs: int = IRS, iss: int = ISS, window: int = 65535,
                 mss: int | None = 1460, wscale: int | None = None, accept: bool = True,
                 now: float = 0.0) -> None:
        self.seq = irs
        syn = TcpSegment(40000, 80, irs, 0, SYN, window, b"", mss, wscale)
        self.conn = TcpConnection(syn, iss, now, accept=accept)
        self.seq = (irs + 1) & 0xFFFFFFFF
        self.ack = 0
        self.window = window

    def seg(self, flags: int = ACK, payload: bytes = b"", seq: int | None = None,
            ack: int | None = None, window: int | None = None) -> TcpSegment:
        return TcpSegment(40000, 80, self.seq if seq is None else seq,
                          self.ack if ack is None else ack, flags,
                          self.window if window is None else window, payload)

    def feed(self, seg: TcpSegment, now: float = 0.0) -> list[ConnEvent]:
        self.conn.on_segment(seg, now)
        events, self.conn.events = self.conn.events, []
        return events

    def send(self, data: bytes, now: float = 0.0, flags: int = ACK | PSH) -> list[ConnEvent]:
        events = self.feed(self.seg(flags, data), now)
        self.seq = (self.seq + len(data) + (1 if flags & FIN else 0)) & 0xFFFFFFFF
        return events

    def poll(self, now: float = 0.0) -> list[TcpSegment]:
        return self.conn.poll_output(now)

    def handshake(self, now: float = 0.0) -> TcpSegment:
        (synack,) = self.poll(now)
        self.ack = (synack.seq + 1) & 0xFFFFFFFF
        assert self.feed(self.seg(), now) == [tcp.Established()]
        return synack

    def ack_all(self, segs: list[TcpSegment], now: float = 0.0,
                window: int | None = None) -> list[ConnEvent]:
        last = segs[-1]
        end = last.seq + len(last.payload) + (1 if last.flags & (FIN | SYN) else 0)
        self.ack = end & 0xFFFFFFFF
        return self.feed(self.seg(window=window), now)


def data_of(segs: list[TcpSegment]) -> bytes:
    return b"".join(s.payload for s in segs)


# -- segments -----------------------------------------------------------------------------

def test_segment_roundtrip_with_options() -> None:
    seg = TcpSegment(1234, 80, 0xFFFFFFF0, 7, SYN | ACK, 65535, b"", mss=1460, wscale=7)
    parsed = TcpSegment.parse(seg.build(SRC, DST), SRC, DST)
    assert parsed == seg


def test_options_only_parsed_on_syn_and_malformed_options_end_parsing() -> None:
    seg = TcpSegment(1, 2, 3, 4, SYN, 5, b"", mss=536)
    raw = bytearray(seg.build(SRC, DST))
    raw[20:24] = b"\x02\x09\x05\xb4"  # MSS option with a bogus length
    raw[16:18] = b"\x00\x00"
    from gondolin.net.ipv4 import PROTO_TCP, checksum, pseudo_header
    raw[16:18] = checksum(pseudo_header(SRC, DST, PROTO_TCP, len(raw)) + raw).to_bytes(2, "big")
    assert TcpSegment.parse(bytes(raw), SRC, DST).mss is None


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda b: b[:19], "tcp-short"),
    (lambda b: b[:12] + bytes([0x40]) + b[13:], "tcp-bad-offset"),  # 16-byte header
    (lambda b: b[:12] + bytes([0xF0]) + b[13:], "tcp-bad-offset"),  # 60 bytes > segment
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "tcp-checksum"),
])
def test_segment_rejects(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    raw = TcpSegment(1, 2, 3, 4, ACK, 5, b"data").build(SRC, DST)
    with pytest.raises(PacketError) as info:
        TcpSegment.parse(mutate(raw), SRC, DST)
    assert info.value.reason == reason


# -- handshake ----------------------------------------------------------------------------

def test_handshake() -> None:
    peer = Peer(mss=1200)
    synack = peer.handshake()
    assert synack.flags == SYN | ACK
    assert synack.seq == ISS and synack.ack == IRS + 1
    assert synack.mss == tcp.MSS and synack.wscale is None
    assert peer.conn.state is TcpState.ESTABLISHED
    assert peer.conn.snd_mss == 1200


def test_window_scale_is_agreed_only_when_offered() -> None:
    peer = Peer(wscale=7, window=1000)
    synack = peer.handshake()
    assert synack.wscale == 0
    peer.feed(peer.seg(window=4))  # 4 << 7
    assert peer.conn.snd_wnd == 512


@pytest.mark.parametrize(("mss", "expected"), [
    (None, tcp.DEFAULT_PEER_MSS), (1, tcp.MIN_MSS), (9000, 9000), (65535, tcp.MSS), (1000, 1000)])
def test_peer_mss_is_clamped(mss: int | None, expected: int) -> None:
    assert Peer(mss=mss).conn.snd_mss == expected


def test_lost_synack_is_retransmitted_then_given_up() -> None:
    peer = Peer()
    assert peer.poll(0.0)[0].flags == SYN | ACK
    now = 0.0
    for _ in range(tcp.MAX_SYNACK_RETRANSMITS):
        now = peer.conn.next_deadline()  # type: ignore[assignment]
        assert peer.conn.on_timer(now) is None
        assert peer.poll(now)[0].flags == SYN | ACK
    now = peer.conn.next_deadline()  # type: ignore[assignment]
    rst = peer.conn.on_timer(now)
    assert rst is not None and rst.flags & RST
    assert peer.conn.state is TcpState.CLOSED


def test_retransmitted_syn_gets_synack_again() -> None:
    peer = Peer()
    peer.poll()
    peer.feed(TcpSegment(40000, 80, IRS, 0, SYN, 65535))
    assert peer.poll()[0].flags == SYN | ACK


def test_deferred_accept() -> None:
    peer = Peer(accept=False)
    assert peer.poll() == []
    peer.feed(TcpSegment(40000, 80, IRS, 0, SYN, 65535))  # guest retries its SYN
    assert peer.poll() == []
    peer.conn.accept()
    assert peer.poll()[0].flags == SYN | ACK


def test_deferred_accept_times_out_with_rst() -> None:
    peer = Peer(accept=False)
    assert peer.conn.next_deadline() == tcp.ACCEPT_TIMEOUT
    rst = peer.conn.on_timer(tcp.ACCEPT_TIMEOUT)
    assert rst is not None and rst.flags == RST | ACK and rst.ack == IRS + 1
    assert peer.conn.state is TcpState.CLOSED


# -- data ---------------------------------------------------------------------------------

def test_data_both_ways() -> None:
    peer = Peer()
    peer.handshake()
    assert peer.send(b"hello") == [tcp.Received(b"hello")]
    assert peer.conn.send(b"world") == 5
    segs = peer.poll()
    assert data_of(segs) == b"world"
    assert segs[-1].ack == IRS + 1 + 5 and segs[-1].flags & PSH
    assert peer.conn.queued == 5
    peer.ack_all(segs)
    assert peer.conn.queued == 0


def test_segments_respect_mss_and_window() -> None:
    peer = Peer(mss=1000, window=2500)
    peer.handshake()
    peer.conn.send(b"x" * 10_000)
    segs = peer.poll()
    assert [len(s.payload) for s in segs] == [1000, 1000, 500]
    assert peer.poll() == []  # window full until acknowledged
    peer.ack_all(segs)
    assert len(data_of(peer.poll())) == 2500


def test_send_buffer_is_bounded_and_writable_follows() -> None:
    peer = Peer()
    peer.handshake()
    assert peer.conn.send(b"x" * (tcp.SEND_BUFFER + 10)) == tcp.SEND_BUFFER
    assert peer.conn.send(b"y") == 0
    total = b""
    events: list[ConnEvent] = []
    while len(total) < tcp.SEND_BUFFER:
        segs = peer.poll()
        total += data_of(segs)
        events += peer.ack_all(segs)
    assert tcp.Writable() in events


def test_duplicate_data_is_acked_not_delivered_twice() -> None:
    peer = Peer()
    peer.handshake()
    peer.send(b"abc")
    assert peer.feed(peer.seg(ACK, b"abc", seq=IRS + 1)) == []
    assert peer.poll()[0].ack == IRS + 4
    # Partial overlap: only the new tail is delivered.
    assert peer.feed(peer.seg(ACK, b"bcde", seq=IRS + 2)) == [tcp.Received(b"de")]


def test_out_of_order_segments_are_buffered_then_delivered() -> None:
    peer = Peer()
    peer.handshake()
    base = IRS + 1
    assert peer.feed(peer.seg(ACK, b"CCC", seq=base + 6)) == []
    assert peer.feed(peer.seg(ACK, b"BBB", seq=base + 3)) == []
    dup_ack = peer.poll()[-1]
    assert dup_ack.ack == base  # duplicate ACK tells the guest what is missing
    assert peer.conn.ooo_bytes == 6
    assert peer.feed(peer.seg(ACK, b"AAA", seq=base)) == [tcp.Received(b"AAABBBCCC")]
    assert peer.conn.ooo_bytes == 0
    assert peer.poll()[-1].ack == base + 9


def test_out_of_order_buffer_is_capped() -> None:
    peer = Peer()
    peer.handshake()
    base = IRS + 1
    for i in range(tcp.MAX_OOO_SEGMENTS + 20):
        peer.feed(peer.seg(ACK, b"z" * 10, seq=base + 100 + i * 20))
    assert len(peer.conn._ooo) == tcp.MAX_OOO_SEGMENTS


def test_data_beyond_receive_window_is_trimmed() -> None:
    peer = Peer()
    peer.handshake()
    far = IRS + 1 + tcp.RECV_BUFFER - 2
    peer.feed(peer.seg(ACK, b"0123456789", seq=far))
    assert peer.conn.ooo_bytes == 2


def test_receive_window_closes_until_app_consumes() -> None:
    peer = Peer()
    peer.handshake()
    chunk = b"d" * 1460
    delivered = 0
    while peer.conn.window >= len(chunk):
        (event,) = peer.send(chunk)
        assert isinstance(event, tcp.Received)
        delivered += len(event.data)
    last = peer.poll()[-1]
    assert last.window == 0  # less than one MSS left: advertised as zero (no silly window)
    # The guest keeps sending: only what fits is taken.
    events = peer.feed(peer.seg(ACK, chunk))
    taken = sum(len(e.data) for e in events if isinstance(e, tcp.Received))
    assert taken == tcp.RECV_BUFFER - delivered
    peer.conn.consumed(tcp.RECV_BUFFER)
    update = peer.poll()
    assert update and update[-1].window == tcp.RECV_BUFFER  # window update sent unprompted


def test_zero_window_probe_from_guest_is_answered() -> None:
    peer = Peer()
    peer.handshake()
    while peer.conn.window > 0:
        peer.send(b"x" * min(1460, peer.conn.window))
    peer.poll()
    assert peer.feed(peer.seg(ACK, b"y")) == []
    (ack,) = peer.poll()
    assert ack.window == 0 and ack.ack == (peer.seq) & 0xFFFFFFFF


# -- retransmission and zero window on our side ---------------------------------------------

def test_retransmission_on_timeout_with_backoff() -> None:
    peer = Peer()
    peer.handshake()
    peer.conn.send(b"payload")
    first = peer.poll(10.0)
    deadline = peer.conn.next_deadline()
    assert deadline is not None
    assert deadline == pytest.approx(10.0 + tcp.RTO_INITIAL)
    assert peer.conn.on_timer(deadline - 0.01) is None
    assert peer.poll(deadline - 0.01) == []  # not yet
    peer.conn.on_timer(deadline)
    again = peer.poll(deadline)
    assert data_of(again) == b"payload" and again[0].seq == first[0].seq
    assert peer.conn.next_deadline() == pytest.approx(deadline + 2 * tcp.RTO_INITIAL)
    peer.ack_all(again, deadline + 0.5)
    assert peer.conn.next_deadline() is None
    assert peer.conn.rto == 2 * tcp.RTO_INITIAL  # no RTT sample from a retransmission


def test_gives_up_after_max_retransmits() -> None:
    peer = Peer()
    peer.handshake()
    peer.conn.send(b"x")
    peer.poll(0.0)
    rst = None
    for _ in range(tcp.MAX_RETRANSMITS + 1):
        now = peer.conn.next_deadline()
        assert now is not None
        rst = peer.conn.on_timer(now)
        peer.poll(now)
    assert rst is not None and rst.flags & RST
    assert peer.conn.state is TcpState.CLOSED
    assert peer.conn.events[-1] == tcp.Closed("retransmit-timeout")


def test_rtt_estimate_lowers_rto() -> None:
    peer = Peer()
    peer.handshake()
    for i in range(10):
        peer.conn.send(b"x")
        segs = peer.poll(float(i))
        peer.ack_all(segs, i + 0.01)
    assert tcp.RTO_MIN <= peer.conn.rto < 0.5


def test_fast_retransmit_after_three_duplicate_acks() -> None:
    peer = Peer()
    peer.handshake()
    peer.conn.send(b"a" * 5000)
    segs = peer.poll()
    assert len(segs) == 4
    peer.ack = (segs[0].seq + 1460) & 0xFFFFFFFF  # second segment "lost"
    peer.feed(peer.seg())  # advances past the first segment
    for _ in range(2):
        peer.feed(peer.seg())
        assert peer.poll() == []
    peer.feed(peer.seg())  # third duplicate
    resent = peer.poll()
    assert resent[0].seq == segs[1].seq


def test_zero_window_persist_probe() -> None:
    peer = Peer(window=1460)
    peer.handshake()
    peer.conn.send(b"q" * 3000)
    segs = peer.poll(0.0)
    assert data_of(segs) == b"q" * 1460
    peer.ack_all(segs, 0.0, window=0)  # guest takes it, then closes its window
    assert peer.poll(0.1) == []
    deadline = peer.conn.next_deadline()
    assert deadline is not None
    probes, gaps = [], []
    for _ in range(4):
        peer.conn.on_timer(deadline)
        out = peer.poll(deadline)
        assert len(out) == 1 and len(out[0].payload) == 1  # one-byte probe
        probes.append(out[0])
        peer.feed(peer.seg(window=0), deadline)  # still closed
        next_deadline = peer.conn.next_deadline()
        assert next_deadline is not None
        gaps.append(next_deadline - deadline)
        deadline = next_deadline
    assert all(p.seq == probes[0].seq for p in probes)
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # probes back off
    assert peer.conn.state is TcpState.ESTABLISHED  # a closed window never times out
    peer.feed(peer.seg(window=65535), deadline)
    rest = peer.poll(deadline)
    assert data_of(segs) + data_of(rest) == b"q" * 3000


def test_persist_probe_accepted_by_guest_advances() -> None:
    peer = Peer(window=0)
    peer.handshake()
    peer.conn.send(b"abc")
    assert peer.poll(0.0) == []
    now = peer.conn.next_deadline()
    assert now is not None
    peer.conn.on_timer(now)
    (probe,) = peer.poll(now)
    assert probe.payload == b"a"
    peer.ack = (probe.seq + 1) & 0xFFFFFFFF
    peer.feed(peer.seg(window=10), now)
    assert data_of(peer.poll(now)) == b"bc"


# -- close ----------------------------------------------------------------------------------

def test_guest_closes_first() -> None:
    peer = Peer()
    peer.handshake()
    assert peer.send(b"bye", flags=ACK | FIN) == [tcp.Received(b"bye"), tcp.PeerFin()]
    assert peer.conn.state is TcpState.CLOSE_WAIT
    peer.conn.send(b"still talking")  # half-close: we may keep sending
    peer.conn.close()
    segs = peer.poll()
    assert data_of(segs) == b"still talking" and segs[-1].flags & FIN
    assert peer.conn.state is TcpState.LAST_ACK
    assert peer.ack_all(segs) == [tcp.Closed("closed")]


def test_we_close_first_and_guest_keeps_sending() -> None:
    peer = Peer()
    peer.handshake()
    peer.conn.close()
    (fin,) = peer.poll(0.0)
    assert fin.flags & FIN and peer.conn.state is TcpState.FIN_WAIT_1
    peer.ack_all([fin])
    assert peer.conn.state is TcpState.FIN_WAIT_2
    assert peer.send(b"more") == [tcp.Received(b"more")]
    assert peer.conn.send(b"nope") == 0
    assert peer.send(b"", flags=ACK | FIN, now=1.0) == [tcp.PeerFin()]
    assert peer.conn.state is TcpState.TIME_WAIT
    assert peer.poll(1.0)[-1].ack == peer.seq
    assert peer.conn.next_deadline() == pytest.approx(1.0 + tcp.TIME_WAIT)
    peer.conn.on_timer(1.0 + tcp.TIME_WAIT)
    assert peer.conn.state is TcpState.CLOSED


def test_simultaneous_close() -> None:
    peer = Peer()
    peer.handshake()
    peer.conn.close()
    (fin,) = peer.poll()
    peer.send(b"", flags=ACK | FIN)  # guest's FIN crosses ours (does not ack it)
    assert peer.conn.state is TcpState.CLOSING
    peer.ack_all([fin])
    assert peer.conn.state is TcpState.TIME_WAIT


def test_fin_is_retransmitted() -> None:
    peer = Peer()
    peer.handshake()
    peer.conn.send(b"data")
    peer.conn.close()
    assert peer.poll(0.0)[-1].flags & FIN
    now = peer.conn.next_deadline()
    assert now is not None
    peer.conn.on_timer(now)
    again = peer.poll(now)
    assert data_of(again) == b"data" and again[-1].flags & FIN


def test_fin_wait_2_times_out() -> None:
    peer = Peer()
    peer.handshake()
    peer.conn.close()
    peer.ack_all(peer.poll(0.0), 0.0)
    assert peer.conn.state is TcpState.FIN_WAIT_2
    rst = peer.conn.on_timer(tcp.FIN_WAIT_2_TIMEOUT)
    assert rst is not None and peer.conn.state is TcpState.CLOSED


def test_guest_reset() -> None:
    peer = Peer()
    peer.handshake()
    assert peer.feed(peer.seg(RST | ACK)) == [tcp.Closed("reset-by-guest")]


def test_reset_outside_window_is_ignored() -> None:
    peer = Peer()
    peer.handshake()
    assert peer.feed(peer.seg(RST, seq=IRS + 10 + tcp.RECV_BUFFER)) == []
    assert peer.conn.state is TcpState.ESTABLISHED


def test_abort_sends_rst_and_frees_buffers() -> None:
    peer = Peer()
    peer.handshake()
    peer.conn.send(b"x" * 1000)
    rst = peer.conn.abort("bye")
    assert rst is not None and rst.flags & RST
    assert peer.conn.queued == 0 and peer.conn.state is TcpState.CLOSED
    assert peer.conn.abort("again") is None


def test_ack_for_unsent_data_is_challenged_and_ignored() -> None:
    peer = Peer()
    peer.handshake()
    peer.feed(peer.seg(ACK, b"hi", ack=ISS + 1000))
    assert peer.conn.snd_una == 1
    assert peer.poll()[0].flags == ACK


@pytest.mark.parametrize(("irs", "iss"), [(0xFFFFFFF0, 0xFFFFFFF8), (0x7FFFFFFF, 0xFFFFFFFF)])
def test_sequence_wraparound(irs: int, iss: int) -> None:
    peer = Peer(irs=irs, iss=iss)
    peer.handshake()
    received = b""
    for i in range(5):
        events = peer.send(bytes([65 + i]) * 7)
        received += b"".join(e.data for e in events if isinstance(e, tcp.Received))
    assert received == b"".join(bytes([65 + i]) * 7 for i in range(5))
    peer.conn.send(b"z" * 40)
    segs = peer.poll()
    peer.ack_all(segs)
    assert peer.conn.queued == 0
