"""Wire format shared by the host and the guest agent (stdlib only: the guest imports it too).

A frame is a 4-byte big-endian length followed by that many payload bytes (at most
:data:`MAX_FRAME`). The payload is a message envelope ``{v, t, id, p}`` plus raw bytes::

    u8  version      (PROTOCOL_VERSION)
    u8  type         (a value of :class:`T`)
    u32 id           (the exec / file-op / request id the message belongs to; 0 = none)
    u32 header_len   length of the JSON object ``p`` (0 means an empty dict)
    ... header       UTF-8 JSON object
    ... data         raw bytes (stdout chunks, file contents), never base64

:class:`FrameDecoder` is a sans-IO incremental decoder: feed it whatever a read returned and
take out whole messages. Anything malformed raises :class:`FrameError` with a stable ``code``.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1
MAX_FRAME = 4 * 1024 * 1024  # bytes per frame: bounds what one guest message can make the host buffer
MAX_HEADER = 256 * 1024  # JSON part of one message
DATA_CHUNK = 256 * 1024  # preferred size of one data message (well under MAX_FRAME)
DEFAULT_WINDOW = 1024 * 1024  # initial credit for a byte stream, in bytes

_LEN = struct.Struct(">I")
_ENV = struct.Struct(">BBII")  # version, type, id, header_len


class T(enum.IntEnum):
    """Message types. Host->guest and guest->host share one numbering."""

    # lifecycle
    HELLO = 1  # guest -> host: agent is up {version, boot_ms, pid}
    CONFIGURE = 2  # host -> guest {clock_ns, entropy(data), env, hostname}
    CONFIGURED = 3  # guest -> host: configure applied
    PING = 4
    PONG = 5
    ERROR = 6  # either way: {code, message} for request `id`
    SHUTDOWN = 7  # host -> guest: sync and power off
    # exec
    EXEC = 10  # host -> guest {argv | shell, env, cwd, uid, gid, pty, rows, cols, stdin, timeout, window}
    EXEC_STARTED = 11  # guest -> host {pid, stdin_window}
    STDOUT = 12  # guest -> host data
    STDERR = 13  # guest -> host data
    STDIN = 14  # host -> guest data
    STDIN_EOF = 15  # host -> guest
    CREDIT = 16  # either way {stdout, stderr, stdin, file, tcp}: more bytes the peer may send
    SIGNAL = 17  # host -> guest {signal}
    RESIZE = 18  # host -> guest {rows, cols}
    EXIT = 19  # guest -> host {exit_code, signal, timed_out, error}
    # files
    FILE_READ = 30  # host -> guest {path, offset, length, window}
    FILE_DATA = 31  # data, either way
    FILE_EOF = 32  # either way: end of a file stream
    FILE_WRITE = 33  # host -> guest {path, mode, append}
    FILE_DONE = 34  # guest -> host: op finished {result...}
    STAT = 35  # {path, follow}
    LISTDIR = 36  # {path}
    MKDIR = 37  # {path, parents, mode}
    RENAME = 38  # {src, dst}
    REMOVE = 39  # {path, recursive, force}
    # host -> guest, either {op: "in", name} on a FILE_WRITE's id (append the staged file to it)
    # or {op: "out", name, path, offset, length} (copy a piece into a staged file); the guest
    # answers FILE_STAGE {size}. The staged file lies in the virtiofs device's staging directory.
    FILE_STAGE = 48
    # guest TCP streams: the host connects to a guest loopback port through the agent
    TCP_OPEN = 40  # host -> guest {host, port, window}: connect; window = bytes the guest may send
    TCP_OPENED = 41  # guest -> host {window}: connected; window = bytes the host may send
    TCP_DATA = 42  # either way: stream bytes (within the receiver's credit)
    TCP_EOF = 43  # either way: the sender will send no more (half-close)
    TCP_CLOSE = 44  # either way {error?}: the stream is gone (after both EOFs, or an abort)


class FrameError(Exception):
    """A frame or message could not be decoded. ``code`` is stable and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Message:
    t: int
    id: int = 0
    p: dict[str, Any] = field(default_factory=dict)
    data: bytes = b""

    @property
    def type_name(self) -> str:
        try:
            return T(self.t).name
        except ValueError:
            return f"UNKNOWN({self.t})"


def encode(msg: Message) -> bytes:
    """Encode one message as a complete frame (length prefix included)."""
    header = json.dumps(msg.p, separators=(",", ":")).encode() if msg.p else b""
    if len(header) > MAX_HEADER:
        raise FrameError("header_too_large", f"message header is {len(header)} bytes")
    size = _ENV.size + len(header) + len(msg.data)
    if size > MAX_FRAME:
        raise FrameError("frame_too_large", f"frame of {size} bytes exceeds {MAX_FRAME}")
    return b"".join(
        (_LEN.pack(size), _ENV.pack(PROTOCOL_VERSION, msg.t, msg.id, len(header)), header, msg.data)
    )


def message(t: int, id: int = 0, data: bytes = b"", **p: Any) -> bytes:
    """Shorthand: encode a message built from keyword arguments."""
    return encode(Message(t, id, p, data))


def decode_payload(payload: bytes | memoryview) -> Message:
    """Decode one frame payload (without its length prefix)."""
    if len(payload) < _ENV.size:
        raise FrameError("short_frame", f"frame of {len(payload)} bytes is shorter than the envelope")
    version, t, ident, hlen = _ENV.unpack_from(payload, 0)
    if version != PROTOCOL_VERSION:
        raise FrameError("bad_version", f"protocol version {version}, expected {PROTOCOL_VERSION}")
    end = _ENV.size + hlen
    if hlen > MAX_HEADER or end > len(payload):
        raise FrameError("bad_header_length", f"header length {hlen} does not fit the frame")
    p: dict[str, Any] = {}
    if hlen:
        try:
            p = json.loads(bytes(payload[_ENV.size : end]))
        except (ValueError, UnicodeDecodeError) as exc:
            raise FrameError("bad_header", f"header is not valid JSON: {exc}") from None
        if not isinstance(p, dict):
            raise FrameError("bad_header", "header is not a JSON object")
    return Message(t, ident, p, bytes(payload[end:]))


class FrameDecoder:
    """Incremental frame decoder: ``feed(bytes)`` then iterate ``messages()``.

    Keeps at most one partial frame (bounded by MAX_FRAME). After a FrameError the stream
    is out of sync and the decoder refuses further input.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self._broken: FrameError | None = None

    def feed(self, data: bytes) -> None:
        if self._broken is not None:
            raise self._broken
        self._buf += data

    def buffered(self) -> int:
        return len(self._buf)

    def messages(self) -> list[Message]:
        out: list[Message] = []
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= 4:
                (size,) = _LEN.unpack_from(buf, pos)
                if size > self._max:
                    raise FrameError("frame_too_large", f"frame of {size} bytes exceeds {self._max}")
                if len(buf) - pos - 4 < size:
                    break
                out.append(decode_payload(bytes(buf[pos + 4 : pos + 4 + size])))
                pos += 4 + size
        except FrameError as exc:
            self._broken = exc
            raise
        finally:
            if pos:
                del buf[:pos]
        return out
