"""Host end of the control port: one reader task, many concurrent requests.

Every request (an exec, a file op) owns a message id and an :class:`Inbox`. The reader task
decodes frames and hands each message to the inbox of its id. Credit messages are applied in
the reader itself, so a writer waiting for stdin credit never waits behind unread output.
The guest is untrusted: data beyond the credit the host granted is a protocol violation.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import anyio
from anyio.abc import ByteStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._log import get_logger
from .errors import GondolinError, GuestTimeoutError, ProtocolError, VMClosedError, VMDiedError
from .options import Timeouts
from .protocol import FrameDecoder, FrameError, Message, T, encode

log = get_logger("protocol")
READ_SIZE = 1 << 20
# Unsolicited guest messages (id 0) queued during boot, when the host waits for HELLO.
UNSOLICITED_SLOTS = 8
# Messages queued for one request before the host reads them. Output and file data are bounded
# by credit; this bounds the rest (a guest that floods one request with small messages).
INBOX_SLOTS = 4096
UNGRANTED_DATA_MAX = 4096  # bytes a message may carry when the host granted none (PONG nonces)
# Ids for host-originated requests. The guest never originates ids other than 0.
_FIRST_ID = 1


def _count(msg: Message, key: str) -> int:
    """A non-negative integer field of a guest message (absent: 0); anything else is a protocol error."""
    value = msg.p.get(key) or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"guest sent {msg.type_name} with {key}={str(value)[:40]!r}, not a count")
    return value


class Inbox:
    """Messages for one request id, plus the credit the guest granted us for it."""

    def __init__(self, channel: Channel, id: int) -> None:
        self.channel = channel
        self.id = id
        self._send: MemoryObjectSendStream[Message | BaseException]
        self._recv: MemoryObjectReceiveStream[Message | BaseException]
        # Data is bounded by the credit this side grants; the number of messages by INBOX_SLOTS.
        self._send, self._recv = anyio.create_memory_object_stream(INBOX_SLOTS)
        self.credit = 0  # bytes we may still send to the guest (stdin / file data)
        self.credit_changed = anyio.Event()
        self.granted: dict[int, int] = {}  # message type -> bytes the guest may still send us
        self.closed = False
        self.finished = False
        self.failure: BaseException | None = None
        self.started = anyio.Event()  # the guest said EXEC_STARTED (or the request ended)
        self.started_pid: int | None = None

    def deliver(self, msg: Message) -> None:
        try:
            if msg.t == T.CREDIT:
                n = _count(msg, "stdin") + _count(msg, "file") + _count(msg, "tcp")
                if n > 0 or "file" in msg.p:
                    self.add_credit(n)
                return
            if msg.t == T.EXEC_STARTED:
                self.add_credit(_count(msg, "stdin_window"))
                self.started_pid = _count(msg, "pid") or None
                self.started.set()
        except ProtocolError as exc:
            self.fail(exc)  # this request fails; the channel and every other request go on
            return
        if msg.t in (T.EXIT, T.ERROR, T.TCP_CLOSE):
            self.finished = True  # writers waiting for credit must stop waiting
            self.add_credit(0)
            self.started.set()
        if msg.data and msg.t in self.granted:
            left = self.granted[msg.t] - len(msg.data)
            if left < 0:
                self.fail(ProtocolError(
                    f"guest sent {len(msg.data)} bytes of {msg.type_name} beyond the granted credit"))
                return
            self.granted[msg.t] = left
        elif len(msg.data) > UNGRANTED_DATA_MAX:
            self.fail(ProtocolError(f"guest sent {len(msg.data)} bytes of {msg.type_name}, which the host "
                                    "never asked for"))
            return
        try:
            self._send.send_nowait(msg)
        except anyio.WouldBlock:
            self.fail(ProtocolError(f"guest sent more than {INBOX_SLOTS} unread messages for one request"))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def add_credit(self, n: int) -> None:
        self.credit += n
        self.credit_changed.set()
        self.credit_changed = anyio.Event()

    def grant(self, t: int, n: int) -> None:
        self.granted[t] = self.granted.get(t, 0) + n

    def fail(self, exc: BaseException) -> None:
        self.failure = self.failure or exc
        self.started.set()
        try:
            self._send.send_nowait(exc)
        except anyio.WouldBlock:
            pass  # get() raises self.failure once the queue is read
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        self.credit_changed.set()

    async def get(self, timeout: float | None = None, what: str = "a reply") -> Message:
        """The next message for this request; :class:`GuestTimeoutError` when none arrives
        within ``timeout`` seconds (None: wait as long as the channel lives)."""
        if self.failure is not None:
            raise self.failure
        if timeout is None:  # the common case (streamed output): no cancel scope per message
            item = await self._recv.receive()
        else:
            with anyio.move_on_after(timeout) as scope:
                item = await self._recv.receive()
            if scope.cancelled_caught:
                raise GuestTimeoutError(f"the guest sent no {what} within {timeout:g}s")
        if isinstance(item, BaseException):
            raise item
        return item

    async def wait_credit(self, timeout: float | None = None) -> None:
        """Wait until the guest grants credit (or the request ends); :class:`GuestTimeoutError`
        after ``timeout`` seconds without any."""
        if self.channel.dead is not None:
            raise self.channel.dead
        with anyio.move_on_after(timeout if timeout is not None else math.inf) as scope:
            await self.credit_changed.wait()
        if self.channel.dead is not None:
            raise self.channel.dead
        if scope.cancelled_caught:
            raise GuestTimeoutError(f"the guest granted no credit within {timeout:g}s")

    def take_nowait(self) -> Message | None:
        """A message already queued for this request, if any (raises a queued failure)."""
        try:
            item = self._recv.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.channel._inboxes.pop(self.id, None)
            self._send.close()
            self._recv.close()


class ControlLink(Protocol):
    """What requests (exec, file operations) need from a running VM: its control channel, a
    place to run their helper tasks, and the host-side deadlines. A machine provides it; unit
    tests provide one over in-memory streams."""

    timeouts: Timeouts

    def control(self) -> Channel:
        """The control channel; raises the VM's death or close error when it has none."""
        ...

    def spawn(self, name: str, fn: Callable[..., Awaitable[Any]], *args: Any, critical: bool = True) -> None:
        """Run ``fn(*args)`` as a background task owned by the VM."""
        ...


class Channel:
    def __init__(self, stream: ByteStream, console: Callable[[], list[str]],
                 before_death: Callable[[], Awaitable[None]] | None = None, *, first_id: int = _FIRST_ID) -> None:
        # A restored guest may still hold replies for the ids of the host that saved it, so a
        # channel to a restored VM starts its ids elsewhere (``first_id``).
        self._stream = stream
        self._console = console
        self._before_death = before_death
        self._send_lock = anyio.Lock()
        self._inboxes: dict[int, Inbox] = {}
        self._ids = itertools.count(first_id)
        self.dead: GondolinError | None = None
        self.unsolicited: MemoryObjectSendStream[Message]
        self._unsolicited_recv: MemoryObjectReceiveStream[Message]
        self.unsolicited, self._unsolicited_recv = anyio.create_memory_object_stream(UNSOLICITED_SLOTS)
        self.decode_errors = 0
        self.dropped_unsolicited = 0
        self._booted = False

    def booted(self) -> None:
        """The boot handshake is over: later unsolicited guest messages are dropped unread."""
        self._booted = True
        self.unsolicited.close()
        with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            while True:
                self._unsolicited_recv.receive_nowait()

    def open(self) -> Inbox:
        if self.dead is not None:
            raise self.dead
        ident = next(self._ids)
        inbox = Inbox(self, ident)
        self._inboxes[ident] = inbox
        return inbox

    async def send(self, frame: bytes) -> None:
        if self.dead is not None:
            raise self.dead
        async with self._send_lock:
            try:
                await self._stream.send(frame)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self.kill(VMDiedError("the VM's control connection broke while sending", self._console()))
                raise self.dead from exc  # type: ignore[misc]

    async def send_message(self, t: int, id: int, data: bytes = b"", **p: object) -> None:
        await self.send(encode(Message(t, id, p, data)))

    async def request(self, t: int, data: bytes = b"", *, timeout: float | None = None, **p: object) -> Message:
        """Send one request and return the guest's first answer to it."""
        inbox = self.open()
        try:
            await self.send_message(t, inbox.id, data, **p)
            return await inbox.get(timeout, what=f"answer to {T(t).name}")
        finally:
            inbox.close()

    @contextlib.asynccontextmanager
    async def quiesced(self, timeout: float = 30.0) -> AsyncIterator[None]:
        """Hold back every host send, after the guest has answered a PING (so it has read all we
        sent): a snapshot taken inside the block cannot hold half a host frame."""
        async with self._send_lock:
            inbox = self.open()
            try:
                try:
                    await self._stream.send(encode(Message(T.PING, inbox.id)))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    self.kill(VMDiedError("the VM's control connection broke while sending", self._console()))
                    raise self.dead from exc  # type: ignore[misc]
                with anyio.fail_after(timeout):
                    await inbox.get()
            finally:
                inbox.close()
            yield

    async def next_unsolicited(self) -> Message:
        return await self._unsolicited_recv.receive()

    async def run(self) -> None:
        """Read and dispatch until the guest side closes. Run as a background task."""
        decoder = FrameDecoder()
        try:
            while True:
                try:
                    data = await self._stream.receive(READ_SIZE)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    break
                try:
                    decoder.feed(data)
                    msgs = decoder.messages()
                except FrameError as exc:
                    self.decode_errors += 1
                    self.kill(ProtocolError(f"malformed frame from the guest ({exc}); connection closed",
                                            code=exc.code))
                    return
                for msg in msgs:
                    self._dispatch(msg)
        finally:
            if self.dead is None and self._before_death is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await self._before_death()  # let QEMU's last console lines arrive
            self.kill(VMDiedError("the VM stopped unexpectedly (control connection closed)", self._console()))

    def _dispatch(self, msg: Message) -> None:
        if log.isEnabledFor(10):
            log.debug("<- %s id=%s %s %s", msg.type_name, msg.id, msg.p, f"+{len(msg.data)}B" if msg.data else "")
        if msg.id == 0:
            if self._booted:
                # Nothing reads unsolicited messages once the guest has said hello: a guest
                # that keeps sending them must not make the host hold their bytes.
                self.dropped_unsolicited += 1
                return
            try:
                self.unsolicited.send_nowait(msg)
            except anyio.WouldBlock:
                self.dropped_unsolicited += 1
                log.debug("dropping unsolicited %s", msg.type_name)
            return
        inbox = self._inboxes.get(msg.id)
        if inbox is None:
            log.debug("dropping %s for unknown id %s", msg.type_name, msg.id)
            return
        inbox.deliver(msg)

    def kill(self, exc: GondolinError) -> None:
        """Fail every pending request with ``exc`` (first cause wins)."""
        if self.dead is None:
            self.dead = exc
        for inbox in list(self._inboxes.values()):
            inbox.fail(self.dead)
        self.unsolicited.close()

    def refresh_console(self) -> None:
        """Re-render the death error with the console lines known now."""
        if isinstance(self.dead, VMDiedError):
            console = self._console()
            if console and not self.dead.console:
                self.dead = VMDiedError(self.dead.message, console)

    async def aclose(self) -> None:
        self.kill(VMClosedError("the VM was closed"))
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()
