"""The host end of the control channel against a scripted guest over an in-memory stream."""

from contextlib import asynccontextmanager

import anyio
import pytest

from gondolin.channel import INBOX_SLOTS, UNGRANTED_DATA_MAX, UNSOLICITED_SLOTS, Channel
from gondolin.errors import GuestTimeoutError, ProtocolError, VMClosedError, VMDiedError
from gondolin.protocol import FrameDecoder, T, message
from tests.support import BOTH_BACKENDS, byte_stream_pair

pytestmark = [pytest.mark.anyio, BOTH_BACKENDS]


@asynccontextmanager
async def running(console=list):
    """A channel whose reader runs for the block, and the guest's end of its connection."""
    host, guest = byte_stream_pair()
    ch = Channel(host, console)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ch.run)
        yield ch, guest
        tg.cancel_scope.cancel()


async def guest_messages(stream, n):
    dec = FrameDecoder()
    out = []
    while len(out) < n:
        dec.feed(await stream.receive())
        out.extend(dec.messages())
    return out


async def test_messages_route_to_their_request():
    async with running(lambda: ["console line"]) as (ch, guest):
        a, b = ch.open(), ch.open()
        await guest.send(message(T.STDOUT, b.id, b"for b") + message(T.STDOUT, a.id, b"for a")
                         + message(T.STDOUT, 999, b"nobody"))
        assert (await a.get()).data == b"for a"
        assert (await b.get()).data == b"for b"
        await ch.send_message(T.PING, a.id)
        [m] = await guest_messages(guest, 1)
        assert (m.t, m.id) == (T.PING, a.id)


async def test_credit_messages_are_applied_without_a_reader():
    async with running() as (ch, guest):
        inbox = ch.open()
        await guest.send(message(T.STDOUT, inbox.id, b"unread output")
                         + message(T.EXEC_STARTED, inbox.id, pid=5, stdin_window=100)
                         + message(T.CREDIT, inbox.id, stdin=50))
        with anyio.fail_after(2):
            while inbox.credit < 150:
                await inbox.wait_credit()
        assert inbox.credit == 150


@pytest.mark.parametrize("fields", [{"tcp": "lots"}, {"stdin": -5}, {"file": 1.5}, {"stdin": True}])
async def test_a_credit_that_is_not_a_count_fails_only_its_request(fields):
    async with running() as (ch, guest):
        bad, good = ch.open(), ch.open()
        await guest.send(message(T.CREDIT, bad.id, **fields) + message(T.STDOUT, good.id, b"still served"))
        with pytest.raises(ProtocolError, match="not a count"):
            await bad.get()
        assert (await good.get()).data == b"still served"
        assert bad.credit == 0


async def test_data_beyond_granted_credit_is_a_protocol_error():
    async with running() as (ch, guest):
        inbox = ch.open()
        inbox.grant(T.STDOUT, 10)
        await guest.send(message(T.STDOUT, inbox.id, b"x" * 10) + message(T.STDOUT, inbox.id, b"y"))
        assert (await inbox.get()).data == b"x" * 10
        with pytest.raises(ProtocolError, match="beyond the granted credit"):
            await inbox.get()


async def test_malformed_frame_fails_everything_with_a_code():
    async with running() as (ch, guest):
        inbox = ch.open()
        await guest.send(b"\x00\x00\x00\x03abc")
        with pytest.raises(ProtocolError) as err:
            await inbox.get()
        assert err.value.code == "short_frame"
        with pytest.raises(ProtocolError):
            ch.open()


async def test_guest_disconnect_fails_pending_requests_with_console_lines():
    async with running(lambda: ["Kernel panic - not syncing"]) as (ch, guest):
        inbox = ch.open()
        await guest.send_eof()
        with pytest.raises(VMDiedError) as err:
            await inbox.get()
        assert "Kernel panic" in str(err.value)
        with pytest.raises(VMDiedError):
            await ch.send_message(T.PING, 1)


async def test_close_fails_pending_with_closed_error():
    async with running() as (ch, guest):
        inbox = ch.open()
        await ch.aclose()
        with pytest.raises(VMClosedError):
            await inbox.get()


async def test_unsolicited_messages_are_queued_during_boot_and_dropped_after():
    async def flood_then_sync(ch: Channel, guest, frames: bytes) -> None:
        """Send ``frames``, then a reply whose arrival shows the reader handled them all."""
        sync = ch.open()
        for i in range(0, len(frames), 1 << 16):
            await guest.send(frames[i:i + (1 << 16)])
        await guest.send(message(T.PONG, sync.id))
        assert (await sync.get(timeout=5)).t == T.PONG
        sync.close()

    async with running() as (ch, guest):
        await flood_then_sync(ch, guest, b"".join(message(T.HELLO, 0, n=i) for i in range(UNSOLICITED_SLOTS + 5)))
        assert ch.dropped_unsolicited == 5  # the first ones are kept, the overflow dropped
        assert (await ch.next_unsolicited()).p == {"n": 0}
        ch.booted()
        assert ch.unsolicited.statistics().current_buffer_used == 0  # the boot backlog is gone
        await flood_then_sync(ch, guest, message(T.PONG, 0, b"x" * 1000) * 5000)
        assert ch.dropped_unsolicited == 5 + 5000
        assert ch.unsolicited.statistics().current_buffer_used == 0


@pytest.mark.parametrize("extra", [0, 1])
async def test_a_guest_flooding_one_request_with_messages_is_a_protocol_error(extra):
    async with running() as (ch, guest):
        inbox, other = ch.open(), ch.open()
        await guest.send(message(T.EXEC_STARTED, inbox.id, pid=1) * (INBOX_SLOTS + extra)
                         + message(T.PONG, other.id))
        # the reader handled the flood before the PONG: one request's flood does not kill the channel
        assert (await other.get(timeout=5)).t == T.PONG
        if extra:
            with pytest.raises(ProtocolError, match=f"more than {INBOX_SLOTS} unread messages"):
                await inbox.get()
        else:
            for _ in range(INBOX_SLOTS):
                assert (await inbox.get()).t == T.EXEC_STARTED


async def test_data_the_host_never_granted_is_a_protocol_error():
    async with running() as (ch, guest):
        small, big = ch.open(), ch.open()
        await guest.send(message(T.PONG, small.id, b"n" * UNGRANTED_DATA_MAX)
                         + message(T.STDOUT, big.id, b"x" * (UNGRANTED_DATA_MAX + 1)))
        assert len((await small.get(timeout=2)).data) == UNGRANTED_DATA_MAX  # a nonce-sized reply is fine
        with pytest.raises(ProtocolError, match="never asked for"):
            await big.get(timeout=2)


async def test_a_request_without_an_answer_times_out_typed():
    async with running() as (ch, guest):
        with anyio.fail_after(5), pytest.raises(GuestTimeoutError, match="answer to PING"):
            await ch.request(T.PING, timeout=0.1)
        assert ch.dead is None  # a slow answer is the caller's error, not the channel's
