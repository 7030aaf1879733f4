"""The anyio driver that connects a VM's NIC to its :class:`~gondolin.net.stack.NetworkStack`.

How to call it: start QEMU with ``-netdev stream,id=net0,server=off,addr.type=unix,
addr.path=PATH`` (or let QEMU connect to a unix socket the host listens on), take the
connected byte stream and run::

    config = NetworkConfig(dns="synthetic", tcp_hosts={"db.internal:5432": "127.0.0.1:5432"},
                           flow_handler=handler)          # handler: FlowHandler or None
    driver = NetworkDriver(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(driver.run, stream)                 # or: await run_network(stream, config)
        ...                                               # driver.stats: NetworkStats counters

``run`` takes ownership of ``stream`` (QEMU's framing: 4-byte big-endian length + Ethernet
frame, both directions), returns when the stream ends (QEMU exited) or when cancelled, and
closes the stream and every flow task it started. Guest MAC is learned from the first frame.

Per classified flow it starts, in a task group it owns, either ``config.flow_handler(info,
stream)`` (HTTP, TLS, SSH flows; the stream is an anyio ``ByteStream`` over the guest TCP
connection) or a raw relay to the ``tcp_hosts`` target (``anyio.connect_tcp``; the guest's
SYN-ACK waits until that connect succeeds, so a dead target looks like a refused connection).
With ``flow_handler=None`` (the default) there is no path for HTTP/TLS: such SYNs are reset.

Backpressure: a guest that does not read stops the writer, flows' send buffers fill and
``send`` on their streams blocks (so host reads pause); an app that does not read leaves data
unconsumed, which closes that flow's TCP window towards the guest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.abc

from gondolin.net.flow import FlowHandler, FlowInfo
from gondolin.net.stack import (
    DnsRequest,
    FlowClosed,
    FlowData,
    FlowEof,
    FlowOpened,
    FlowWritable,
    NetworkStack,
    StackConfig,
)
from gondolin.net.stats import NetworkStats
from gondolin.net.tcp_hosts import MappedTarget

log = logging.getLogger(__name__)

# QEMU's stream netdev never sends more than NET_BUFSIZE (4096 + 65536) bytes per frame; a
# larger length means the byte stream lost sync and nothing after it can be trusted.
MAX_STREAM_FRAME = 4096 + 65536
READ_CHUNK = 256 * 1024
CONNECT_TIMEOUT = 10.0
DNS_TIMEOUT = 5.0
RELAY_CHUNK = 65536


class NetworkStreamError(Exception):
    """QEMU's side of the netdev stream broke its framing."""


@dataclass(frozen=True)
class NetworkConfig:
    dns: Literal["synthetic", "trusted", "open"] = "synthetic"
    trusted_resolvers: tuple[str, ...] = ()  # IPv4; empty: nameservers in /etc/resolv.conf
    tcp_hosts: Mapping[str, str] = field(default_factory=dict)
    flow_handler: FlowHandler | None = None  # None: HTTP/TLS/SSH flows are refused at SYN
    ssh_enabled: bool = False
    ssh_ports: frozenset[int] = frozenset({22})
    guest_mac: str | None = None
    connect_timeout: float = CONNECT_TIMEOUT
    resolver_port: int = 53  # where trusted/open DNS queries are sent (tests use a high port)
    mtu: int | None = None  # guest link MTU advertised by DHCP (see JUMBO_MTU); None: not advertised

    def stack_config(self) -> StackConfig:
        resolvers = self.trusted_resolvers
        if self.dns != "synthetic" and not resolvers:
            resolvers = system_resolvers()
            if not resolvers:
                raise ValueError(f"dns={self.dns!r} needs an IPv4 resolver; none configured")
        return StackConfig(
            guest_mac=self.guest_mac, dns_mode=self.dns, dns_upstreams=resolvers,
            tcp_hosts=dict(self.tcp_hosts), http_enabled=self.flow_handler is not None,
            ssh_enabled=self.ssh_enabled and self.flow_handler is not None,
            ssh_ports=self.ssh_ports, mtu=self.mtu,
        )


def system_resolvers(path: str = "/etc/resolv.conf") -> tuple[str, ...]:
    """IPv4 ``nameserver`` entries of the host's resolv.conf (loopback ones included: the
    host, not the guest, sends the queries)."""
    import ipaddress

    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        out.append(str(ipaddress.IPv4Address(parts[1])))
                    except ValueError:
                        continue
    except OSError:
        return ()
    return tuple(out)


class _Wakeup:
    """A level-triggered wakeup for one waiting task."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()


class NetworkDriver:
    def __init__(self, config: NetworkConfig | None = None, *,
                 clock: Callable[[], float] = anyio.current_time) -> None:
        self.config = config or NetworkConfig()
        self.stack = NetworkStack(self.config.stack_config())
        self._clock = clock
        self._streams: dict[int, FlowStream] = {}
        self._tx = _Wakeup()
        self._timer = _Wakeup()
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def stats(self) -> NetworkStats:
        return self.stack.stats

    async def run(self, stream: anyio.abc.ByteStream) -> None:
        """Serve the guest until ``stream`` ends; raises :class:`NetworkStreamError` if the
        framing breaks (a QEMU bug or the wrong socket, never something a guest can do)."""
        error: NetworkStreamError | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._writer, stream)
                tg.start_soon(self._timers)
                try:
                    await self._reader(stream)
                except NetworkStreamError as exc:
                    error = exc
                tg.cancel_scope.cancel()
        finally:
            self._tg = None
            for flow_stream in self._streams.values():
                flow_stream.on_closed("network-stopped")
            self._streams.clear()
            with anyio.CancelScope(shield=True):
                await stream.aclose()
        if error is not None:
            raise error

    # -- I/O tasks ----------------------------------------------------------------------------

    async def _reader(self, stream: anyio.abc.ByteStream) -> None:
        buf = bytearray()
        while True:
            try:
                chunk = await stream.receive(READ_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            buf += chunk
            now = self._clock()
            pos = 0
            while len(buf) - pos >= 4:
                length = int.from_bytes(buf[pos:pos + 4], "big")
                if length > MAX_STREAM_FRAME:
                    raise NetworkStreamError(f"netdev frame length {length} out of range")
                if len(buf) - pos - 4 < length:
                    break
                self.stack.feed_frame(bytes(buf[pos + 4:pos + 4 + length]), now)
                pos += 4 + length
            del buf[:pos]
            self.kick()

    async def _writer(self, stream: anyio.abc.ByteStream) -> None:
        while True:
            await self._tx.wait()
            while self.stack.has_output():
                frames = self.stack.frames_to_send(self._clock())
                self._timer.set()  # sending arms retransmission timers
                if not frames:
                    continue
                out = bytearray()
                for frame in frames:
                    out += len(frame).to_bytes(4, "big")
                    out += frame
                try:
                    await stream.send(bytes(out))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    if self._tg is not None:
                        self._tg.cancel_scope.cancel()
                    return

    async def _timers(self) -> None:
        while True:
            deadline = self.stack.next_timer()
            now = self._clock()
            if deadline is not None and deadline <= now:
                self.stack.on_timer(now)
                self.kick()
                continue
            with anyio.move_on_after(math.inf if deadline is None else deadline - now):
                await self._timer.wait()

    # -- events -------------------------------------------------------------------------------

    def kick(self) -> None:
        """Dispatch the stack's events and wake the writer and timer tasks."""
        for event in self.stack.events():
            self._dispatch(event)
        self._tx.set()
        self._timer.set()

    def _dispatch(self, event: object) -> None:
        if isinstance(event, FlowData):
            flow_stream = self._streams.get(event.flow_id)
            if flow_stream is not None:
                flow_stream.on_data(event.data)
        elif isinstance(event, FlowOpened):
            flow_stream = FlowStream(self, event.flow_id, event.info)
            self._streams[event.flow_id] = flow_stream
            assert self._tg is not None
            if event.target is not None:
                self._tg.start_soon(self._relay, flow_stream, event.target)
            else:
                self._tg.start_soon(self._handle, flow_stream)
        elif isinstance(event, FlowEof):
            flow_stream = self._streams.get(event.flow_id)
            if flow_stream is not None:
                flow_stream.on_eof()
        elif isinstance(event, FlowWritable):
            flow_stream = self._streams.get(event.flow_id)
            if flow_stream is not None:
                flow_stream.on_writable()
        elif isinstance(event, FlowClosed):
            flow_stream = self._streams.pop(event.flow_id, None)
            if flow_stream is not None:
                flow_stream.on_closed(event.reason)
        elif isinstance(event, DnsRequest):
            assert self._tg is not None
            self._tg.start_soon(self._forward_dns, event)

    # -- flow tasks -----------------------------------------------------------------------------

    async def _handle(self, flow_stream: FlowStream) -> None:
        handler = self.config.flow_handler
        assert handler is not None
        try:
            await handler(flow_stream.info, flow_stream)
        except Exception:  # one broken handler must not take the VM's network down
            log.exception("flow handler failed for %s", flow_stream.info)
            self.stats.reject("handler-error")
            flow_stream.reset("handler-error")
        finally:
            with anyio.CancelScope(shield=True):
                await flow_stream.aclose()

    async def _relay(self, flow_stream: FlowStream, target: MappedTarget) -> None:
        try:
            with anyio.fail_after(self.config.connect_timeout):
                upstream = await anyio.connect_tcp(target.host, target.port)
        except (OSError, TimeoutError):
            self.stats.reject("upstream-connect-failed")
            flow_stream.reset("upstream-connect-failed")
            return
        async with upstream:
            self.stack.flow_accept(flow_stream.flow_id)
            self.kick()
            broken = False
            async with anyio.create_task_group() as tg:

                async def copy(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream) -> None:
                    nonlocal broken
                    try:
                        while True:
                            try:
                                data = await src.receive(RELAY_CHUNK)
                            except anyio.EndOfStream:
                                await dst.send_eof()
                                return
                            await dst.send(data)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        broken = True
                        tg.cancel_scope.cancel()

                tg.start_soon(copy, flow_stream, upstream)
                tg.start_soon(copy, upstream, flow_stream)
            if broken:
                flow_stream.reset("relay-broken")
            with anyio.CancelScope(shield=True):
                await flow_stream.aclose()

    async def _forward_dns(self, request: DnsRequest) -> None:
        try:
            with anyio.move_on_after(DNS_TIMEOUT):
                async with await anyio.create_connected_udp_socket(
                        request.server, self.config.resolver_port) as sock:
                    await sock.send(request.payload)
                    reply = await sock.receive()
                    self.stack.dns_reply(request.request_id, reply)
                    self.kick()
        except OSError:
            self.stats.drop("dns-upstream-error")


class FlowStream(anyio.abc.ByteStream):
    """One guest TCP connection as an anyio byte stream (what a FlowHandler receives).

    ``receive`` raises ``EndOfStream`` after the guest's FIN and ``BrokenResourceError`` if
    the flow was reset; ``send_eof`` sends FIN (the guest can keep sending); ``aclose``
    sends FIN and discards whatever the guest sends afterwards.
    """

    def __init__(self, driver: NetworkDriver, flow_id: int, info: FlowInfo) -> None:
        self._driver = driver
        self._stack = driver.stack
        self.flow_id = flow_id
        self.info = info
        self._buf = bytearray()
        self._eof = False
        self._gone: str | None = None
        self._closed = False
        self._eof_sent = False
        self._readable = anyio.Event()
        self._writable = anyio.Event()

    # Called by the driver (synchronously, from event dispatch).

    def on_data(self, data: bytes) -> None:
        if self._closed:
            self._stack.flow_consumed(self.flow_id, len(data))  # nobody will read it
            return
        self._buf += data
        self._readable.set()

    def on_eof(self) -> None:
        self._eof = True
        self._readable.set()

    def on_writable(self) -> None:
        self._writable.set()

    def on_closed(self, reason: str) -> None:
        if self._gone is None:
            self._gone = reason
        self._readable.set()
        self._writable.set()

    # ByteStream API.

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._buf:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._eof:
                raise anyio.EndOfStream
            if self._gone is not None:
                raise anyio.BrokenResourceError(f"flow {self.flow_id}: {self._gone}")
            self._readable = anyio.Event()
            await self._readable.wait()
        data = bytes(self._buf[:max_bytes])
        del self._buf[:max_bytes]
        self._stack.flow_consumed(self.flow_id, len(data))
        self._driver.kick()
        return data

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._gone is not None or self._eof_sent:
                raise anyio.BrokenResourceError(f"flow {self.flow_id}: {self._gone or 'eof sent'}")
            n = self._stack.flow_send(self.flow_id, view)
            if n:
                view = view[n:]
                self._driver.kick()
                continue
            self._writable = anyio.Event()
            await self._writable.wait()

    async def send_eof(self) -> None:
        if not self._eof_sent and self._gone is None:
            self._eof_sent = True
            self._stack.flow_close(self.flow_id)
            self._driver.kick()

    def reset(self, reason: str) -> None:
        """Abort the flow: RST to the guest, buffers dropped."""
        self._closed = True
        if self._gone is None:
            self._stack.flow_reset(self.flow_id, reason)
            self._driver.kick()
        self._buf.clear()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._buf:
            self._stack.flow_consumed(self.flow_id, len(self._buf))
            self._buf.clear()
        if self._gone is None and not self._eof_sent:
            self._eof_sent = True
            self._stack.flow_close(self.flow_id)
        self._driver.kick()
        self._readable.set()
        self._writable.set()


async def run_network(stream: anyio.abc.ByteStream, config: NetworkConfig | None = None,
                      ) -> NetworkStats:
    """Run a :class:`NetworkDriver` on ``stream`` until it ends; returns its counters."""
    driver = NetworkDriver(config)
    await driver.run(stream)
    return driver.stats
