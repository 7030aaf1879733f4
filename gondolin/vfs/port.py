"""The host end of the fs port: frames in, FS RPC service, frames out.

One virtio-serial port carries every mount. The guest FUSE daemon mounts a single FUSE
filesystem whose root is a :class:`~gondolin.vfs.router.MountRouter` over all the mounts
(so router paths are guest paths) and bind-mounts each mount point from it; see
``guest/fuse.py``. This module is the thin anyio driver around the sans-IO pieces:
:class:`~gondolin.vfs.wire.FrameSplitter` and :class:`~gondolin.vfs.rpc.FsRpcService`.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
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
_CLOSED = (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError)


class VfsServer:
    """Serves one VM's mounts on its fs port; :meth:`invalidate` reaches the guest kernel."""

    def __init__(self, mounts: Mapping[str, Provider], **service_options: Any) -> None:
        self.mounts = dict(mounts)
        self.root = single_or_router(self.mounts)
        # Ids no earlier session of this guest can hold (see FsRpcService's id_offset).
        offset = secrets.randbelow(1 << 46) << 16
        options = {**CACHE_TTLS_MS, "id_offset": offset, **service_options}
        self.service = FsRpcService(self.root, **options)

    def invalidate(self, path: str) -> None:
        """Drop what the guest kernel caches about the guest path ``path`` (changed on the host)."""
        self.service.invalidate(path)

    async def serve(self, stream: ByteStream) -> None:
        """Run until the stream ends or the task is cancelled; every open handle is released.

        Each request is answered from its own task (at most ``max_in_flight`` at once; the
        port is not read while all are busy), replies go out as they finish.
        """
        service = self.service
        lock = anyio.Lock()
        slots = anyio.Semaphore(service.max_in_flight)

        async def reply(message: bytes) -> None:
            frame = wire.encode_frame(message)
            async with lock:
                await stream.send(frame)

        async def one(message: bytes) -> None:
            try:
                response = await service.handle(message)
            finally:
                slots.release()
            if response is not None:
                with contextlib.suppress(*_CLOSED):
                    await reply(response)

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


async def serve_vfs(stream: ByteStream, mounts: Mapping[str, Provider]) -> None:
    """Serve ``mounts`` on the fs port ``stream`` until it closes or this task is cancelled."""
    await VfsServer(mounts).serve(stream)


__all__ = ["VfsServer", "serve_vfs"]
