"""Unix sockets for a VM's long-lived ports (control, network, files, registry).

anyio's own asyncio socket streams wait for readability with a reader callback that sets a
future's result without checking that the future is still pending. When a reader task is
cancelled in the same loop iteration as its socket turns readable (a guest that resumes and
sends while its VM is being closed), the event loop reports ``InvalidStateError``. These
streams wait with :func:`anyio.wait_readable` / :func:`anyio.wait_writable`, which do not have
that race, and otherwise behave as anyio's ``ByteStream`` (``EndOfStream`` at EOF,
``ClosedResourceError`` after ``aclose``, ``BrokenResourceError`` on a reset).
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from anyio.abc import ByteStream

T = TypeVar("T")
RECEIVE_MAX = 1 << 20
BACKLOG = 16


class _Socket:
    """A non-blocking socket: one retry loop for its calls, one way to close it."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False

    async def _call(self, op: Callable[[], T], wait: Callable[[socket.socket], Awaitable[None]]) -> T:
        """``op()``, retried after ``wait(sock)`` while it would block; anyio's errors for a
        closed or broken socket."""
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                return op()
            except BlockingIOError:
                await wait(self._sock)
            except OSError as exc:
                if self._closed:
                    raise anyio.ClosedResourceError from None
                raise anyio.BrokenResourceError from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._sock)
            self._sock.close()
        await anyio.lowlevel.checkpoint()


class UnixStream(_Socket, ByteStream):
    """One connected, non-blocking unix stream socket."""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self._call(lambda: self._sock.recv(min(max_bytes, RECEIVE_MAX)), anyio.wait_readable)
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            sent = await self._call(functools.partial(self._sock.send, view), anyio.wait_writable)
            view = view[sent:]

    async def send_eof(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise anyio.BrokenResourceError from exc

    @property
    def extra_attributes(self) -> Any:
        return {}


class UnixListener(_Socket):
    """A listening unix socket at ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)  # in a run directory only its owner can enter
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        super().__init__(sock)

    async def accept(self) -> UnixStream:
        conn, _ = await self._call(self._sock.accept, anyio.wait_readable)
        return UnixStream(conn)

    async def __aenter__(self) -> UnixListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def connect_unix(path: str | os.PathLike[str]) -> UnixStream:
    """Connect to a unix socket (non-blocking; a listener's backlog answers at once)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        try:
            sock.connect(os.fspath(path))
        except BlockingIOError:
            await anyio.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err)) from None
    except BaseException:
        sock.close()
        raise
    return UnixStream(sock)


__all__ = ["UnixListener", "UnixStream", "connect_unix"]
