"""Bounded output and secret redaction (sans-IO: bytes in, bytes/text out).

:class:`HeadTailBuffer` keeps the first and last bytes of a stream and counts what it dropped, so
a command that prints gigabytes costs a bounded amount of memory and the model still sees how
it started and how it ended. :class:`Redactor` scrubs secret values (and their common encodings)
from anything a tool returns.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

MIN_REDACTED_LENGTH = 6  # shorter values would redact innocent text by coincidence
MIN_EDGE_FRAGMENT = 4  # a secret fragment this long at a truncation edge is masked
OMITTED_MARKER = "\n...[{n} bytes omitted]...\n"


@dataclass(frozen=True)
class Clip:
    """A head+tail view of some bytes: ``omitted`` bytes were dropped between them."""

    head: bytes
    tail: bytes
    omitted: int

    @property
    def truncated(self) -> bool:
        return self.omitted > 0

    @property
    def shown(self) -> int:
        return len(self.head) + len(self.tail)

    def clip(self, limit: int) -> Clip:
        """The same view cut down to at most ``limit`` bytes (about half head, half tail)."""
        if self.shown <= limit:
            return self
        if not self.omitted:  # head and tail are contiguous: cut the middle of their join
            joined = self.head + self.tail
            head_cap = limit // 2
            tail_cap = limit - head_cap
            return Clip(joined[:head_cap], joined[len(joined) - tail_cap:] if tail_cap else b"",
                        len(joined) - limit)
        new_head = self.head[: limit // 2]
        tail_cap = limit - len(new_head)
        new_tail = self.tail[len(self.tail) - tail_cap:] if tail_cap else b""
        dropped = len(self.head) - len(new_head) + len(self.tail) - len(new_tail)
        return Clip(new_head, new_tail, self.omitted + dropped)


def clip_bytes(data: bytes, limit: int) -> Clip:
    return Clip(data, b"", 0).clip(limit)


class HeadTailBuffer:
    """Keeps at most ``limit`` bytes of a stream: its first half and its latest half."""

    def __init__(self, limit: int) -> None:
        if limit < 2:
            raise ValueError("limit must be at least 2 bytes")
        self._head_cap = limit // 2
        self._tail_cap = limit - self._head_cap
        self._head = bytearray()
        self._tail = bytearray()
        self.omitted = 0
        self.total = 0

    def append(self, data: bytes) -> None:
        self.total += len(data)
        room = self._head_cap - len(self._head)
        if room > 0 and not self.omitted and not self._tail:
            self._head += data[:room]
            data = data[room:]
        if not data:
            return
        self._tail += data
        excess = len(self._tail) - self._tail_cap
        if excess > 0:
            del self._tail[:excess]
            self.omitted += excess

    def __len__(self) -> int:
        return len(self._head) + len(self._tail)

    def view(self) -> Clip:
        return Clip(bytes(self._head), bytes(self._tail), self.omitted)

    def take(self, hold: int = 0) -> Clip:
        """Return the buffered view and empty the buffer, keeping back the last ``hold`` bytes
        (a possible start of a secret that the next chunk completes)."""
        clip = self.view()
        kept = b""
        if hold and clip.omitted:
            hold = min(hold, len(clip.tail))
            kept = clip.tail[len(clip.tail) - hold:]
            clip = Clip(clip.head, clip.tail[:len(clip.tail) - hold], clip.omitted)
        elif hold:
            joined = clip.head + clip.tail
            hold = min(hold, len(joined))
            kept = joined[len(joined) - hold:]
            clip = Clip(joined[:len(joined) - hold], b"", 0)
        self._head = bytearray()
        self._tail = bytearray()
        self.omitted = 0
        if kept:
            self._head += kept
        return clip


def render_clip(clip: Clip) -> str:
    head = clip.head.decode(errors="replace")
    if not clip.omitted:
        return head + clip.tail.decode(errors="replace")
    return head + OMITTED_MARKER.format(n=clip.omitted) + clip.tail.decode(errors="replace")


class Redactor:
    """Replaces secret values (plain, URL-encoded, base64) with ``[REDACTED:NAME]``."""

    def __init__(self, secrets: Mapping[str, str] | None = None) -> None:
        forms: dict[bytes, str] = {}
        for name, value in (secrets or {}).items():
            if len(value) < MIN_REDACTED_LENGTH:
                continue
            raw = value.encode()
            for form in (raw, quote(value, safe="").encode(), base64.b64encode(raw),
                         base64.b64encode(raw).rstrip(b"="), base64.urlsafe_b64encode(raw).rstrip(b"=")):
                if len(form) >= MIN_REDACTED_LENGTH:
                    forms.setdefault(form, name)
        # Longest first, so a value that contains another is replaced whole.
        self._forms = sorted(forms.items(), key=lambda item: -len(item[0]))
        self._longest = max((len(f) for f in forms), default=0)

    def __bool__(self) -> bool:
        return bool(self._forms)

    @property
    def names(self) -> list[str]:
        return sorted({name for _, name in self._forms})

    def redact_bytes(self, data: bytes) -> bytes:
        for form, name in self._forms:
            if form in data:
                data = data.replace(form, f"[REDACTED:{name}]".encode())
        return data

    def redact(self, text: str) -> str:
        if not self._forms:
            return text
        for form, name in self._forms:
            needle = form.decode()
            if needle in text:
                text = text.replace(needle, f"[REDACTED:{name}]")
        return text

    def pending_prefix(self, data: bytes) -> int:
        """Length of the longest suffix of ``data`` that could be the start of a secret form;
        streaming callers hold those bytes back until the next chunk decides."""
        best = 0
        tail = data[-(self._longest - 1):] if self._longest > 1 else b""
        for form, _ in self._forms:
            for n in range(min(len(form) - 1, len(tail)), best, -1):
                if tail.endswith(form[:n]):
                    best = n
                    break
        return best

    def redact_clip(self, clip: Clip) -> Clip:
        """Redact both halves, and mask secret fragments cut in two at the omission point."""
        head = self.redact_bytes(clip.head)
        tail = self.redact_bytes(clip.tail)
        if clip.omitted and self._forms:
            head = self._mask_edge(head, at_end=True)
            tail = self._mask_edge(tail, at_end=False)
        return Clip(head, tail, clip.omitted)

    def _mask_edge(self, data: bytes, *, at_end: bool) -> bytes:
        for form, name in self._forms:
            for n in range(min(len(form) - 1, len(data)), MIN_EDGE_FRAGMENT - 1, -1):
                if at_end and data.endswith(form[:n]):
                    return data[:-n] + f"[REDACTED:{name}]".encode()
                if not at_end and data.startswith(form[-n:]):
                    return f"[REDACTED:{name}]".encode() + data[n:]
        return data

    def redact_obj(self, value: object) -> object:
        """Redact every string inside nested dicts, lists and tuples (JSON-like data)."""
        if not self._forms:
            return value
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self.redact_obj(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.redact_obj(v) for v in value]
        return value


def merge_redactors(redactors: Iterable[Redactor]) -> Redactor:
    merged = Redactor()
    forms: dict[bytes, str] = {}
    for r in redactors:
        for form, name in r._forms:
            forms.setdefault(form, name)
    merged._forms = sorted(forms.items(), key=lambda item: -len(item[0]))
    merged._longest = max((len(f) for f in forms), default=0)
    return merged
