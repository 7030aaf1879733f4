"""Guest-facing HTTP/2 server: the ``h2`` state machine driven over an anyio byte stream.

One reader task feeds frames to ``h2``; each request stream runs the pipeline in its own task,
owned by the connection's task group, so many streams proceed at once. Request bodies are
flow-controlled end to end: data is acknowledged to the guest only once the upstream side has
taken it, so a stream buffers at most its window. A stream that fails (policy refusal mid-body,
upstream failure after the response began, oversized body) is reset with RST_STREAM and the
connection carries on; only connection-level protocol errors end it with GOAWAY.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from anyio.abc import ByteStream, TaskGroup

from .errors import BodyTooLarge, GuestProtocolError, HttpMediationError
from .exchange import ByteBudget, Limits, close_body
from .messages import (
    DEFAULT_PORTS,
    Body,
    HttpRequest,
    HttpResponse,
    has_no_body,
    invalid_field,
    parse_authority,
    parse_target,
    strip_hop_by_hop,
)
from .server_h1 import RequestHandler

logger = logging.getLogger(__name__)

READ_SIZE = 64 << 10
MAX_CONCURRENT_STREAMS = 100  # advertised; h2 refuses streams beyond it
STREAM_WINDOW = 1 << 20  # per-stream receive window: bytes one stream may buffer
CONNECTION_WINDOW = 8 << 20  # bounds what all streams of a connection buffer together
HARD_HEADER_LIST_SIZE = 256 << 10  # beyond this HPACK decoding is a connection error
# Streams a guest may reset before their response began, per connection, before the
# connection ends with ENHANCE_YOUR_CALM: cancelling requests is cheap for the guest and each
# one may have cost an upstream connection ("rapid reset", CVE-2023-44487).
MAX_EARLY_RESETS = 200
_STREAM_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
_FORBIDDEN_RESPONSE_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection",
                                         "transfer-encoding", "upgrade", "te"})


class _StreamGone(Exception):
    """The guest reset the stream, or the connection is closing."""


@dataclass(eq=False)
class _Stream:
    stream_id: int
    chunks: deque[tuple[bytes, int]] = field(default_factory=deque)
    ended: bool = False
    reset: bool = False
    responding: bool = False  # response headers sent
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    wakeup: anyio.Event = field(default_factory=anyio.Event)

    def wake(self) -> None:
        self.wakeup.set()
        self.wakeup = anyio.Event()


class H2Server:
    """Serves one HTTP/2 connection; :meth:`run` returns when it is over."""

    def __init__(self, stream: ByteStream, handler: RequestHandler, *, scheme: str, limits: Limits | None = None,
                 budget: ByteBudget | None = None) -> None:
        self._io = stream
        self._handler = handler
        self._scheme = scheme
        self._limits = limits or Limits()
        self._budget = budget or ByteBudget(self._limits.max_buffered_bytes)
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self._conn.decoder.max_header_list_size = HARD_HEADER_LIST_SIZE
        self._streams: dict[int, _Stream] = {}
        self._send_lock = anyio.Lock()
        self._window = anyio.Event()
        self._closing = False
        self.early_resets = 0

    async def run(self) -> None:
        conn = self._conn
        conn.initiate_connection()
        conn.update_settings(
            {
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: HARD_HEADER_LIST_SIZE,
            }
        )
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        try:
            async with anyio.create_task_group() as tg:
                try:
                    await self._flush()
                    await self._read_loop(tg)
                finally:
                    self._closing = True
                    tg.cancel_scope.cancel()
        except _STREAM_GONE:
            pass

    # -- I/O ------------------------------------------------------------------------------

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._conn.data_to_send()
            if data:
                await self._io.send(data)

    async def _read_loop(self, tg: TaskGroup) -> None:
        while True:
            try:
                data = await self._io.receive(READ_SIZE)
            except _STREAM_GONE:
                return
            try:
                events = self._conn.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                logger.debug("HTTP/2 protocol error from guest: %s", exc)
                await self._flush()  # h2 has queued the GOAWAY
                return
            terminated = False
            for event in events:
                terminated |= self._dispatch(event, tg)
            await self._flush()
            if terminated:
                return

    def _dispatch(self, event: h2.events.Event, tg: TaskGroup) -> bool:
        if isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None and event.headers is not None
            st = _Stream(event.stream_id, ended=bool(event.stream_ended))
            self._streams[event.stream_id] = st
            tg.start_soon(self._run_stream, st, list(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None and event.data is not None
            flow = event.flow_controlled_length or 0
            live = self._streams.get(event.stream_id)
            if live is None or live.reset:
                self._ack(flow, event.stream_id)
            elif not self._budget.take(len(event.data)):
                # The VM's request buffers are full: refuse this stream, keep the connection.
                self._ack(flow, event.stream_id)
                live.scope.cancel()
                self._reset(live, h2.errors.ErrorCodes.REFUSED_STREAM)
            else:
                live.chunks.append((event.data, flow))
                live.ended |= event.stream_ended is not None
                live.wake()
        elif isinstance(event, h2.events.StreamEnded | h2.events.TrailersReceived):
            assert event.stream_id is not None
            live = self._streams.get(event.stream_id)
            if live is not None:
                live.ended = True
                live.wake()
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            live = self._streams.get(event.stream_id)
            if live is not None:
                live.reset = True
                live.scope.cancel()
                live.wake()
                if not live.responding:
                    self.early_resets += 1
                    if self.early_resets > MAX_EARLY_RESETS:
                        self._conn.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                        return True
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window.set()
            self._window = anyio.Event()
        elif isinstance(event, h2.events.ConnectionTerminated):
            return True
        return False

    def _ack(self, flow: int, stream_id: int) -> None:
        if flow:
            try:
                self._conn.acknowledge_received_data(flow, stream_id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self._conn.increment_flow_control_window(flow)

    # -- streams --------------------------------------------------------------------------

    async def _run_stream(self, st: _Stream, raw_headers: list[tuple[bytes, bytes]]) -> None:
        response: HttpResponse | None = None
        method = "GET"
        try:
            with st.scope:
                if st.reset:
                    return  # reset in the same read as its headers: never start it upstream
                request_or_error = self._build_request(st, raw_headers)
                if isinstance(request_or_error, tuple):
                    status, reason, partial = request_or_error
                    response = self._handler.reject(status, reason, partial)
                else:
                    method = request_or_error.method
                    try:
                        response = await self._handler.handle(request_or_error)
                    except (BodyTooLarge, GuestProtocolError) as exc:
                        response = self._handler.failed(exc, request_or_error)
                await self._send_response(st, method, response)
        except (_StreamGone, h2.exceptions.StreamClosedError):
            pass
        except HttpMediationError as exc:
            logger.debug("resetting stream %d: %s", st.stream_id, exc)
            self._reset(st, h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            if response is not None:
                await close_body(response.body)
            if not st.ended and not st.reset and not self._closing:
                # Response complete but the guest is still sending: RFC 9113 section 8.1.
                self._reset(st, h2.errors.ErrorCodes.NO_ERROR)
            self._streams.pop(st.stream_id, None)
            for data, flow in st.chunks:
                self._budget.give(len(data))
                self._ack(flow, st.stream_id)
            st.chunks.clear()
            if not self._closing:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    try:
                        await self._flush()
                    except _STREAM_GONE:
                        pass

    def _reset(self, st: _Stream, code: h2.errors.ErrorCodes) -> None:
        try:
            self._conn.reset_stream(st.stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        st.reset = True

    def _build_request(
        self, st: _Stream, raw: list[tuple[bytes, bytes]]
    ) -> HttpRequest | tuple[int, str, HttpRequest | None]:
        pseudo: dict[str, str] = {}
        headers: list[tuple[str, str]] = []
        size = 0
        problem = None
        for name_b, value_b in raw:
            name, value = name_b.decode("latin-1"), value_b.decode("latin-1")
            size += len(name) + len(value)
            problem = problem or invalid_field(name, value)
            if name.startswith(":"):
                pseudo[name] = value
            else:
                headers.append((name, value))
        if size > self._limits.max_header_bytes:
            return 431, "request header list too large", None
        method = pseudo.get(":method", "")
        if method == "CONNECT":
            return 405, "CONNECT is not supported", None
        scheme = pseudo.get(":scheme", self._scheme)
        if scheme not in DEFAULT_PORTS:
            return 400, "unsupported :scheme", None
        authority = pseudo.get(":authority") or next((v for n, v in headers if n == "host"), None)
        if authority is None:
            return 400, "missing :authority", None
        try:
            target = parse_target(pseudo.get(":path", ""))
            if target.scheme is not None:
                raise ValueError("absolute :path")
            host, port = parse_authority(authority, DEFAULT_PORTS[scheme])
        except ValueError as exc:
            return 400, str(exc), None
        clean = tuple((n, v) for n, v in strip_hop_by_hop(headers) if n != "expect")
        length_text = next((v for n, v in clean if n == "content-length"), None)
        length = int(length_text) if length_text is not None and length_text.isdigit() else None
        if length_text is not None and length is None:
            return 400, "invalid content-length", None
        partial = HttpRequest(method, scheme, host, port, target.path_and_query, clean)
        if problem is not None:
            return 400, problem, partial
        if length is not None and length > self._limits.max_body_bytes:
            return 413, f"request body exceeds {self._limits.max_body_bytes} bytes", partial
        body = Body() if st.ended and not st.chunks else Body(self._body(st), length=length)
        return partial.replace(body=body)

    async def _body(self, st: _Stream) -> AsyncIterator[bytes]:
        total = 0
        while True:
            if st.reset:
                raise GuestProtocolError("stream reset by the guest")
            if st.chunks:
                data, flow = st.chunks.popleft()
                self._budget.give(len(data))
                total += len(data)
                if total > self._limits.max_body_bytes:
                    raise BodyTooLarge(f"request body exceeds {self._limits.max_body_bytes} bytes")
                self._ack(flow, st.stream_id)
                await self._flush()
                if data:
                    yield data
            elif st.ended:
                return
            else:
                await st.wakeup.wait()

    async def _send_response(self, st: _Stream, method: str, response: HttpResponse) -> None:
        if response.status < 200:
            response = HttpResponse.text(502, "upstream sent an informational status")
        no_body = has_no_body(method, response.status)
        headers = [(b":status", str(response.status).encode("ascii"))] + [
            (n.encode("latin-1"), v.encode("latin-1"))
            for n, v in response.headers
            if n not in _FORBIDDEN_RESPONSE_HEADERS
        ]
        st.responding = True
        self._conn.send_headers(st.stream_id, headers, end_stream=no_body)
        await self._flush()
        if no_body:
            return
        async for chunk in response.body:
            await self._send_data(st, chunk)
        self._conn.end_stream(st.stream_id)
        await self._flush()

    async def _send_data(self, st: _Stream, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            if st.reset:
                raise _StreamGone
            window = self._conn.local_flow_control_window(st.stream_id)
            size = min(window, self._conn.max_outbound_frame_size, len(view))
            if size <= 0:
                await self._window.wait()
                continue
            self._conn.send_data(st.stream_id, bytes(view[:size]))
            view = view[size:]
            await self._flush()
