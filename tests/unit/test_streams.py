"""Guest TCP streams through a real Channel over in-memory streams, against a scripted guest."""

import anyio
import pytest

from gondolin._cli_options import forward_spec
from gondolin.errors import GondolinError, GuestConnectionError, GuestTimeoutError, ProtocolError
from gondolin.options import Timeouts
from gondolin.protocol import T
from gondolin.streams import open_stream, relay
from tests.support import BOTH_BACKENDS, byte_stream_pair, fake_machine

pytestmark = [pytest.mark.anyio, BOTH_BACKENDS]


async def opened(machine, port=8000, *, guest_window=4, window=4096):
    """Open a stream; the scripted guest accepts it granting ``guest_window`` bytes."""
    async with anyio.create_task_group() as tg:
        result = []

        async def open_it():
            result.append(await open_stream(machine, port, window=window))

        tg.start_soon(open_it)
        req = await machine.guest.expect(T.TCP_OPEN)
        assert req.p == {"host": "127.0.0.1", "port": port, "window": window}
        await machine.guest.send(T.TCP_OPENED, req.id, window=guest_window)
    return result[0], req.id


async def test_sends_stay_within_the_guest_credit():
    async with fake_machine() as machine, anyio.create_task_group() as tg:
        stream, sid = await opened(machine)
        tg.start_soon(stream.send, b"0123456789")
        assert (await machine.guest.expect(T.TCP_DATA)).data == b"0123"
        await anyio.wait_all_tasks_blocked()  # no more credit: the writer waits, nothing is sent
        await machine.guest.send(T.CREDIT, sid, tcp=100)
        assert (await machine.guest.expect(T.TCP_DATA)).data == b"456789"
        await stream.send_eof()
        assert (await machine.guest.expect(T.TCP_EOF)).id == sid
        with pytest.raises(GuestConnectionError, match="after send_eof"):
            await stream.send(b"late")
        await stream.aclose()
        assert (await machine.guest.expect(T.TCP_CLOSE)).id == sid


async def test_reading_returns_credit_in_quarters_and_eof_ends_the_stream():
    async with fake_machine() as machine:
        stream, sid = await opened(machine, window=4096, guest_window=100)
        for i in range(4):
            await machine.guest.send(T.TCP_DATA, sid, bytes([i]) * 1024)
        got = b""
        while len(got) < 4096:
            got += await stream.receive(700)  # max_bytes is honoured across messages
        assert got == b"".join(bytes([i]) * 1024 for i in range(4))
        credits = [(await machine.guest.expect(T.CREDIT)).p for _ in range(4)]
        assert credits == [{"tcp": 1024}] * 4  # a message is taken in reads of 700 + 324 bytes
        await machine.guest.send(T.TCP_EOF, sid)
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
        await stream.send(b"still open")  # our half is ours to close
        await stream.aclose()


async def test_data_beyond_the_granted_window_is_a_protocol_error():
    async with fake_machine() as machine:
        stream, sid = await opened(machine, window=4096)
        await machine.guest.send(T.TCP_DATA, sid, b"x" * 4096)
        await machine.guest.send(T.TCP_DATA, sid, b"!")
        await anyio.wait_all_tasks_blocked()  # both arrived before the host read (and gave back) any
        with anyio.fail_after(5), pytest.raises(ProtocolError, match="beyond the granted credit"):
            while True:
                await stream.receive()


async def test_a_refused_port_and_a_reset_are_typed_errors():
    async with fake_machine() as machine, anyio.create_task_group() as tg:
        async def refuse():
            req = await machine.guest.expect(T.TCP_OPEN)
            await machine.guest.send(T.ERROR, req.id, code="ECONNREFUSED", errno=111,
                                     message="connect: Connection refused")
        tg.start_soon(refuse)
        with pytest.raises(GuestConnectionError, match="nothing in the guest listens on 127.0.0.1 port 8000") as err:
            await open_stream(machine, 8000)
        assert err.value.code == "ECONNREFUSED"

        stream, sid = await opened(machine)
        await machine.guest.send(T.TCP_CLOSE, sid, error="read: Connection reset by peer")
        with pytest.raises(GuestConnectionError, match="Connection reset") as err:
            await stream.receive()
        assert err.value.code == "connection_reset"
        with pytest.raises(GuestConnectionError, match="closed the connection"):
            await stream.send(b"x")
        await stream.aclose()  # the guest dropped it already: nothing more is sent


async def test_only_loopback_and_real_ports_are_asked_for():
    async with fake_machine() as machine:
        for host in ("10.0.0.1", "192.168.127.1", "0.0.0.0", "localhost6", "example.com"):
            with pytest.raises(GuestConnectionError) as err:
                await open_stream(machine, 80, host)
            assert err.value.code == "not_loopback"
        for port in (0, 65536, -1, True, "80"):
            with pytest.raises(ValueError):
                await open_stream(machine, port)
        with anyio.move_on_after(0.2):
            msg = await machine.guest.receive()
            pytest.fail(f"the host sent {msg.type_name} for a refused request")


async def test_a_silent_guest_times_out_and_the_request_is_withdrawn():
    async with fake_machine(timeouts=Timeouts(call=0.5)) as machine:
        with pytest.raises(GuestTimeoutError, match="answer to the connection to port 9"):
            await open_stream(machine, 9)
        req = await machine.guest.expect(T.TCP_OPEN)
        assert (await machine.guest.expect(T.TCP_CLOSE)).id == req.id


async def test_a_bad_window_from_the_guest_is_a_protocol_error():
    async with fake_machine() as machine, anyio.create_task_group() as tg:
        async def answer():
            req = await machine.guest.expect(T.TCP_OPEN)
            await machine.guest.send(T.TCP_OPENED, req.id, window="lots")
        tg.start_soon(answer)
        with pytest.raises(ProtocolError, match="bad window"):
            await open_stream(machine, 8000)


async def test_a_dead_channel_fails_waiting_readers_and_writers():
    async with fake_machine() as machine, anyio.create_task_group() as tg:
        stream, _ = await opened(machine, guest_window=0)
        errors = []

        async def run(fn, *args):
            try:
                await fn(*args)
            except GondolinError as exc:
                errors.append(exc)

        tg.start_soon(run, stream.receive)
        tg.start_soon(run, stream.send, b"x")
        await anyio.wait_all_tasks_blocked()
        await machine.channel.aclose()
    assert len(errors) == 2 and all("closed" in str(e) for e in errors)


async def test_relay_passes_bytes_and_half_closes_both_ways():
    a_near, a_far = byte_stream_pair()
    b_near, b_far = byte_stream_pair()
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay, a_far, b_far)
        await a_near.send(b"to b")
        assert await b_near.receive() == b"to b"
        await a_near.send_eof()
        with pytest.raises(anyio.EndOfStream):
            await b_near.receive()
        await b_near.send(b"answer after eof")
        assert await a_near.receive() == b"answer after eof"
        await b_near.send_eof()
        with pytest.raises(anyio.EndOfStream):
            await a_near.receive()
    # both directions ended: relay returned on its own


@pytest.mark.parametrize("text,expected", [("8000", (8000, 0)), ("8000:18000", (8000, 18000)), ("22:0", (22, 0))])
def test_forward_flag_parses(text, expected, anyio_backend):
    assert forward_spec(text) == expected


@pytest.mark.parametrize("text", ["", "0", "x", "80:", "80:x", "70000", "80:70000", ":80", "-1"])
def test_forward_flag_refuses_nonsense(text, anyio_backend):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="GUEST_PORT"):
        forward_spec(text)
