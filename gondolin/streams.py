"""TCP streams to guest loopback ports, and host listeners that forward to them.

A :class:`GuestStream` is one connection the guest agent made to ``127.0.0.1:PORT`` (or
``::1``) inside the guest, carried over the control channel (messages ``TCP_*`` of
:mod:`gondolin.protocol`). Each direction is credit-limited: the guest sends at most what the
host granted and gets more only as the host's reader consumes it; the host sends at most what
the guest granted, which the guest returns only as the guest socket takes the bytes. So a peer
that stops reading makes the other side's writer wait, and neither side buffers more than one
window per stream.

:class:`TcpForward` is a host listener whose every accepted connection is relayed to a guest
port through its own stream (half-close in both directions).
"""

from __future__ import annotations

import ipaddress

import anyio
from anyio.abc import ByteStream, SocketAttribute, SocketListener, SocketStream

from ._log import get_logger
from .channel import ControlLink, Inbox
from .errors import GondolinError, GuestConnectionError, ProtocolError
from .protocol import DATA_CHUNK, Message, T

log = get_logger("streams")
STREAM_WINDOW = 256 * 1024  # bytes the guest may send ahead of the host's reader, per stream
RECEIVE_SIZE = 65536  # default max_bytes of receive()
LOOPBACK_HOSTS = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "::1": "::1"}
FORWARD_MAX_CONNECTIONS = 256  # concurrent connections one forward relays (more are closed at once)
FORWARD_CLOSE_TIMEOUT = 10.0  # seconds close() waits for a forward's relays to stop


def guest_loopback(host: str) -> str:
    """The guest address for ``host``; only loopback is reachable through a stream."""
    try:
        return LOOPBACK_HOSTS[host]
    except KeyError:
        raise GuestConnectionError(
            f"only the guest's loopback (127.0.0.1 or ::1) can be reached this way, not {host!r}; "
            "listen on 127.0.0.1 in the guest", code="not_loopback") from None


def check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be an integer from 1 to 65535, not {port!r}")
    return port


class GuestStream(ByteStream):
    """A byte stream to a guest loopback port (an :class:`anyio.abc.ByteStream`).

    ``receive()`` raises :class:`anyio.EndOfStream` once the guest side shut its writing half;
    ``send_eof()`` shuts ours. A connection the guest side resets raises
    :class:`GuestConnectionError`; a closed or dead VM raises its error. Use it as an async
    context manager or call :meth:`aclose`.
    """

    def __init__(self, link: ControlLink, inbox: Inbox, host: str, port: int, window: int) -> None:
        self._link = link
        self._inbox = inbox
        self._host = host
        self._port = port
        self._window = window
        self._pending = b""  # the rest of a data message a receive() did not take
        self._unreturned = 0  # bytes read that the guest has not been given back as credit
        self._eof = False  # the guest sent TCP_EOF
        self._gone: GondolinError | None = None  # the guest dropped the stream (TCP_CLOSE / ERROR)
        self._eof_sent = False
        self._closed = False
        self._receive_guard = anyio.ResourceGuard("reading from")
        self._send_guard = anyio.ResourceGuard("writing to")

    @property
    def port(self) -> int:
        """The guest port this stream is connected to."""
        return self._port

    def __repr__(self) -> str:
        return f"<GuestStream {self._host}:{self._port} id={self._inbox.id}{' closed' if self._closed else ''}>"

    # -- receiving ----------------------------------------------------------------------------
    async def receive(self, max_bytes: int = RECEIVE_SIZE) -> bytes:
        with self._receive_guard:
            if self._closed:
                raise anyio.ClosedResourceError
            while not self._pending:
                if self._eof:
                    raise anyio.EndOfStream
                if self._gone is not None:
                    raise self._gone
                self._handle(await self._inbox.get())
            data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
            await self._consumed(len(data))
            return data

    def _handle(self, msg: Message) -> None:
        if msg.t == T.TCP_DATA:
            self._pending = msg.data
        elif msg.t == T.TCP_EOF:
            self._eof = True
        elif msg.t == T.TCP_CLOSE:
            error = msg.p.get("error")
            self._gone = GuestConnectionError(
                f"the guest side of the connection to port {self._port} failed: {str(error)[:200]}"
                if error else f"the guest side closed the connection to port {self._port}",
                code="connection_reset" if error else "connection_closed")
        elif msg.t == T.ERROR:
            self._gone = GuestConnectionError(
                f"the guest refused the stream to port {self._port}: {str(msg.p.get('message'))[:200]}",
                code=str(msg.p.get("code") or "stream_error"))

    async def _consumed(self, n: int) -> None:
        """Give the guest credit back for bytes the reader took (in batches of a quarter window)."""
        self._unreturned += n
        if self._unreturned < self._window // 4 or self._gone is not None or self._eof:
            return
        n, self._unreturned = self._unreturned, 0
        self._inbox.grant(T.TCP_DATA, n)
        with anyio.CancelScope(shield=True):  # a half-sent frame would break the channel
            try:
                await self._link.control().send_message(T.CREDIT, self._inbox.id, tcp=n)
            except GondolinError:
                pass  # the next receive raises why

    # -- sending ------------------------------------------------------------------------------
    async def send(self, item: bytes) -> None:
        """Send bytes; waits while the guest side has not taken what was sent before."""
        with self._send_guard:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._eof_sent:
                raise GuestConnectionError("send() after send_eof(): this side of the stream is shut",
                                           code="stream_shut")
            inbox = self._inbox
            view = memoryview(item)
            while view:
                while True:
                    if inbox.failure is not None:
                        raise inbox.failure
                    if inbox.finished:
                        raise GuestConnectionError(
                            f"the guest side closed the connection to port {self._port}", code="connection_closed")
                    if inbox.credit > 0:
                        break
                    await inbox.wait_credit()
                n = min(len(view), inbox.credit, DATA_CHUNK)
                inbox.credit -= n
                await self._link.control().send_message(T.TCP_DATA, inbox.id, bytes(view[:n]))
                view = view[n:]

    async def send_eof(self) -> None:
        """Shut the writing half: the guest program reads end of file; it may still reply."""
        if self._closed:
            raise anyio.ClosedResourceError
        if self._eof_sent or self._inbox.finished:
            self._eof_sent = True
            return
        self._eof_sent = True
        with anyio.CancelScope(shield=True):
            await self._link.control().send_message(T.TCP_EOF, self._inbox.id)

    # -- closing ------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close the stream (the guest socket is closed too). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._inbox.finished and self._inbox.failure is None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self._link.timeouts.call):
                    await self._link.control().send_message(T.TCP_CLOSE, self._inbox.id)
        except GondolinError:
            pass  # the VM is closed or dead: its guest socket is gone with it
        finally:
            self._inbox.close()


async def open_stream(link: ControlLink, port: int, host: str = "127.0.0.1", *,
                      window: int = STREAM_WINDOW) -> GuestStream:
    """Connect to ``host:port`` inside the guest (loopback only) and return the stream."""
    port = check_port(port)
    host = guest_loopback(host)
    if window < 4096:
        raise ValueError("window must be at least 4096 bytes")
    channel = link.control()
    inbox = channel.open()
    inbox.grant(T.TCP_DATA, window)
    try:
        await channel.send_message(T.TCP_OPEN, inbox.id, host=host, port=port, window=window)
        msg = await inbox.get(link.timeouts.call, what=f"answer to the connection to port {port}")
    except BaseException:
        with anyio.CancelScope(shield=True), anyio.move_on_after(link.timeouts.call):
            try:
                await channel.send_message(T.TCP_CLOSE, inbox.id)
            except GondolinError:
                pass
        inbox.close()
        raise
    if msg.t != T.TCP_OPENED:
        inbox.close()
        code = str(msg.p.get("code") or "connect_failed")
        text = str(msg.p.get("message") or msg.type_name)[:300]
        if code == "ECONNREFUSED":
            text = f"nothing in the guest listens on {host} port {port} (connection refused); start the server first"
        else:
            text = f"the guest could not connect to {host} port {port}: {text}"
        raise GuestConnectionError(text, code=code)
    granted = msg.p.get("window")
    if not isinstance(granted, int) or isinstance(granted, bool) or granted < 0:
        await GuestStream(link, inbox, host, port, window).aclose()
        raise ProtocolError(f"the guest answered the connection to port {port} with a bad window {granted!r:.40}")
    inbox.add_credit(granted)
    return GuestStream(link, inbox, host, port, window)


# -- forwarding ----------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TcpForward:
    """A host listener whose connections are relayed to a guest port. ``host``/``port`` say
    where it listens; :meth:`close` stops it (the VM's close does too)."""

    def __init__(self, link: ControlLink, listener: SocketListener, guest_port: int, max_connections: int) -> None:
        self._link = link
        self._listener = listener
        self.guest_port = guest_port
        self.host: str = str(listener.extra(SocketAttribute.local_address)[0])
        self.port: int = int(listener.extra(SocketAttribute.local_port))
        self.max_connections = max_connections
        self._limit = anyio.Semaphore(max_connections)
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        self._started = False
        self.connections = 0  # accepted so far

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 hosts in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"<TcpForward {self.address} -> guest port {self.guest_port}>"

    async def serve(self) -> None:
        """Accept and relay until closed (runs as a VM background task)."""
        self._started = True
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    while True:
                        client = await self._listener.accept()
                        self.connections += 1
                        tg.start_soon(self._relay, client)
        finally:
            with anyio.CancelScope(shield=True):
                await self._listener.aclose()
            self._done.set()

    async def _relay(self, client: SocketStream) -> None:
        async with client:
            if self._limit.value == 0:
                log.warning("forward %s: %d connections already open; closing a new one", self.address,
                            self.max_connections)
                return
            async with self._limit:
                try:
                    guest = await open_stream(self._link, self.guest_port)
                except GondolinError as exc:
                    log.info("forward %s: %s", self.address, exc.message)
                    return
                async with guest:
                    await relay(client, guest)

    async def close(self) -> None:
        """Stop listening and close the relayed connections. Safe to call twice."""
        self._scope.cancel()
        if not self._started:
            with anyio.CancelScope(shield=True):
                await self._listener.aclose()
            self._done.set()
        with anyio.CancelScope(shield=True), anyio.move_on_after(FORWARD_CLOSE_TIMEOUT):
            await self._done.wait()

    async def __aenter__(self) -> TcpForward:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def relay(a: ByteStream, b: ByteStream, chunk: int = RECEIVE_SIZE) -> None:
    """Copy bytes both ways until both sides said EOF (each EOF is passed on as a half-close);
    an error on either side ends both directions."""
    async def pump(src: ByteStream, dst: ByteStream) -> None:
        while True:
            try:
                data = await src.receive(chunk)
            except anyio.EndOfStream:
                try:
                    await dst.send_eof()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, GondolinError, OSError):
                    tg.cancel_scope.cancel()
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, GondolinError, OSError):
                tg.cancel_scope.cancel()
                return
            try:
                await dst.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, GondolinError, OSError):
                tg.cancel_scope.cancel()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(pump, a, b)
        tg.start_soon(pump, b, a)


async def start_forward(link: ControlLink, guest_port: int, host: str = "127.0.0.1", host_port: int = 0, *,
                        allow_remote: bool = False, max_connections: int = FORWARD_MAX_CONNECTIONS) -> TcpForward:
    """Listen on ``host:host_port`` (0: a free port) and relay connections to guest loopback
    ``guest_port``. A ``host`` that is not loopback needs ``allow_remote=True``."""
    check_port(guest_port)
    if isinstance(host_port, bool) or not isinstance(host_port, int) or not 0 <= host_port < 65536:
        raise ValueError(f"host_port must be an integer from 0 to 65535, not {host_port!r}")
    if not is_loopback(host) and not allow_remote:
        raise GondolinError(
            f"refusing to listen on {host!r}: anyone who can reach that address could reach the guest's port "
            f"{guest_port}; pass allow_remote=True to mean it, or listen on 127.0.0.1", code="remote_listen")
    if max_connections < 1:
        raise ValueError("max_connections must be at least 1")
    link.control()  # a closed or dead VM fails here
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=host_port)
    except OSError as exc:
        raise GondolinError(f"cannot listen on {host}:{host_port}: {exc.strerror or exc}",
                            code="listen_failed") from exc
    listeners = getattr(listener, "listeners", [listener])
    for extra in listeners[1:]:  # a name with several addresses: keep the first one
        await extra.aclose()
    forward = TcpForward(link, listeners[0], guest_port, max_connections)
    try:
        link.spawn(f"TCP forward {forward.address}", forward.serve, critical=False)
    except BaseException:
        await forward.close()
        raise
    return forward


__all__ = ["GuestStream", "TcpForward", "open_stream", "relay", "start_forward"]
