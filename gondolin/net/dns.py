"""DNS over UDP/53 from the guest (RFC 1035): a strict query parser and the three resolver modes.

``synthetic`` (default) never leaves the host: each name gets a stable address from
198.19.0.0/16 (RFC 2544 benchmarking space, never routed) so a later TCP flow to that address
can be attributed to the name the guest asked for. ``trusted`` forwards well-formed queries to
the host's resolvers; ``open`` relays any UDP/53 payload. Forwarding is an action the driver
executes; this module never touches a socket.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass

from gondolin.net.errors import PacketError

PORT = 53

HEADER_LEN = 12
MAX_QUERY_LEN = 512  # RFC 1035 section 4.2.1 UDP limit; queries are far smaller
MAX_QUESTIONS = 4  # real stub resolvers send one
MAX_ADDITIONAL = 2  # an EDNS OPT record, maybe a cookie; never parsed
MAX_LABEL_LEN = 63  # RFC 1035 section 2.3.4
MAX_NAME_LEN = 255  # wire length, including length bytes and the root
MAX_NAME_TEXT_LEN = 253
# Largest reply we can hand the guest in one unfragmented UDP datagram (1500 - IP - UDP).
MAX_REPLY_LEN = 1472

TYPE_A = 1
TYPE_AAAA = 28
CLASS_IN = 1

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_REFUSED = 5

SYNTHETIC_TTL = 60
SYNTHETIC_PREFIX = bytes([198, 19])
# 198.19.<hi>.<1..254>: 256 * 254 addresses. The table is capped lower by default so a
# guest querying random names cannot make it grow without bound.
SYNTHETIC_CAPACITY_MAX = 256 * 254
DEFAULT_SYNTHETIC_CAPACITY = 16384
LOOPBACK = bytes([127, 0, 0, 1])

_HEADER = struct.Struct("!HHHHHH")
_QR = 0x8000
_OPCODE_MASK = 0x7800
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080
_LABEL_RE = re.compile(rb"[A-Za-z0-9_-]+\Z")


class DnsMode(enum.Enum):
    SYNTHETIC = "synthetic"
    TRUSTED = "trusted"
    OPEN = "open"


@dataclass(frozen=True, slots=True)
class Question:
    name: str  # lower-case, no trailing dot; "" is the root
    qtype: int
    qclass: int
    wire: bytes  # name + type + class as sent, echoed back with the guest's letter case


@dataclass(frozen=True, slots=True)
class DnsQuery:
    id: int
    flags: int
    questions: tuple[Question, ...]

    @property
    def question(self) -> Question:
        return self.questions[0]


def parse_query(data: bytes) -> DnsQuery:
    """Parse a standard query; anything else raises :class:`PacketError`."""
    if len(data) < HEADER_LEN:
        raise PacketError("dns-short")
    if len(data) > MAX_QUERY_LEN:
        raise PacketError("dns-oversize")
    qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if flags & _QR or flags & _OPCODE_MASK:
        raise PacketError("dns-not-query")
    if not 1 <= qdcount <= MAX_QUESTIONS or ancount or nscount or arcount > MAX_ADDITIONAL:
        raise PacketError("dns-counts")
    pos = HEADER_LEN
    questions = []
    for _ in range(qdcount):
        start = pos
        name, pos = _read_name(data, pos)
        if pos + 4 > len(data):
            raise PacketError("dns-truncated")
        qtype, qclass = struct.unpack_from("!HH", data, pos)
        pos += 4
        questions.append(Question(name, qtype, qclass, bytes(data[start:pos])))
    return DnsQuery(qid, flags, tuple(questions))


def _read_name(data: bytes, pos: int) -> tuple[str, int]:
    labels: list[bytes] = []
    start = pos
    while True:
        if pos >= len(data):
            raise PacketError("dns-truncated")
        length = data[pos]
        if length & 0xC0:
            # Compression pointers (and the reserved 0x40/0x80 forms) have no place in a
            # query: rejecting them removes pointer loops and forward references outright.
            raise PacketError("dns-pointer")
        pos += 1
        if length == 0:
            break
        label = data[pos:pos + length]
        if len(label) != length:
            raise PacketError("dns-truncated")
        if not _LABEL_RE.match(label):
            raise PacketError("dns-bad-label")
        labels.append(bytes(label))
        pos += length
        if pos - start > MAX_NAME_LEN:
            raise PacketError("dns-name-too-long")
    return b".".join(labels).decode("ascii").lower(), pos


def build_response(query: DnsQuery, rcode: int = RCODE_NOERROR,
                   addresses: tuple[bytes, ...] = (), ttl: int = SYNTHETIC_TTL,
                   truncated: bool = False) -> bytes:
    """A reply echoing the first question, with A records for ``addresses``."""
    flags = _QR | (query.flags & _RD) | _RA | (rcode & 0x0F) | (_TC if truncated else 0)
    out = bytearray(_HEADER.pack(query.id, flags, 1, len(addresses), 0, 0))
    out += query.question.wire
    for addr in addresses:
        # 0xC00C: a pointer to the question name at offset 12.
        out += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, ttl, 4) + addr
    return bytes(out)


def response_matches(query_id: int, payload: bytes) -> bool:
    """Whether an upstream payload can be the reply to ``query_id`` (ID and QR bit)."""
    if len(payload) < HEADER_LEN:
        return False
    rid, flags = struct.unpack_from("!HH", payload)
    return rid == query_id and bool(flags & _QR)


def is_localhost(name: str) -> bool:
    return name == "localhost" or name.endswith(".localhost")


class SyntheticNames:
    """Name <-> synthetic address table: stable per name, capped, never evicts.

    Never evicting matters: reusing an address for another name would attribute a guest's
    flow (made from a cached answer) to the wrong host.
    """

    def __init__(self, capacity: int = DEFAULT_SYNTHETIC_CAPACITY) -> None:
        if not 0 < capacity <= SYNTHETIC_CAPACITY_MAX:
            raise ValueError(f"capacity must be 1..{SYNTHETIC_CAPACITY_MAX}")
        self.capacity = capacity
        self._by_name: dict[str, bytes] = {}
        self._by_ip: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._by_name)

    def address_for(self, name: str) -> bytes | None:
        """The name's address, allocating one; None when the table is full."""
        addr = self._by_name.get(name)
        if addr is not None:
            return addr
        index = len(self._by_name)
        if index >= self.capacity or len(name) > MAX_NAME_TEXT_LEN:
            return None
        addr = SYNTHETIC_PREFIX + bytes([index // 254, index % 254 + 1])
        self._by_name[name] = addr
        self._by_ip[addr] = name
        return addr

    def name_for(self, addr: bytes) -> str | None:
        return self._by_ip.get(addr)


def is_synthetic(addr: bytes) -> bool:
    return addr[:2] == SYNTHETIC_PREFIX


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """Send ``payload`` back to the guest."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class DnsForward:
    """Send ``payload`` to ``server`` (IPv4, port 53) and hand the reply back to the stack."""

    payload: bytes
    server: bytes
    query_id: int


class DnsResolver:
    """Turns one guest query into an answer, a forward action, or nothing (dropped)."""

    def __init__(self, mode: DnsMode, names: SyntheticNames,
                 upstreams: tuple[bytes, ...] = ()) -> None:
        if mode is not DnsMode.SYNTHETIC and not upstreams:
            raise ValueError(f"dns mode {mode.value!r} needs at least one IPv4 resolver")
        self.mode = mode
        self.names = names
        self.upstreams = upstreams
        self._next_upstream = 0

    def handle(self, payload: bytes, dst_ip: bytes, gateway_ip: bytes
               ) -> DnsAnswer | DnsForward:
        """Raises :class:`PacketError` for a query this mode will not serve."""
        if self.mode is DnsMode.OPEN:
            if len(payload) < HEADER_LEN or len(payload) > MAX_QUERY_LEN:
                raise PacketError("dns-bad-size")
            server = self._pick_upstream() if dst_ip == gateway_ip else dst_ip
            return DnsForward(payload, server, struct.unpack_from("!H", payload)[0])
        query = parse_query(payload)
        if self.mode is DnsMode.TRUSTED:
            return DnsForward(payload, self._pick_upstream(), query.id)
        return DnsAnswer(self._synthetic_answer(query))

    def _pick_upstream(self) -> bytes:
        server = self.upstreams[self._next_upstream % len(self.upstreams)]
        self._next_upstream += 1
        return server

    def _synthetic_answer(self, query: DnsQuery) -> bytes:
        q = query.question
        if q.qclass != CLASS_IN or q.qtype != TYPE_A or not q.name:
            return build_response(query)  # NOERROR, no answers: "no such record type"
        if is_localhost(q.name):
            return build_response(query, addresses=(LOOPBACK,))
        addr = self.names.address_for(q.name)
        if addr is None:
            return build_response(query, RCODE_REFUSED)
        return build_response(query, addresses=(addr,))
