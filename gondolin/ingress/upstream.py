"""One HTTP/1.1 exchange with a guest server over a byte stream (``h11`` client side).

The request body is streamed to the guest as it arrives from the client; the response body is
streamed back through :class:`~gondolin.http.Body`. A guest connection whose exchange ended
cleanly (both messages complete, no ``Connection: close``) goes back to a :class:`Pool` of idle
connections for the next request to that port; an idle one is used only for ``IDLE_EXPIRY``
seconds (below the keep-alive timeouts servers commonly use), and a reused connection that turns
out closed before any byte of a response is retried once on a fresh one when the request can be
sent again. A ``101 Switching Protocols`` answer to a WebSocket handshake hands the raw stream
on (with any bytes that followed the 101) for the gateway to relay; those are never pooled.
Every failure is an :class:`~gondolin.http.UpstreamError`; its reason is for logs, never for
the client.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import h11
from anyio.abc import ByteStream

from ..http.errors import UpstreamError
from ..http.messages import Body, HttpRequest, HttpResponse, has_no_body, strip_hop_by_hop

READ_SIZE = 64 << 10
MAX_IDLE_PER_PORT = 8  # idle guest connections kept per guest port
IDLE_EXPIRY = 4.0  # seconds an idle guest connection may be reused
_STREAM_ERRORS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    response: float  # for the response head, and between two reads of its body
    send: float  # for one write of the request to the guest


class StaleConnection(UpstreamError):
    """A reused idle connection was closed by the guest before it answered (safe to retry)."""


class Pool:
    """Guest connections per port: idle ones are reused, the rest are opened by ``connector``."""

    def __init__(self, connector: Callable[[int], Awaitable[ByteStream]], *,
                 max_idle_per_port: int = MAX_IDLE_PER_PORT, idle_expiry: float = IDLE_EXPIRY) -> None:
        self._connector = connector
        self._idle: dict[int, list[tuple[float, ByteStream]]] = {}
        self._max_idle = max_idle_per_port
        self._expiry = idle_expiry
        self._closed = False

    async def acquire(self, port: int, timeout: float) -> tuple[ByteStream, bool]:
        """A connection to ``port`` and whether it was reused."""
        idle = self._idle.get(port, [])
        now = anyio.current_time()
        while idle:
            since, stream = idle.pop()
            if now - since < self._expiry:
                return stream, True
            await _close_quietly(stream)
        with anyio.fail_after(timeout):
            return await self._connector(port), False

    async def release(self, port: int, stream: ByteStream) -> None:
        idle = self._idle.setdefault(port, [])
        if self._closed or len(idle) >= self._max_idle:
            await _close_quietly(stream)
        else:
            idle.append((anyio.current_time(), stream))

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for streams in idle.values():
            for _since, stream in streams:
                await _close_quietly(stream)


class Upgraded:
    """The guest side of a WebSocket after its 101: ``read``/``write`` like an httpcore stream."""

    def __init__(self, stream: ByteStream, leftover: bytes) -> None:
        self._stream = stream
        self._leftover = leftover

    async def read(self, max_bytes: int) -> bytes:
        if self._leftover:
            data, self._leftover = self._leftover, b""
            return data
        try:
            return await self._stream.receive(max_bytes)
        except anyio.EndOfStream:
            return b""

    async def write(self, data: bytes) -> None:
        await self._stream.send(data)


class _Exchange:
    def __init__(self, stream: ByteStream, max_header_bytes: int, timeouts: UpstreamTimeouts) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
        self.timeouts = timeouts
        self.received = 0  # bytes the guest sent on this exchange

    @property
    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            with anyio.fail_after(self.timeouts.send):
                await self.stream.send(data)

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            with anyio.fail_after(self.timeouts.response):
                try:
                    data = await self.stream.receive(READ_SIZE)
                except anyio.EndOfStream:
                    data = b""
            self.received += len(data)
            self.h11.receive_data(data)


async def exchange(pool: Pool, port: int, request: HttpRequest, target: str, *, max_header_bytes: int,
                   connect_timeout: float, timeouts: UpstreamTimeouts) -> HttpResponse:
    """Send ``request`` (to ``target``) to guest ``port`` and return the guest's response.

    The connection belongs to the returned response: back to the pool or closed when its body
    is closed. On failure it is closed here.
    """
    while True:
        stream, reused = await pool.acquire(port, connect_timeout)
        try:
            return await _exchange_on(pool, port, stream, reused, request, target, max_header_bytes, timeouts)
        except StaleConnection:
            continue  # a fresh connection next (acquire only reuses what the pool holds)


async def _exchange_on(pool: Pool, port: int, stream: ByteStream, reused: bool, request: HttpRequest,
                       target: str, max_header_bytes: int, timeouts: UpstreamTimeouts) -> HttpResponse:
    ex = _Exchange(stream, max_header_bytes, timeouts)
    try:
        return await _run(ex, pool, port, request, target)
    except (UpstreamError, h11.ProtocolError, TimeoutError, *_STREAM_ERRORS) as exc:
        await _close_quietly(stream)
        if reused and not ex.received and request.body.replayable and not isinstance(exc, TimeoutError):
            raise StaleConnection("idle connection closed by the guest") from exc
        if isinstance(exc, UpstreamError):
            raise
        raise UpstreamError(f"guest server failed: {type(exc).__name__}: {exc}") from exc
    except BaseException:
        await _close_quietly(stream)
        raise


async def _run(ex: _Exchange, pool: Pool, port: int, request: HttpRequest, target: str) -> HttpResponse:
    headers: list[tuple[str, str]] = [("host", request.authority), *request.headers]
    body = request.body
    if request.upgrade == "websocket":
        headers += [("connection", "Upgrade"), ("upgrade", "websocket")]
    elif not body.is_empty and request.header("content-length") is None:
        headers.append(("transfer-encoding", "chunked"))
    await ex.send(h11.Request(method=request.method, target=target.encode("latin-1"),
                              headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]))
    await _send_body(ex, body)  # a guest that answers early may not take it all
    while True:
        event = await ex.next_event()
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101 and request.upgrade is not None:
                return _upgraded(ex, event)
            continue  # 100 Continue and friends: the client gets only the final answer
        if isinstance(event, h11.Response):
            break
        raise UpstreamError(f"guest server closed without a response ({type(event).__name__})")
    response_headers = strip_hop_by_hop(_decode(event.headers))
    status = event.status_code
    reason = event.reason.decode("latin-1")

    async def finish() -> None:
        if ex.reusable:
            ex.h11.start_next_cycle()
            await pool.release(port, ex.stream)
        else:
            await _close_quietly(ex.stream)

    if has_no_body(request.method, status):
        end = await ex.next_event()  # h11 knows there is no body: no read happens
        if not isinstance(end, h11.EndOfMessage):
            raise UpstreamError("guest response without a body did not end")
        await finish()
        return HttpResponse(status, response_headers, Body(), reason)
    length_text = next((v for n, v in response_headers if n == "content-length"), None)
    length = int(length_text) if length_text is not None and length_text.isdigit() else None
    chunks = _body_chunks(ex)

    async def close() -> None:
        await chunks.aclose()
        await finish()

    return HttpResponse(status, response_headers, Body(chunks, length=length, close_source=close), reason)


async def _send_body(ex: _Exchange, body: Body) -> bool:
    """Stream the request body; False when the guest stopped taking it (it may still answer)."""
    try:
        async for chunk in body:
            await ex.send(h11.Data(data=chunk))
        await ex.send(h11.EndOfMessage())
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return False
    return True


async def _body_chunks(ex: _Exchange) -> AsyncGenerator[bytes, None]:
    try:
        while True:
            event = await ex.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise UpstreamError(f"guest response ended early ({type(event).__name__})")
    except (h11.ProtocolError, TimeoutError, *_STREAM_ERRORS) as exc:
        raise UpstreamError(f"guest response body failed: {type(exc).__name__}: {exc}") from exc


def _upgraded(ex: _Exchange, event: h11.InformationalResponse) -> HttpResponse:
    leftover, _closed = ex.h11.trailing_data
    upgraded = Upgraded(ex.stream, bytes(leftover))
    headers = strip_hop_by_hop(_decode(event.headers))

    async def close() -> None:
        await _close_quietly(ex.stream)

    return HttpResponse(101, headers, Body(b"", close_source=close), "Switching Protocols", upgraded=upgraded)


def _decode(headers: Any) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


async def _close_quietly(stream: ByteStream) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        try:
            await stream.aclose()
        except (*_STREAM_ERRORS, RuntimeError):
            pass
