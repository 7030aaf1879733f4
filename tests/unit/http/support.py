"""Test doubles for the HTTP mediation tests.

* :func:`byte_stream_pair` — two connected in-memory anyio byte streams (guest end, host end).
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
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from anyio.streams.tls import TLSListener

from gondolin.http import CertificateAuthority, HttpMediator
from gondolin.net.flow import FlowInfo, FlowProtocol

STREAM_BUFFER = 16  # items in flight per direction: enough to pipeline, small enough for backpressure


class MemoryByteStream(ByteStream):
    def __init__(self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]) -> None:
        self._send = send
        self._receive = receive
        self._buffer = b""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._buffer:
            self._buffer = await self._receive.receive()
        data, self._buffer = self._buffer[:max_bytes], self._buffer[max_bytes:]
        return data

    async def send(self, item: bytes) -> None:
        if item:
            await self._send.send(bytes(item))

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def byte_stream_pair() -> tuple[MemoryByteStream, MemoryByteStream]:
    a_send, b_recv = anyio.create_memory_object_stream[bytes](STREAM_BUFFER)
    b_send, a_recv = anyio.create_memory_object_stream[bytes](STREAM_BUFFER)
    return MemoryByteStream(a_send, a_recv), MemoryByteStream(b_send, b_recv)


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
