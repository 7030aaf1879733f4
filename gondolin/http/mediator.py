"""The flow handler the network stack calls for every guest HTTP or TLS flow.

``HttpMediator(hooks, ca)`` is a :data:`gondolin.net.flow.FlowHandler`. Plain HTTP flows go to
the HTTP/1.x server. TLS flows are terminated with a leaf for the server name the guest asked
for (SNI; without SNI the name the guest resolved, else the destination address), ALPN picks
HTTP/2 or HTTP/1.1, and every request on the connection must name that same host (else 421).
All requests then run through one :class:`~gondolin.http.exchange.Exchange` and one pooled
upstream client per mediator, so use it as ``async with HttpMediator(...) as mediator``.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from types import TracebackType

import anyio
from anyio.abc import ByteStream
from anyio.streams.tls import TLSAttribute, TLSStream

from ..net.flow import FlowInfo, FlowProtocol
from .ca import CertificateAuthority, served_name
from .errors import HttpMediationError
from .exchange import ByteBudget, ConnectionContext, Exchange, Limits
from .hooks import HttpHooks, deny_all_hooks
from .messages import HttpRequest, HttpResponse
from .policy import normalize_host
from .server_h1 import serve_http1
from .server_h2 import H2Server
from .upstream import Connector, Resolver, Timeouts, UpstreamClient

logger = logging.getLogger(__name__)

# Seconds a guest gets to finish the handshake. Generous: an emulated guest that opens many
# connections at once (curl --parallel) may verify our certificate seconds after the ClientHello,
# and the network stack's flow cap, not this timeout, bounds what waiting flows cost.
TLS_HANDSHAKE_TIMEOUT = 60.0


@dataclass
class MediatorStats:
    flows: int = 0
    tls_handshake_failures: int = 0
    flow_errors: int = 0  # unexpected exceptions contained at the flow boundary
    refused_flows: int = 0  # protocols this handler does not serve


class _Session:
    """Binds the shared exchange to one connection's context (the servers' RequestHandler)."""

    def __init__(self, exchange: Exchange, context: ConnectionContext) -> None:
        self._exchange = exchange
        self._context = context

    async def handle(self, request: HttpRequest) -> HttpResponse:
        return await self._exchange.handle(request, self._context)

    def reject(self, status: int, reason: str, request: HttpRequest | None = None) -> HttpResponse:
        return self._exchange.reject(self._context, status, reason, request)

    def failed(self, exc: HttpMediationError, request: HttpRequest) -> HttpResponse:
        return self._exchange.failed(self._context, exc, request)


class HttpMediator:
    """HTTP/1.1 + HTTP/2 mediation with TLS interception for guest flows."""

    def __init__(
        self,
        hooks: HttpHooks | None = None,
        ca: CertificateAuthority | None = None,
        *,
        limits: Limits | None = None,
        resolver: Resolver | None = None,
        connector: Connector | None = None,
        upstream_ca_pem: bytes | None = None,
        upstream_http2: bool = True,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.hooks = hooks if hooks is not None else deny_all_hooks()
        self.ca = ca
        self.limits = limits or Limits()
        self.upstream = UpstreamClient(
            self.hooks.policy,
            resolver=resolver if resolver is not None else self.hooks.resolver,
            connector=connector,
            extra_ca_pem=upstream_ca_pem if upstream_ca_pem is not None else self.hooks.upstream_ca_pem,
            http2=upstream_http2,
            timeouts=timeouts,
        )
        self.budget = ByteBudget(self.limits.max_buffered_bytes)  # this VM's buffered request bytes
        self.exchange = Exchange(self.hooks, self.upstream, self.limits, self.budget)
        self.stats = MediatorStats()

    async def __aenter__(self) -> HttpMediator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.upstream.aclose()

    async def __call__(self, flow: FlowInfo, stream: ByteStream) -> None:
        self.stats.flows += 1
        try:
            if flow.protocol is FlowProtocol.HTTP:
                context = ConnectionContext("http", "HTTP/1.1")
                await serve_http1(stream, _Session(self.exchange, context), scheme="http", limits=self.limits)
            elif flow.protocol is FlowProtocol.TLS and self.ca is not None:
                await self._serve_tls(flow, stream, self.ca)
            else:
                self.stats.refused_flows += 1
        except Exception:
            # Whatever the guest did, one bad flow must not take the network stack down.
            self.stats.flow_errors += 1
            logger.exception("HTTP flow %s:%d -> %s:%d failed", flow.src_ip, flow.src_port, flow.dst_ip, flow.dst_port)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                try:
                    await stream.aclose()
                except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass

    async def _serve_tls(self, flow: FlowInfo, stream: ByteStream, ca: CertificateAuthority) -> None:
        fallback = next(
            (n for n in (flow.sni, flow.hostname, flow.dst_ip) if n and normalize_host(n)), None
        )
        if fallback is None:
            self.stats.tls_handshake_failures += 1
            return
        try:
            with anyio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                tls = await TLSStream.wrap(
                    stream,
                    server_side=True,
                    ssl_context=ca.server_context(fallback),
                    standard_compatible=False,
                )
        except (ssl.SSLError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            self.stats.tls_handshake_failures += 1
            logger.debug("guest TLS handshake failed: %s", exc)
            return
        server_name = served_name(tls.extra(TLSAttribute.ssl_object)) or normalize_host(fallback)
        alpn = tls.extra(TLSAttribute.alpn_protocol, None)
        if alpn == "h2":
            context = ConnectionContext("https", "HTTP/2", server_name)
            await H2Server(tls, _Session(self.exchange, context), scheme="https", limits=self.limits,
                           budget=self.budget).run()
        else:
            context = ConnectionContext("https", "HTTP/1.1", server_name)
            await serve_http1(tls, _Session(self.exchange, context), scheme="https", limits=self.limits)
