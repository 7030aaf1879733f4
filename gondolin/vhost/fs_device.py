"""A ``vhost-user-fs`` device served from this process: the guest kernel's virtiofs driver,
answered from the same FS RPC service the FUSE daemon path uses.

QEMU (the frontend) connects to our unix socket, shares guest RAM as memfd regions and hands
us each virtqueue's kick and call eventfds. Each request queue is drained by one task: a
descriptor chain holds a FUSE request (header and arguments, data of a WRITE included) and
the buffers for its reply. The FUSE side is :class:`guest.fuse.FuseSession` — the same
translation the guest daemon runs — and the file side is :class:`~gondolin.vfs.rpc.FsRpcService`
in this process, so the providers, bounds and node table are those of the existing path; what
goes is the guest daemon and the 4 KiB virtio-serial hops.

Queue 0 is virtiofs's high-priority queue (FORGET, INTERRUPT), the others carry requests.
Replies are written straight into the chain's guest pages; the eventfd is signalled only when
the guest asked for it (notification suppression).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

import anyio

from guest.fuse import IN_HEADER, OUT_HEADER, TO_FUSE, TO_PORT, FuseSession

from ..vfs import wire
from ..vfs.port import VfsServer
from .protocol import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    DeviceState,
    MessageReader,
    Request,
    VhostUserError,
    Vring,
)
from .virtqueue import Chain, SplitQueue, VirtqueueError

log = logging.getLogger(__name__)

REQUEST_QUEUES = 1
MAX_FDS = 8
STOP_TIMEOUT = 10.0  # seconds a stopping ring waits for the requests it already took


def _unframe(pieces: Sequence[bytes | memoryview]) -> bytes:
    """The FS RPC message in a frame FuseSession built (length prefix, then its pieces), one copy."""
    return b"".join([memoryview(pieces[0])[wire.FRAME_HEADER.size:], *pieces[1:]])


class VirtioFsDevice:
    """Serve ``vfs`` (its providers) to a guest through QEMU's ``vhost-user-fs-pci`` device."""

    def __init__(self, vfs: VfsServer) -> None:
        self.vfs = vfs
        self.state = DeviceState(1 + REQUEST_QUEUES, (1 << F_RING_INDIRECT_DESC) | (1 << F_RING_EVENT_IDX))
        self.session: FuseSession | None = None
        self.requests = 0
        self.bad_requests = 0
        # Per running ring: the scope of its kick loop, and an event set once the ring's task
        # (its requests in flight included) is over.
        self._pumps: dict[int, anyio.CancelScope] = {}
        self._done: dict[int, anyio.Event] = {}

    async def _hello(self) -> FuseSession:
        message = _unframe(wire.request_frame(0, wire.Hello, (wire.VERSION, wire.MAX_IO, 0)))
        response = await self.vfs.service.handle(message)
        assert response is not None
        body = wire.decode_response(response).body
        if not isinstance(body, wire.HelloReply):
            raise VhostUserError("the file service did not answer hello")
        return FuseSession(body)

    async def serve(self, sock: socket.socket) -> None:
        """Run the vhost-user conversation on ``sock`` (connected, from QEMU) until it closes."""
        sock.setblocking(False)
        self.session = await self._hello()
        reader = MessageReader()
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    await anyio.wait_readable(sock)
                    try:
                        data, fds, _flags, _addr = socket.recv_fds(sock, 65536, MAX_FDS)
                    except BlockingIOError:
                        continue
                    except OSError:
                        break
                    if not data:
                        for fd in fds:
                            os.close(fd)
                        break
                    for msg in reader.feed(data, fds):
                        if msg.request == Request.GET_VRING_BASE and len(msg.payload) >= 4:
                            # The frontend stops the ring (the VM is paused or stopped): finish
                            # the requests already taken, so the index reported is where the
                            # ring really is and nothing answers into it after the reply.
                            await self._stop_queue(int.from_bytes(msg.payload[:4], "little"))
                        try:
                            reply = self.state.handle(msg)
                        except VhostUserError:
                            for fd in msg.fds:
                                os.close(fd)
                            raise
                        for index in reply.stopped:
                            pump = self._pumps.get(index)
                            if pump is not None:
                                pump.cancel()
                        for fd in reply.close_fds:
                            anyio.notify_closing(fd)  # a kick loop waiting on it wakes up
                            os.close(fd)
                        if reply.data:
                            sock.sendall(reply.data)
                        for index in reply.started:
                            await self._stop_queue(index)  # one task per ring, never two
                            self._done[index] = anyio.Event()
                            tg.start_soon(self._run_queue, index)
                tg.cancel_scope.cancel()
        finally:
            for fd in self.state.close():
                with contextlib.suppress(OSError):
                    os.close(fd)
            sock.close()

    def _queue(self, index: int) -> SplitQueue:
        vring = self.state.vrings[index]
        memory = self.state.memory
        if memory is None or vring.addr is None:
            raise VhostUserError(f"vring {index} started before the memory table or its addresses")
        event_idx = bool(self.state.features & (1 << F_RING_EVENT_IDX))
        return SplitQueue(memory, vring.size, memory.guest_addr(vring.addr.desc_user_addr),
                          memory.guest_addr(vring.addr.avail_user_addr),
                          memory.guest_addr(vring.addr.used_user_addr), next_avail=vring.base,
                          event_idx=event_idx)

    async def _stop_queue(self, index: int) -> None:
        """Stop ring ``index``'s kick loop and wait (bounded) until its requests are answered."""
        pump, done = self._pumps.get(index), self._done.get(index)
        if pump is not None:
            pump.cancel()
        if done is not None:
            with anyio.move_on_after(STOP_TIMEOUT):
                await done.wait()

    async def _run_queue(self, index: int) -> None:
        vring = self.state.vrings[index]
        done = self._done.setdefault(index, anyio.Event())
        try:
            queue = self._queue(index)
        except BaseException:
            done.set()
            raise
        pump = anyio.CancelScope()
        self._pumps[index] = pump
        try:
            async with anyio.create_task_group() as tg:
                with pump:
                    await self._pump(index, vring, queue, tg)
                # Stopped (or the ring broke): the requests already taken finish first.
        finally:
            if self._pumps.get(index) is pump:
                del self._pumps[index]
            vring.base = queue.next_avail
            queue.release()
            done.set()

    async def _pump(self, index: int, vring: Vring, queue: SplitQueue, tg: Any) -> None:
        while vring.ready and vring.kick_fd is not None:
            kick = vring.kick_fd  # the frontend may replace kick and call fds at any time
            try:
                os.eventfd_read(kick)
            except BlockingIOError:
                try:
                    await anyio.wait_readable(kick)
                except anyio.ClosedResourceError:
                    pass  # replaced or stopped: look at the ring again
                continue
            while True:
                try:
                    chain = queue.pop()
                except VirtqueueError as exc:
                    log.warning("virtiofs queue %d: %s; the queue stops", index, exc)
                    return
                if chain is None:
                    break
                tg.start_soon(self._answer, queue, chain, vring)

    async def _answer(self, queue: SplitQueue, chain: Chain, vring: Vring) -> None:
        session = self.session
        assert session is not None
        self.requests += 1
        request = chain.read()
        written = 0
        if len(request) >= IN_HEADER.size:
            outs = session.fuse_request(request)
            while outs:
                dest, pieces = outs.pop(0)
                if dest == TO_PORT:
                    response = await self.vfs.service.handle(_unframe(pieces))
                    if response is not None:
                        outs.extend(session.port_message(response))
                elif dest == TO_FUSE:
                    try:
                        for piece in pieces:
                            written += chain.write(piece, written)
                    except VirtqueueError:
                        self.bad_requests += 1
                        unique = IN_HEADER.unpack_from(request)[2]
                        header = OUT_HEADER.pack(OUT_HEADER.size, -errno.EIO, unique)
                        written = chain.write(header) if chain.writable_len >= OUT_HEADER.size else 0
        else:
            self.bad_requests += 1
        queue.push(chain, written)
        if vring.call_fd is not None and queue.should_notify():
            with contextlib.suppress(OSError):
                os.eventfd_write(vring.call_fd, 1)


async def serve_virtiofs(listener: socket.socket, vfs: VfsServer) -> VirtioFsDevice:
    """Accept QEMU's one connection on ``listener`` and serve it until it closes."""
    listener.setblocking(False)
    while True:
        await anyio.wait_readable(listener)
        try:
            conn, _ = listener.accept()
            break
        except BlockingIOError:
            continue
    device = VirtioFsDevice(vfs)
    await device.serve(conn)
    return device

