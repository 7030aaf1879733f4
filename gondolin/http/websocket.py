"""Reads the payload of the WebSocket frames a guest sends, so they can be scanned (sans-IO).

The tunnel forwards the guest's bytes unchanged; :class:`FrameReader` only follows along and
hands out each frame's payload, unmasked (RFC 6455 section 5.3), in the pieces it arrived in.
It holds at most one frame header (14 bytes) between calls, whatever the frame sizes.
Compression (permessage-deflate) is never negotiated through the mediator, so the payload it
returns is what the application sent.
"""

from __future__ import annotations

_HEADER_MIN = 2  # RFC 6455 section 5.2: FIN/opcode byte, MASK/length byte
_LEN16 = 126  # the next 2 bytes hold the payload length
_LEN64 = 127  # the next 8 bytes hold the payload length
_MASK_BIT = 0x80
_MASK_KEY = 4


def unmask(data: bytes, key: bytes, offset: int) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` starting ``offset`` bytes into the payload."""
    if not data:
        return data
    shift = offset % _MASK_KEY
    rotated = key[shift:] + key[:shift]
    stream = (rotated * (len(data) // _MASK_KEY + 1))[: len(data)]
    mixed = int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")
    return mixed.to_bytes(len(data), "big")


class FrameReader:
    """Feed raw client-to-server bytes; get back payload pieces, unmasked."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._remaining = 0  # payload bytes of the current frame still to come
        self._key = b""
        self._offset = 0  # payload bytes of the current frame already seen

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        view = memoryview(data)
        while view:
            if self._remaining:
                piece = bytes(view[: self._remaining])
                view = view[len(piece) :]
                out.append(unmask(piece, self._key, self._offset) if self._key else piece)
                self._remaining -= len(piece)
                self._offset += len(piece)
                continue
            need = self._header_size()
            take = need - len(self._head)
            self._head += view[:take]
            view = view[take:]
            if len(self._head) < need or need != self._header_size():
                continue  # more header to come (the length or mask bytes were just learnt)
            self._start_frame()
        return out

    def _header_size(self) -> int:
        if len(self._head) < _HEADER_MIN:
            return _HEADER_MIN
        length = self._head[1] & 0x7F
        extra = 2 if length == _LEN16 else 8 if length == _LEN64 else 0
        return _HEADER_MIN + extra + (_MASK_KEY if self._head[1] & _MASK_BIT else 0)

    def _start_frame(self) -> None:
        head = bytes(self._head)
        self._head.clear()
        length = head[1] & 0x7F
        pos = _HEADER_MIN
        if length == _LEN16:
            length, pos = int.from_bytes(head[2:4], "big"), 4
        elif length == _LEN64:
            length, pos = int.from_bytes(head[2:10], "big"), 10
        self._key = head[pos : pos + _MASK_KEY] if head[1] & _MASK_BIT else b""
        self._remaining = length
        self._offset = 0
