"""Protocol-neutral request/response values shared by the guest servers, hooks and upstream client.

Header names are lower-case ``str``; values are ``str`` decoded as latin-1, so any byte a peer
sent survives a round trip. ``Host`` is never a header here: it is ``host``/``port`` on the
request, the single source of truth for where a request goes. Hop-by-hop headers are removed when
a message enters (see :func:`strip_hop_by_hop`).
"""

from __future__ import annotations

import http
import re
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from .errors import BodyTooLarge
from .policy import normalize_host, parse_ip

Headers = tuple[tuple[str, str], ...]

DEFAULT_PORTS = {"http": 80, "https": 443}
_SCHEME_ALIASES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
REPLAY_LIMIT = 1 << 20  # request bodies up to this size are kept so a 307/308 can resend them
DEFAULT_MAX_BODY = 64 << 20  # cap when a hook materialises a body with read()

# RFC 9110 section 7.6.1 plus the legacy proxy headers every proxy also drops.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
    }
)


_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-z]+$")  # RFC 9110 section 5.6.2, lower case
_BAD_VALUE_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # controls other than HTAB, and DEL


def invalid_field(name: str, value: str) -> str | None:
    """Why a header field is malformed (RFC 9110 section 5.5, RFC 9113 section 8.2.1), else None.

    HTTP/1.1 parsing (h11) already refuses these; HTTP/2 frames carry any octets, so the HTTP/2
    server checks every field with this before a request can be replayed upstream.
    """
    if not _TOKEN_RE.match(name.removeprefix(":")):
        return "invalid header name"
    if _BAD_VALUE_RE.search(value) or value != value.strip(" \t"):
        return f"invalid characters in the value of header {name[:64]}"
    return None


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> Headers:
    """Drop hop-by-hop headers, those the Connection header nominates, and ``host``."""
    pairs = [(n.lower(), v) for n, v in headers]
    nominated = {
        token.strip().lower()
        for name, value in pairs
        if name == "connection"
        for token in value.split(",")
    }
    return tuple(
        (n, v) for n, v in pairs if n not in HOP_BY_HOP and n not in nominated and n != "host"
    )


def parse_authority(authority: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` from a Host header or URL -> normalised host and port; ValueError if bad."""
    if not authority or "@" in authority or any(c in authority for c in " \t/\\?#"):
        raise ValueError("invalid authority")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError("invalid authority")
        host_text, rest = authority[: end + 1], authority[end + 1 :]
    else:
        host_text, _, port_text = authority.partition(":")
        rest = ":" + port_text if _ else ""
    port = default_port
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit() or len(rest) > 6:
            raise ValueError("invalid port")
        port = int(rest[1:])
        if not 0 < port < 65536:
            raise ValueError("invalid port")
    if ":" in host_text and not host_text.startswith("["):
        raise ValueError("IPv6 literals must be bracketed")
    host = normalize_host(host_text)
    if host is None:
        raise ValueError("invalid host")
    return host, port


def format_authority(host: str, port: int, scheme: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if DEFAULT_PORTS.get(scheme) == port else f"{shown}:{port}"


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed request target. ``scheme``/``authority`` are set only for absolute-form."""

    path_and_query: str
    scheme: str | None = None
    authority: str | None = None


def parse_target(target: str) -> Target:
    """Origin-form or absolute-form (http, https, ws, wss) request target; ValueError otherwise."""
    if not target or any(c.isspace() or ord(c) < 0x21 or ord(c) == 0x7F for c in target):
        raise ValueError("invalid request target")
    if "#" in target:
        raise ValueError("fragment in request target")
    if target.startswith("/"):
        return Target(target)
    scheme_text, sep, _ = target.partition("://")
    scheme = _SCHEME_ALIASES.get(scheme_text.lower())
    if not sep or scheme is None:
        raise ValueError("unsupported request target")
    parts = urlsplit(target)
    if not parts.netloc:
        raise ValueError("absolute-form target without authority")
    path = parts.path or "/"
    return Target(path + ("?" + parts.query if parts.query else ""), scheme, parts.netloc)


class Body:
    """A message body: fixed bytes or a one-shot async stream of chunks.

    Iterating counts the bytes handed out (``bytes_read``). Stream bodies up to ``REPLAY_LIMIT``
    are remembered while they pass so a redirect can resend them (``replayable``).
    :meth:`aclose` closes the source and runs ``on_close`` exactly once.
    """

    def __init__(
        self,
        source: bytes | AsyncIterable[bytes] = b"",
        *,
        length: int | None = None,
        on_close: Callable[[Body], None] | None = None,
        close_source: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if isinstance(source, bytes | bytearray | memoryview):
            self._data: bytes | None = bytes(source)
            self._stream: AsyncIterable[bytes] | None = None
            self.length: int | None = len(self._data)
        else:
            self._data = None
            self._stream = source
            self.length = length
        self._record: bytearray | None = bytearray()
        self._started = False
        self._finished = False
        self._closed = False
        self._on_close = on_close
        self._close_source = close_source
        self.bytes_read = 0

    def __repr__(self) -> str:
        kind = "bytes" if self._data is not None else "stream"
        return f"Body({kind}, length={self.length}, read={self.bytes_read})"

    @property
    def is_empty(self) -> bool:
        return self.length == 0

    @property
    def finished(self) -> bool:
        """True once every byte has been handed out (always for bytes bodies once read)."""
        return self._finished

    @property
    def replayable(self) -> bool:
        return self._data is not None or not self._started or (
            self._finished and self._record is not None
        )

    def set_on_close(self, callback: Callable[[Body], None]) -> None:
        self._on_close = callback

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        if self._data is not None:
            if self._data:
                self.bytes_read += len(self._data)
                yield self._data
            self._finished = True
            return
        if self._started:
            if not self.replayable or self._record is None:
                raise RuntimeError("body stream was already consumed")
            data = bytes(self._record)
            if data:
                self.bytes_read += len(data)
                yield data
            return
        self._started = True
        assert self._stream is not None
        async for chunk in self._stream:
            if not chunk:
                continue
            if self._record is not None:
                if len(self._record) + len(chunk) <= REPLAY_LIMIT:
                    self._record += chunk
                else:
                    self._record = None
            self.bytes_read += len(chunk)
            yield chunk
        self._finished = True

    async def read(self, limit: int = DEFAULT_MAX_BODY) -> bytes:
        """Materialise the whole body (at most ``limit`` bytes, else :class:`BodyTooLarge`)."""
        if self._data is not None:
            if len(self._data) > limit:
                raise BodyTooLarge(f"body larger than {limit} bytes")
            return self._data
        buf = bytearray()
        async for chunk in self:
            buf += chunk
            if len(buf) > limit:
                raise BodyTooLarge(f"body larger than {limit} bytes")
        self._data = bytes(buf)
        self.length = len(self._data)
        return self._data

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._close_source is not None:
                await self._close_source()
            elif self._stream is not None and hasattr(self._stream, "aclose"):
                await self._stream.aclose()
        finally:
            if self._on_close is not None:
                self._on_close(self)


def _get(headers: Headers, name: str) -> str | None:
    name = name.lower()
    return next((v for n, v in headers if n == name), None)


def _set(headers: Headers, name: str, value: str | None) -> Headers:
    name = name.lower()
    kept = tuple((n, v) for n, v in headers if n != name)
    return kept if value is None else (*kept, (name, value))


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request as the guest meant it (or as a hook rewrote it). Rewrite with :meth:`replace`."""

    method: str
    scheme: str
    host: str
    port: int
    target: str = "/"  # origin-form path and query
    headers: Headers = ()
    body: Body = field(default_factory=Body, compare=False)
    upgrade: str | None = None  # "websocket" for a WebSocket handshake

    @classmethod
    def from_url(
        cls,
        method: str,
        url: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | AsyncIterable[bytes] = b"",
    ) -> HttpRequest:
        parsed = parse_target(url)
        if parsed.scheme is None or parsed.authority is None:
            raise ValueError("url must be absolute")
        host, port = parse_authority(parsed.authority, DEFAULT_PORTS[parsed.scheme])
        return cls(method.upper(), parsed.scheme, host, port, parsed.path_and_query,
                   strip_hop_by_hop(headers), Body(body))

    @property
    def authority(self) -> str:
        return format_authority(self.host, self.port, self.scheme)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    @property
    def is_ip_literal(self) -> bool:
        return parse_ip(self.host) is not None

    def header(self, name: str) -> str | None:
        return _get(self.headers, name)

    def with_header(self, name: str, value: str | None) -> HttpRequest:
        """Set (replacing every existing value) or, with ``None``, remove a header."""
        return replace(self, headers=_set(self.headers, name, value))

    def replace(self, **changes: Any) -> HttpRequest:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A response headed to the guest. ``upgraded`` carries the upstream stream after a 101."""

    status: int
    headers: Headers = ()
    body: Body = field(default_factory=Body, compare=False)
    reason: str = ""
    upgraded: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def text(cls, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> HttpResponse:
        """A short plain-text response: ``"<status> <phrase>: <message>\\n"``."""
        phrase = reason_phrase(status)
        data = f"{status} {phrase}: {message}\n".encode()
        return cls(
            status,
            (("content-type", "text/plain; charset=utf-8"), *strip_hop_by_hop(headers)),
            Body(data),
            phrase,
        )

    def header(self, name: str) -> str | None:
        return _get(self.headers, name)

    def with_header(self, name: str, value: str | None) -> HttpResponse:
        return replace(self, headers=_set(self.headers, name, value))

    def replace(self, **changes: Any) -> HttpResponse:
        return replace(self, **changes)


def reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def has_no_body(method: str, status: int) -> bool:
    """RFC 9110 section 6.4.1: HEAD responses, 1xx, 204 and 304 carry no content."""
    return method == "HEAD" or status < 200 or status in (204, 304)
