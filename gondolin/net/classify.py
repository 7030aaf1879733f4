"""Flow classification from the first bytes a guest sends on a TCP connection.

Recognised: an HTTP/1.x request line, a TLS ClientHello (with its SNI), and an SSH banner
when SSH is enabled for the destination. Everything else is rejected, as is ``CONNECT``
(a tunnel would let the guest bypass per-request policy). A flow that has not classified
within :data:`CLASSIFY_LIMIT` bytes is rejected.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from gondolin.net.flow import FlowProtocol

CLASSIFY_LIMIT = 16384  # a large post-quantum ClientHello is ~2 KiB; request lines ~8 KiB max
MAX_REQUEST_LINE = 8192

HTTP_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"TRACE")
_CONNECT = b"CONNECT "
_REQUEST_LINE_RE = re.compile(
    rb"(?:" + b"|".join(HTTP_METHODS) + rb") [\x21-\x7e]+ HTTP/1\.[01]\r?\n"
)
_SSH_PREFIX = b"SSH-"

_TLS_HANDSHAKE = 0x16
_TLS_CLIENT_HELLO = 1
_TLS_MAX_RECORD = 16384 + 2048  # RFC 8446 section 5.1 (plaintext, with slack)
_EXT_SERVER_NAME = 0  # RFC 6066 section 3
_SNI_RE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\Z")


@dataclass(frozen=True, slots=True)
class NeedMore:
    pass


@dataclass(frozen=True, slots=True)
class Classified:
    protocol: FlowProtocol
    sni: str | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str


Classification = NeedMore | Classified | Rejected
NEED_MORE = NeedMore()


def classify(data: bytes, *, ssh_allowed: bool = False, eof: bool = False) -> Classification:
    """Classify a flow from the bytes received so far; ``eof`` means no more will come."""
    result = _classify(data[:CLASSIFY_LIMIT], ssh_allowed)
    if isinstance(result, NeedMore):
        if eof:
            return Rejected("eof-before-classified")
        if len(data) >= CLASSIFY_LIMIT:
            return Rejected("classify-limit")
    return result


def _classify(data: bytes, ssh_allowed: bool) -> Classification:
    if not data:
        return NEED_MORE
    if data[0] == _TLS_HANDSHAKE:
        return _classify_tls(data)
    if data.startswith(_CONNECT):
        return Rejected("connect-refused")
    possible = _could_be(data, _CONNECT)
    for method in HTTP_METHODS:
        prefix = method + b" "
        if data.startswith(prefix):
            return _classify_http(data)
        possible = possible or _could_be(data, prefix)
    if ssh_allowed:
        if data.startswith(_SSH_PREFIX):
            return Classified(FlowProtocol.SSH)
        possible = possible or _could_be(data, _SSH_PREFIX)
    return NEED_MORE if possible else Rejected("unknown-protocol")


def _could_be(data: bytes, prefix: bytes) -> bool:
    return len(data) < len(prefix) and prefix.startswith(data)


def _classify_http(data: bytes) -> Classification:
    end = data.find(b"\n", 0, MAX_REQUEST_LINE)
    if end < 0:
        return Rejected("http-request-line-too-long") if len(data) >= MAX_REQUEST_LINE else NEED_MORE
    if not _REQUEST_LINE_RE.fullmatch(data, 0, end + 1):
        return Rejected("http-bad-request-line")
    return Classified(FlowProtocol.HTTP)


def _classify_tls(data: bytes) -> Classification:
    # Record header: type(1) version(2) length(2); RFC 8446 section 5.1.
    if len(data) >= 2 and data[1] != 0x03 or len(data) >= 3 and data[2] > 0x04:
        return Rejected("tls-bad-record")
    if len(data) < 5:
        return NEED_MORE
    (length,) = struct.unpack_from("!H", data, 3)
    if length == 0 or length > _TLS_MAX_RECORD:
        return Rejected("tls-bad-record")
    if len(data) < 5 + length:
        return NEED_MORE
    record = data[5:5 + length]
    if record[0] != _TLS_CLIENT_HELLO:
        return Rejected("tls-not-client-hello")
    if len(record) < 4:
        return Rejected("tls-malformed")
    hs_len = int.from_bytes(record[1:4], "big")
    if hs_len + 4 > len(record):
        # The ClientHello continues in the next record; rare enough to hand over without SNI.
        return Classified(FlowProtocol.TLS, None)
    try:
        sni = _client_hello_sni(record[4:4 + hs_len])
    except _Malformed:
        return Rejected("tls-malformed")
    return Classified(FlowProtocol.TLS, sni)


class _Malformed(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Malformed
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vec(self, len_bytes: int) -> bytes:
        return self.take(int.from_bytes(self.take(len_bytes), "big"))

    def done(self) -> bool:
        return self.pos == len(self.data)


def _client_hello_sni(body: bytes) -> str | None:
    """RFC 8446 section 4.1.2 layout; raises _Malformed on any structural error."""
    r = _Reader(body)
    r.take(2 + 32)  # legacy_version, random
    r.vec(1)  # legacy_session_id
    r.vec(2)  # cipher_suites
    r.vec(1)  # legacy_compression_methods
    if r.done():
        return None  # extensions are optional in TLS <= 1.2
    exts = _Reader(r.vec(2))
    sni = None
    while not exts.done():
        ext_type = exts.u16()
        ext_data = exts.vec(2)
        if ext_type == _EXT_SERVER_NAME:
            sni = _parse_server_name(ext_data)
    return sni


def _parse_server_name(data: bytes) -> str | None:
    names = _Reader(_Reader(data).vec(2))
    while not names.done():
        name_type = names.u8()
        name = names.vec(2)
        if name_type == 0:  # host_name
            try:
                text = name.decode("ascii").lower().rstrip(".")
            except UnicodeDecodeError:
                return None
            return text if len(text) <= 253 and _SNI_RE.match(text) else None
    return None
