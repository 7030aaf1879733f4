"""The host HTTP gateway into a guest: ``gateway = await vm.expose_http(port=8080)``.

A TCP listener on the host (loopback unless ``allow_remote=True``) serves HTTP/1.1 with the
same ``h11`` server the egress mediator uses (keep-alive, chunked and streamed bodies,
WebSocket upgrades). Each request is routed by path prefix (:mod:`gondolin.ingress.routes`),
passed through the host's hooks, and sent over a fresh guest loopback connection opened by the
``connector`` (``vm.open_tcp``). Clients never see why the guest failed: that is a plain 502.

Bounded: connections (``max_connections``; more get a 503), request heads and guest response
heads (``max_header_bytes``), every wait (client idle, guest connect, guest response). Bodies
stream through; the gateway never holds one whole.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketAttribute

from ..errors import GondolinError
from ..http.errors import BodyTooLarge, GuestProtocolError, HttpMediationError
from ..http.exchange import Limits
from ..http.hooks import maybe_await
from ..http.messages import HttpRequest, HttpResponse
from ..http.server_h1 import serve_http1
from ..streams import is_loopback
from .hooks import IngressContext, IngressEvent, IngressEventLog, IngressHooks
from .routes import ListenersError, Route, RouteTable, parse_listeners
from .upstream import Pool, UpstreamTimeouts, exchange

logger = logging.getLogger(__name__)

Connector = Callable[[int], Awaitable[ByteStream]]
# Returns the listeners file's bytes, or None when there is none.
ListenersSource = Callable[[], Awaitable[bytes | None]]

# Client-supplied forwarding headers are dropped: only the gateway's own are trusted upstream.
FORWARDING_HEADERS = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
                                "x-forwarded-prefix", "x-forwarded-port", "x-real-ip"})
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
         b"content-length: 25\r\nconnection: close\r\n\r\nserver too busy, retry.\r\n")
_BAD_GATEWAY = "bad gateway"


@dataclass(frozen=True, slots=True)
class IngressLimits:
    max_connections: int = 128  # client connections at once (WebSockets included)
    max_header_bytes: int = 64 << 10  # request head from a client, response head from the guest
    max_request_body: int | None = None  # bytes; None: any size (bodies are streamed, not held)
    connect_timeout: float = 15.0  # opening a guest connection
    response_timeout: float = 60.0  # guest response head, and between two pieces of its body
    idle_timeout: float = 60.0  # a client connection with nothing to read or unable to take data
    listeners_interval: float = 1.0  # seconds between two looks at the listeners file
    listeners_timeout: float = 10.0  # one read of the listeners file


class _IdleTimeout(ByteStream):
    """A client stream whose reads and writes give up after ``timeout`` (None: never)."""

    def __init__(self, stream: ByteStream, timeout: float | None) -> None:
        self.inner = stream
        self.timeout = timeout

    async def receive(self, max_bytes: int = 65536) -> bytes:
        with anyio.move_on_after(self.timeout) as scope:
            return await self.inner.receive(max_bytes)
        assert scope.cancelled_caught
        raise anyio.EndOfStream

    async def send(self, item: bytes) -> None:
        with anyio.move_on_after(self.timeout):
            return await self.inner.send(item)
        raise anyio.BrokenResourceError

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class IngressGateway:
    """An HTTP listener on the host forwarding to guest ports by path prefix.

    Made by :meth:`gondolin.VM.expose_http`; standalone: bind with :meth:`listen`, run
    :meth:`serve` in a task group, stop with :meth:`close`.
    """

    def __init__(self, connector: Connector, *, routes: RouteTable | Mapping[str, int] | Iterable[Route] | None = None,
                 hooks: IngressHooks | None = None, listeners: ListenersSource | None = None,
                 limits: IngressLimits | None = None) -> None:
        self._pool = Pool(connector)
        self._host_routes = RouteTable.of(routes)
        self._file_routes = RouteTable()
        self._table = self._host_routes
        self.hooks = hooks or IngressHooks()
        self.limits = limits or IngressLimits()
        self._listeners = listeners
        self._listeners_data: bytes | None = None
        self._log = IngressEventLog(self.hooks.on_event)
        self._listener: anyio.abc.Listener[Any] | None = None
        self._scope: anyio.CancelScope | None = None
        self._stopped = anyio.Event()
        self._closed = False
        self._active = 0
        self.host = ""
        self.port = 0

    # -- what it is ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/"

    @property
    def routes(self) -> RouteTable:
        """The routes in force: the listeners file's, then the host's (which win)."""
        return self._table

    def set_routes(self, routes: RouteTable | Mapping[str, int] | Iterable[Route] | None) -> None:
        """Replace the host's route table (the listeners file's routes stay)."""
        self._host_routes = RouteTable.of(routes)
        self._table = self._file_routes.merged(self._host_routes)

    def events(self) -> list[IngressEvent]:
        return self._log.events()

    @property
    def active_connections(self) -> int:
        return self._active

    def __repr__(self) -> str:
        return f"<IngressGateway {self.url} routes={len(self._table)}>"

    # -- running ------------------------------------------------------------------------------
    async def listen(self, host: str = "127.0.0.1", port: int = 0, *, allow_remote: bool = False) -> None:
        """Bind the listening socket (``port=0``: any free port; see :attr:`url`)."""
        if not allow_remote and not is_loopback(host):
            raise GondolinError(f"refusing to listen on {host!r}: anyone who can reach that address could reach "
                                "the guest's servers; pass allow_remote=True to mean it, or listen on 127.0.0.1",
                                code="remote_listen")
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"listen port must be 0-65535, got {port!r}")
        bind = "127.0.0.1" if host == "localhost" else host
        try:
            listener = await anyio.create_tcp_listener(local_host=bind, local_port=port, reuse_port=False)
        except OSError as exc:
            raise GondolinError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another address "
                                "or port (0 picks a free one)", code="listen_failed") from exc
        self._listener = listener
        inner = listener.listeners[0]
        address = inner.extra(SocketAttribute.local_address)
        self.host, self.port = str(address[0]), int(address[1])

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept clients (and watch the listeners file) until :meth:`close` or cancellation."""
        if self._listener is None:
            raise RuntimeError("call listen() before serve()")
        listener = self._listener
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                if self._closed:
                    tg.cancel_scope.cancel()
                if self._listeners is not None:
                    await self.reload_listeners()
                    tg.start_soon(self._watch_listeners)
                task_status.started()
                await listener.serve(self._client, task_group=tg)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
                await self._pool.aclose()
            self._stopped.set()

    async def close(self) -> None:
        """Stop listening and drop every client connection; safe to call twice."""
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await self._stopped.wait()
        elif self._listener is not None:
            await self._listener.aclose()
            await self._pool.aclose()

    async def __aenter__(self) -> IngressGateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the listeners file -------------------------------------------------------------------
    async def reload_listeners(self) -> bool:
        """Read the listeners file once; True when it was read (changed or not) and is valid."""
        if self._listeners is None:
            return False
        try:
            with anyio.fail_after(self.limits.listeners_timeout):
                data = await self._listeners()
        except ListenersError as exc:
            return self._reload_failed(str(exc), None)
        except (GondolinError, TimeoutError, OSError) as exc:
            logger.debug("ingress: cannot read the listeners file: %s", exc)
            return False
        data = data or b""
        if data == self._listeners_data:
            return True
        try:
            table = parse_listeners(data)
        except ListenersError as exc:
            return self._reload_failed(str(exc), data)
        self._listeners_data = data
        self._file_routes = table
        self._table = table.merged(self._host_routes)
        self._log.record("reload", f"{len(table)} routes from the listeners file")
        return True

    def _reload_failed(self, reason: str, data: bytes | None) -> bool:
        self._listeners_data = data  # report a bad file once, not on every poll
        self._log.record("reload_error", reason)
        return False

    async def _watch_listeners(self) -> None:
        while True:
            await anyio.sleep(self.limits.listeners_interval)
            await self.reload_listeners()

    # -- clients ------------------------------------------------------------------------------
    async def _client(self, stream: ByteStream) -> None:
        async with stream:
            if self._active >= self.limits.max_connections:
                with anyio.move_on_after(1):
                    try:
                        await stream.send(_BUSY)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
                return
            self._active += 1
            try:
                try:
                    remote = stream.extra(SocketAttribute.remote_address)
                    client = str(remote[0]) if isinstance(remote, tuple) else str(remote)
                except anyio.TypedAttributeLookupError:
                    client = ""
                wrapped = _IdleTimeout(stream, self.limits.idle_timeout)
                limits = Limits(max_header_bytes=self.limits.max_header_bytes,
                                max_body_bytes=self.limits.max_request_body or (1 << 62))
                await serve_http1(wrapped, _Handler(self, client, wrapped), scheme="http", limits=limits)
            except Exception:  # one client's failure must not stop the gateway
                logger.exception("ingress: client connection failed")
            finally:
                self._active -= 1

    async def forward(self, request: HttpRequest, client: str) -> HttpResponse:
        """Route, check and forward one request (the handler of every client connection)."""
        route = self._table.match(request.path)
        if route is None:
            return self._answer(request, client, None, HttpResponse.text(404, "no route"), "no route")
        ctx = IngressContext(client, route)
        request = _forwarded(request, ctx)
        if self.hooks.on_request is not None:
            try:
                decided = await maybe_await(self.hooks.on_request(request, ctx))
            except Exception:
                logger.exception("ingress on_request hook failed")
                return self._answer(request, client, route, HttpResponse.text(502, _BAD_GATEWAY), "hook failed")
            if isinstance(decided, HttpResponse):
                return self._answer(request, client, route, decided, "answered by on_request")
            if isinstance(decided, HttpRequest):
                request = decided
        target = route.upstream_target(request.target) if route.matches(request.path) else request.target
        try:
            response = await self._exchange(route.port, request, target)
        except (BodyTooLarge, GuestProtocolError):
            raise  # the client broke its own body: the server answers it (413/400)
        except Exception as exc:  # anything from the guest side is a 502 without detail
            logger.debug("ingress: %s %s -> guest port %d failed: %r", request.method, request.path, route.port, exc)
            return self._answer(request, client, route, HttpResponse.text(502, _BAD_GATEWAY), f"upstream failed: {exc}")
        if self.hooks.on_response is not None:
            try:
                edited = await maybe_await(self.hooks.on_response(response, request, ctx))
            except Exception:
                logger.exception("ingress on_response hook failed")
                await response.body.aclose()
                return self._answer(request, client, route, HttpResponse.text(502, _BAD_GATEWAY), "hook failed")
            if isinstance(edited, HttpResponse):
                response = edited
        return self._answer(request, client, route, response, "forwarded")

    async def _exchange(self, port: int, request: HttpRequest, target: str) -> HttpResponse:
        timeouts = UpstreamTimeouts(response=self.limits.response_timeout, send=self.limits.idle_timeout)
        return await exchange(self._pool, port, request, target, max_header_bytes=self.limits.max_header_bytes,
                              connect_timeout=self.limits.connect_timeout, timeouts=timeouts)

    def _answer(self, request: HttpRequest, client: str, route: Route | None, response: HttpResponse,
                reason: str) -> HttpResponse:
        self._log.record("request", reason, method=request.method, path=request.path, status=response.status,
                         client=client, route=route.prefix if route else None)
        return response

    def _rejected(self, status: int, reason: str, request: HttpRequest | None, client: str) -> HttpResponse:
        self._log.record("request", reason, method=request.method if request else "",
                         path=request.path if request else "", status=status, client=client)
        return HttpResponse.text(status, reason)


def _forwarded(request: HttpRequest, ctx: IngressContext) -> HttpRequest:
    headers = [(n, v) for n, v in request.headers if n not in FORWARDING_HEADERS]
    headers += [("x-forwarded-for", ctx.client), ("x-forwarded-proto", "http"),
                ("x-forwarded-host", request.authority)]
    if ctx.route.strip_prefix and ctx.route.prefix != "/":
        headers.append(("x-forwarded-prefix", ctx.route.prefix))
    return replace(request, headers=tuple(headers))


class _Handler:
    """The :class:`gondolin.http.server_h1.RequestHandler` of one client connection."""

    def __init__(self, gateway: IngressGateway, client: str, stream: _IdleTimeout) -> None:
        self._gateway = gateway
        self._client = client
        self._stream = stream

    async def handle(self, request: HttpRequest) -> HttpResponse:
        response = await self._gateway.forward(request, self._client)
        if response.status == 101 and response.upgraded is not None:
            self._stream.timeout = None  # a WebSocket may be quiet for long; max_connections bounds them
        return response

    def reject(self, status: int, reason: str, request: HttpRequest | None = None) -> HttpResponse:
        return self._gateway._rejected(status, reason, request, self._client)

    def failed(self, exc: HttpMediationError, request: HttpRequest) -> HttpResponse:
        return self._gateway._rejected(exc.status, exc.reason, request, self._client)
