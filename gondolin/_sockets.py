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

import os
import socket
from typing import Any

import anyio
from anyio.abc import ByteStream

RECEIVE_MAX = 1 << 20
BACKLOG = 16


class UnixStream(ByteStream):
    """One connected, non-blocking unix stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                data = self._sock.recv(min(max_bytes, RECEIVE_MAX))
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                continue
            except OSError as exc:
                if self._closed:
                    raise anyio.ClosedResourceError from None
                raise anyio.BrokenResourceError from exc
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                await anyio.wait_writable(self._sock)
                continue
            except OSError as exc:
                if self._closed:
                    raise anyio.ClosedResourceError from None
                raise anyio.BrokenResourceError from exc
            view = view[sent:]

    async def send_eof(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise anyio.BrokenResourceError from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._sock)
            self._sock.close()
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Any:
        return {}


class UnixListener:
    """A listening unix socket at ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)  # in a run directory only its owner can enter
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._closed = False

    async def accept(self) -> UnixStream:
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                continue
            except OSError as exc:
                if self._closed:
                    raise anyio.ClosedResourceError from None
                raise anyio.BrokenResourceError from exc
            return UnixStream(conn)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._sock)
            self._sock.close()
        await anyio.lowlevel.checkpoint()

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
