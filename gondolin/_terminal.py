"""An interactive terminal on a command in a VM: raw mode, resize, stdin and output pumps."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from typing import Any

import anyio


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    import termios
    import tty

    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)

def terminal_size() -> os.terminal_size:
    """The real size of our terminal (COLUMNS/LINES from the environment can be stale)."""
    for fd in (1, 0, 2):
        try:
            return os.get_terminal_size(fd)
        except OSError:
            continue
    return shutil.get_terminal_size()


async def piped_command(vm: Any, command: str | list[str], *, user: str | None = None, cwd: str | None = None,
                        forward_stdin: bool = True, **options: Any) -> Any:
    """Run ``command`` with plain pipes: this process's stdin forwarded until its end (then the
    command's stdin is closed, so a shell reading it exits), output streamed as it arrives.
    Returns the command's result. Works on a :class:`~gondolin.VM` and on a ``RemoteVM``."""
    if cwd is not None:
        options["cwd"] = cwd
    proc = await vm.start(command, user=user, stdin=True if forward_stdin else None, **options)
    async with anyio.create_task_group() as tg:
        async def pump_in() -> None:
            fd = sys.stdin.fileno()
            while data := await anyio.to_thread.run_sync(os.read, fd, 65536, abandon_on_cancel=True):
                await proc.write(data)
            await proc.close_stdin()

        if forward_stdin:
            tg.start_soon(pump_in)
        async for chunk in proc:
            out = sys.stdout.buffer if chunk.stream == "stdout" else sys.stderr.buffer
            out.write(chunk.data)
            out.flush()
        tg.cancel_scope.cancel()
    return await proc.wait()


async def interactive_shell(vm: Any, command: list[str], user: str | None = None, cwd: str | None = None) -> int:
    """Attach this terminal to a PTY command in the VM: raw mode, live resize, exit code back."""
    size = terminal_size()
    env = {"TERM": os.environ.get("TERM", "xterm-256color")}
    extra = {"cwd": cwd} if cwd is not None else {}
    proc = await vm.start(command, pty=True, rows=size.lines, cols=size.columns, stdin=True, stdout="pipe", env=env,
                          user=user, **extra)
    in_fd = sys.stdin.fileno()
    out = sys.stdout.buffer
    resized = anyio.Event()

    def on_winch(*_: object) -> None:
        resized.set()

    old = signal.signal(signal.SIGWINCH, on_winch) if os.isatty(in_fd) else None
    with raw_terminal(in_fd):
        async with anyio.create_task_group() as tg:
            async def pump_in() -> None:
                pollable = True
                os.set_blocking(in_fd, False)
                try:
                    while True:
                        if pollable:
                            try:
                                await anyio.wait_readable(in_fd)
                            except PermissionError:  # a regular file or /dev/null: epoll refuses it
                                pollable = False
                                os.set_blocking(in_fd, True)
                        try:
                            if pollable:
                                data = os.read(in_fd, 65536)
                            else:
                                data = await anyio.to_thread.run_sync(os.read, in_fd, 65536)
                        except BlockingIOError:
                            continue
                        if not data:
                            await proc.close_stdin()
                            return
                        await proc.write(data)
                finally:
                    os.set_blocking(in_fd, True)

            async def watch_size() -> None:
                nonlocal resized
                while True:
                    await resized.wait()
                    resized = anyio.Event()
                    s = terminal_size()
                    await proc.resize(s.lines, s.columns)

            tg.start_soon(pump_in)
            tg.start_soon(watch_size)
            async for chunk in proc:
                out.write(chunk.data)
                out.flush()
            tg.cancel_scope.cancel()
    if old is not None:
        signal.signal(signal.SIGWINCH, old)
    result = await proc.wait()
    return int(result.exit_code)
