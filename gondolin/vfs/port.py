"""The host end of the fs port: frames in, FS RPC service, frames out.

One virtio-serial port carries every mount. The guest FUSE daemon mounts a single FUSE
filesystem whose root is a :class:`~gondolin.vfs.router.MountRouter` over all the mounts
(so router paths are guest paths) and bind-mounts each mount point from it; see
``guest/fuse.py``. This module is the thin anyio driver around the sans-IO pieces:
:class:`~gondolin.vfs.wire.FrameSplitter` and :class:`~gondolin.vfs.rpc.FsRpcService`.
"""

from __future__ import annotations

import logging
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
QUEUE_DEPTH = 256  # decoded messages waiting for a free service slot; the port waits beyond this
_CLOSED = (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError)


class VfsServer:
    """Serves one VM's mounts on its fs port; :meth:`invalidate` reaches the guest kernel."""

    def __init__(self, mounts: Mapping[str, Provider], **service_options: Any) -> None:
        self.mounts = dict(mounts)
        self.root = single_or_router(self.mounts)
        self.service = FsRpcService(self.root, **service_options)

    def invalidate(self, path: str) -> None:
        """Drop what the guest kernel caches about the guest path ``path`` (changed on the host)."""
        self.service.invalidate(path)

    async def serve(self, stream: ByteStream) -> None:
        """Run until the stream ends or the task is cancelled; every open handle is released."""
        send_in, receive_in = anyio.create_memory_object_stream[bytes](QUEUE_DEPTH)
        send_out, receive_out = anyio.create_memory_object_stream[bytes](QUEUE_DEPTH)

        async def read_port() -> None:
            splitter = wire.FrameSplitter()
            async with send_in:
                while True:
                    try:
                        data = await stream.receive(READ_SIZE)
                    except _CLOSED:
                        return
                    try:
                        messages = splitter.feed(data)
                    except wire.WireError as exc:
                        # No way to find the next frame boundary: stop serving this port.
                        log.warning("fs port: %s; closing it", exc)
                        return
                    for message in messages:
                        await send_in.send(message)

        async def write_port() -> None:
            async with receive_out:
                async for message in receive_out:
                    try:
                        await stream.send(wire.encode_frame(message))
                    except _CLOSED:
                        return

        async def run_service() -> None:
            async with send_out:
                await self.service.serve(receive_in, send_out)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(write_port)
                tg.start_soon(run_service)
                await read_port()
                # The guest is gone or spoke garbage: nobody is left to answer.
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.service.aclose()
                await stream.aclose()


async def serve_vfs(stream: ByteStream, mounts: Mapping[str, Provider]) -> None:
    """Serve ``mounts`` on the fs port ``stream`` until it closes or this task is cancelled."""
    await VfsServer(mounts).serve(stream)


__all__ = ["VfsServer", "serve_vfs"]
