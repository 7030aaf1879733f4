"""The host end of the control channel against a scripted guest over an in-memory stream."""

import anyio
import pytest

from gondolin.channel import Channel
from gondolin.errors import ProtocolError, VMClosedError, VMDiedError
from gondolin.protocol import FrameDecoder, T, message

pytestmark = pytest.mark.anyio


class Pipe:
    """A byte stream pair: what the host sends, the fake guest reads, and vice versa."""

    def __init__(self):
        a_send, a_recv = anyio.create_memory_object_stream(100)
        b_send, b_recv = anyio.create_memory_object_stream(100)
        self.host = _ByteStream(a_send, b_recv)
        self.guest = _ByteStream(b_send, a_recv)


class _ByteStream(anyio.abc.ByteStream):
    def __init__(self, send, recv):
        self._send, self._recv = send, recv

    async def send(self, data):
        await self._send.send(bytes(data))

    async def receive(self, max_bytes=65536):
        try:
            return await self._recv.receive()
        except anyio.EndOfStream:
            raise
        except anyio.ClosedResourceError:
            raise anyio.EndOfStream from None

    async def send_eof(self):
        self._send.close()

    async def aclose(self):
        self._send.close()
        self._recv.close()


async def guest_messages(stream, n):
    dec = FrameDecoder()
    out = []
    while len(out) < n:
        dec.feed(await stream.receive())
        out.extend(dec.messages())
    return out


async def test_messages_route_to_their_request():
    pipe = Pipe()
    ch = Channel(pipe.host, lambda: ["console line"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(ch.run)
        a, b = ch.open(), ch.open()
        await pipe.guest.send(message(T.STDOUT, b.id, b"for b") + message(T.STDOUT, a.id, b"for a")
                              + message(T.STDOUT, 999, b"nobody"))
        assert (await a.get()).data == b"for a"
        assert (await b.get()).data == b"for b"
        await ch.send_message(T.PING, a.id)
        [m] = await guest_messages(pipe.guest, 1)
        assert (m.t, m.id) == (T.PING, a.id)
        tg.cancel_scope.cancel()


async def test_credit_messages_are_applied_without_a_reader():
    pipe = Pipe()
    ch = Channel(pipe.host, list)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ch.run)
        inbox = ch.open()
        await pipe.guest.send(message(T.STDOUT, inbox.id, b"unread output")
                              + message(T.EXEC_STARTED, inbox.id, pid=5, stdin_window=100)
                              + message(T.CREDIT, inbox.id, stdin=50))
        with anyio.fail_after(2):
            while inbox.credit < 150:
                await inbox.wait_credit()
        assert inbox.credit == 150
        tg.cancel_scope.cancel()


async def test_data_beyond_granted_credit_is_a_protocol_error():
    pipe = Pipe()
    ch = Channel(pipe.host, list)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ch.run)
        inbox = ch.open()
        inbox.grant(T.STDOUT, 10)
        await pipe.guest.send(message(T.STDOUT, inbox.id, b"x" * 10) + message(T.STDOUT, inbox.id, b"y"))
        assert (await inbox.get()).data == b"x" * 10
        with pytest.raises(ProtocolError, match="beyond the granted credit"):
            await inbox.get()
        tg.cancel_scope.cancel()


async def test_malformed_frame_fails_everything_with_a_code():
    pipe = Pipe()
    ch = Channel(pipe.host, list)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ch.run)
        inbox = ch.open()
        await pipe.guest.send(b"\x00\x00\x00\x03abc")
        with pytest.raises(ProtocolError) as err:
            await inbox.get()
        assert err.value.code == "short_frame"
        with pytest.raises(ProtocolError):
            ch.open()
        tg.cancel_scope.cancel()


async def test_guest_disconnect_fails_pending_requests_with_console_lines():
    pipe = Pipe()
    ch = Channel(pipe.host, lambda: ["Kernel panic - not syncing"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(ch.run)
        inbox = ch.open()
        await pipe.guest.send_eof()
        with pytest.raises(VMDiedError) as err:
            await inbox.get()
        assert "Kernel panic" in str(err.value)
        with pytest.raises(VMDiedError):
            await ch.send_message(T.PING, 1)


async def test_close_fails_pending_with_closed_error():
    pipe = Pipe()
    ch = Channel(pipe.host, list)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ch.run)
        inbox = ch.open()
        await ch.aclose()
        with pytest.raises(VMClosedError):
            await inbox.get()
        tg.cancel_scope.cancel()
