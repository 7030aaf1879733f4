"""The anyio driver over a real socketpair, with a fake guest on the other end and real
loopback servers on the host side."""

from __future__ import annotations

import hashlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from gondolin.net import tcp
from gondolin.net.driver import (
    FlowStream,
    NetworkConfig,
    NetworkDriver,
    NetworkStreamError,
    run_network,
    system_resolvers,
)
from gondolin.net.flow import FlowInfo, FlowProtocol

from .fakeguest import GW_IP, SocketGuest, ip
from .test_dns import parse_answer, query

pytestmark = pytest.mark.anyio
PUBLIC = ip("93.184.216.34")


@asynccontextmanager
async def running(config: NetworkConfig) -> AsyncIterator[tuple[NetworkDriver, SocketGuest]]:
    a, b = socket.socketpair()
    host_side = await anyio.abc.UNIXSocketStream.from_socket(a)
    guest_side = await anyio.abc.UNIXSocketStream.from_socket(b)
    driver = NetworkDriver(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(driver.run, host_side)
        try:
            yield driver, SocketGuest(guest_side)
        finally:
            tg.cancel_scope.cancel()
            await guest_side.aclose()


@asynccontextmanager
async def tcp_server(handler: Callable[[anyio.abc.SocketStream], Awaitable[None]],
                     ) -> AsyncIterator[int]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


async def echo(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        try:
            while True:
                await stream.send(await stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass


async def resolve(link: SocketGuest, name: str) -> bytes:
    link.guest.send_udp(GW_IP, 30000, 53, query(name))
    await link.run_until(lambda: bool(link.guest.udp))
    return parse_answer(link.guest.udp.pop().payload)[2][0]


async def test_mapped_rule_relays_to_a_real_echo_server() -> None:
    async with tcp_server(echo) as port, running(
            NetworkConfig(tcp_hosts={"db.internal:5432": f"127.0.0.1:{port}"})) as (drv, link):
        addr = await resolve(link, "db.internal")
        conn = link.guest.connect(addr, 5432)
        await link.run_until(lambda: conn.state == "established")
        payload = bytes(range(256)) * 4096  # 1 MiB, several windows' worth
        sent = 0
        while sent < len(payload):
            n = min(32 * 1024, len(payload) - sent)
            conn.send(payload[sent:sent + n])
            sent += n
            # The fake client never retransmits, so it stays inside the advertised window:
            # everything sent must be acknowledged before the next burst.
            await link.run_until(lambda: conn.snd_una == conn.snd_nxt)
        await link.run_until(lambda: len(conn.received) == len(payload))
        assert hashlib.sha256(conn.received).digest() == hashlib.sha256(payload).digest()
        conn.fin()  # echo server sees EOF, closes, the guest gets FIN
        await link.run_until(lambda: conn.fin_received)
        assert drv.stats.flows_opened == 1


async def test_parallel_mapped_connections() -> None:
    async with tcp_server(echo) as port, running(
            NetworkConfig(tcp_hosts={"10.0.0.5:7": f"127.0.0.1:{port}"})) as (_, link):
        conns = [link.guest.connect(ip("10.0.0.5"), 7) for _ in range(20)]
        await link.run_until(lambda: all(c.state == "established" for c in conns))
        for i, c in enumerate(conns):
            c.send(f"conn {i}\n".encode() * 100)
        await link.run_until(lambda: all(len(c.received) == len(f"conn {i}\n") * 100
                                         for i, c in enumerate(conns)))
        assert all(c.received == f"conn {i}\n".encode() * 100 for i, c in enumerate(conns))


async def test_mapped_rule_to_dead_port_is_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # closed again before use: nothing listens
    async with running(NetworkConfig(tcp_hosts={"10.0.0.5:7": f"127.0.0.1:{dead_port}"})) as (
            drv, link):
        conn = link.guest.connect(ip("10.0.0.5"), 7)
        await link.run_until(lambda: conn.reset)
        assert not any(s.flags & tcp.SYN for s in conn.segments)  # never a SYN-ACK
        assert drv.stats.rejects["upstream-connect-failed"] == 1


async def test_http_flow_goes_to_the_handler() -> None:
    seen: list[FlowInfo] = []

    async def handler(info: FlowInfo, stream: anyio.abc.ByteStream) -> None:
        seen.append(info)
        request = b""
        while not request.endswith(b"\r\n\r\n"):
            request += await stream.receive()
        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with running(NetworkConfig(flow_handler=handler)) as (_, link):
        addr = await resolve(link, "www.example.com")
        conn = link.guest.connect(addr, 80)
        await link.run_until(lambda: conn.state == "established")
        conn.send(b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        await link.run_until(lambda: conn.fin_received)  # handler returned: stream closed
        assert conn.received.endswith(b"\r\n\r\nok")
        (info,) = seen
        assert info.protocol is FlowProtocol.HTTP and info.hostname == "www.example.com"
        assert info.dst_port == 80


async def test_handler_sees_guest_eof_and_can_still_reply() -> None:
    async def handler(info: FlowInfo, stream: anyio.abc.ByteStream) -> None:
        data = b""
        with pytest.raises(anyio.EndOfStream):
            while True:
                data += await stream.receive()
        await stream.send(b"got %d bytes" % len(data))

    async with running(NetworkConfig(flow_handler=handler)) as (_, link):
        conn = link.guest.connect(PUBLIC, 80)
        await link.run_until(lambda: conn.state == "established")
        conn.send(b"POST / HTTP/1.0\r\n\r\n" + b"x" * 5000)
        conn.fin()
        await link.run_until(lambda: conn.fin_received)
        assert conn.received == b"got 5019 bytes"


async def test_no_handler_means_rst_at_syn() -> None:
    async with running(NetworkConfig()) as (drv, link):
        conn = link.guest.connect(PUBLIC, 443)
        await link.run_until(lambda: conn.reset)
        assert drv.stats.rejects["no-handler"] == 1


async def test_failing_handler_resets_only_its_flow() -> None:
    async def handler(info: FlowInfo, stream: anyio.abc.ByteStream) -> None:
        data = await stream.receive()
        if b"/boom" in data:
            raise RuntimeError("handler bug")
        await stream.send(b"fine")

    async with running(NetworkConfig(flow_handler=handler)) as (drv, link):
        bad = link.guest.connect(PUBLIC, 80)
        await link.run_until(lambda: bad.state == "established")
        bad.send(b"GET /boom HTTP/1.1\r\n\r\n")
        await link.run_until(lambda: bad.reset)
        good = link.guest.connect(PUBLIC, 80)
        await link.run_until(lambda: good.state == "established")
        good.send(b"GET / HTTP/1.1\r\n\r\n")
        await link.run_until(lambda: good.fin_received)
        assert good.received == b"fine"
        assert drv.stats.rejects["handler-error"] == 1


async def test_slow_handler_closes_the_guest_window() -> None:
    release = anyio.Event()
    got: list[bytes] = []

    async def handler(info: FlowInfo, stream: anyio.abc.ByteStream) -> None:
        await release.wait()
        try:
            while True:
                got.append(await stream.receive())
        except anyio.EndOfStream:
            pass

    async with running(NetworkConfig(flow_handler=handler)) as (_, link):
        conn = link.guest.connect(PUBLIC, 80)
        await link.run_until(lambda: conn.state == "established")
        body = b"GET / HTTP/1.1\r\n\r\n" + b"b" * 200_000
        offset = 0
        for _ in range(200):  # push until the stack stops taking data
            if conn.peer_window == 0 and offset:
                break
            n = min(conn.peer_window or 1460, len(body) - offset, 1460 * 8)
            conn.send(body[offset:offset + n])
            offset += n
            await link.settle(0.02)
        assert conn.peer_window == 0
        assert offset <= tcp.RECV_BUFFER + 1460
        release.set()
        await link.run_until(lambda: conn.peer_window > 0)


async def test_slow_guest_pauses_host_reads() -> None:
    """The guest never reads: the relay stops pulling from the upstream socket."""
    written = 0

    async def firehose(stream: anyio.abc.SocketStream) -> None:
        nonlocal written
        async with stream:
            chunk = b"f" * 65536
            try:
                for _ in range(1000):  # 64 MiB if nothing pushed back
                    await stream.send(chunk)
                    written += len(chunk)
            except (anyio.BrokenResourceError, OSError):
                pass

    async with tcp_server(firehose) as port, running(
            NetworkConfig(tcp_hosts={"10.0.0.5:9": f"127.0.0.1:{port}"})) as (drv, link):
        conn = link.guest.connect(ip("10.0.0.5"), 9, rcv_buffer=20000, auto_read=False)
        await link.run_until(lambda: conn.state == "established")
        await link.settle(1.0)
        assert len(conn.received) == 20000 and conn.window_violations == 0
        (flow,) = drv.stack._flows.values()
        assert flow.conn.queued <= tcp.SEND_BUFFER
        assert written < 1000 * 65536  # the upstream was pushed back, not drained
        conn.read()
        await link.run_until(lambda: len(conn.received) > 20000)


async def test_trusted_dns_is_forwarded_to_the_resolver() -> None:
    async with await anyio.create_udp_socket(local_host="127.0.0.1") as resolver:
        port = resolver.extra(anyio.abc.SocketAttribute.local_port)

        async def answer_once() -> None:
            data, addr = await resolver.receive()
            await resolver.sendto(data[:2] + b"\x81\x80" + data[4:], *addr)

        config = NetworkConfig(dns="trusted", trusted_resolvers=("127.0.0.1",),
                               resolver_port=port)
        async with anyio.create_task_group() as tg, running(config) as (drv, link):
            tg.start_soon(answer_once)
            link.guest.send_udp(ip("8.8.8.8"), 30001, 53, query("example.org", qid=77))
            await link.run_until(lambda: bool(link.guest.udp))
            (reply,) = link.guest.udp
            assert reply.src_ip == ip("8.8.8.8") and reply.payload[:2] == b"\x00\x4d"
            assert drv.stats.dns_forwards == 1


async def test_run_returns_when_qemu_goes_away() -> None:
    a, b = socket.socketpair()
    host_side = await anyio.abc.UNIXSocketStream.from_socket(a)
    guest_side = await anyio.abc.UNIXSocketStream.from_socket(b)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            link = SocketGuest(guest_side)
            results = []

            async def run() -> None:
                results.append(await run_network(host_side, NetworkConfig()))

            tg.start_soon(run)
            link.guest.send_udp(GW_IP, 30000, 53, query("a.test"))
            await link.run_until(lambda: bool(link.guest.udp))
            await guest_side.aclose()
    assert results[0].dns_answers == 1


async def test_broken_framing_is_an_error() -> None:
    a, b = socket.socketpair()
    host_side = await anyio.abc.UNIXSocketStream.from_socket(a)
    guest_side = await anyio.abc.UNIXSocketStream.from_socket(b)
    async with guest_side:
        await guest_side.send(b"\xff\xff\xff\xff")
        with anyio.fail_after(5), pytest.raises(NetworkStreamError):
            await NetworkDriver().run(host_side)


def test_system_resolvers(tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "resolv.conf"
    path.write_text("# c\nnameserver 127.0.0.53\nnameserver ::1\nnameserver bogus\n"
                    "search lan\nnameserver 10.0.0.1\n")
    assert system_resolvers(str(path)) == ("127.0.0.53", "10.0.0.1")
    assert system_resolvers(str(path) + ".missing") == ()


def test_forwarding_dns_needs_a_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    import gondolin.net.driver as driver_module

    monkeypatch.setattr(driver_module, "system_resolvers", lambda path="": ())
    with pytest.raises(ValueError):
        NetworkDriver(NetworkConfig(dns="trusted"))


def test_flow_stream_is_a_byte_stream() -> None:
    assert issubclass(FlowStream, anyio.abc.ByteStream)


def _self_signed_context(tmp_dir: str) -> ssl.SSLContext:
    import datetime
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secure.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(tmp_dir, "c.pem"), os.path.join(tmp_dir, "k.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


async def test_tls_handler_terminates_tls_over_the_flow_stream(tmp_path: object) -> None:
    """The flow stream carries a real TLS session (anyio TLSStream on top of it)."""
    from anyio.streams.tls import TLSStream

    server_ctx = _self_signed_context(str(tmp_path))
    seen: list[FlowInfo] = []

    async def handler(info: FlowInfo, stream: anyio.abc.ByteStream) -> None:
        seen.append(info)
        tls = await TLSStream.wrap(stream, server_side=True, ssl_context=server_ctx,
                                   standard_compatible=False)
        request = await tls.receive()
        await tls.send(b"reply to " + request)
        await tls.aclose()

    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(incoming, outgoing, server_hostname="secure.example.com")

    async with running(NetworkConfig(flow_handler=handler)) as (_, link):
        conn = link.guest.connect(PUBLIC, 443)
        await link.run_until(lambda: conn.state == "established")
        fed = 0

        def pump_tls() -> None:
            nonlocal fed
            incoming.write(bytes(conn.received[fed:]))
            fed = len(conn.received)
            out = outgoing.read()
            if out:
                conn.send(out)

        def handshake_done() -> bool:
            pump_tls()
            try:
                client.do_handshake()
            except ssl.SSLWantReadError:
                pump_tls()
                return False
            pump_tls()
            return True

        await link.run_until(handshake_done)
        client.write(b"ping")
        pump_tls()
        got = bytearray()

        def reply_read() -> bool:
            pump_tls()
            try:
                got.extend(client.read(100))
            except ssl.SSLWantReadError:
                return False
            return got == b"reply to ping"

        await link.run_until(reply_read)
        assert seen[0].protocol is FlowProtocol.TLS and seen[0].sni == "secure.example.com"


def test_config_passes_the_guest_mtu_to_the_stack() -> None:
    from gondolin.net import JUMBO_MTU, NetworkConfig

    assert NetworkConfig().stack_config().mtu is None
    assert NetworkConfig(mtu=JUMBO_MTU).stack_config().mtu == JUMBO_MTU
