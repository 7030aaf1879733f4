"""The host end of the fs port: frames in, FS RPC service, frames out.

One virtio-serial port carries every mount. The guest FUSE daemon mounts a single FUSE
filesystem whose root is a :class:`~gondolin.vfs.router.MountRouter` over all the mounts
(so router paths are guest paths) and bind-mounts each mount point from it; see
``guest/fuse.py``. This module is the thin anyio driver around the sans-IO pieces:
:class:`~gondolin.vfs.wire.FrameSplitter` and :class:`~gondolin.vfs.rpc.FsRpcService`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

import anyio
from anyio.abc import ByteStream

from . import wire
from .provider import Provider
from .router import single_or_router
from .rpc import FsRpcService

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20  # bytes asked of the stream per receive
# How long the guest kernel may trust what it was told. Changes made through the guest or
# through vm.fs are pushed to it at once (replies, invalidations); only changes made behind
# gondolin's back (another host process editing a RealFSProvider directory) wait for these.
# Measured: git status on 5,000 files, run twice, took 10.9 s + 10.9 s with 1 s and
# 10.3 s + 2.2 s with 10 s (the second run answered from the guest's caches).
CACHE_TTLS_MS = {"entry_ttl_ms": 10_000, "attr_ttl_ms": 10_000, "negative_ttl_ms": 1_000}
IDLE_BEFORE_HAND_OVER = 0.05  # s without port traffic before a session is handed over
HAND_OVER_MAX_BYTES = 64 << 20  # recorded replies a hand-over carries at most
_CLOSED = (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError)


class VfsServer:
    """Serves one VM's mounts on its fs port; :meth:`invalidate` reaches the guest kernel."""

    def __init__(self, mounts: Mapping[str, Provider], *, state: Any = None, **service_options: Any) -> None:
        """``state``: a session :meth:`FsRpcService.export_state` saved with the guest's memory
        (checkpoint, fork); when it is usable this server answers that session's node and file
        ids (``carried_over``), so the guest keeps its open files and working directories."""
        self.mounts = dict(mounts)
        self.root = single_or_router(self.mounts)
        # Ids no earlier session of this guest can hold (see FsRpcService's id_offset).
        offset = secrets.randbelow(1 << 46) << 16
        options = {**CACHE_TTLS_MS, "id_offset": offset, **service_options}
        self.service = FsRpcService(self.root, **options)
        self.shm = self.service.shm
        self._reopen: list[Any] = []
        self._replay: list[tuple[bytes, int | None, bytes]] = []
        self.carried_over = False
        if state is not None:
            try:
                self._reopen = self.service.import_state(state)
                self._replay = _replies(state.get("replies"))
                self.carried_over = True
            except (ValueError, TypeError) as exc:
                log.warning("the saved file-service session is unusable (%s): the guest mounts afresh", exc)
        # While a snapshot is taken: every reply sent (with a READ_SHM's span data), replayed by
        # the server that takes the session over (see hand_over); None when not recording.
        self._recorded: list[tuple[bytes, int | None, bytes]] | None = None
        self._recorded_bytes = 0
        self._in_flight = 0
        self._last_activity = 0.0

    # --- hand-over to the host of a restored copy (checkpoint, fork) -------------------------

    def begin_hand_over(self) -> None:
        """Start recording replies: call before the guest's memory is saved."""
        self._recorded, self._recorded_bytes = [], 0

    def end_hand_over(self) -> None:
        self._recorded, self._recorded_bytes = None, 0

    async def hand_over(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """This session for the server of a copy restored from the memory just saved (the guest
        is stopped now): node and file ids (:meth:`FsRpcService.export_state`) plus every reply
        sent since :meth:`begin_hand_over`, which the guest may not have received before it
        stopped; the new server sends them again (the guest drops a reply it already has).
        Waits (bounded) until no request is being answered. None when too much was sent to
        keep: the copy then mounts afresh."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.01)):  # polled: "nothing in flight and nothing new for a while"
            if self._quiet() or time.monotonic() > deadline:
                break
            await anyio.sleep(0.01)
        recorded = self._recorded
        if recorded is None or self._recorded_bytes > HAND_OVER_MAX_BYTES:
            return None
        state = self.service.export_state()
        state["replies"] = [[base64.b64encode(r).decode(), span, base64.b64encode(d).decode()]
                            for r, span, d in recorded]
        return state

    def _quiet(self) -> bool:
        return not self._in_flight and time.monotonic() - self._last_activity >= IDLE_BEFORE_HAND_OVER

    def _record(self, request: bytes, response: bytes) -> None:
        recorded = self._recorded
        if recorded is None:
            return
        span: int | None = None
        data = b""
        if request[1:2] == bytes([wire.Op.READ_SHM]) and self.shm is not None:
            try:
                body = wire.decode_request(request).body
                reply = wire.decode_response(response)
                if not reply.errno and isinstance(body, wire.ReadShm) and isinstance(reply.body, wire.SizeReply):
                    span = body.span
                    data = bytes(self.shm[span * wire.MAX_IO:span * wire.MAX_IO + reply.body.size])
            except wire.WireError:
                pass
        recorded.append((response, span, data))
        self._recorded_bytes += len(response) + len(data)

    def invalidate(self, path: str) -> None:
        """Drop what the guest kernel caches about the guest path ``path`` (changed on the host)."""
        self.service.invalidate(path)

    async def serve(self, stream: ByteStream) -> None:
        """Run until the stream ends or the task is cancelled; every open handle is released.

        Each request is answered from its own task (at most ``max_in_flight`` at once; the
        port is not read while all are busy), replies go out as they finish.
        """
        service = self.service
        if self._reopen:  # before the first request: the guest may use these handles at once
            rows, self._reopen = self._reopen, []
            log.debug("reopened %d of %d open files of the saved session", await service.reopen_files(rows), len(rows))
        lock = anyio.Lock()
        slots = anyio.Semaphore(service.max_in_flight)

        async def reply(message: bytes) -> None:
            frame = wire.encode_frame(message)
            async with lock:
                await stream.send(frame)

        replay, self._replay = self._replay, []
        for response, span, data in replay:  # the saved session's last answers (see hand_over)
            if span is not None and self.shm is not None and 0 <= span < wire.SHM_SPANS:
                self.shm[span * wire.MAX_IO:span * wire.MAX_IO + len(data)] = data[:wire.MAX_IO]
            with contextlib.suppress(*_CLOSED):
                await reply(response)

        async def one(message: bytes) -> None:
            self._in_flight += 1
            try:
                try:
                    response = await service.handle(message)
                finally:
                    slots.release()
                if response is not None:
                    self._record(message, response)
                    with contextlib.suppress(*_CLOSED):
                        await reply(response)
            finally:
                self._in_flight -= 1
                self._last_activity = time.monotonic()

        async def notifications() -> None:
            with contextlib.suppress(*_CLOSED):
                while True:
                    for note in await service.next_notifications():
                        await reply(note)

        splitter = wire.FrameSplitter()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(notifications)
                while True:
                    try:
                        data = await stream.receive(READ_SIZE)
                        self._last_activity = time.monotonic()
                        messages = splitter.feed(data)
                    except _CLOSED:
                        break
                    except wire.WireError as exc:
                        # No way to find the next frame boundary: stop serving this port.
                        log.warning("fs port: %s; closing it", exc)
                        break
                    for message in messages:
                        await slots.acquire()
                        tg.start_soon(one, message)
                # The guest is gone or spoke garbage: nobody is left to answer.
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await service.aclose()
                await stream.aclose()


def _replies(raw: Any) -> list[tuple[bytes, int | None, bytes]]:
    """The recorded replies of a saved session (see :meth:`VfsServer.hand_over`)."""
    out = []
    for row in raw or []:
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                and (row[1] is None or type(row[1]) is int) and isinstance(row[2], str)):
            raise ValueError("bad recorded reply")
        out.append((base64.b64decode(row[0]), row[1], base64.b64decode(row[2])))
    return out


async def serve_vfs(stream: ByteStream, mounts: Mapping[str, Provider]) -> None:
    """Serve ``mounts`` on the fs port ``stream`` until it closes or this task is cancelled."""
    await VfsServer(mounts).serve(stream)


__all__ = ["VfsServer", "serve_vfs"]
