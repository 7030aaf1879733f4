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
from dataclasses import dataclass

import anyio

from .errors import (
    BodyTooLarge,
    EgressBlocked,
    GuestProtocolError,
    HttpMediationError,
    UpstreamError,
)
from .hooks import AuditEvent, Decision, HttpHooks, maybe_await
from .messages import DEFAULT_MAX_BODY, Body, HttpRequest, HttpResponse, has_no_body
from .upstream import MAX_REDIRECTS, UpstreamClient, redirect_request

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 << 10  # request head (HTTP/1.1) or header list (HTTP/2) -> 431
CLOSE_TIMEOUT = 5.0  # seconds to release an upstream response after the guest is gone


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = MAX_HEADER_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY  # request bodies, and bodies hooks materialise
    max_redirects: int = MAX_REDIRECTS


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


class Exchange:
    """Runs the pipeline for one mediator; stateless per request apart from the event log."""

    def __init__(self, hooks: HttpHooks, upstream: UpstreamClient, limits: Limits | None = None) -> None:
        self.hooks = hooks
        self.upstream = upstream
        self.limits = limits or Limits()

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

    def _refuse(
        self, conn: ConnectionContext, request: HttpRequest, status: int, decision: Decision, reason: str
    ) -> HttpResponse:
        reason = self.hooks.secrets.redact(reason)
        self._event(conn, request, status, decision, reason)
        return HttpResponse.text(status, reason)

    def _track(
        self,
        conn: ConnectionContext,
        request: HttpRequest,
        response: HttpResponse,
        decision: Decision,
        secrets: tuple[str, ...],
    ) -> HttpResponse:
        def finished(body: Body) -> None:
            complete = body.finished or body.is_empty or has_no_body(request.method, response.status)
            reason = decision.value if complete else "response body incomplete"
            self._event(conn, request, response.status, decision, reason,
                        response_bytes=body.bytes_read, secrets=secrets)

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
        current = request
        for hop in range(self.limits.max_redirects + 1):
            outcome = await self._hop(current, conn)
            if isinstance(outcome, HttpResponse):
                return outcome
            sent, response, used = outcome
            try:
                following = redirect_request(sent, response)
            except UpstreamError as exc:
                await close_body(response.body)
                return self._refuse(conn, sent, 502, Decision.ERROR, exc.reason)
            if following is None:
                return await self._finish(conn, sent, response, used)
            await close_body(response.body)
            self._event(conn, sent, response.status, Decision.ALLOWED,
                        f"redirect to {following.authority}", secrets=used)
            if hop == self.limits.max_redirects:
                break
            current = following
        return self._refuse(conn, current, 508, Decision.ERROR,
                            f"more than {self.limits.max_redirects} redirects")

    async def _hop(
        self, request: HttpRequest, conn: ConnectionContext
    ) -> HttpResponse | tuple[HttpRequest, HttpResponse, tuple[str, ...]]:
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
                return self._track(conn, request, result, Decision.ANSWERED, ())
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
            )
        except EgressBlocked as exc:
            return self._refuse(conn, outgoing, 403, Decision.BLOCKED, exc.reason)
        wire = outgoing.replace(headers=sub.headers, target=sub.target)
        try:
            response = await self.upstream.send(wire)
        except EgressBlocked as exc:
            return self._refuse(conn, outgoing, 403, Decision.BLOCKED, exc.reason)
        except (BodyTooLarge, GuestProtocolError):
            raise  # the guest connection is in an unknown state: its server answers and cleans up
        except HttpMediationError as exc:
            decision = Decision.REJECTED if exc.status < 500 else Decision.ERROR
            return self._refuse(conn, outgoing, exc.status, decision, exc.reason)
        return outgoing, response, sub.used

    async def _finish(
        self, conn: ConnectionContext, request: HttpRequest, response: HttpResponse, used: tuple[str, ...]
    ) -> HttpResponse:
        hooks = self.hooks
        if hooks.on_response is not None and response.upgraded is None:
            try:
                replaced: HttpResponse | None = await maybe_await(
                    hooks.on_response(response, request)
                )
            except HttpMediationError as exc:
                await close_body(response.body)
                return self._refuse(conn, request, exc.status, Decision.ERROR, exc.reason)
            except Exception as exc:
                await close_body(response.body)
                logger.warning("on_response hook failed: %s", hooks.secrets.redact(repr(exc)))
                return self._refuse(conn, request, 502, Decision.ERROR, "on_response hook failed")
            if replaced is not None:
                if replaced.body is not response.body:
                    await close_body(response.body)
                response = replaced
        return self._track(conn, request, response, Decision.ALLOWED, used)
