"""A small QMP (QEMU Machine Protocol) client over QEMU's unix socket.

QMP is newline-delimited JSON (docs/interop/qmp-spec.rst in the QEMU tree): QEMU greets with
``{"QMP": {...}}``, the client negotiates with ``qmp_capabilities``, then sends
``{"execute": CMD, "arguments": {...}, "id": N}`` and gets ``{"return": ..., "id": N}`` or
``{"error": {"class": ..., "desc": ...}, "id": N}``; asynchronous ``{"event": ...}`` messages
arrive in between.

:class:`QmpParser` is the sans-IO half (bytes in, typed messages out). QEMU runs the guest's
device models, so a compromised QEMU is not trusted to be polite: lines are bounded, and a
line that is not a JSON object is counted and dropped. :class:`QmpClient` is the anyio driver.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import ByteStream

from .._log import get_logger
from .._sockets import connect_unix
from ..errors import GondolinError

log = get_logger("qemu")
MAX_LINE = 1 << 20  # a QMP reply we use is a few hundred bytes; a longer line is dropped
MAX_EVENTS = 256  # events kept for wait_event(); the oldest go first
READ_SIZE = 65536
MIGRATION_DONE = ("completed", "failed", "cancelled")


class QmpError(GondolinError):
    """QEMU refused a QMP command, or the QMP connection failed."""

    code = "qmp_error"

    def __init__(self, message: str, *, error_class: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class


@dataclass(frozen=True)
class Greeting:
    version: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    id: int | None
    value: Any


@dataclass(frozen=True)
class ErrorReply:
    id: int | None
    error_class: str
    desc: str


@dataclass(frozen=True)
class Event:
    name: str
    data: dict[str, Any] = field(default_factory=dict)


QmpMessage = Greeting | Reply | ErrorReply | Event


def encode_command(command: str, arguments: dict[str, Any] | None, id: int) -> bytes:
    msg: dict[str, Any] = {"execute": command, "id": id}
    if arguments:
        msg["arguments"] = arguments
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


class QmpParser:
    """Split QEMU's output into lines and turn each into a typed message."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._max = max_line
        self._skipping = False  # inside an oversize line: drop until its newline
        self.dropped = 0

    def feed(self, data: bytes) -> list[QmpMessage]:
        out: list[QmpMessage] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self._max:
                    self._buf.clear()
                    if not self._skipping:
                        self.dropped += 1
                    self._skipping = True
                return out
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if self._skipping:
                self._skipping = False
                continue
            if len(line) > self._max:
                self.dropped += 1
                continue
            msg = self._parse(line)
            if msg is not None:
                out.append(msg)

    def _parse(self, line: bytes) -> QmpMessage | None:
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            self.dropped += 1
            return None
        if not isinstance(obj, dict):
            self.dropped += 1
            return None
        ident = obj.get("id")
        ident = ident if isinstance(ident, int) and not isinstance(ident, bool) else None
        if "return" in obj:
            return Reply(ident, obj["return"])
        if isinstance(obj.get("error"), dict):
            err = obj["error"]
            return ErrorReply(ident, str(err.get("class", "")), str(err.get("desc", "")))
        if isinstance(obj.get("event"), str):
            data = obj.get("data")
            return Event(obj["event"], data if isinstance(data, dict) else {})
        if isinstance(obj.get("QMP"), dict):
            version = obj["QMP"].get("version")
            return Greeting(version if isinstance(version, dict) else {})
        self.dropped += 1
        return None


class QmpClient:
    """One QMP connection. Commands run one at a time (QEMU answers them in order anyway)."""

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._parser = QmpParser()
        self._pending: list[QmpMessage] = []
        self._events: list[Event] = []
        self._ids = itertools.count(1)
        self._lock = anyio.Lock()
        self.greeting: Greeting | None = None

    @classmethod
    async def connect(cls, path: str, timeout: float = 10.0) -> QmpClient:
        """Connect to QEMU's QMP socket (retrying while QEMU creates it) and negotiate."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                stream = await connect_unix(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() > deadline:
                    raise QmpError(f"QEMU's QMP socket {path} did not accept a connection: {exc}") from exc
                await anyio.sleep(0.005)
        return await cls.over(stream, max(0.1, deadline - time.monotonic()))

    @classmethod
    async def over(cls, stream: ByteStream, timeout: float = 10.0) -> QmpClient:
        """Negotiate on a connected stream (closed again if that fails)."""
        client = cls(stream)
        try:
            with anyio.fail_after(timeout):
                msg = await client._next()
                if not isinstance(msg, Greeting):
                    raise QmpError(f"QEMU did not greet on QMP (got {msg!r})")
                client.greeting = msg
                await client.execute("qmp_capabilities")
        except TimeoutError:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise QmpError(f"QEMU did not complete the QMP handshake within {timeout:.1f}s") from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise
        return client

    async def _next(self) -> QmpMessage:
        while not self._pending:
            try:
                data = await self._stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise QmpError("QEMU closed its QMP connection") from exc
            self._pending.extend(self._parser.feed(data))
        return self._pending.pop(0)

    def _keep_event(self, event: Event) -> None:
        self._events.append(event)
        if len(self._events) > MAX_EVENTS:
            del self._events[0]

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its ``return`` value; QEMU's refusal raises :class:`QmpError`."""
        async with self._lock:
            ident = next(self._ids)
            try:
                await self._stream.send(encode_command(command, arguments, ident))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise QmpError(f"QMP connection broke while sending {command}") from exc
            while True:
                msg = await self._next()
                if isinstance(msg, Event):
                    self._keep_event(msg)
                elif isinstance(msg, Reply) and msg.id == ident:
                    return msg.value
                elif isinstance(msg, ErrorReply) and msg.id in (ident, None):
                    raise QmpError(f"QEMU refused {command}: {msg.desc}", error_class=msg.error_class)

    def take_events(self, name: str) -> list[Event]:
        """Events named ``name`` received so far (removed from the buffer)."""
        hits = [e for e in self._events if e.name == name]
        self._events = [e for e in self._events if e.name != name]
        return hits

    async def status(self) -> str:
        """The run state (``running``, ``paused``, ``inmigrate``, ``postmigrate``, ...).

        Read the ``status`` field: the reply also holds ``"running": false``, so matching on the
        word alone misleads."""
        value = await self.execute("query-status")
        return str(value.get("status", "")) if isinstance(value, dict) else ""

    async def migrate_to(self, uri: str, *, timeout: float = 60.0, poll: float = 0.005) -> dict[str, Any]:
        """Migrate (save) the VM to ``uri`` and wait until QEMU says it completed."""
        await self.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        await self.execute("migrate", {"uri": uri})
        with anyio.fail_after(timeout):
            while True:
                info = await self.execute("query-migrate")
                state = info.get("status", "") if isinstance(info, dict) else ""
                if state == "completed":
                    return info
                if state in MIGRATION_DONE:
                    raise QmpError(f"saving the VM failed ({state}): {info.get('error-desc', 'no details')}")
                await anyio.sleep(poll)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()
