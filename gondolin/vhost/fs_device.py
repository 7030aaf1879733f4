"""A ``vhost-user-fs`` device served from this process: the guest kernel's virtiofs driver,
answered from the same FS RPC service the FUSE daemon path uses.

QEMU (the frontend) connects to our unix socket, shares guest RAM as memfd regions and hands
us each virtqueue's kick and call eventfds. Queue 0 is virtiofs's high-priority queue (FORGET,
INTERRUPT), the others carry requests; a descriptor chain holds one FUSE request (header and
arguments, the data of a WRITE included) and the buffers for its reply.

Each running queue has a worker thread (:class:`_Ring`) that waits on the kick eventfd (with
a timeout, so it always notices a stop), pops every available chain and answers the data path
itself: a READ or WRITE on a file whose handle offers :class:`~gondolin.vfs.provider.DirectIO`
(a host file: ``RealFSProvider``, also behind the mount router, a read-only wrapper or a
copy-on-write upper layer that is one) is one ``preadv`` into the chain's device-writable
guest pages or one ``pwritev`` from its device-readable ones: one copy, no wire encoding, no
event-loop hop. Kicks stay suppressed while the thread drains (``avail_event`` is moved only
when it has run dry, then the ring is checked again) and the call eventfd is written only when
the guest asked for it (event idx).

Every other request is handed to the event loop (a deque and an eventfd), where
:class:`guest.fuse.FuseSession` — the same translation the guest daemon runs — turns it into an
FS RPC message for :class:`~gondolin.vfs.rpc.FsRpcService`, so the providers, bounds and node
table are those of the existing path. At most :data:`MAX_HANDED_OFF` chains per queue wait for
the loop; past that the thread stops popping until some are answered, so a guest that floods the
queue (or posts huge requests) makes the host hold a bounded amount of memory.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Sequence

import anyio

from guest.fuse import (
    CREATE,
    FOPEN_DIRECT_IO,
    FOPEN_KEEP_CACHE,
    IN_HEADER,
    OPEN,
    OPEN_OUT,
    OUT_HEADER,
    READ,
    READ_IN,
    TO_FUSE,
    TO_PORT,
    WRITE,
    WRITE_OUT,
    FuseSession,
)

from ..errors import GondolinError
from ..vfs import wire
from ..vfs.errors import VfsError, linux_errno
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
POLL_TIMEOUT_MS = 500  # a worker looks at its stop flag at least this often
MAX_HANDED_OFF = 32  # chains per queue waiting for the event loop; then the worker stops popping
# The most bytes of one request that are copied out of guest memory for the event-loop path:
# a WRITE of wire.MAX_IO plus its headers. The FUSE buffer of the guest daemon is the same.
MAX_REQUEST = wire.MAX_IO + 2 * 4096
# A chain's buffers together: a READ's reply of wire.MAX_IO plus headers, with room to spare.
MAX_CHAIN_BYTES = 4 * wire.MAX_IO
_DATA_HEAD = IN_HEADER.size + READ_IN.size  # fuse_in_header + fuse_read_in / fuse_write_in
# Requests a queue held before these messages: the ring is stopped around them and restarted
# (QEMU sends them before starting a ring; a frontend that does so later gets correct answers).
_RESTART = (Request.SET_MEM_TABLE, Request.SET_VRING_KICK, Request.SET_VRING_ADDR, Request.SET_VRING_NUM)


def _unframe(pieces: Sequence[bytes | memoryview]) -> bytes:
    """The FS RPC message in a frame FuseSession built (length prefix, then its pieces), one copy."""
    return b"".join([memoryview(pieces[0])[wire.FRAME_HEADER.size:], *pieces[1:]])


def _gather(buffers: Sequence[memoryview], size: int) -> bytes | memoryview:
    """The first ``size`` bytes of ``buffers`` (fewer if they hold less); no copy when the first
    buffer holds them all."""
    if buffers and len(buffers[0]) >= size:
        return buffers[0][:size]
    out = bytearray()
    for buf in buffers:
        out += buf[:size - len(out)]
        if len(out) >= size:
            break
    return bytes(out)


def _span(buffers: Sequence[memoryview], offset: int, size: int) -> list[memoryview]:
    """Views of ``size`` bytes of ``buffers`` from ``offset`` on (fewer where they end)."""
    out: list[memoryview] = []
    for buf in buffers:
        if size <= 0:
            break
        n = len(buf)
        if offset >= n:
            offset -= n
            continue
        if not offset and n <= size:
            out.append(buf)  # the common case: whole pages, no new view
            size -= n
            continue
        piece = buf[offset:offset + size]
        out.append(piece)
        size -= len(piece)
        offset = 0
    return out


class _Ring:
    """One running virtqueue: its worker thread and what it shares with the event loop."""

    def __init__(self, device: VirtioFsDevice, index: int, vring: Vring, queue: SplitQueue) -> None:
        self.device = device
        self.index = index
        self.vring = vring
        self.queue = queue
        assert vring.kick_fd is not None
        self.kick = os.dup(vring.kick_fd)  # the worker's own: the loop may close the original
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # loop -> worker
        self.handoff = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # worker -> loop
        self.inbox: collections.deque[Chain] = collections.deque()
        self.handed_off = 0  # chains given to the loop and not yet answered (under device.lock)
        self.stopping = False
        self.exited = False  # set by the worker as it ends, after its last hand-off
        self.broken = False
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()
        self.thread = threading.Thread(target=self._work, name=f"virtiofs-queue-{index}", daemon=True)

    # --- worker thread -------------------------------------------------------------------------

    def _work(self) -> None:
        poller = select.poll()
        poller.register(self.kick, select.POLLIN)
        poller.register(self.wake, select.POLLIN)
        try:
            while not self.stopping:
                self._drain()
                if self.stopping:
                    break
                poller.poll(POLL_TIMEOUT_MS)
                for fd in (self.kick, self.wake):
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
        except VirtqueueError as exc:
            log.warning("virtiofs queue %d: %s; the queue stops", self.index, exc)
            self.broken = True
        except Exception:  # a bug here must not take the device down silently
            log.exception("virtiofs queue %d: worker failed; the queue stops", self.index)
            self.broken = True
        finally:
            self.exited = True
            with contextlib.suppress(OSError):
                os.eventfd_write(self.handoff, 1)  # the loop looks once more

    def _drain(self) -> None:
        """Answer or hand off every available chain, then re-arm kicks and look again."""
        queue = self.queue
        queue.quiet()
        while not self.stopping:
            while self.handed_off < MAX_HANDED_OFF:
                chain = queue.pop(arm=False)
                if chain is None:
                    break
                self.device.requests += 1
                if not self._direct(chain):
                    with self.device.lock:
                        self.handed_off += 1
                    self.inbox.append(chain)
                    os.eventfd_write(self.handoff, 1)
            if self.handed_off >= MAX_HANDED_OFF:
                return  # the loop writes ``wake`` when it has answered some
            if not queue.arm_kick():
                return

    def _direct(self, chain: Chain) -> bool:
        """Answer a READ or WRITE on a DirectIO handle here; False hands the chain to the loop."""
        head = _gather(chain.readable, _DATA_HEAD)
        if len(head) < _DATA_HEAD:
            return False
        length, op, unique = IN_HEADER.unpack_from(head)[:3]
        if op != READ and op != WRITE:
            return False
        fh, offset, size = READ_IN.unpack_from(head, IN_HEADER.size)[:3]
        device = self.device
        io = device.vfs.service.direct_io(fh)
        if io is None:
            return False
        err = 0
        if op == READ:
            if chain.writable_len < OUT_HEADER.size:
                return False  # the loop answers it as a malformed request
            size = min(size, device.max_io)
            try:
                n = io.readinto(offset, _span(chain.writable, OUT_HEADER.size, size))
            except Exception as exc:  # noqa: BLE001 - a provider's bug is an EIO, not a dead queue
                n, err = 0, _errno(exc)
            reply: bytes = OUT_HEADER.pack(OUT_HEADER.size + n, -err, unique)
            device.bytes_read += n
        else:
            if chain.writable_len < OUT_HEADER.size + WRITE_OUT.size:
                return False
            if size > wire.MAX_IO or _DATA_HEAD + size > min(length, chain.readable_len):
                n, err = 0, errno.EINVAL
            else:
                try:
                    n = io.writefrom(offset, _span(chain.readable, _DATA_HEAD, size))
                except Exception as exc:  # noqa: BLE001
                    n, err = 0, _errno(exc)
            if err:
                reply = OUT_HEADER.pack(OUT_HEADER.size, -err, unique)
            else:
                reply = OUT_HEADER.pack(OUT_HEADER.size + WRITE_OUT.size, 0, unique) + WRITE_OUT.pack(n, 0)
            device.bytes_written += n
        chain.write(reply)
        device.direct_requests += 1
        self.complete(chain, OUT_HEADER.size + n if op == READ and not err else len(reply))
        return True

    # --- both sides ----------------------------------------------------------------------------

    def complete(self, chain: Chain, written: int, handed_off: bool = False) -> None:
        """Put ``chain`` on the used ring and signal the guest if it asked to be."""
        device = self.device
        with device.lock:
            self.queue.push(chain, written)
            if self.queue.should_notify():
                fd = self.vring.call_fd
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.eventfd_write(fd, 1)
            if handed_off:
                self.handed_off -= 1
                resume = self.handed_off == MAX_HANDED_OFF - 1
            else:
                resume = False
        if resume:
            self.poke()

    def poke(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self.wake, 1)

    def close_fds(self) -> None:
        for fd in (self.kick, self.wake, self.handoff):
            with contextlib.suppress(OSError):
                os.close(fd)


def _errno(exc: BaseException) -> int:
    if isinstance(exc, VfsError):
        return exc.errno or errno.EIO
    if isinstance(exc, OSError):
        return linux_errno(exc.errno)
    log.error("virtiofs: direct I/O failed", exc_info=exc)
    return errno.EIO


CACHE_MODES = ("auto", "none")


def _uncached(pieces: Sequence[bytes | memoryview]) -> tuple[bytes | memoryview, ...]:
    """An OPEN or CREATE reply with FOPEN_DIRECT_IO set (and the page cache not kept)."""
    if OUT_HEADER.unpack_from(pieces[0])[1] or len(pieces[-1]) != OPEN_OUT.size:
        return tuple(pieces)  # an error, or not the shape of an open reply
    fh, flags, pad = OPEN_OUT.unpack(pieces[-1])
    flags = (flags | FOPEN_DIRECT_IO) & ~FOPEN_KEEP_CACHE
    return (*pieces[:-1], OPEN_OUT.pack(fh, flags, pad))


class VirtioFsDevice:
    """Serve ``vfs`` (its providers) to a guest through QEMU's ``vhost-user-fs-pci`` device.

    ``cache="auto"`` (the default) lets the guest kernel keep file pages in its page cache, as
    the FUSE daemon path does. (Opening write-only files with ``FOPEN_DIRECT_IO`` was tried and
    dropped: direct I/O through the guest kernel's 6.1 virtiofs driver corrupted guest kernel
    memory within minutes of repeated ``git status`` runs; see docs/filesystem.md.) ``cache="none"``
    (not used by ``VM.create``, for measurements only, with that caveat) opens every file with
    ``FOPEN_DIRECT_IO`` (what
    virtiofsd's ``--cache=none`` and 9p's ``cache=none`` do): reads and writes go straight
    between the guest process's own pages and the host file, no guest page-cache copy, which
    under TCG is most of the cost of a large read or write. The price: the guest kernel (6.1)
    refuses ``mmap(MAP_SHARED)`` of such files (ENODEV; private mappings and exec work) and
    every read goes to the host.
    """

    def __init__(self, vfs: VfsServer, *, cache: str = "auto") -> None:
        if cache not in CACHE_MODES:
            raise GondolinError(f"virtiofs cache mode {cache!r} is not one of {', '.join(CACHE_MODES)}; "
                                "use 'auto' (guest page cache) or 'none' (direct I/O)", code="virtiofs_cache")
        self.vfs = vfs
        self.cache = cache
        self.state = DeviceState(1 + REQUEST_QUEUES, (1 << F_RING_INDIRECT_DESC) | (1 << F_RING_EVENT_IDX))
        self.session: FuseSession | None = None
        self.max_io = wire.MAX_IO
        self.requests = 0
        self.bad_requests = 0
        self.direct_requests = 0  # READ/WRITE answered by a worker thread (no event-loop hop)
        self.bytes_read = 0
        self.bytes_written = 0
        # Used-ring updates, notifications and the frontend's fds: taken briefly by the worker
        # threads and by the event loop (which replaces and closes fds under it).
        self.lock = threading.Lock()
        self._rings: dict[int, _Ring] = {}

    async def _hello(self) -> FuseSession:
        message = _unframe(wire.request_frame(0, wire.Hello, (wire.VERSION, wire.MAX_IO, 0)))
        response = await self.vfs.service.handle(message)
        assert response is not None
        body = wire.decode_response(response).body
        if not isinstance(body, wire.HelloReply):
            raise VhostUserError("the file service did not answer hello")
        return FuseSession(body)

    @property
    def threads(self) -> list[threading.Thread]:
        """The worker threads now running (one per started queue)."""
        return [r.thread for r in self._rings.values() if r.thread.is_alive()]

    async def serve(self, sock: socket.socket) -> None:
        """Run the vhost-user conversation on ``sock`` (connected, from QEMU) until it closes."""
        sock.setblocking(False)
        self.session = await self._hello()
        self.max_io = self.session.max_io
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
                        restart: list[int] = []
                        if msg.request == Request.GET_VRING_BASE and len(msg.payload) >= 4:
                            # The frontend stops the ring (the VM is paused or stopped): finish
                            # the requests already taken, so the index reported is where the
                            # ring really is and nothing answers into it after the reply.
                            await self._stop_queue(int.from_bytes(msg.payload[:4], "little"))
                        elif msg.request in _RESTART:
                            restart = list(self._rings)
                            for index in restart:
                                await self._stop_queue(index)
                        with self.lock:  # no worker uses a call fd while it is replaced
                            try:
                                reply = self.state.handle(msg)
                            except VhostUserError:
                                for fd in msg.fds:
                                    os.close(fd)
                                raise
                            for fd in reply.close_fds:
                                anyio.notify_closing(fd)
                                os.close(fd)
                        for index in reply.stopped:
                            await self._stop_queue(index)
                        if reply.data:
                            sock.sendall(reply.data)
                        for index in {*reply.started, *restart}:
                            if self.state.vrings[index].ready and index not in self._rings:
                                await self._stop_queue(index)  # one worker per ring, never two
                                await tg.start(self._run_queue, index)
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
                          event_idx=event_idx, max_chain_bytes=MAX_CHAIN_BYTES)

    async def _stop_queue(self, index: int) -> None:
        """Stop ring ``index``'s worker and wait (bounded) until its requests are answered."""
        ring = self._rings.get(index)
        if ring is None:
            return
        ring.stopping = True
        ring.poke()
        with anyio.move_on_after(STOP_TIMEOUT):
            await ring.done.wait()

    async def _run_queue(self, index: int, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
                         ) -> None:
        vring = self.state.vrings[index]
        queue = self._queue(index)
        ring = _Ring(self, index, vring, queue)
        self._rings[index] = ring
        task_status.started()
        try:
            ring.thread.start()
            async with anyio.create_task_group() as tg:
                with ring.scope:
                    while True:
                        if ring.exited:
                            break
                        self._take(ring, tg)
                        await anyio.wait_readable(ring.handoff)
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(ring.handoff)
                self._take(ring, tg)  # what the worker handed over before it stopped
                # The task group waits for the requests handed off.
        finally:
            with anyio.CancelScope(shield=True):
                await self._join(ring)
                if self._rings.get(index) is ring:
                    del self._rings[index]
                vring.base = queue.next_avail
                queue.release()
                ring.done.set()

    async def _join(self, ring: _Ring) -> None:
        ring.stopping = True
        ring.poke()
        with anyio.move_on_after(STOP_TIMEOUT):
            while not ring.exited:  # the worker's last act is a hand-off write after ``exited``
                await anyio.wait_readable(ring.handoff)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(ring.handoff)
        ring.thread.join(1.0)  # past ``exited`` it only returns
        if ring.thread.is_alive():
            # Stuck in a system call on the provider's storage: it exits when that returns.
            log.warning("virtiofs queue %d: worker still busy after %.0f s", ring.index, STOP_TIMEOUT)
            return
        anyio.notify_closing(ring.handoff)
        ring.close_fds()

    def _take(self, ring: _Ring, tg: anyio.abc.TaskGroup) -> None:
        while ring.inbox:
            tg.start_soon(self._answer, ring, ring.inbox.popleft())

    async def _answer(self, ring: _Ring, chain: Chain) -> None:
        session = self.session
        assert session is not None
        head = _gather(chain.readable, IN_HEADER.size)
        written = 0
        if len(head) >= IN_HEADER.size:
            length, op = IN_HEADER.unpack_from(head)[:2]
            if length <= MAX_REQUEST:
                request = _gather(chain.readable, length)
                outs = session.fuse_request(request)
            else:
                request = head
                outs = [(TO_FUSE, (OUT_HEADER.pack(OUT_HEADER.size, -errno.EINVAL, IN_HEADER.unpack_from(head)[2]),))]
                self.bad_requests += 1
            while outs:
                dest, pieces = outs.pop(0)
                if dest == TO_PORT:
                    response = await self.vfs.service.handle(_unframe(pieces))
                    if response is not None:
                        outs.extend(session.port_message(response))
                elif dest == TO_FUSE:
                    if op in (OPEN, CREATE) and self.cache == "none":
                        pieces = _uncached(pieces)
                    try:
                        for piece in pieces:
                            written += chain.write(piece, written)
                    except VirtqueueError:
                        self.bad_requests += 1
                        unique = IN_HEADER.unpack_from(head)[2]
                        header = OUT_HEADER.pack(OUT_HEADER.size, -errno.EIO, unique)
                        written = chain.write(header) if chain.writable_len >= OUT_HEADER.size else 0
        else:
            self.bad_requests += 1
        ring.complete(chain, written, handed_off=True)


async def serve_virtiofs(listener: socket.socket, vfs: VfsServer, *, cache: str = "auto") -> VirtioFsDevice:
    """Accept QEMU's one connection on ``listener`` and serve it until it closes (``cache``: see
    :class:`VirtioFsDevice`)."""
    listener.setblocking(False)
    while True:
        await anyio.wait_readable(listener)
        try:
            conn, _ = listener.accept()
            break
        except BlockingIOError:
            continue
    device = VirtioFsDevice(vfs, cache=cache)
    await device.serve(conn)
    return device
