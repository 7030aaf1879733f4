"""Running commands of the tools: a guest command whose output is pumped into bounded buffers.

The ``exec`` tool waits a short while for the command; if it is still running, it
lives on under an ``exec_id`` so the model can poll it, write to its stdin or kill it. The
pump always drains the guest (so the guest never blocks on a full pipe) and keeps at most
``buffer_bytes`` of unread output per stream, head and tail.
"""

from __future__ import annotations

import signal as _signal
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import anyio

from gondolin.errors import GondolinError
from gondolin.exec import ExecProcess, ExecResult

from .errors import ToolError, translate
from .output import Clip, HeadTailBuffer, Redactor, render_clip

Status = Literal["exited", "running", "timed_out", "killed"]
ProgressFn = Callable[[float, float | None, str], Awaitable[None]]
PROGRESS_INTERVAL_S = 1.0  # how often a waiting exec reports progress
KILL_GRACE_S = 5.0  # how long a kill waits for the guest to report the exit

SIGNALS = {"KILL": _signal.SIGKILL, "TERM": _signal.SIGTERM, "INT": _signal.SIGINT, "HUP": _signal.SIGHUP}


class CommandRun:
    def __init__(self, exec_id: str, proc: ExecProcess, command: str, *, buffer_bytes: int,
                 redactor: Redactor, stdin_open: bool) -> None:
        self.exec_id = exec_id
        self.command = command
        self.proc = proc
        self._redactor = redactor
        self._buffers = {"stdout": HeadTailBuffer(buffer_bytes), "stderr": HeadTailBuffer(buffer_bytes)}
        self.done = anyio.Event()
        self.result: ExecResult | None = None
        self.error: ToolError | None = None
        self.killed = False
        self.stdin_open = stdin_open
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        self._scope = anyio.CancelScope()

    # -- the pump, owned by the manager's task group -----------------------------------------
    async def run(self) -> None:
        with self._scope:
            try:
                async for chunk in self.proc:
                    self._buffers[chunk.stream].append(chunk.data)
                self.result = await self.proc.wait()
            except GondolinError as exc:
                self.error = translate(exc)
            finally:
                self.finished_at = time.monotonic()
                self.stdin_open = False
                self.done.set()

    def cancel(self) -> None:
        """Stop pumping (the sandbox is going away)."""
        self._scope.cancel()
        if not self.done.is_set():
            self.error = ToolError("sandbox_not_running", "the sandbox was destroyed while this command ran")
            self.done.set()

    # -- queries ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return not self.done.is_set()

    @property
    def status(self) -> Status:
        if not self.done.is_set():
            return "running"
        if self.result is not None and self.result.timed_out:
            return "timed_out"
        if self.killed:
            return "killed"
        return "exited"

    @property
    def duration(self) -> float:
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        return end - self.started_at

    def total_bytes(self, stream: str) -> int:
        return self._buffers[stream].total

    async def wait(self, timeout: float, progress: ProgressFn | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the command to end; True when it has."""
        deadline = anyio.current_time() + timeout
        while not self.done.is_set():
            left = deadline - anyio.current_time()
            if left <= 0:
                break
            with anyio.move_on_after(min(left, PROGRESS_INTERVAL_S) if progress else left):
                await self.done.wait()
            if progress is not None and not self.done.is_set():
                out = self.total_bytes("stdout") + self.total_bytes("stderr")
                await progress(round(self.duration, 1), None,
                               f"{self.command[:60]!s}: running for {self.duration:.0f}s, {out} bytes of output")
        return self.done.is_set()

    def take(self, stream: str, limit: int) -> Clip:
        """Unread output of one stream, redacted, cut to ``limit`` bytes; marks it read."""
        buf = self._buffers[stream]
        hold = 0
        if self.running and self._redactor:
            view = buf.view()
            hold = self._redactor.pending_prefix(view.tail if view.omitted else view.head + view.tail)
        clip = buf.take(hold)
        return self._redactor.redact_clip(clip.clip(limit))

    def take_text(self, stream: str, limit: int) -> tuple[str, int]:
        clip = self.take(stream, limit)
        return render_clip(clip), clip.omitted

    # -- control ---------------------------------------------------------------------------
    async def write(self, data: str) -> int:
        if not self.stdin_open:
            raise ToolError("invalid_argument", "this command's stdin is closed",
                            "Start the command with stdin_open=true to write to it later.")
        if not self.running:
            raise ToolError("invalid_argument", "the command has already finished")
        payload = data.encode()
        try:
            await self.proc.write(payload)
        except GondolinError as exc:
            raise translate(exc) from exc
        return len(payload)

    async def close_stdin(self) -> None:
        if self.stdin_open:
            self.stdin_open = False
            try:
                await self.proc.close_stdin()
            except GondolinError as exc:
                raise translate(exc) from exc

    async def send_signal(self, name: str) -> None:
        if not self.running:
            return
        self.killed = True  # every signal offered here asks the command to stop
        try:
            await self.proc.signal(SIGNALS[name])
        except GondolinError as exc:
            raise translate(exc) from exc

    async def kill_quietly(self) -> None:
        """Kill the guest process; used on cancellation, so it never raises."""
        if not self.running:
            return
        self.killed = True
        try:
            with anyio.move_on_after(KILL_GRACE_S):
                await self.proc.kill()
                await self.done.wait()
        except GondolinError:
            pass  # the VM is gone, and so is the process
