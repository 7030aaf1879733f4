"""Guest TCP streams (vm.open_tcp) and port forwards (vm.forward_tcp) against real servers in the guest."""

import hashlib

import anyio
import httpx
import pytest

from gondolin import GondolinError, GuestConnectionError, VMClosedError
from gondolin.protocol import T

from .conftest import both_backends as anyio_backend  # noqa: F401 - these tests run under asyncio and trio
from .conftest import max_rss_mb

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

# A guest server per behaviour, each on its own port (the module shares one VM).
SERVERS = r'''
import hashlib, os, socket, sys, threading

def serve(port, handle):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    def loop():
        while True:
            c, _ = s.accept()
            threading.Thread(target=handle, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()

def echo(c):  # echo until EOF, then shut our side
    while data := c.recv(65536):
        c.sendall(data)
    c.shutdown(socket.SHUT_WR)
    c.close()

def digest_after_eof(c):  # read to EOF, then answer with the size and sha256 of what came
    h, n = hashlib.sha256(), 0
    while data := c.recv(65536):
        h.update(data)
        n += len(data)
    c.sendall(f"{n} {h.hexdigest()}".encode())
    c.close()

def talk_first(c):  # send a greeting and shut our side, then read to EOF and report it
    c.sendall(b"hello from the guest")
    c.shutdown(socket.SHUT_WR)
    got = b""
    while data := c.recv(65536):
        got += data
    with open("/tmp/talk_first.tmp", "wb") as f:
        f.write(got)
    os.rename("/tmp/talk_first.tmp", "/tmp/talk_first.out")
    c.close()

def never_reads(c):  # accept and sit there
    threading.Event().wait()

def firehose(c):  # send 32 MiB of a pattern, counting what the socket took
    block = bytes(range(256)) * 256
    sent = 0
    for _ in range(512):
        c.sendall(block)
        sent += len(block)
        open("/tmp/firehose.sent", "w").write(str(sent))
    c.close()

def reset(c):  # abort with a RST
    c.recv(10)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()

serve(7001, echo)
serve(7002, digest_after_eof)
serve(7003, talk_first)
serve(7004, never_reads)
serve(7005, firehose)
serve(7006, reset)
open("/tmp/servers.ready", "w").close()
threading.Event().wait()
'''


@pytest.fixture(scope="module")
async def vm(vm):
    await vm.fs.write("/tmp/servers.py", SERVERS)
    os_cmd = "nohup python3 /tmp/servers.py >/tmp/servers.log 2>&1 & " \
             "for i in $(seq 200); do [ -e /tmp/servers.ready ] && exit 0; sleep 0.1; done; cat /tmp/servers.log; exit 1"
    r = await vm.exec(os_cmd, timeout=60)
    assert r.ok, r.stdout + r.stderr
    await vm.exec("mkdir -p /srv/www && head -c 3000000 /dev/urandom > /srv/www/blob && "
                  "cd /srv/www && nohup python3 -m http.server 8080 --bind 127.0.0.1 >/dev/null 2>&1 &")
    with anyio.fail_after(60):
        while True:
            try:
                await (await vm.open_tcp(8080)).aclose()
                break
            except GuestConnectionError:
                await anyio.sleep(0.2)
    yield vm


async def receive_all(stream, limit=1 << 30):
    out = bytearray()
    while True:
        try:
            out += await stream.receive(1 << 20)
        except anyio.EndOfStream:
            return bytes(out)
        assert len(out) <= limit


async def test_echo_and_half_close_from_the_host(vm):
    async with await vm.open_tcp(7001) as s:
        await s.send(b"ping")
        assert await s.receive() == b"ping"
        await s.send(b"more")
        await s.send_eof()  # the guest reads EOF, shuts its side after echoing
        assert await receive_all(s) == b"more"
        with pytest.raises(anyio.EndOfStream):
            await s.receive()
        with pytest.raises(GuestConnectionError):
            await s.send(b"after eof")


async def test_large_transfer_both_ways_is_intact(vm):
    payload = hashlib.sha256(b"seed").digest() * (3 * 65536 // 32 * 16)  # 3 MiB
    async with await vm.open_tcp(7002) as s:
        await s.send(payload)
        await s.send_eof()
        answer = (await receive_all(s)).decode()
    assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"


async def test_half_close_from_the_guest_leaves_the_host_side_open(vm):
    async with await vm.open_tcp(7003) as s:
        assert await receive_all(s) == b"hello from the guest"  # guest shut its side: EOF here
        await s.send(b"the host still talks")  # ... and ours stays open
        await s.send_eof()
    r = await vm.exec("for i in $(seq 600); do [ -e /tmp/talk_first.out ] && exec cat /tmp/talk_first.out; "
                      "sleep 0.1; done", timeout=90)
    assert r.stdout == "the host still talks"


async def test_refused_port_is_a_typed_error(vm):
    with pytest.raises(GuestConnectionError, match="nothing in the guest listens on 127.0.0.1 port 7999") as info:
        await vm.open_tcp(7999)
    assert info.value.code == "ECONNREFUSED"
    with pytest.raises(ValueError):
        await vm.open_tcp(0)


async def test_only_guest_loopback_is_reachable(vm):
    for host in ("192.168.127.1", "10.0.0.1", "0.0.0.0", "example.com"):
        with pytest.raises(GuestConnectionError, match="only the guest's loopback") as info:
            await vm.open_tcp(80, host=host)
        assert info.value.code == "not_loopback"
    # The agent refuses too, whatever the host sends it.
    control = vm._machine.control()
    for host in ("192.168.127.1", "10.0.0.1", "0.0.0.0", "127.0.0.2"):
        answer = await control.request(T.TCP_OPEN, host=host, port=8080, window=65536, timeout=30)
        assert answer.t == T.ERROR and answer.p["code"] == "invalid_request", answer
        assert "only guest loopback" in answer.p["message"]


async def test_reset_by_the_guest_is_a_typed_error(vm):
    async with await vm.open_tcp(7006) as s:
        await s.send(b"x" * 10)
        with pytest.raises(GuestConnectionError) as info:
            while True:
                await s.receive()
        assert info.value.code == "connection_reset"


async def test_http_server_through_a_forward(vm):
    blob = await vm.fs.read_bytes("/srv/www/blob")
    fwd = await vm.forward_tcp(8080)
    try:
        assert fwd.host == "127.0.0.1" and fwd.port > 0
        async with httpx.AsyncClient(base_url=f"http://{fwd.address}", timeout=60) as client:
            for _ in range(3):  # keep-alive: one connection, several requests
                r = await client.get("/blob")
                assert r.status_code == 200 and r.content == blob
            rs = []
            async with anyio.create_task_group() as tg:  # concurrent connections
                async def get() -> None:
                    rs.append(await httpx.AsyncClient(timeout=60).get(f"http://{fwd.address}/blob"))
                for _ in range(4):
                    tg.start_soon(get)
            assert [r.content == blob for r in rs] == [True] * 4
    finally:
        await fwd.close()
    with pytest.raises(OSError):
        await anyio.connect_tcp(fwd.host, fwd.port)


async def test_forward_half_close_and_refused_guest_port(vm):
    fwd = await vm.forward_tcp(7002)
    async with fwd:
        async with await anyio.connect_tcp(fwd.host, fwd.port) as client:
            await client.send(b"abc")
            await client.send_eof()
            assert await receive_all(client) == f"3 {hashlib.sha256(b'abc').hexdigest()}".encode()
    async with await vm.forward_tcp(7999) as nothing:  # nothing listens: the client sees a close
        async with await anyio.connect_tcp(nothing.host, nothing.port) as client:
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                with anyio.fail_after(60):
                    await client.receive()


async def test_forward_listens_elsewhere_only_when_asked(vm):
    with pytest.raises(GondolinError, match="allow_remote=True") as info:
        await vm.forward_tcp(8080, host="0.0.0.0")
    assert info.value.code == "remote_listen"


async def test_a_guest_that_never_reads_blocks_the_host_writer(vm, asyncio_only):
    rss0 = max_rss_mb()
    chunk = b"\0" * 65536
    accepted = 0
    async with await vm.open_tcp(7004) as s:
        while accepted < 256 << 20:
            with anyio.move_on_after(5) as scope:
                await s.send(chunk)
            if scope.cancelled_caught:
                break  # the writer waits: the guest granted no more credit
            accepted += len(chunk)
    # What the guest socket buffers plus one window, not the 256 MiB the host tried to send.
    assert accepted < 32 << 20, accepted
    assert max_rss_mb() - rss0 < 64
    assert await vm.ping() >= 0


async def test_a_host_that_never_reads_holds_one_window(vm, asyncio_only):
    rss0 = max_rss_mb()
    async with await vm.open_tcp(7005) as s:
        await anyio.sleep(3)  # the guest server writes; nobody on the host reads
        sent = int((await vm.exec("cat /tmp/firehose.sent 2>/dev/null || echo 0")).stdout)
        assert sent < 16 << 20, sent  # the guest's sender blocked too (socket buffers + one window)
        data = await receive_all(s)
    assert data == bytes(range(256)) * 256 * 512
    assert max_rss_mb() - rss0 < 96


async def test_streams_and_forwards_end_with_the_vm(no_leaks):
    from gondolin import VM

    vm = await VM.create(memory="512M")  # the shape of the module VM: its warm template exists
    try:
        await vm.exec("nohup python3 -c \"import socket,time\ns=socket.socket();s.bind(('127.0.0.1',7100));"
                      "s.listen();c=s.accept();time.sleep(600)\" >/dev/null 2>&1 & sleep 1")
        stream = await vm.open_tcp(7100)
        fwd = await vm.forward_tcp(7100)
    finally:
        await vm.close()
    with pytest.raises(VMClosedError):
        await stream.receive()
    with pytest.raises(VMClosedError):
        await stream.send(b"x")
    await stream.aclose()
    with pytest.raises(OSError):
        await anyio.connect_tcp(fwd.host, fwd.port)
    with pytest.raises(VMClosedError):
        await vm.open_tcp(7100)
