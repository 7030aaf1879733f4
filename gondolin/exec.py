"""Running commands in the guest: :class:`ExecProcess` and its :class:`ExecResult`."""

from __future__ import annotations

import codecs
import json
import signal as _signal
import time
from collections.abc import AsyncIterable, AsyncIterator, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from ._log import get_logger
from .channel import ControlLink, Inbox
from .errors import ExecTimeout, GondolinError, GuestTimeoutError, ProtocolError
from .protocol import DATA_CHUNK, T

log = get_logger("exec")
StreamMode = Literal["buffer", "pipe", "ignore"]
StdinSource = bytes | str | Iterable[bytes] | AsyncIterable[bytes] | bool | None


@dataclass(frozen=True)
class ExecResult:
    """What a finished command left behind. A non-zero exit is a result, never an exception."""

    exit_code: int
    signal: int | None
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.stdout_bytes)

    def lines(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line]

    def __str__(self) -> str:
        return self.stdout


@dataclass(frozen=True)
class OutputChunk:
    """One piece of piped output, in arrival order."""

    stream: Literal["stdout", "stderr"]
    data: bytes = field(repr=False)

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")


_STREAM: dict[int, str] = {T.STDOUT: "stdout", T.STDERR: "stderr"}


class ExecProcess:
    """A command running in the guest.

    Await it for an :class:`ExecResult`. With ``stdout="pipe"`` (and/or ``stderr="pipe"``),
    ``async for chunk in proc`` yields :class:`OutputChunk` objects as they arrive; the guest only
    produces more once they are consumed (credit-based flow control), so memory stays bounded.
    """

    def __init__(self, link: ControlLink, request: dict[str, Any], *, stdin: StdinSource, stdout: StreamMode,
                 stderr: StreamMode, window: int, timeout: float | None) -> None:
        for name, mode in (("stdout", stdout), ("stderr", stderr)):
            if mode not in ("buffer", "pipe", "ignore"):
                raise ValueError(f"{name} must be 'buffer', 'pipe' or 'ignore', not {mode!r}")
        self._link = link
        self._request = request
        self._stdin_source = stdin
        self._modes: dict[int, StreamMode] = {T.STDOUT: stdout, T.STDERR: stderr}
        self._window = window
        self._timeout = timeout
        self._inbox: Inbox | None = None
        self._started = anyio.Event()
        self._start_error: BaseException | None = None
        self._start_lock = anyio.Lock()
        self._buffers: dict[int, list[bytes]] = {T.STDOUT: [], T.STDERR: []}
        self._unreturned: dict[int, int] = {T.STDOUT: 0, T.STDERR: 0}
        self._result: ExecResult | None = None
        self._t0 = time.monotonic()
        self._stdin_closed = False
        self._stdin_task_done = anyio.Event()
        self._feeder_started = False
        self.pid: int | None = None

    @property
    def id(self) -> int | None:
        return self._inbox.id if self._inbox else None

    @property
    def result(self) -> ExecResult | None:
        return self._result

    # -- start ---------------------------------------------------------------
    async def start(self) -> ExecProcess:
        """Send the command to the guest (once) and start feeding its stdin source, if any."""
        await self._send_request()
        if not self._feeder_started and self._request_stdin() and not isinstance(self._stdin_source, bool):
            self._feeder_started = True
            self._link.spawn("stdin feeder", self._feed_stdin, critical=False)
        return self

    async def wait_started(self) -> int | None:
        """Wait until the guest has started the command; its pid (None if it could not start:
        the result or the error then says why)."""
        await self.start()
        inbox = self._inbox
        assert inbox is not None
        with anyio.move_on_after(self._link.timeouts.call) as scope:
            await inbox.started.wait()
        if scope.cancelled_caught:
            raise GuestTimeoutError(f"the guest did not start the command within {self._link.timeouts.call:g}s")
        if inbox.failure is not None:
            raise inbox.failure
        if self.pid is None:
            self.pid = inbox.started_pid
        return self.pid

    async def _send_request(self) -> None:
        async with self._start_lock:
            if self._inbox is not None:
                return
            channel = self._link.control()
            inbox = channel.open()
            self._inbox = inbox
            inbox.grant(T.STDOUT, self._window)
            inbox.grant(T.STDERR, self._window)
            self._t0 = time.monotonic()
            req = dict(self._request, window=self._window,
                       stdin=self._stdin_source is not None and self._stdin_source is not False)
            log.debug("exec %s: %s", inbox.id, req.get("shell") or req.get("argv"))
            await channel.send_message(T.EXEC, inbox.id, **req)

    # -- stdin ---------------------------------------------------------------
    async def write(self, data: bytes | str) -> None:
        """Send bytes to the process's stdin (waits for guest credit: flow control)."""
        if isinstance(data, str):
            data = data.encode()
        await self._send_request()
        inbox = self._inbox
        assert inbox is not None
        if self._stdin_closed:
            raise GondolinError("stdin of this process is already closed", code="stdin_closed")
        if not self._request_stdin():
            raise GondolinError("this process was started without stdin; pass stdin=True to exec()",
                                code="no_stdin")
        view = memoryview(data)
        while view:
            while inbox.credit <= 0:
                if self._result is not None or inbox.finished:
                    return  # the process is gone; its stdin went nowhere
                await inbox.wait_credit()
            n = min(len(view), inbox.credit, DATA_CHUNK)
            inbox.credit -= n
            await self._link.control().send_message(T.STDIN, inbox.id, bytes(view[:n]))
            view = view[n:]

    async def close_stdin(self) -> None:
        """Signal end of input (on a PTY this sends ^D, like a terminal)."""
        await self._send_request()
        if not self._stdin_closed and self._result is None:
            self._stdin_closed = True
            assert self._inbox is not None
            await self._link.control().send_message(T.STDIN_EOF, self._inbox.id)

    def _request_stdin(self) -> bool:
        return self._stdin_source is not None and self._stdin_source is not False

    async def _feed_stdin(self) -> None:
        src = self._stdin_source
        try:
            if src is None or isinstance(src, bool):
                return
            if isinstance(src, (bytes, bytearray, memoryview, str)):
                await self.write(bytes(src) if not isinstance(src, str) else src)
            elif isinstance(src, AsyncIterable):
                async for chunk in src:
                    await self.write(chunk)
            else:
                for chunk in src:
                    await self.write(chunk)
            await self.close_stdin()
        except GondolinError:
            pass  # the process ended or the VM died: wait() reports that
        finally:
            self._stdin_task_done.set()

    # -- control -------------------------------------------------------------
    async def signal(self, signum: int = _signal.SIGTERM) -> None:
        """Send a signal to the process group of the command."""
        await self.start()
        if self._result is None:
            assert self._inbox is not None
            await self._link.control().send_message(T.SIGNAL, self._inbox.id, signal=int(signum))

    async def kill(self) -> None:
        await self.signal(_signal.SIGKILL)

    async def resize(self, rows: int, cols: int) -> None:
        """Change the PTY size (the process sees SIGWINCH)."""
        await self.start()
        if self._result is None:
            assert self._inbox is not None
            await self._link.control().send_message(T.RESIZE, self._inbox.id, rows=rows, cols=cols)

    # -- output --------------------------------------------------------------
    async def _next(self) -> OutputChunk | None:
        """Take the next message; return a piped chunk, or None when the process finished."""
        inbox = self._inbox
        assert inbox is not None
        while self._result is None:
            try:
                msg = await inbox.get(self._remaining(), what="end of the command it had to kill")
            except GuestTimeoutError:
                raise ExecTimeout(
                    f"the guest did not report the end of the command within its timeout of {self._timeout:g}s "
                    f"plus {self._link.timeouts.grace:g}s (frozen or overloaded guest)") from None
            if msg.t in (T.STDOUT, T.STDERR):
                mode = self._modes[msg.t]
                if mode == "pipe":
                    return OutputChunk(_STREAM[msg.t], msg.data)  # type: ignore[arg-type]
                if mode == "buffer":
                    self._buffers[msg.t].append(msg.data)
                await self._return_credit(msg.t, len(msg.data))
            elif msg.t == T.EXEC_STARTED:
                self.pid = int(msg.p.get("pid") or 0) or None
            elif msg.t == T.EXIT:
                self._finish(msg.p)
            elif msg.t == T.ERROR:
                inbox.close()
                raise ProtocolError(f"guest refused the command: {msg.p.get('message')}",
                                    code=str(msg.p.get("code") or "exec_failed"))
        return None

    def _remaining(self) -> float | None:
        """Seconds until the host gives up on a command run with ``timeout`` (the guest kills it
        at ``timeout``; a guest that does not report that within the grace is not answering)."""
        if self._timeout is None:
            return None
        return max(0.0, self._t0 + self._timeout + self._link.timeouts.grace - time.monotonic())

    async def _return_credit(self, t: int, n: int) -> None:
        self._unreturned[t] += n
        if self._unreturned[t] >= self._window // 4 and self._result is None:
            assert self._inbox is not None
            n, self._unreturned[t] = self._unreturned[t], 0
            self._inbox.grant(t, n)
            grant = {"stdout": n} if t == T.STDOUT else {"stderr": n}
            try:
                await self._link.control().send_message(T.CREDIT, self._inbox.id, b"", **grant)
            except GondolinError:
                pass  # surfaced by the next inbox.get()

    def _finish(self, p: dict[str, Any]) -> None:
        self._result = ExecResult(
            exit_code=int(p.get("exit_code", -1)),
            signal=p.get("signal"),
            stdout_bytes=b"".join(self._buffers[T.STDOUT]),
            stderr_bytes=b"".join(self._buffers[T.STDERR]),
            duration=time.monotonic() - self._t0,
            timed_out=bool(p.get("timed_out")),
        )
        self._buffers = {T.STDOUT: [], T.STDERR: []}
        if self._inbox is not None:
            self._inbox.close()

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[OutputChunk]:
        await self.start()
        while True:
            chunk = await self._next()
            if chunk is None:
                return
            yield chunk
            await self._return_credit(T.STDOUT if chunk.stream == "stdout" else T.STDERR, len(chunk.data))

    async def wait(self, timeout: float | None = None) -> ExecResult:
        """Wait for the process to exit. Unread piped output is discarded (credit is returned).

        ``timeout`` bounds this wait only (raises :class:`ExecTimeout`, the process keeps running);
        the ``timeout`` given to ``exec()`` kills the process in the guest instead.
        """
        await self.start()
        try:
            with anyio.fail_after(timeout) if timeout is not None else _nullcontext():
                while self._result is None:
                    chunk = await self._next()
                    if chunk is not None:
                        await self._return_credit(T.STDOUT if chunk.stream == "stdout" else T.STDERR,
                                                  len(chunk.data))
        except TimeoutError:
            raise ExecTimeout(f"command still running after {timeout}s") from None
        assert self._result is not None
        return self._result

    def __await__(self) -> Generator[Any, None, ExecResult]:
        return self.wait().__await__()

    # -- text helpers --------------------------------------------------------
    async def lines(self) -> AsyncIterator[str]:
        """Piped stdout as text lines (needs stdout="pipe")."""
        async for line in stdout_lines(self):
            yield line


async def stdout_lines(chunks: AsyncIterable[OutputChunk]) -> AsyncIterator[str]:
    """The stdout chunks of an output stream as text lines (UTF-8, errors replaced); the last
    line is yielded even without a final newline."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    async for chunk in chunks:
        if chunk.stream != "stdout":
            continue
        pending += decoder.decode(chunk.data)
        *complete, pending = pending.split("\n")
        for line in complete:
            yield line
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def normalize_command(command: str | list[str] | tuple[str, ...]) -> dict[str, Any]:
    if isinstance(command, str):
        if not command.strip():
            raise ValueError("command is empty")
        return {"shell": command}
    argv = [str(a) for a in command]
    if not argv:
        raise ValueError("command is empty")
    return {"argv": argv}

