"""Guest-facing HTTP/1.x server: the ``h11`` state machine driven over an anyio byte stream.

Keep-alive, pipelining (bounded: the socket is only read when h11 needs data, so at most one
read's worth of later requests waits in its buffer), chunked and Content-Length bodies,
``Expect: 100-continue`` (``100 Continue`` goes out only when the pipeline starts sending the body
upstream, i.e. after every policy check passed), absolute-form targets and WebSocket upgrades.
Malformed input gets a short plain-text 400/431 and the connection closes; nothing the guest
sends raises out of :func:`serve_http1`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

import anyio
import h11
import httpcore2
from anyio.abc import ByteStream

from .errors import BodyTooLarge, GuestProtocolError, HttpMediationError
from .exchange import Limits, close_body
from .messages import (
    DEFAULT_PORTS,
    Body,
    HttpRequest,
    HttpResponse,
    has_no_body,
    parse_authority,
    parse_target,
    reason_phrase,
    strip_hop_by_hop,
)

logger = logging.getLogger(__name__)

READ_SIZE = 64 << 10
DRAIN_LIMIT = 64 << 10  # unread request body we swallow to keep a connection alive
DRAIN_TIMEOUT = 1.0
TUNNEL_READ_SIZE = 64 << 10
_STREAM_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class RequestHandler(Protocol):
    """What a guest server needs: run a request, or describe a refusal."""

    async def handle(self, request: HttpRequest) -> HttpResponse: ...

    def reject(self, status: int, reason: str, request: HttpRequest | None = None) -> HttpResponse: ...

    def failed(self, exc: HttpMediationError, request: HttpRequest) -> HttpResponse: ...


class _Connection:
    def __init__(self, stream: ByteStream, limits: Limits) -> None:
        self.stream = stream
        self.limits = limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive(READ_SIZE)
            except _STREAM_GONE:
                data = b""
            self.h11.receive_data(data)

    async def send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            await self.stream.send(data)


async def serve_http1(
    stream: ByteStream, handler: RequestHandler, *, scheme: str, limits: Limits | None = None
) -> None:
    """Serve requests on ``stream`` until the guest closes it or an error ends the connection."""
    conn = _Connection(stream, limits or Limits())
    try:
        while await _serve_one(conn, handler, scheme):
            conn.h11.start_next_cycle()
    except _STREAM_GONE:
        return
    except h11.LocalProtocolError as exc:
        logger.debug("ending HTTP/1 connection: %s", exc)


async def _serve_one(conn: _Connection, handler: RequestHandler, scheme: str) -> bool:
    """Serve one request; True when the connection can carry another."""
    try:
        event = await conn.next_event()
    except h11.RemoteProtocolError as exc:
        status = exc.error_status_hint if exc.error_status_hint in (400, 431) else 400
        reason = "request head too large" if status == 431 else f"malformed request: {exc}"
        await _send_error(conn, handler.reject(status, reason))
        return False
    if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
        return False
    assert isinstance(event, h11.Request)
    request_or_error = _build_request(conn, event, scheme)
    if isinstance(request_or_error, tuple):
        status, reason, partial = request_or_error
        await _send_error(conn, handler.reject(status, reason, partial))
        return False
    request = request_or_error
    try:
        response = await handler.handle(request)
    except (BodyTooLarge, GuestProtocolError) as exc:
        # The request body is in an unknown state: answer and close.
        await _send_error(conn, handler.failed(exc, request))
        return False
    if response.upgraded is not None and response.status == 101:
        await _tunnel(conn, response)
        return False
    waiting_for_100 = conn.h11.they_are_waiting_for_100_continue
    ok = await _send_response(conn, request.method, response)
    if not ok or conn.h11.our_state is not h11.DONE:
        return False
    if waiting_for_100 and conn.h11.their_state is not h11.DONE:
        return False  # the guest never got its 100 Continue: it may or may not send the body
    return await _finish_request_body(conn)


def _build_request(
    conn: _Connection, event: h11.Request, scheme: str
) -> HttpRequest | tuple[int, str, HttpRequest | None]:
    method = event.method.decode("ascii", "replace")
    raw_target = event.target.decode("latin-1")
    raw = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
    head_size = len(raw_target) + sum(len(n) + len(v) + 4 for n, v in raw)
    if head_size > conn.limits.max_header_bytes:
        return 431, "request head too large", None
    if method == "CONNECT":
        return 405, "CONNECT is not supported", None
    if raw_target == "*":
        return 501, "asterisk-form request targets are not supported", None
    try:
        target = parse_target(raw_target)
    except ValueError as exc:
        return 400, str(exc), None
    request_scheme = target.scheme or scheme
    authority = target.authority or next((v for n, v in raw if n == "host"), None)
    if authority is None:
        return 400, "missing Host header", None
    try:
        host, port = parse_authority(authority, DEFAULT_PORTS[request_scheme])
    except ValueError as exc:
        return 400, f"invalid host: {exc}", None
    upgrade = None
    tokens = {t.strip().lower() for n, v in raw if n == "connection" for t in v.split(",")}
    upgrade_header = next((v.strip().lower() for n, v in raw if n == "upgrade"), "")
    if method == "GET" and "upgrade" in tokens and upgrade_header == "websocket":
        upgrade = "websocket"
    headers = strip_hop_by_hop(raw)
    partial = HttpRequest(method, request_scheme, host, port, target.path_and_query, headers)
    expect = partial.header("expect")
    if expect is not None and expect.strip().lower() != "100-continue":
        return 417, "only Expect: 100-continue is supported", partial
    headers = tuple((n, v) for n, v in headers if n != "expect")
    length_text = next((v for n, v in raw if n == "content-length"), None)
    chunked = any(n == "transfer-encoding" for n, _ in raw)
    if chunked and length_text is not None:
        # RFC 9112 section 6.3: a request smuggling vector; a server may refuse it outright.
        return 400, "both Content-Length and Transfer-Encoding", partial
    length = int(length_text) if length_text is not None else None
    if length is not None and length > conn.limits.max_body_bytes:
        return 413, f"request body exceeds {conn.limits.max_body_bytes} bytes", partial
    body = Body(_body_chunks(conn), length=length) if chunked or length else Body()
    return HttpRequest(method, request_scheme, host, port, target.path_and_query, headers, body, upgrade)


async def _body_chunks(conn: _Connection) -> AsyncIterator[bytes]:
    if conn.h11.they_are_waiting_for_100_continue:
        await conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
    total = 0
    while True:
        try:
            event = await conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise GuestProtocolError(f"malformed request body: {exc}") from exc
        if isinstance(event, h11.Data):
            total += len(event.data)
            if total > conn.limits.max_body_bytes:
                raise BodyTooLarge(f"request body exceeds {conn.limits.max_body_bytes} bytes")
            yield bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return
        else:
            raise GuestProtocolError("request body ended early")


def _head(response: HttpResponse, *, close: bool = False) -> h11.Response:
    headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in response.headers]
    if close:
        headers.append((b"connection", b"close"))
    reason = response.reason or reason_phrase(response.status)
    return h11.Response(status_code=response.status, headers=headers, reason=reason.encode("latin-1"))


async def _send_error(conn: _Connection, response: HttpResponse) -> None:
    """Send a small, complete, connection-closing response, if the state machine still allows it."""
    try:
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        data = await response.body.read()
        response = response.with_header("content-length", str(len(data)))
        await conn.send(_head(response, close=True))
        await conn.send(h11.Data(data=data))
        await conn.send(h11.EndOfMessage())
    except (h11.LocalProtocolError, *_STREAM_GONE):
        pass
    finally:
        await close_body(response.body)


async def _send_response(conn: _Connection, method: str, response: HttpResponse) -> bool:
    """Stream ``response``; False when the connection must close (failure mid-body)."""
    body = response.body
    try:
        if response.status < 200:
            response = HttpResponse.text(502, "upstream sent an informational status")
        await conn.send(_head(response))
        if not has_no_body(method, response.status):
            async for chunk in body:
                await conn.send(h11.Data(data=chunk))
        await conn.send(h11.EndOfMessage())
        return True
    except (HttpMediationError, h11.LocalProtocolError) as exc:
        logger.debug("response to guest cut short: %s", exc)
        return False
    finally:
        await close_body(body)


async def _finish_request_body(conn: _Connection) -> bool:
    """Swallow a small unread request body so the connection can be reused."""
    if conn.h11.their_state is h11.DONE:
        return True
    drained = 0
    with anyio.move_on_after(DRAIN_TIMEOUT):
        while drained <= DRAIN_LIMIT:
            try:
                event = await conn.next_event()
            except h11.RemoteProtocolError:
                return False
            if isinstance(event, h11.Data):
                drained += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return conn.h11.their_state is h11.DONE
            else:
                return False
    return False


async def _tunnel(conn: _Connection, response: HttpResponse) -> None:
    """Relay the 101 to the guest, then shuttle bytes both ways until either side closes."""
    upstream: httpcore2.AsyncNetworkStream = response.upgraded
    try:
        head = h11.InformationalResponse(
            status_code=101,
            headers=[(b"upgrade", b"websocket"), (b"connection", b"Upgrade")]
            + [(n.encode("latin-1"), v.encode("latin-1")) for n, v in response.headers],
            reason=b"Switching Protocols",
        )
        await conn.send(head)
        leftover, _ = conn.h11.trailing_data

        async def guest_to_upstream() -> None:
            if leftover:
                await upstream.write(bytes(leftover))
            while True:
                try:
                    data = await conn.stream.receive(TUNNEL_READ_SIZE)
                except _STREAM_GONE:
                    return
                await upstream.write(data)

        async def upstream_to_guest() -> None:
            while True:
                data = await upstream.read(TUNNEL_READ_SIZE)
                if not data:
                    return
                await conn.stream.send(data)

        async def run(part: Any, scope: anyio.CancelScope) -> None:
            try:
                await part()
            except (httpcore2.NetworkError, httpcore2.TimeoutException, *_STREAM_GONE):
                pass
            finally:
                scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, guest_to_upstream, tg.cancel_scope)
            tg.start_soon(run, upstream_to_guest, tg.cancel_scope)
    finally:
        await close_body(response.body)
