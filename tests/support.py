"""Shared test doubles for unit tests (nothing here boots a VM).

* :func:`byte_stream_pair` — two connected in-memory anyio byte streams.
* :class:`Guest` — the guest's end of a control channel: read the host's messages, send frames.
  Tests script an agent with it, transcript style.
* :class:`FakeMachine` — the one stand-in for :class:`gondolin.machine.machine.Machine`: a real
  :class:`~gondolin.channel.Channel` over an in-memory stream to a :class:`Guest`, background
  tasks in the test's task group. ``gondolin.VM(machine)`` on it is the real VM facade;
  ``ExecProcess(machine, ...)`` and ``GuestFS(machine, machine)`` run against it directly.
* :func:`assert_exports` — pins a package's ``__all__`` with checks that can fail.
* :class:`EchoAgent` — a small agent: each command echoes its stdin to stdout.
"""

from __future__ import annotations

import collections
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream, TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from gondolin.channel import Channel
from gondolin.options import Timeouts, VMOptions
from gondolin.protocol import FrameDecoder, Message, T, encode
from gondolin.vfs import MountRouter
from gondolin.vfs.provider import Provider

# Unit tests that drive the library's own concurrency run under both anyio backends.
BOTH_BACKENDS = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
STREAM_BUFFER = 16  # items in flight per direction: enough to pipeline, small enough for backpressure


class MemoryByteStream(ByteStream):
    """One end of an in-memory byte stream pair. ``receive`` honours ``max_bytes``; the peer's
    ``send_eof``/``aclose`` reads as ``EndOfStream``."""

    def __init__(self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]) -> None:
        self._send = send
        self._receive = receive
        self._buffer = b""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._buffer:
            self._buffer = await self._receive.receive()
        data, self._buffer = self._buffer[:max_bytes], self._buffer[max_bytes:]
        return data

    async def send(self, item: bytes) -> None:
        if item:
            await self._send.send(bytes(item))

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def byte_stream_pair(buffer: int = STREAM_BUFFER) -> tuple[MemoryByteStream, MemoryByteStream]:
    """Two connected byte streams: what one end sends, the other receives."""
    a_send, b_recv = anyio.create_memory_object_stream[bytes](buffer)
    b_send, a_recv = anyio.create_memory_object_stream[bytes](buffer)
    return MemoryByteStream(a_send, a_recv), MemoryByteStream(b_send, b_recv)


class Guest:
    """The guest's end of a control channel, for scripting an agent in a test."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self._decoder = FrameDecoder()
        self._pending: collections.deque[Message] = collections.deque()

    async def receive(self) -> Message:
        while not self._pending:
            self._decoder.feed(await self.stream.receive())
            self._pending.extend(self._decoder.messages())
        return self._pending.popleft()

    async def expect(self, t: int, timeout: float = 5.0) -> Message:
        """The host's next message, which must be of type ``t``."""
        with anyio.fail_after(timeout):
            msg = await self.receive()
        assert msg.t == t, f"expected {T(t).name} from the host, got {msg.type_name} {msg.p}"
        return msg

    async def send(self, t: int, id: int = 0, data: bytes = b"", **p: Any) -> None:
        await self.stream.send(encode(Message(t, id, p, data)))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send(data)


class FakeMachine:
    """What a VM needs of its machine (ControlLink, MountAccess, the registry's side and the
    facade's read-only facts), with a scripted :class:`Guest` in place of QEMU."""

    def __init__(self, tg: TaskGroup, *, timeouts: Timeouts | None = None,
                 mounts: Mapping[str, Provider] | None = None, run_dir: Path | None = None,
                 label: str | None = None) -> None:
        host, guest = byte_stream_pair()
        self._tg = tg
        self.channel = Channel(host, lambda: ["fake console line"])
        self.guest = Guest(guest)
        self.timeouts = timeouts or Timeouts()
        self.options = VMOptions(label=label, mounts=dict(mounts or {}), timeouts=self.timeouts)
        self.id = "f00dfeed0001"
        self.image = SimpleNamespace(build_id="fake-image", defaults={})
        self.memory_mb = self.options.memory_mb
        self.accel = "tcg"
        self.network = None
        self.created = time.time()
        self.boot_time = self.guest_boot_ms = self.qemu_pid = None
        self.restored_from: str | None = "template"
        self.running = True
        self.run_dir = run_dir
        self.mounts: dict[str, Provider] = dict(mounts or {})
        self.router = MountRouter(self.mounts) if self.mounts else None
        self.invalidated: list[str] = []
        self.closers: list[Callable[[], Any]] = []

    # ControlLink
    def control(self) -> Channel:
        if self.channel.dead is not None:
            raise self.channel.dead
        return self.channel

    def spawn(self, name: str, fn: Callable[..., Awaitable[Any]], *args: Any, critical: bool = True) -> None:
        self._tg.start_soon(fn, *args, name=name)

    # MountAccess
    def vfs_root(self) -> MountRouter | None:
        return self.router

    def vfs_invalidate(self, path: str) -> None:
        self.invalidated.append(path)

    # what the registry and the VM facade use
    def on_close(self, callback: Callable[[], Any]) -> None:
        self.closers.append(callback)

    def kill_now(self) -> None:
        pass

    async def close(self, raise_failure: bool = True) -> None:
        self.running = False
        for callback in self.closers:
            callback()
        await self.channel.aclose()


@asynccontextmanager
async def fake_machine(agent: Callable[[Guest], Awaitable[Any]] | None = None,
                       **kw: Any) -> AsyncIterator[FakeMachine]:
    """A :class:`FakeMachine` whose channel reader (and ``agent(machine.guest)``, if given) runs
    until the block ends."""
    async with anyio.create_task_group() as tg:
        machine = FakeMachine(tg, **kw)
        tg.start_soon(machine.channel.run, name="channel reader")
        if agent is not None:
            tg.start_soon(agent, machine.guest, name="fake agent")
        try:
            yield machine
        finally:
            tg.cancel_scope.cancel()


class EchoAgent:
    """Runs every command as "echo stdin to stdout": writes ``started`` to stderr first, exits
    with the number of resizes it saw at stdin EOF, or with 128+n on a signal. ``execs`` keeps
    each EXEC request; ``signals`` each signal received."""

    STDIN_WINDOW = 1 << 16

    def __init__(self) -> None:
        self.execs: list[Message] = []
        self.signals: list[int] = []
        self.signalled = anyio.Event()

    async def __call__(self, guest: Guest) -> None:
        resizes: dict[int, int] = {}
        while True:
            msg = await guest.receive()
            if msg.t == T.EXEC:
                self.execs.append(msg)
                resizes[msg.id] = 0
                await guest.send(T.EXEC_STARTED, msg.id, pid=42, stdin_window=self.STDIN_WINDOW)
                await guest.send(T.STDERR, msg.id, b"started\n")
            elif msg.t == T.STDIN:
                await guest.send(T.STDOUT, msg.id, msg.data)
                await guest.send(T.CREDIT, msg.id, stdin=len(msg.data))
            elif msg.t == T.RESIZE:
                resizes[msg.id] += 1
            elif msg.t == T.STDIN_EOF:
                await guest.send(T.EXIT, msg.id, exit_code=resizes.pop(msg.id, 0))
            elif msg.t == T.SIGNAL:
                self.signals.append(int(msg.p["signal"]))
                self.signalled.set()
                await guest.send(T.EXIT, msg.id, exit_code=128 + int(msg.p["signal"]), signal=msg.p["signal"])
            elif msg.t == T.PING:
                await guest.send(T.PONG, msg.id, msg.data)


def assert_exports(package: ModuleType, expected: list[str]) -> None:
    """``package.__all__`` is exactly ``expected``; each name is bound in the package, and each
    class or function it names is defined in one of the package's modules."""
    assert sorted(package.__all__) == sorted(expected)
    namespace = vars(package)
    for name in expected:
        assert name in namespace, f"{package.__name__}.__all__ names {name}, which it does not define"
        obj = namespace[name]
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__.startswith(f"{package.__name__}."), f"{name} comes from {obj.__module__}"


__all__ = ["BOTH_BACKENDS", "EchoAgent", "assert_exports", "FakeMachine", "Guest", "MemoryByteStream", "byte_stream_pair", "fake_machine"]
