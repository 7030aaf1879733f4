"""vhost-user messages and the backend's side of the set-up conversation, without I/O.

Every message is a 12-byte header (request, flags, payload size; native byte order, which is
little-endian on every host we run on) and a payload; file descriptors travel alongside as
``SCM_RIGHTS`` ancillary data. :class:`MessageReader` frames a byte stream into
:class:`Message` objects (oversized payloads refused); :class:`DeviceState` answers the
frontend's requests and records what it set up — features, the memory table and each vring's
size, addresses, base and kick/call descriptors — handing mapping and eventfds to its caller
through the returned :class:`Reply` and its attributes. The socket loop that drives it lives
with the device that uses it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import ProtocolError
from .memory import GuestMemory, MemoryRegion


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SET_BACKEND_REQ_FD = 21
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_PROTOCOL_FEATURES = 30
F_VERSION_1 = 32

PF_MQ = 0
PF_REPLY_ACK = 3

VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

HEADER = struct.Struct("<III")
MAX_PAYLOAD = 4096
MAX_FDS = 8
MAX_MEM_REGIONS = 8
_REGION = struct.Struct("<QQQQ")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_U64 = struct.Struct("<Q")


class VhostUserError(ProtocolError):
    """The frontend broke the vhost-user protocol (bad framing, payload or order)."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


class MessageReader:
    """Frames vhost-user messages from stream bytes.

    File descriptors belong to the message holding the last byte of the read they came with:
    the frontend sends each message with one ``sendmsg``, and a unix stream socket ends a read
    right after the data that carried ``SCM_RIGHTS`` (data before it may be glued on).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._consumed = 0  # stream offset of self._buf[0]
        self._fds: list[tuple[int, list[int]]] = []  # (stream offset, fds)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Message]:
        if fds:
            self._fds.append((self._consumed + len(self._buf) + max(len(data) - 1, 0), list(fds)))
            if sum(len(f) for _, f in self._fds) > MAX_FDS:
                raise VhostUserError(f"more than {MAX_FDS} file descriptors pending")
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= HEADER.size:
            request, flags, size = HEADER.unpack_from(self._buf)
            if flags & 0x3 != VERSION:
                raise VhostUserError(f"vhost-user version {flags & 0x3} (this backend speaks {VERSION})")
            if size > MAX_PAYLOAD:
                raise VhostUserError(f"message {request} has a {size}-byte payload (limit {MAX_PAYLOAD})")
            if len(self._buf) < HEADER.size + size:
                break
            payload = bytes(self._buf[HEADER.size:HEADER.size + size])
            start, end = self._consumed, self._consumed + HEADER.size + size
            mine = [fd for offset, group in self._fds if start <= offset < end for fd in group]
            self._fds = [(offset, group) for offset, group in self._fds if not start <= offset < end]
            del self._buf[:HEADER.size + size]
            self._consumed = end
            out.append(Message(request, flags, payload, mine))
        return out

    def take_fds(self) -> list[int]:
        """File descriptors received but not attached to a message (for the caller to close)."""
        fds = [fd for _, group in self._fds for fd in group]
        self._fds = []
        return fds


def encode(request: int, payload: bytes = b"", *, reply: bool = True) -> bytes:
    return HEADER.pack(request, VERSION | (FLAG_REPLY if reply else 0), len(payload)) + payload


def _need(payload: bytes, size: int, what: str) -> None:
    if len(payload) < size:
        raise VhostUserError(f"{what}: payload of {len(payload)} bytes, expected {size}")


def decode_u64(payload: bytes, what: str = "u64 payload") -> int:
    _need(payload, 8, what)
    return int(_U64.unpack_from(payload)[0])


def decode_mem_table(payload: bytes) -> list[MemoryRegion]:
    _need(payload, 8, "SET_MEM_TABLE")
    nregions = struct.unpack_from("<I", payload)[0]
    if not 0 < nregions <= MAX_MEM_REGIONS:
        raise VhostUserError(f"SET_MEM_TABLE with {nregions} regions (1..{MAX_MEM_REGIONS})")
    _need(payload, 8 + nregions * _REGION.size, "SET_MEM_TABLE")
    return [MemoryRegion(*_REGION.unpack_from(payload, 8 + i * _REGION.size)) for i in range(nregions)]


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


def decode_vring_addr(payload: bytes) -> VringAddr:
    _need(payload, _VRING_ADDR.size, "SET_VRING_ADDR")
    return VringAddr(*_VRING_ADDR.unpack_from(payload))


def decode_vring_state(payload: bytes, what: str) -> tuple[int, int]:
    _need(payload, _VRING_STATE.size, what)
    index, num = _VRING_STATE.unpack_from(payload)
    return int(index), int(num)


@dataclass
class Vring:
    """What the frontend told us about one virtqueue."""

    size: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False

    @property
    def ready(self) -> bool:
        return self.started and self.enabled and self.addr is not None and self.size > 0


@dataclass
class Reply:
    """The bytes to send back (possibly empty) and the fds the caller now owns and must close."""

    data: bytes = b""
    close_fds: list[int] = field(default_factory=list)
    started: list[int] = field(default_factory=list)  # vrings that became ready
    stopped: list[int] = field(default_factory=list)  # vrings that stopped (GET_VRING_BASE)


class DeviceState:
    """The backend's answers to a vhost-user frontend for a device with ``queues`` virtqueues.

    ``map_memory(regions, fds) -> GuestMemory`` is called for SET_MEM_TABLE (the default maps the
    fds); ``last_avail(index)`` reports where a stopped ring got to (its queue's next_avail).
    """

    def __init__(self, queues: int, features: int, *,
                 map_memory: Callable[[Sequence[MemoryRegion], Sequence[int]], GuestMemory] = GuestMemory.map_fds,
                 last_avail: Callable[[int], int] | None = None) -> None:
        self.queues = queues
        self.offered_features = features | (1 << F_PROTOCOL_FEATURES) | (1 << F_VERSION_1)
        self.offered_protocol = (1 << PF_MQ) | (1 << PF_REPLY_ACK)
        self.features = 0
        self.protocol_features = 0
        self.owned = False
        self.memory: GuestMemory | None = None
        self.vrings = [Vring() for _ in range(queues)]
        self._map_memory = map_memory
        self._last_avail = last_avail

    @property
    def protocol_negotiated(self) -> bool:
        return bool(self.features & (1 << F_PROTOCOL_FEATURES))

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < self.queues:
            raise VhostUserError(f"vring {index} does not exist (this device has {self.queues})")
        return self.vrings[index]

    def handle(self, msg: Message) -> Reply:
        """Apply one message. Its fds are kept or listed in ``close_fds``; if it is refused
        (:class:`VhostUserError`), none was kept and the caller closes ``msg.fds``."""
        reply = Reply()
        answer = self._apply(msg, reply)
        if answer is not None:
            reply.data = encode(msg.request, answer)
        elif msg.need_reply and self.protocol_features & (1 << PF_REPLY_ACK):
            reply.data = encode(msg.request, _U64.pack(0))
        return reply

    def _kept_fds(self) -> set[int]:
        kept: set[int] = set()
        for v in self.vrings:
            kept.update(fd for fd in (v.kick_fd, v.call_fd, v.err_fd) if fd is not None)
        return kept

    def _apply(self, msg: Message, reply: Reply) -> bytes | None:
        r, p = msg.request, msg.payload
        if r not in (Request.SET_MEM_TABLE, Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                     Request.SET_VRING_ERR, Request.SET_LOG_FD, Request.SET_BACKEND_REQ_FD):
            reply.close_fds.extend(msg.fds)  # nobody else sends fds; never leak them
        if r == Request.GET_FEATURES:
            return _U64.pack(self.offered_features)
        if r == Request.SET_FEATURES:
            wanted = decode_u64(p, "SET_FEATURES")
            if wanted & ~self.offered_features:
                raise VhostUserError(f"SET_FEATURES asks for features {wanted & ~self.offered_features:#x} "
                                     "that were not offered")
            self.features = wanted
            return None
        if r == Request.GET_PROTOCOL_FEATURES:
            return _U64.pack(self.offered_protocol)
        if r == Request.SET_PROTOCOL_FEATURES:
            self.protocol_features = decode_u64(p, "SET_PROTOCOL_FEATURES") & self.offered_protocol
            return None
        if r == Request.GET_QUEUE_NUM:
            return _U64.pack(self.queues)
        if r == Request.GET_MAX_MEM_SLOTS:
            return _U64.pack(MAX_MEM_REGIONS)
        if r in (Request.SET_OWNER, Request.RESET_OWNER):
            self.owned = r == Request.SET_OWNER
            return None
        if r == Request.SET_MEM_TABLE:
            regions = decode_mem_table(p)
            if len(msg.fds) != len(regions):
                raise VhostUserError(f"SET_MEM_TABLE: {len(regions)} regions but {len(msg.fds)} fds")
            memory = self._map_memory(regions, msg.fds)
            reply.close_fds.extend(msg.fds)  # a mapping outlives its fd
            if self.memory is not None:
                self.memory.close()
            self.memory = memory
            return None
        if r == Request.SET_VRING_NUM:
            index, num = decode_vring_state(p, "SET_VRING_NUM")
            if not 0 < num <= 32768 or num & (num - 1):
                raise VhostUserError(f"SET_VRING_NUM {num} is not a power of two up to 32768")
            self._vring(index).size = num
            return None
        if r == Request.SET_VRING_ADDR:
            addr = decode_vring_addr(p)
            self._vring(addr.index).addr = addr
            return None
        if r == Request.SET_VRING_BASE:
            index, num = decode_vring_state(p, "SET_VRING_BASE")
            self._vring(index).base = num & 0xFFFF
            return None
        if r == Request.GET_VRING_BASE:
            index, _ = decode_vring_state(p, "GET_VRING_BASE")
            vring = self._vring(index)
            base = self._last_avail(index) if self._last_avail and vring.started else vring.base
            if vring.started:
                reply.stopped.append(index)
            vring.started = False
            vring.base = base
            for attr in ("kick_fd", "call_fd"):
                fd = getattr(vring, attr)
                if fd is not None:
                    reply.close_fds.append(fd)
                    setattr(vring, attr, None)
            return _VRING_STATE.pack(index, base)
        if r in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            value = decode_u64(p, Request(r).name)
            vring = self._vring(value & VRING_INDEX_MASK)
            if value & VRING_NOFD_MASK:
                if r == Request.SET_VRING_KICK:
                    raise VhostUserError("polling a vring without a kick fd is not supported")
                reply.close_fds.extend(msg.fds)
                fd = None
            else:
                if len(msg.fds) != 1:
                    raise VhostUserError(f"{Request(r).name} without exactly one fd")
                fd = msg.fds[0]
            attr = {Request.SET_VRING_KICK: "kick_fd", Request.SET_VRING_CALL: "call_fd",
                    Request.SET_VRING_ERR: "err_fd"}[Request(r)]
            old = getattr(vring, attr)
            if old is not None:
                reply.close_fds.append(old)
            setattr(vring, attr, fd)
            if r == Request.SET_VRING_KICK:
                was_ready = vring.ready
                vring.started = True
                if not self.protocol_negotiated:
                    vring.enabled = True  # without protocol features a started ring is enabled
                if vring.ready and not was_ready:
                    reply.started.append(value & VRING_INDEX_MASK)
            return None
        if r == Request.SET_VRING_ENABLE:
            index, num = decode_vring_state(p, "SET_VRING_ENABLE")
            vring = self._vring(index)
            was_ready = vring.ready
            vring.enabled = bool(num)
            if vring.ready and not was_ready:
                reply.started.append(index)
            elif was_ready and not vring.ready:
                reply.stopped.append(index)
            return None
        if r in (Request.SET_LOG_BASE, Request.SET_LOG_FD, Request.SET_BACKEND_REQ_FD):
            reply.close_fds.extend(msg.fds)
            return None  # no dirty logging (we refuse migration of this device); no backend requests
        if r == Request.SET_STATUS:
            return None
        if r == Request.GET_STATUS:
            return _U64.pack(0)
        raise VhostUserError(f"vhost-user request {r} is not supported by this backend")

    def close(self) -> list[int]:
        """Forget everything; returns the fds the caller must close."""
        fds = sorted(self._kept_fds())
        self.vrings = [Vring() for _ in range(self.queues)]
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        return fds
