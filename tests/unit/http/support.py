"""Test doubles for the HTTP mediation tests.

* :func:`byte_stream_pair` (from ``tests.support``) — two connected in-memory byte streams (guest end, host end).
* :class:`UpstreamServer` — a real HTTP/1.1 server on 127.0.0.1 written directly on ``h11``
  (independent of the code under test), optionally behind TLS, with a few routes.
* :func:`h1_roundtrip` — a tiny h11 client to read what the mediator sent back.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import h11
from anyio.abc import ByteStream, SocketStream
from anyio.streams.tls import TLSListener

from gondolin.http import CertificateAuthority, HttpMediator
from gondolin.net.flow import FlowInfo, FlowProtocol
from tests.support import MemoryByteStream, byte_stream_pair


def http_flow(dst_port: int = 80, hostname: str | None = None) -> FlowInfo:
    return FlowInfo(FlowProtocol.HTTP, "192.168.127.3", 40000, "192.0.2.1", dst_port, hostname)


def tls_flow(sni: str | None, dst_port: int = 443, hostname: str | None = None) -> FlowInfo:
    return FlowInfo(FlowProtocol.TLS, "192.168.127.3", 40001, "192.0.2.1", dst_port, hostname, sni)


@asynccontextmanager
async def guest_connection(mediator: HttpMediator, flow: FlowInfo) -> AsyncIterator[MemoryByteStream]:
    """Run ``mediator`` on one flow; yields the guest's end of the connection."""
    guest, host = byte_stream_pair()
    async with anyio.create_task_group() as tg:
        tg.start_soon(mediator, flow, host)
        try:
            yield guest
        finally:
            await guest.aclose()


async def read_all(stream: ByteStream, limit: float = 5.0) -> bytes:
    out = bytearray()
    with anyio.fail_after(limit):
        while True:
            try:
                out += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return bytes(out)


@dataclass
class ClientResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    informational: list[int] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


async def read_h1_responses(stream: ByteStream, count: int, methods: list[str] | None = None) -> list[ClientResponse]:
    """Parse ``count`` responses off ``stream`` with an independent h11 client."""
    methods = methods or ["GET"] * count
    client = h11.Connection(h11.CLIENT)
    out: list[ClientResponse] = []
    for method in methods[:count]:
        # Teach the client state machine what was requested so it frames the response right.
        client.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        informational: list[int] = []
        status, headers, body = 0, {}, bytearray()
        with anyio.fail_after(10):
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    try:
                        client.receive_data(await stream.receive())
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        client.receive_data(b"")
                    continue
                if isinstance(event, h11.InformationalResponse):
                    informational.append(event.status_code)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {n.decode(): v.decode() for n, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise AssertionError("connection closed before a full response")
        out.append(ClientResponse(status, headers, bytes(body), informational))
        if client.our_state is h11.MUST_CLOSE or client.their_state is h11.MUST_CLOSE:
            break
        client.start_next_cycle()
    return out


async def h1_roundtrip(stream: ByteStream, raw: bytes, method: str = "GET") -> ClientResponse:
    await stream.send(raw)
    return (await read_h1_responses(stream, 1, [method]))[0]


# -- upstream test server -----------------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class UpstreamServer:
    """Real loopback server. ``url`` is its base URL; ``requests`` what it received."""

    port: int = 0
    scheme: str = "http"
    requests: list[Seen] = field(default_factory=list)
    connections: int = 0
    routes: dict[str, Callable[[Seen], Any]] = field(default_factory=dict)

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    async def serve(self, stream: SocketStream | Any) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = None, bytearray()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        try:
                            conn.receive_data(await stream.receive())
                        except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError):
                            conn.receive_data(b"")
                        continue
                    if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                        if event is h11.PAUSED and request is not None:
                            break
                        return
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                assert request is not None
                seen = Seen(
                    request.method.decode(),
                    request.target.decode(),
                    [(n.decode(), v.decode()) for n, v in request.headers],
                    bytes(body),
                )
                self.requests.append(seen)
                if await self._respond(conn, stream, seen) is False:
                    return
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        finally:
            await stream.aclose()

    async def _respond(self, conn: h11.Connection, stream: Any, seen: Seen) -> bool | None:
        parts = urlsplit(seen.target)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        status, headers, chunks = 200, [("content-type", "application/octet-stream")], [b""]
        length: int | None = None
        if path in self.routes:
            status, headers, chunks = self.routes[path](seen)
        elif path.startswith("/echo"):
            payload = {
                "method": seen.method,
                "target": seen.target,
                "headers": seen.headers,
                "body": seen.body.decode("latin-1"),
            }
            chunks = [json.dumps(payload).encode()]
            headers = [("content-type", "application/json")]
        elif path == "/count":
            chunks = [str(len(seen.body)).encode()]
        elif path.startswith("/bytes/"):
            n = int(path.rsplit("/", 1)[1])
            block = bytes(range(256)) * 64
            chunks = [block[: min(len(block), n - i)] for i in range(0, n, len(block))]
            length = n
        elif path.startswith("/stream/"):
            n = int(path.rsplit("/", 1)[1])
            chunks = [b"z" * min(16384, n - i) for i in range(0, n, 16384)]
        elif path == "/redirect":
            status = int(query.get("status", "302"))
            headers = [("location", query["to"]), ("set-cookie", "hop=1")]
            chunks = [b"moved"]
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            chunks = [f"status {status}".encode()]
        elif path == "/ws":
            if any(n.lower() == "upgrade" and v.lower() == "websocket" for n, v in seen.headers):
                await stream.send(conn.send(h11.InformationalResponse(
                    status_code=101, headers=[("upgrade", "websocket"), ("connection", "Upgrade"),
                                              ("sec-websocket-accept", "test")])))
                leftover = conn.trailing_data[0]
                if leftover:
                    await stream.send(b"echo:" + leftover)
                while True:
                    try:
                        data = await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return False
                    await stream.send(b"echo:" + data)
            status, chunks = 400, [b"not a websocket request"]
        else:
            status, chunks = 404, [b"no such route"]
        if length is None and all(isinstance(c, bytes) for c in chunks) and len(chunks) == 1:
            length = len(chunks[0])
        if length is not None and not any(n == "content-length" for n, _ in headers):
            headers = [*headers, ("content-length", str(length))]
        await stream.send(conn.send(h11.Response(status_code=status, headers=headers)))
        if seen.method != "HEAD":
            for chunk in chunks:
                if chunk:
                    await stream.send(conn.send(h11.Data(data=chunk)))
        await stream.send(conn.send(h11.EndOfMessage()))
        return None


@asynccontextmanager
async def upstream_server(tls_context: ssl.SSLContext | None = None) -> AsyncIterator[UpstreamServer]:
    server = UpstreamServer(scheme="https" if tls_context else "http")
    listener: Any = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    server.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    if tls_context is not None:
        listener = TLSListener(listener, tls_context, standard_compatible=False)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_serve_forever, listener, server)
            try:
                yield server
            finally:
                tg.cancel_scope.cancel()
    finally:
        await listener.aclose()


async def _serve_forever(listener: Any, server: UpstreamServer) -> None:
    async def guarded(stream: Any) -> None:
        try:
            await server.serve(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError, OSError, h11.ProtocolError):
            pass

    await listener.serve(guarded)


def upstream_tls_context(test_ca: CertificateAuthority, name: str) -> ssl.SSLContext:
    ctx = test_ca.server_context(name)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def client_context(ca: CertificateAuthority, *, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    if hasattr(ssl, "VERIFY_X509_STRICT"):
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def static_resolver(table: dict[str, list[str]]) -> Callable[[str, int], Any]:
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"unknown test host {host}")
        return list(table[host])

    return resolve


# -- HTTP/2 guest client ---------------------------------------------------------------------


@dataclass
class H2Result:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None
    done: anyio.Event = field(default_factory=anyio.Event)


class H2Client:
    """A minimal HTTP/2 client on the ``h2`` library, reading in a background task."""

    def __init__(self, stream: ByteStream, tg: Any, *, window: int = 1 << 24) -> None:
        import h2.config
        import h2.connection

        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.results: dict[int, H2Result] = {}
        self.terminated: Any = None
        self.window_open = anyio.Event()
        self.auto_ack = True
        self.conn.initiate_connection()
        if window > 65535:
            self.conn.increment_flow_control_window(window - 65535)
        tg.start_soon(self._reader)

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send(data)

    async def _reader(self) -> None:
        import h2.events

        await self.flush()
        while True:
            try:
                data = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                break
            for event in self.conn.receive_data(data):
                sid = getattr(event, "stream_id", None)
                result = self.results.get(sid) if sid else None
                if isinstance(event, h2.events.ResponseReceived) and result:
                    for n, v in event.headers:
                        if n == b":status":
                            result.status = int(v)
                        else:
                            result.headers[n.decode()] = v.decode()
                elif isinstance(event, h2.events.DataReceived) and result:
                    result.body += event.data
                    if self.auto_ack and sid is not None:
                        self.conn.acknowledge_received_data(event.flow_controlled_length or 0, sid)
                elif isinstance(event, h2.events.StreamEnded) and result:
                    result.ended = True
                    result.done.set()
                elif isinstance(event, h2.events.StreamReset) and result:
                    result.reset = event.error_code
                    result.done.set()
                elif isinstance(event, h2.events.WindowUpdated):
                    self.window_open.set()
                    self.window_open = anyio.Event()
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.terminated = event
            await self.flush()
        for result in self.results.values():
            result.done.set()

    async def request(
        self, method: str, authority: str, path: str, *, headers: list[tuple[str, str]] | None = None,
        body: bytes = b"", end: bool = True,
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.results[sid] = H2Result()
        hdrs = [(":method", method), (":scheme", "https"), (":authority", authority), (":path", path)]
        hdrs += headers or []
        self.conn.send_headers(sid, [(n.encode(), v.encode()) for n, v in hdrs], end_stream=not body and end)
        await self.flush()
        if body:
            await self.send_body(sid, body, end=end)
        return sid

    async def send_body(self, sid: int, body: bytes, *, end: bool = True) -> None:
        view = memoryview(body)
        while view:
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                await self.window_open.wait()
                continue
            self.conn.send_data(sid, bytes(view[:window]))
            view = view[window:]
            await self.flush()
        if end:
            self.conn.end_stream(sid)
            await self.flush()

    async def response(self, sid: int, limit: float = 10) -> H2Result:
        with anyio.fail_after(limit):
            await self.results[sid].done.wait()
        return self.results[sid]


# -- TLS set-ups ------------------------------------------------------------------------------

UPSTREAM_NAME = "upstream.test"


@asynccontextmanager
async def tls_setup(
    mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority, *, limits: Any = None, trust_upstream: bool = True,
    **hook_kwargs: Any,
) -> AsyncIterator[tuple[HttpMediator, UpstreamServer]]:
    """A mediator intercepting TLS, and a TLS upstream for ``upstream.test`` (-> 127.0.0.1)."""
    from gondolin.http import create_http_hooks

    hook_kwargs.setdefault("allowed_internal_hosts", [UPSTREAM_NAME])
    hooks, _ = create_http_hooks(**hook_kwargs)
    async with upstream_server(upstream_tls_context(upstream_ca, UPSTREAM_NAME)) as server, HttpMediator(
        hooks,
        mitm_ca,
        limits=limits,
        resolver=static_resolver({UPSTREAM_NAME: ["127.0.0.1"]}),
        upstream_ca_pem=upstream_ca.cert_pem if trust_upstream else None,
    ) as mediator:
        yield mediator, server


@asynccontextmanager
async def tls_guest(
    mediator: HttpMediator, ca: CertificateAuthority, sni: str | None = UPSTREAM_NAME, *,
    alpn: tuple[str, ...] = ("http/1.1",), flow_hostname: str | None = None,
) -> AsyncIterator[Any]:
    """The guest's TLS connection through the mediator (a strict stdlib ssl client)."""
    from anyio.streams.tls import TLSStream

    ctx = client_context(ca, alpn=list(alpn))
    if sni is None:
        ctx.check_hostname = False
    async with guest_connection(mediator, tls_flow(sni, hostname=flow_hostname)) as raw:
        with anyio.fail_after(10):
            tls = await TLSStream.wrap(raw, server_side=False, hostname=sni, ssl_context=ctx, standard_compatible=False)
        yield tls


@asynccontextmanager
async def h2_guest(mediator: HttpMediator, ca: CertificateAuthority, **kwargs: Any) -> AsyncIterator[H2Client]:
    from anyio.streams.tls import TLSAttribute

    async with tls_guest(mediator, ca, alpn=("h2", "http/1.1"), **kwargs) as tls:
        assert tls.extra(TLSAttribute.alpn_protocol) == "h2"
        async with anyio.create_task_group() as tg:
            client = H2Client(tls, tg)
            yield client
            tg.cancel_scope.cancel()
