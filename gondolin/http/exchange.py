"""The per-request pipeline shared by the HTTP/1.1 and HTTP/2 guest servers.

For each hop (the guest's request, then up to ``MAX_REDIRECTS`` redirects followed on the host):

1. ``on_request`` (may rewrite the request or answer it itself; sees placeholders, never values);
2. host policy, then ``is_request_allowed``;
3. secret substitution for that host (a placeholder or value headed elsewhere is refused here);
4. the guarded upstream client (address policy at connect time);
5. on a redirect: back to 1 with the next hop; otherwise ``on_response`` may replace the response.

Every hop yields one :class:`~gondolin.http.hooks.AuditEvent`; the final hop's event is recorded
when the guest has received (or failed to receive) the body, so it carries the byte count.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from .errors import (
    EgressBlocked,
    HttpMediationError,
    UpstreamError,
)
from .hooks import AuditEvent, Decision, HttpHooks, maybe_await
from .messages import DEFAULT_MAX_BODY, REPLAY_LIMIT, Body, HttpRequest, HttpResponse, has_no_body
from .secrets import BodyScanner, Redactor
from .upstream import MAX_REDIRECTS, UpstreamClient, redirect_request
from .websocket import FrameReader

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 << 10  # request head (HTTP/1.1) or header list (HTTP/2) -> 431
CLOSE_TIMEOUT = 5.0  # seconds to release an upstream response after the guest is gone
# Request bodies up to this size are read whole and scanned for secret values before any
# connection exists (they are kept for redirects anyway); longer ones are scanned as they stream.
SCAN_BUFFER = REPLAY_LIMIT


# Guest request bytes one mediator (one VM) holds in host memory at once, all connections
# together: HTTP/2 stream buffers waiting for the upstream, and bodies read whole for the
# secret scan. Past it HTTP/2 streams are refused (RST_STREAM) and bodies are scanned as they
# stream instead of read whole: the guest gets errors or slower paths, the host no growth.
MAX_BUFFERED_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = MAX_HEADER_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY  # request bodies, and bodies hooks materialise
    max_redirects: int = MAX_REDIRECTS
    max_buffered_bytes: int = MAX_BUFFERED_BYTES


class ByteBudget:
    """A count of bytes held against a limit (sans-IO); one per mediator, so one per VM."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0  # times a take() did not fit

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            self.refused += 1
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


@dataclass(frozen=True, slots=True)
class ConnectionContext:
    """What the guest servers know about the connection a request arrived on."""

    scheme: str  # "http" or "https"
    protocol: str  # "HTTP/1.1" or "HTTP/2"
    server_name: str | None = None  # the TLS leaf's name; every request must match it


async def close_body(body: Body) -> None:
    """Release a body (and its upstream connection) even while being cancelled."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
        try:
            await body.aclose()
        except (OSError, HttpMediationError, RuntimeError):
            pass


class _Audit:
    """The one audit event of a hop that went to the upstream client: the first record wins."""

    def __init__(self, exchange: Exchange, conn: ConnectionContext, request: HttpRequest,
                 secrets: tuple[str, ...], decision: Decision = Decision.ALLOWED) -> None:
        self._exchange = exchange
        self._conn = conn
        self._request = request
        self._secrets = secrets
        self.decision = decision
        self.done = False

    def record(self, status: int | None, reason: str, *, decision: Decision | None = None,
               response_bytes: int = 0) -> None:
        if self.done:
            return
        self.done = True
        self._exchange._event(self._conn, self._request, status, decision or self.decision, reason,
                              response_bytes=response_bytes, secrets=self._secrets)


class Exchange:
    """Runs the pipeline for one mediator; stateless per request apart from the event log.

    Every request gets exactly one audit event. Once a hop is handed to the upstream client its
    event is ``allowed`` whatever fails afterwards (the upstream may hold the request), with the
    guest-visible status and the failure as the reason; the exceptions are failures that happen
    before any byte leaves (no connection, TLS refused, address policy: ``error``/``blocked``)
    and a streamed body cut off because it carried a secret's real value (``blocked``).
    """

    def __init__(self, hooks: HttpHooks, upstream: UpstreamClient, limits: Limits | None = None,
                 budget: ByteBudget | None = None) -> None:
        self.hooks = hooks
        self.upstream = upstream
        self.limits = limits or Limits()
        self.budget = budget or ByteBudget(self.limits.max_buffered_bytes)

    # -- events ---------------------------------------------------------------------------

    def _event(
        self,
        conn: ConnectionContext,
        request: HttpRequest | None,
        status: int | None,
        decision: Decision,
        reason: str,
        *,
        response_bytes: int = 0,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self.hooks.events.record(
            AuditEvent(
                time=self.hooks.events.clock(),
                method=request.method if request else "",
                scheme=request.scheme if request else conn.scheme,
                host=request.host if request else "",
                port=request.port if request else 0,
                path=request.path if request else "",
                status=status,
                response_bytes=response_bytes,
                decision=decision,
                reason=self.hooks.secrets.redact(reason),
                secrets=secrets,
                protocol=conn.protocol,
            )
        )

    def reject(
        self, conn: ConnectionContext, status: int, reason: str, request: HttpRequest | None = None
    ) -> HttpResponse:
        """A plain-text error for a request the guest server refused before the pipeline."""
        reason = self.hooks.secrets.redact(reason)
        self._event(conn, request, status, Decision.REJECTED, reason)
        return HttpResponse.text(status, reason)

    def failed(self, conn: ConnectionContext, exc: HttpMediationError, request: HttpRequest) -> HttpResponse:
        """The answer to a failure :meth:`handle` raised (the guest broke its request body)."""
        if exc.audited:
            return HttpResponse.text(exc.status, self.hooks.secrets.redact(exc.reason))
        return self.reject(conn, exc.status, exc.reason, request)

    def _refuse(
        self, conn: ConnectionContext, request: HttpRequest, status: int, decision: Decision, reason: str
    ) -> HttpResponse:
        reason = self.hooks.secrets.redact(reason)
        self._event(conn, request, status, decision, reason)
        return HttpResponse.text(status, reason)

    def _failure(self, audit: _Audit, status: int, reason: str, decision: Decision = Decision.ALLOWED) -> HttpResponse:
        reason = self.hooks.secrets.redact(reason)
        audit.record(status, reason, decision=decision)
        return HttpResponse.text(status, reason)

    def _track(self, request: HttpRequest, response: HttpResponse, audit: _Audit) -> HttpResponse:
        def finished(body: Body) -> None:
            complete = body.finished or body.is_empty or has_no_body(request.method, response.status)
            reason = audit.decision.value if complete else "response body incomplete"
            audit.record(response.status, reason, response_bytes=body.bytes_read)

        response.body.set_on_close(finished)
        return response

    # -- pipeline -------------------------------------------------------------------------

    async def handle(self, request: HttpRequest, conn: ConnectionContext) -> HttpResponse:
        if request.method == "CONNECT":
            return self._refuse(conn, request, 405, Decision.REJECTED, "CONNECT is not supported")
        if conn.server_name is not None and (
            request.host != conn.server_name or request.scheme != "https"
        ):
            return self._refuse(
                conn, request, 421, Decision.REJECTED,
                f"request for {request.host} on a TLS connection to {conn.server_name}",
            )
        if request.body.length is not None and request.body.length > self.limits.max_body_bytes:
            return self._refuse(
                conn, request, 413, Decision.REJECTED,
                f"request body exceeds {self.limits.max_body_bytes} bytes",
            )
        held: list[int] = []  # bytes taken from the budget for bodies read whole
        try:
            return await self._hops(request, conn, held)
        finally:
            self.budget.give(sum(held))

    async def _hops(self, request: HttpRequest, conn: ConnectionContext, held: list[int]) -> HttpResponse:
        origin = _origin(request)
        substitute = True  # never again once a redirect left the guest's scheme, host and port
        current = request
        for hop in range(self.limits.max_redirects + 1):
            substitute = substitute and _origin(current) == origin
            prepared = await self._prepare(current, conn, substitute, held)
            if isinstance(prepared, HttpResponse):
                return prepared
            outgoing, wire, used = prepared
            audit = _Audit(self, conn, outgoing, used)
            try:
                outcome = await self._send(conn, outgoing, wire, audit)
                if outcome.upgraded is not None or audit.done:
                    return outcome
                try:
                    following = redirect_request(outgoing, outcome)
                except UpstreamError as exc:
                    await close_body(outcome.body)
                    return self._failure(audit, 502, exc.reason)
                if following is None:
                    return await self._finish(outgoing, outcome, audit)
                await close_body(outcome.body)
                audit.record(outcome.status, f"redirect to {following.authority}")
            except BaseException:
                audit.record(None, "not completed: the guest connection went away")
                raise
            current = following
            if hop == self.limits.max_redirects:
                break
        return self._refuse(conn, current, 508, Decision.ERROR,
                            f"more than {self.limits.max_redirects} redirects")

    async def _prepare(
        self, request: HttpRequest, conn: ConnectionContext, substitute: bool, held: list[int]
    ) -> HttpResponse | tuple[HttpRequest, HttpRequest, tuple[str, ...]]:
        """Hooks, policy and secrets for one hop: the request as decided and as it goes on the wire."""
        hooks = self.hooks
        outgoing = request
        if hooks.on_request is not None:
            try:
                result: HttpRequest | HttpResponse | None = await maybe_await(
                    hooks.on_request(request)
                )
            except HttpMediationError as exc:
                return self._refuse(conn, request, exc.status, Decision.BLOCKED, exc.reason)
            except Exception as exc:
                logger.warning("on_request hook failed: %s", hooks.secrets.redact(repr(exc)))
                return self._refuse(conn, request, 500, Decision.ERROR, "on_request hook failed")
            if isinstance(result, HttpResponse):
                return self._track(request, result, _Audit(self, conn, request, (), Decision.ANSWERED))
            if isinstance(result, HttpRequest):
                outgoing = result
        verdict = hooks.policy.check_host(outgoing.host)
        if not verdict.allowed:
            return self._refuse(conn, outgoing, 403, Decision.BLOCKED, verdict.reason)
        if hooks.is_request_allowed is not None:
            try:
                allowed: bool = await maybe_await(hooks.is_request_allowed(outgoing))
            except Exception as exc:
                logger.warning("is_request_allowed failed: %s", hooks.secrets.redact(repr(exc)))
                allowed = False
            if not allowed:
                return self._refuse(conn, outgoing, 403, Decision.BLOCKED,
                                    "blocked by is_request_allowed")
        try:
            sub = hooks.secrets.apply(
                outgoing.host, outgoing.headers, outgoing.target,
                in_query=hooks.replace_secrets_in_query,
                scheme=outgoing.scheme, port=outgoing.port, substitute=substitute,
            )
            scanner = hooks.secrets.scanner(outgoing.scheme, outgoing.host, outgoing.port)
            body = outgoing.body
            if scanner is not None:
                body = await scan_body(body, scanner, self.budget, held)
        except EgressBlocked as exc:
            return self._refuse(conn, outgoing, 403, Decision.BLOCKED, exc.reason)
        headers = sub.headers
        if outgoing.upgrade:
            # No permessage-deflate: frames the guest sends must stay readable for the scan.
            headers = tuple((n, v) for n, v in headers if n != "sec-websocket-extensions")
        outgoing = outgoing.replace(body=body)
        return outgoing, outgoing.replace(headers=headers, target=sub.target), sub.used

    async def _send(
        self, conn: ConnectionContext, outgoing: HttpRequest, wire: HttpRequest, audit: _Audit
    ) -> HttpResponse:
        """One hop through the upstream client; failures come back as responses, audited."""
        try:
            response = await self.upstream.send(wire)
        except EgressBlocked as exc:
            # Refused at connect time (address policy), or a streamed body carried a value.
            return self._failure(audit, 403, exc.reason, Decision.BLOCKED)
        except UpstreamError as exc:
            if exc.request_sent:
                return self._failure(audit, exc.status, exc.reason)
            return self._failure(audit, exc.status, exc.reason, Decision.ERROR)
        except HttpMediationError as exc:
            # The guest's body broke off or grew too large on the way: its server answers.
            audit.record(exc.status, exc.reason)
            exc.audited = True
            raise
        if response.upgraded is not None:
            scanner = self.hooks.secrets.scanner(outgoing.scheme, outgoing.host, outgoing.port)
            if scanner is not None:
                def blocked(reason: str) -> None:
                    self._event(conn, outgoing, 403, Decision.BLOCKED, f"WebSocket closed: {reason}")

                response = response.replace(upgraded=ScanningStream(response.upgraded, scanner, blocked))
            audit.record(response.status, "WebSocket tunnel opened")
        return response

    async def _finish(self, request: HttpRequest, response: HttpResponse, audit: _Audit) -> HttpResponse:
        hooks = self.hooks
        if hooks.on_response is not None:
            try:
                replaced: HttpResponse | None = await maybe_await(
                    hooks.on_response(response, request)
                )
            except HttpMediationError as exc:
                await close_body(response.body)
                return self._failure(audit, exc.status, exc.reason)
            except Exception as exc:
                await close_body(response.body)
                logger.warning("on_response hook failed: %s", hooks.secrets.redact(repr(exc)))
                return self._failure(audit, 502, "on_response hook failed")
            if replaced is not None:
                if replaced.body is not response.body:
                    await close_body(response.body)
                response = replaced
        if hooks.redact_responses:
            response = redact_response(response, hooks.secrets.redactor(), request.method)
        return self._track(request, response, audit)


def _origin(request: HttpRequest) -> tuple[str, str, int]:
    return request.scheme, request.host, request.port


async def scan_body(body: Body, scanner: BodyScanner, budget: ByteBudget, held: list[int]) -> Body:
    """``body`` checked for real values that may not go where it goes (:class:`EgressBlocked`).

    A body of up to ``SCAN_BUFFER`` bytes is read whole and checked before any connection
    exists, while ``budget`` has room (what it takes is appended to ``held``). A longer one goes
    out as it streams, minus a held-back window, and is cut off (:class:`EgressBlocked` from the
    upload) at the first value found.
    """
    if body.is_empty:
        return body
    chunks = body.__aiter__()
    head = bytearray()
    while len(head) <= SCAN_BUFFER:
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            scanner.check(bytes(head))
            return Body(bytes(head))
        head += chunk
        if not budget.take(len(chunk)):
            break
        held.append(len(chunk))

    async def stream() -> AsyncIterator[bytes]:
        yield scanner.feed(bytes(head))
        async for chunk in chunks:
            safe = scanner.feed(chunk)
            if safe:
                yield safe
        yield scanner.finish()

    return Body(stream(), length=body.length, close_source=body.aclose)


def redact_response(response: HttpResponse, redactor: Redactor | None, method: str) -> HttpResponse:
    """Real values in the response headers and body replaced with their placeholders."""
    if redactor is None or response.upgraded is not None:
        return response
    headers = tuple((n, redactor.text(v)) for n, v in response.headers)
    if has_no_body(method, response.status) or response.body.is_empty:
        return response.replace(headers=headers)
    source = response.body

    async def stream() -> AsyncIterator[bytes]:
        async for chunk in source:
            safe = redactor.feed(chunk)
            if safe:
                yield safe
        rest = redactor.finish()
        if rest:
            yield rest

    # Placeholders and values differ in length: the body's length is no longer known up front.
    headers = tuple((n, v) for n, v in headers if n != "content-length")
    return response.replace(headers=headers, body=Body(stream(), close_source=source.aclose))


class ScanningStream:
    """An upstream WebSocket stream whose writes (the guest's frames) are scanned for values."""

    def __init__(self, inner: Any, scanner: BodyScanner, on_blocked: Callable[[str], None]) -> None:
        self._inner = inner
        self._scanner = scanner
        self._frames = FrameReader()
        self._on_blocked = on_blocked

    async def write(self, data: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109 (httpcore2 stream signature)
        try:
            for payload in self._frames.feed(data):
                self._scanner.check(payload)
        except EgressBlocked as exc:
            self._on_blocked(exc.reason)
            raise
        await self._inner.write(data, timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        data: bytes = await self._inner.read(max_bytes, timeout)
        return data

    async def aclose(self) -> None:
        await self._inner.aclose()
