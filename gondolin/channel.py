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

import anyio
from anyio.abc import ByteStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._log import get_logger
from .errors import GondolinError, ProtocolError, VMClosedError, VMDiedError
from .protocol import FrameDecoder, FrameError, Message, T, encode

log = get_logger("protocol")
READ_SIZE = 1 << 20
# Ids for host-originated requests. The guest never originates ids other than 0.
_FIRST_ID = 1


class Inbox:
    """Messages for one request id, plus the credit the guest granted us for it."""

    def __init__(self, channel: Channel, id: int) -> None:
        self.channel = channel
        self.id = id
        self._send: MemoryObjectSendStream[Message | BaseException]
        self._recv: MemoryObjectReceiveStream[Message | BaseException]
        # Bounded in practice by the credit this side grants; see Channel._dispatch.
        self._send, self._recv = anyio.create_memory_object_stream(math.inf)
        self.credit = 0  # bytes we may still send to the guest (stdin / file data)
        self.credit_changed = anyio.Event()
        self.granted: dict[int, int] = {}  # message type -> bytes the guest may still send us
        self.closed = False
        self.finished = False

    def deliver(self, msg: Message) -> None:
        if msg.t == T.CREDIT:
            n = int(msg.p.get("stdin") or 0) + int(msg.p.get("file") or 0)
            if n > 0 or "file" in msg.p:
                self.add_credit(n)
            return
        if msg.t == T.EXEC_STARTED:
            self.add_credit(int(msg.p.get("stdin_window") or 0))
        elif msg.t in (T.EXIT, T.ERROR):
            self.finished = True  # writers waiting for credit must stop waiting
            self.add_credit(0)
        if msg.data and msg.t in self.granted:
            left = self.granted[msg.t] - len(msg.data)
            if left < 0:
                self.fail(ProtocolError(
                    f"guest sent {len(msg.data)} bytes of {msg.type_name} beyond the granted credit"))
                return
            self.granted[msg.t] = left
        try:
            self._send.send_nowait(msg)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def add_credit(self, n: int) -> None:
        self.credit += n
        self.credit_changed.set()
        self.credit_changed = anyio.Event()

    def grant(self, t: int, n: int) -> None:
        self.granted[t] = self.granted.get(t, 0) + n

    def fail(self, exc: BaseException) -> None:
        try:
            self._send.send_nowait(exc)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        self.credit_changed.set()

    async def get(self) -> Message:
        item = await self._recv.receive()
        if isinstance(item, BaseException):
            raise item
        return item

    async def wait_credit(self) -> None:
        if self.channel.dead is not None:
            raise self.channel.dead
        await self.credit_changed.wait()
        if self.channel.dead is not None:
            raise self.channel.dead

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.channel._inboxes.pop(self.id, None)
            self._send.close()
            self._recv.close()


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
        self.unsolicited, self._unsolicited_recv = anyio.create_memory_object_stream(64)
        self.decode_errors = 0

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
            try:
                self.unsolicited.send_nowait(msg)
            except anyio.WouldBlock:
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
