"""The host-side client that replays guest requests upstream.

A pooled ``httpcore2`` client (HTTP/2 when the origin offers it via ALPN) whose only way out is
:class:`GuardedBackend`: for every new connection it checks the host name against the policy,
resolves the name itself, checks every resolved address and connects to an address it checked,
while TLS still uses the original name for SNI and certificate verification. A name that
re-resolves to an internal address between two connections is refused at the second one (DNS
rebinding). Pooled connections are reused only for the origin they were checked for.

Upstream TLS is verified against the host trust store (``httpcore2.default_ssl_context``),
optionally extended with an extra CA. Third-party exceptions are translated here, once, into
:mod:`gondolin.http.errors`.
"""

from __future__ import annotations

import functools
import inspect
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import anyio
import h2.exceptions
import h11
import httpcore2

from .errors import EgressBlocked, HttpMediationError, UpstreamError
from .messages import (
    DEFAULT_PORTS,
    Body,
    HttpRequest,
    HttpResponse,
    parse_authority,
    parse_target,
    strip_hop_by_hop,
)
from .policy import EgressPolicy, parse_ip

MAX_UPSTREAM_CONNECTIONS = 128  # per mediator (per VM), like the reference's fetch semaphore
MAX_KEEPALIVE_CONNECTIONS = 64
KEEPALIVE_EXPIRY = 30.0  # seconds an idle pooled connection is kept
MAX_WEBSOCKETS = 64  # concurrent upstream WebSocket tunnels per mediator
MAX_REDIRECTS = 10
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_BODY_HEADERS = ("content-length", "content-type", "content-encoding", "content-language")
_CREDENTIAL_HEADERS = ("authorization", "cookie", "proxy-authorization")

# The ``resolver`` hook: sync or async, returning the addresses to try in order.
Resolver = Callable[[str, int], Awaitable[Iterable[str]] | Iterable[str]]
Connector = Callable[[str, int, float | None], Awaitable[httpcore2.AsyncNetworkStream]]


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0
    read: float = 120.0
    write: float = 120.0
    pool: float = 60.0

    def as_extension(self) -> dict[str, float]:
        return {"connect": self.connect, "read": self.read, "write": self.write, "pool": self.pool}


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve with the host's resolver; unique addresses in resolver order."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for _family, _type, _proto, _canon, sockaddr in infos:
        seen.setdefault(str(sockaddr[0]), None)
    return list(seen)


_default_backend = httpcore2.AnyIOBackend()


async def tcp_connector(ip: str, port: int, timeout: float | None) -> httpcore2.AsyncNetworkStream:  # noqa: ASYNC109 (httpcore2 backend signature)
    return await _default_backend.connect_tcp(ip, port, timeout=timeout)


def upstream_ssl_context(extra_ca_pem: bytes | None = None) -> ssl.SSLContext:
    """Host trust store plus, optionally, one more CA (a test CA, a corporate root)."""
    ctx = httpcore2.default_ssl_context()
    if extra_ca_pem:
        ctx.load_verify_locations(cadata=extra_ca_pem.decode("ascii"))
    return ctx


@functools.lru_cache(maxsize=8)
def _shared_ssl_context(extra_ca_pem: bytes | None, http2: bool) -> ssl.SSLContext:
    """One context per trust store and ALPN list in this process: loading the host's trust
    store costs ~20 ms of CPU, which every VM's network start would otherwise pay."""
    return upstream_ssl_context(extra_ca_pem)


class GuardedBackend(httpcore2.AsyncNetworkBackend):
    """Network backend that only connects to addresses the policy accepted for that name."""

    def __init__(self, policy: EgressPolicy, resolver: Resolver, connector: Connector) -> None:
        self._policy = policy
        self._resolver = resolver
        self._connector = connector

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore2 backend signature)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        addresses = await self.resolve_checked(host, port, timeout)
        failures: list[str] = []
        for address in addresses:
            try:
                return await self._connector(address, port, timeout)
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout, OSError) as exc:
                failures.append(f"{address}: {exc}")
        raise httpcore2.ConnectError(f"cannot connect to {host}:{port} ({'; '.join(failures)})")

    async def resolve_checked(self, host: str, port: int, timeout: float | None = None) -> list[str]:  # noqa: ASYNC109
        """Addresses of ``host`` that the policy lets it connect to, or :class:`EgressBlocked`."""
        decision = self._policy.check_host(host)
        if not decision.allowed:
            raise EgressBlocked(decision.reason)
        if parse_ip(host) is not None:
            return [host]
        try:
            with anyio.fail_after(timeout):
                answer: Any = self._resolver(host, port)
                if inspect.isawaitable(answer):  # the resolver hook may be sync or async
                    answer = await answer
                addresses = [str(a) for a in answer]
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot resolve {host}: {exc}", request_sent=False) from exc
        except Exception as exc:  # a user's resolver hook failed: a 502 and an error event, like any upstream
            raise UpstreamError(f"the resolver hook failed for {host}: {type(exc).__name__}",
                                request_sent=False) from exc
        allowed = []
        refusal = None
        for address in addresses:
            verdict = self._policy.check_address(host, address)
            if verdict.allowed:
                allowed.append(address)
            else:
                refusal = verdict
        if not allowed:
            raise EgressBlocked(refusal.reason if refusal else f"{host} has no addresses")
        return allowed

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class UpstreamClient:
    """Sends one request hop upstream and streams the response back; owns the connection pools."""

    def __init__(
        self,
        policy: EgressPolicy,
        *,
        resolver: Resolver | None = None,
        connector: Connector | None = None,
        extra_ca_pem: bytes | None = None,
        http2: bool = True,
        timeouts: Timeouts | None = None,
        max_connections: int = MAX_UPSTREAM_CONNECTIONS,
    ) -> None:
        self.backend = GuardedBackend(policy, resolver or system_resolver, connector or tcp_connector)
        self.timeouts = timeouts or Timeouts()
        # A pool sets its ALPN list on the context it is given at each connect: pools share a
        # context only with pools of the same ALPN list (and trust store).
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=_shared_ssl_context(extra_ca_pem, http2),
            max_connections=max_connections,
            max_keepalive_connections=MAX_KEEPALIVE_CONNECTIONS,
            keepalive_expiry=KEEPALIVE_EXPIRY,
            http1=True,
            http2=http2,
            network_backend=self.backend,
        )
        self._extra_ca_pem = extra_ca_pem
        self._ws_pool: httpcore2.AsyncConnectionPool | None = None  # built on first WebSocket

    def _websocket_pool(self) -> httpcore2.AsyncConnectionPool:
        if self._ws_pool is None:
            self._ws_pool = httpcore2.AsyncConnectionPool(
                ssl_context=upstream_ssl_context(self._extra_ca_pem),
                max_connections=MAX_WEBSOCKETS,
                max_keepalive_connections=0,
                http1=True,
                http2=False,
                network_backend=self.backend,
            )
        return self._ws_pool

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._pool.aclose()
            if self._ws_pool is not None:
                await self._ws_pool.aclose()

    async def send(self, request: HttpRequest) -> HttpResponse:
        """One hop; redirects are the caller's business (see :func:`redirect_request`)."""
        headers, content = _wire_headers(request)
        core = httpcore2.Request(
            request.method.encode("ascii"),
            httpcore2.URL(
                scheme=request.scheme.encode("ascii"),
                host=request.host.encode("ascii"),
                port=request.port,
                target=request.target.encode("latin-1"),
            ),
            headers=headers,
            content=content,
            extensions={"timeout": self.timeouts.as_extension()},
        )
        pool = self._websocket_pool() if request.upgrade else self._pool
        try:
            response = await pool.handle_async_request(core)
        except THIRD_PARTY_ERRORS as exc:
            raise translate_error(exc, request.authority) from exc
        return _to_response(response, request)


# Everything the client libraries raise; :func:`translate_error` is the one place they become ours.
THIRD_PARTY_ERRORS = (
    httpcore2.TimeoutException,
    httpcore2.NetworkError,
    httpcore2.ProtocolError,
    httpcore2.UnsupportedProtocol,
    h11.ProtocolError,  # httpcore2 lets some through raw (a body shorter than its Content-Length)
    h2.exceptions.ProtocolError,
    ssl.SSLError,
)
# Failures that happen before any byte of a request is written: the upstream has nothing.
_NOT_SENT = (httpcore2.ConnectError, httpcore2.ConnectTimeout, httpcore2.PoolTimeout,
             httpcore2.UnsupportedProtocol)


def translate_error(exc: BaseException, authority: str = "", *, during: str = "") -> HttpMediationError:
    """The :mod:`gondolin.http.errors` exception for a third-party one.

    Our own errors raised inside the client (a guest body that broke off or grew too large while
    being sent) come back as themselves, whatever the library wrapped them in.
    """
    for inner in (exc, exc.__cause__, exc.__context__):
        if isinstance(inner, HttpMediationError):
            return inner
    upstream = f"upstream {authority}".rstrip() + (f" {during}" if during else "")
    if isinstance(exc, ssl.SSLError):
        return UpstreamError(f"TLS to {authority or 'the upstream'} failed: {exc}", request_sent=False)
    sent = not isinstance(exc, _NOT_SENT)
    if isinstance(exc, httpcore2.TimeoutException):
        return UpstreamError(f"{upstream} timed out", request_sent=sent)
    return UpstreamError(f"{upstream} failed: {exc or type(exc).__name__}", request_sent=sent)


def _wire_headers(request: HttpRequest) -> tuple[list[tuple[bytes, bytes]], AsyncIterator[bytes] | bytes | None]:
    headers = [("host", request.authority)]
    headers += [(n, v) for n, v in request.headers if n not in ("content-length", "transfer-encoding")]
    body = request.body
    content: AsyncIterator[bytes] | bytes | None = None
    declared = request.header("content-length")
    if body.length is not None:
        if body.length or request.method in ("POST", "PUT", "PATCH") or declared == "0":
            headers.append(("content-length", str(body.length)))
        if body.length:
            content = body.__aiter__()
    elif declared is not None:
        headers.append(("content-length", declared))
        content = body.__aiter__()
    else:
        headers.append(("transfer-encoding", "chunked"))
        content = body.__aiter__()
    if request.upgrade:
        headers += [("connection", "Upgrade"), ("upgrade", request.upgrade)]
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers], content


def _to_response(response: httpcore2.Response, request: HttpRequest) -> HttpResponse:
    raw = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in response.headers]
    reason = response.extensions.get("reason_phrase", b"").decode("latin-1")
    if response.status == 101 and request.upgrade:
        kept = tuple((n, v) for n, v in raw if n not in ("connection", "upgrade", "transfer-encoding"))
        return HttpResponse(101, kept, Body(b"", close_source=response.aclose), reason,
                            upgraded=response.extensions["network_stream"])
    length_text = next((v for n, v in raw if n == "content-length"), None)
    length = int(length_text) if length_text and length_text.isdigit() else None
    assert hasattr(response.stream, "__aiter__")
    body = Body(_stream(response.stream), length=length, close_source=response.aclose)
    return HttpResponse(response.status, strip_hop_by_hop(raw), body, reason)


async def _stream(source: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in source:
            yield chunk
    except THIRD_PARTY_ERRORS as exc:
        raise translate_error(exc, during="while sending the response body") from exc


def redirect_request(request: HttpRequest, response: HttpResponse) -> HttpRequest | None:
    """The next hop for a redirect response, or ``None`` when ``response`` is not one.

    303 (except HEAD) and 301/302 after POST become GET without a body; cross-origin hops drop
    Authorization, Cookie and Proxy-Authorization; a body that was streamed and not kept cannot
    be resent (:class:`UpstreamError`).
    """
    location = response.header("location")
    if response.status not in REDIRECT_STATUSES or not location or request.upgrade:
        return None
    try:
        absolute = urljoin(request.url, location.strip()).split("#", 1)[0]
        target = parse_target(absolute)
        if target.scheme is None or target.authority is None or urlsplit(absolute).scheme not in DEFAULT_PORTS:
            raise ValueError("not http(s)")
        host, port = parse_authority(target.authority, DEFAULT_PORTS[target.scheme])
    except ValueError as exc:
        raise UpstreamError("redirect to an invalid or unsupported location") from exc
    method, body, headers = request.method, request.body, request.headers
    if (response.status == 303 and method != "HEAD") or (response.status in (301, 302) and method == "POST"):
        method, body = "GET", Body()
        headers = tuple((n, v) for n, v in headers if n not in _BODY_HEADERS)
    elif not body.is_empty and not body.replayable:
        raise UpstreamError("cannot resend a streamed request body to follow a redirect")
    if (target.scheme, host, port) != (request.scheme, request.host, request.port):
        headers = tuple((n, v) for n, v in headers if n not in _CREDENTIAL_HEADERS)
    return HttpRequest(method, target.scheme, host, port, target.path_and_query, headers, body)
