"""FsRpcService: serves the guest FUSE daemon's requests from a provider.

Each request is handled in its own task (up to ``max_in_flight`` at once), so a slow read
never holds up a ``stat``, and responses go out in whatever order they finish. The service
owns the node table (bounded by FORGET), the open-file and open-directory tables (bounded
by ``max_handles``) and a bounded queue of cache invalidations for the guest.

Anything a request does wrong becomes an errno in its response; a message that does not
decode is counted and, when its id is readable, answered with EINVAL (ENOSYS for an unknown
op). Nothing the guest sends can stop the service.
"""

from __future__ import annotations

import logging
import stat
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from . import paths, wire
from .errors import (
    EBADF,
    EINVAL,
    EIO,
    ENFILE,
    ENOMEM,
    ENOSYS,
    ENOTDIR,
    EPROTO,
    VfsError,
    linux_errno,
)
from .nodes import DEFAULT_MAX_NODES, ROOT_NODE, NodeTable
from .provider import (
    READ_ONLY,
    Attr,
    Caller,
    DirectIO,
    FileHandle,
    OpenMode,
    Provider,
    SetAttr,
    copy_range,
    current_caller,
    dtype,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_HANDLES = 16384  # open files + open directories, each
DEFAULT_MAX_IN_FLIGHT = 64  # requests handled concurrently; more wait in the transport
# Host memory all open-directory snapshots of one VM may hold together: a guest that opens the
# same directory many times without reading it makes the host keep a copy per handle. Charged
# per entry as its name plus DIR_ENTRY_OVERHEAD (a name tuple and an Attr measured ~450 bytes
# with tracemalloc on CPython 3.11; rounded up). 64 MiB is ~100,000 entries held open at once.
DEFAULT_MAX_DIR_BYTES = 64 << 20
DIR_ENTRY_OVERHEAD = 512
NOTIFY_QUEUE = 1024  # invalidations waiting to be sent; beyond this they are dropped
_O_CREAT = 0o100


@dataclass
class FsRpcStats:
    requests: int = 0
    errors: int = 0  # requests answered with an errno
    bad_messages: int = 0  # messages that did not decode
    internal_errors: int = 0  # provider bugs answered with EIO
    bytes_read: int = 0
    bytes_written: int = 0
    notifications_dropped: int = 0
    ops: dict[str, int] = field(default_factory=dict)


@dataclass
class _OpenFile:
    handle: FileHandle
    node: int
    mode: OpenMode | None = None  # how the guest opened it (carried over by export_state)


@dataclass
class _OpenDir:
    node: int
    entries: list[tuple[bytes, Attr]]  # "." and ".." first
    cost: int = 0  # bytes charged against max_dir_bytes


class _Table:
    """Numbered handles, ids never reused, at most ``limit`` live."""

    def __init__(self, limit: int, first: int = 1) -> None:
        self.limit = limit
        self.items: dict[int, Any] = {}
        self._next = first

    def add(self, item: object) -> int:
        if len(self.items) >= self.limit:
            raise VfsError(ENFILE, "too many open handles")
        key = self._next
        self._next += 1
        self.items[key] = item
        return key

    def get(self, key: int) -> Any:
        item = self.items.get(key)
        if item is None:
            raise VfsError(EBADF)
        return item

    def pop(self, key: int) -> Any:
        item = self.items.pop(key, None)
        if item is None:
            raise VfsError(EBADF)
        return item


_MODE_FIELDS = ("read", "write", "append", "truncate", "exclusive", "sync")


def _mode_bits(mode: OpenMode) -> int:
    return sum(1 << i for i, k in enumerate(_MODE_FIELDS) if getattr(mode, k))


def _name(raw: bytes) -> str:
    return paths.check_name(paths.decode(raw))


class FsRpcService:
    def __init__(
        self,
        provider: Provider,
        *,
        entry_ttl_ms: int = 1000,
        attr_ttl_ms: int = 1000,
        negative_ttl_ms: int = 250,
        max_nodes: int = DEFAULT_MAX_NODES,
        max_handles: int = DEFAULT_MAX_HANDLES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_dir_bytes: int = DEFAULT_MAX_DIR_BYTES,
        clock: Callable[[], int] = time.time_ns,
        id_offset: int = 0,
        shm: memoryview | None = None,
    ) -> None:
        """``id_offset`` moves where node and handle ids start. A guest that outlives its host
        session (a resumed checkpoint) still holds the old session's ids; with a fresh random
        offset they are unknown (ESTALE, which makes the guest kernel look the path up again)
        instead of naming someone else's file."""
        self.provider = provider
        # The FUSE payload area of the VM's shared region (wire.SHM_SPANS spans of MAX_IO), if any.
        self.shm = shm if shm is not None and len(shm) >= wire.SHM_SPANS * wire.MAX_IO else None
        self.entry_ttl_ms = entry_ttl_ms
        self.attr_ttl_ms = attr_ttl_ms
        self.negative_ttl_ms = negative_ttl_ms
        self.max_in_flight = max_in_flight
        self.nodes = NodeTable(max_nodes, ROOT_NODE + 1 + id_offset)
        self._files = _Table(max_handles, 1 + id_offset)
        self._dirs = _Table(max_handles, 1 + id_offset)
        self.max_dir_bytes = max_dir_bytes
        self.dir_bytes = 0  # what open-directory snapshots are charged now
        self._clock = clock
        self.stats = FsRpcStats()
        self._notes: deque[bytes] = deque()  # encoded notifications not yet sent
        self._wakeup: anyio.Event | None = None  # set when a note arrives for a waiting pump
        self._notify_seq = 0
        self._handlers: dict[type[wire.Body], Callable[[Any], Awaitable[Any]]] = {
            wire.Hello: self._hello,
            wire.Lookup: self._lookup,
            wire.Forget: self._forget,
            wire.Getattr: self._getattr,
            wire.Setattr: self._setattr,
            wire.Readlink: self._readlink,
            wire.Symlink: self._symlink,
            wire.Mkdir: self._mkdir,
            wire.Unlink: self._unlink,
            wire.Rmdir: self._rmdir,
            wire.Rename: self._rename,
            wire.Link: self._link,
            wire.Open: self._open,
            wire.Create: self._create,
            wire.Read: self._read,
            wire.Write: self._write,
            wire.Statfs: self._statfs,
            wire.Release: self._release,
            wire.Fsync: self._fsync,
            wire.Flush: self._flush,
            wire.Opendir: self._opendir,
            wire.Readdir: self._readdir,
            wire.Releasedir: self._releasedir,
            wire.Access: self._access,
            wire.Fallocate: self._fallocate,
            wire.CopyFileRange: self._copy_file_range,
            wire.ReadShm: self._read_shm,
            wire.WriteShm: self._write_shm,
        }

    # --- hand-over to another host session (checkpoint resume, fork) -------------------------

    def export_state(self) -> dict[str, Any]:
        """What the guest kernel holds of this session, as plain data: node ids with their paths
        and open files with their modes. A service that :meth:`import_state` s it answers the
        same ids, so a guest restored from a snapshot keeps its open files and working
        directories. Call it while the guest is stopped (the snapshot's moment)."""
        files = [[fh, entry.node, self._path_or_none(entry.node), _mode_bits(entry.mode or READ_ONLY)]
                 for fh, entry in self._files.items.items()]
        return {"v": 1, "nodes": self.nodes.export(), "files": files, "next_file": self._files._next,
                "next_dir": self._dirs._next}

    def _path_or_none(self, node: int) -> str | None:
        """The node's path; None when it has none any more (unlinked, or unknown)."""
        try:
            return self.nodes.path(node)
        except VfsError:
            return None

    def import_state(self, state: Any) -> list[Any]:
        """Take over an exported session (before serving): the same node ids and handle
        counters. Returns the open files to reopen with :meth:`reopen_files`; ValueError when
        ``state`` is malformed (the service is unchanged then)."""
        if not isinstance(state, dict) or state.get("v") != 1 or not isinstance(state.get("files"), list):
            raise ValueError("bad file-service state")
        nodes = NodeTable.restore(state.get("nodes"), self.nodes.max_nodes)
        next_file, next_dir = state.get("next_file"), state.get("next_dir")
        if type(next_file) is not int or type(next_dir) is not int:
            raise ValueError("bad handle counters")
        self.nodes = nodes
        self._files._next = max(self._files._next, next_file)
        self._dirs._next = max(self._dirs._next, next_dir)
        return list(state["files"][: self._files.limit])

    async def reopen_files(self, rows: list[Any]) -> int:
        """Open again, by path, the files an imported session had open, under the same handle
        ids. One whose path is gone, or that the provider refuses, is left out: the guest gets
        EBADF for it. Returns how many were reopened."""
        reopened = 0
        for row in rows:
            if not (isinstance(row, list) and len(row) == 4 and type(row[0]) is int and type(row[1]) is int
                    and (row[2] is None or isinstance(row[2], str)) and type(row[3]) is int):
                continue
            fh, node, path, bits = row
            if path is None or fh in self._files.items or fh >= self._files._next:
                continue
            # as opened, less what must not happen twice (truncating, failing because it exists)
            mode = OpenMode(**{k: bool(bits & (1 << i)) for i, k in enumerate(_MODE_FIELDS)
                               if k not in ("truncate", "exclusive")})
            try:
                handle = await self.provider.open(path, mode)
            except (VfsError, OSError) as exc:
                log.debug("open file %s not carried over: %s", path, exc)
                continue
            self._files.items[fh] = _OpenFile(handle, node, mode)
            reopened += 1
        return reopened

    @property
    def open_files(self) -> int:
        return len(self._files.items)

    @property
    def open_dirs(self) -> int:
        return len(self._dirs.items)

    def direct_io(self, fh: int) -> DirectIO | None:
        """The :class:`DirectIO` of open file ``fh`` (None when unknown or its handle has none).

        For transports that move READ/WRITE payloads between guest memory and the file
        themselves (virtiofs); safe to call from their worker thread (one dict lookup)."""
        entry = self._files.items.get(fh)
        return None if entry is None else entry.handle.direct_io()

    # --- transport ---------------------------------------------------------------------------

    async def serve(
        self, receive: ObjectReceiveStream[bytes], send: ObjectSendStream[bytes]
    ) -> None:
        """Answer requests from ``receive`` on ``send`` until ``receive`` ends.

        Messages are whole (unframed); pair with :class:`wire.FrameSplitter` on a byte
        stream. Invalidations queued with :meth:`invalidate` are sent on ``send`` too.
        Returns once every request already received has been answered.
        """
        lock = anyio.Lock()
        slots = anyio.Semaphore(self.max_in_flight)

        async def reply(data: bytes) -> None:
            async with lock:
                await send.send(data)

        async def one(message: bytes) -> None:
            try:
                response = await self.handle(message)
            finally:
                slots.release()
            if response is not None:
                await reply(response)

        async def pump() -> None:
            while True:
                for note in await self.next_notifications():
                    await reply(note)

        async with anyio.create_task_group() as outer:
            outer.start_soon(pump)
            async with anyio.create_task_group() as handlers:
                async for message in receive:
                    await slots.acquire()
                    handlers.start_soon(one, message)
            outer.cancel_scope.cancel()

    async def handle(self, message: bytes) -> bytes | None:
        """One encoded request in, its encoded response out (None for FORGET)."""
        try:
            request = wire.decode_request(message)
        except wire.WireError as exc:
            self.stats.bad_messages += 1
            if exc.request_id is None or exc.op is None:
                return None
            known = exc.op in wire.REQUEST_TYPES.keys()
            return wire.encode_error(exc.request_id, exc.op, EINVAL if known else ENOSYS)
        response = await self.dispatch(request)
        if response is None:
            return None
        try:
            return wire.encode_response(response)
        except (ValueError, struct.error):
            # A provider handed back something the wire cannot carry (a negative uid, ...).
            log.exception("cannot encode the reply to %s", request.body.OP.name)
            self.stats.internal_errors += 1
            return wire.encode_error(request.id, request.body.OP, EIO)

    async def dispatch(self, request: wire.Request) -> wire.Response | None:
        body = request.body
        op = body.OP
        self.stats.requests += 1
        self.stats.ops[op.name] = self.stats.ops.get(op.name, 0) + 1
        token = current_caller.set(Caller(request.uid, request.gid, request.pid))
        try:
            result = await self._handlers[type(body)](body)
        except VfsError as exc:
            errno = exc.errno or EIO
        except OSError as exc:
            errno = linux_errno(exc.errno)
        except Exception:
            log.exception("fs request %s failed", op.name)
            self.stats.internal_errors += 1
            errno = EIO
        else:
            if op == wire.Op.FORGET:
                return None
            return wire.Response(request.id, op, 0, result)
        finally:
            current_caller.reset(token)
        self.stats.errors += 1
        if op == wire.Op.FORGET:
            return None
        return wire.Response(request.id, op, errno)

    # --- invalidation ------------------------------------------------------------------------

    def invalidate(self, path: str) -> None:
        """Tell the guest to drop what its kernel caches about ``path`` (changed on the host).

        Call it from the event loop's thread. Notifications wait in a bounded queue; when it
        is full they are dropped (and counted): the attribute TTL still bounds staleness.
        """
        parts = paths.split(path)
        node = ROOT_NODE
        for i, name in enumerate(parts):
            child = self.nodes.child(node, name)
            if child is None:
                # The guest holds nothing below here, but may cache this name as absent.
                self._notify(wire.InvalEntry(node, paths.encode(name)))
                return
            if i == len(parts) - 1:
                self._notify(wire.InvalEntry(node, paths.encode(name)))
            node = child
        self._notify(wire.InvalInode(node, 0, 0))

    def _notify(self, body: wire.Body) -> None:
        self._notify_seq = (self._notify_seq + 1) & 0xFFFFFFFF
        if len(self._notes) >= NOTIFY_QUEUE:
            self.stats.notifications_dropped += 1
            return
        self._notes.append(wire.encode_notify(wire.Notify(body, self._notify_seq)))
        if self._wakeup is not None:
            self._wakeup.set()

    async def next_notifications(self) -> list[bytes]:
        """Wait until invalidations are queued, then take them (for transport drivers)."""
        while not self._notes:
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        return self.pending_notifications()

    def pending_notifications(self) -> list[bytes]:
        """Take the queued notifications (for drivers that do not use :meth:`serve`)."""
        out = list(self._notes)
        self._notes.clear()
        return out

    async def aclose(self) -> None:
        """Release every handle the guest left open."""
        files = list(self._files.items.values())
        self._files.items.clear()
        self._dirs.items.clear()
        self.dir_bytes = 0
        for entry in files:
            await entry.handle.release()

    # --- helpers -----------------------------------------------------------------------------

    def _entry(self, node: int, attr: Attr) -> wire.EntryReply:
        return wire.EntryReply(node, 0, self.entry_ttl_ms, self.attr_ttl_ms, attr)

    def _file(self, fh: int) -> FileHandle:
        entry: _OpenFile = self._files.get(fh)
        return entry.handle

    async def _new_entry(self, parent: int, name: str, attr: Attr) -> wire.EntryReply:
        return self._entry(self.nodes.lookup(parent, name), attr)

    # --- handlers ----------------------------------------------------------------------------

    async def _hello(self, req: wire.Hello) -> wire.HelloReply:
        if req.version != wire.VERSION:
            raise VfsError(EPROTO, f"guest speaks version {req.version}")
        return wire.HelloReply(
            version=wire.VERSION,
            max_io=min(req.max_io, wire.MAX_IO),
            flags=(wire.HELLO_READONLY if self.provider.readonly else 0)
            | (wire.HELLO_SHM if self.shm is not None else 0),
            entry_ttl_ms=self.entry_ttl_ms,
            attr_ttl_ms=self.attr_ttl_ms,
            negative_ttl_ms=self.negative_ttl_ms,
        )

    async def _lookup(self, req: wire.Lookup) -> wire.EntryReply:
        name = _name(req.name)
        attr = await self.provider.getattr(self.nodes.child_path(req.parent, name))
        return await self._new_entry(req.parent, name, attr)

    async def _forget(self, req: wire.Forget) -> None:
        for node, count in req.items:
            self.nodes.forget(node, count)

    async def _getattr(self, req: wire.Getattr) -> wire.AttrReply:
        if req.fh:
            attr = await self._file(req.fh).getattr()
        else:
            attr = await self.provider.getattr(self.nodes.path(req.node))
        return wire.AttrReply(self.attr_ttl_ms, attr)

    async def _setattr(self, req: wire.Setattr) -> wire.AttrReply:
        v = req.valid
        now = self._clock()
        changes = SetAttr(
            mode=req.mode & 0o7777 if v & wire.FATTR_MODE else None,
            uid=req.uid if v & wire.FATTR_UID else None,
            gid=req.gid if v & wire.FATTR_GID else None,
            size=req.size if v & wire.FATTR_SIZE else None,
            atime_ns=now
            if v & wire.FATTR_ATIME_NOW
            else (req.atime_ns if v & wire.FATTR_ATIME else None),
            mtime_ns=now
            if v & wire.FATTR_MTIME_NOW
            else (req.mtime_ns if v & wire.FATTR_MTIME else None),
        )
        if req.fh:
            handle = self._file(req.fh)
            attr = await (handle.getattr() if changes.empty else handle.setattr(changes))
        else:
            path = self.nodes.path(req.node)
            attr = await (
                self.provider.getattr(path)
                if changes.empty
                else self.provider.setattr(path, changes)
            )
        return wire.AttrReply(self.attr_ttl_ms, attr)

    async def _readlink(self, req: wire.Readlink) -> wire.DataReply:
        target = await self.provider.readlink(self.nodes.path(req.node))
        return wire.DataReply(paths.encode(target))

    async def _symlink(self, req: wire.Symlink) -> wire.EntryReply:
        name = _name(req.name)
        target = paths.check_target(paths.decode(req.target))
        path = self.nodes.child_path(req.parent, name)
        attr = await self.provider.symlink(path, target, current_caller.get())
        return await self._new_entry(req.parent, name, attr)

    async def _mkdir(self, req: wire.Mkdir) -> wire.EntryReply:
        name = _name(req.name)
        path = self.nodes.child_path(req.parent, name)
        attr = await self.provider.mkdir(path, req.mode & 0o7777, current_caller.get())
        return await self._new_entry(req.parent, name, attr)

    async def _unlink(self, req: wire.Unlink) -> wire.EmptyReply:
        name = _name(req.name)
        await self.provider.unlink(self.nodes.child_path(req.parent, name))
        self.nodes.detach(req.parent, name)
        return wire.EmptyReply()

    async def _rmdir(self, req: wire.Rmdir) -> wire.EmptyReply:
        name = _name(req.name)
        await self.provider.rmdir(self.nodes.child_path(req.parent, name))
        self.nodes.detach(req.parent, name)
        return wire.EmptyReply()

    async def _rename(self, req: wire.Rename) -> wire.EmptyReply:
        old, new = _name(req.old_name), _name(req.new_name)
        src = self.nodes.child_path(req.old_parent, old)
        dst = self.nodes.child_path(req.new_parent, new)
        await self.provider.rename(src, dst, req.flags)
        if req.flags & wire.RENAME_EXCHANGE:
            self.nodes.exchange(req.old_parent, old, req.new_parent, new)
        else:
            self.nodes.move(req.old_parent, old, req.new_parent, new)
        return wire.EmptyReply()

    async def _link(self, req: wire.Link) -> wire.EntryReply:
        name = _name(req.new_name)
        src = self.nodes.path(req.node)
        attr = await self.provider.link(src, self.nodes.child_path(req.new_parent, name))
        return await self._new_entry(req.new_parent, name, attr)

    async def _add_file(self, handle: FileHandle, node: int, mode: OpenMode | None = None) -> int:
        try:
            return self._files.add(_OpenFile(handle, node, mode))
        except VfsError:
            await handle.release()
            raise

    async def _open(self, req: wire.Open) -> wire.OpenReply:
        mode = OpenMode.from_linux_flags(req.flags)
        handle = await self.provider.open(self.nodes.path(req.node), mode)
        return wire.OpenReply(await self._add_file(handle, req.node, mode), 0)

    async def _create(self, req: wire.Create) -> wire.CreateReply:
        name = _name(req.name)
        mode = OpenMode.from_linux_flags(req.flags | _O_CREAT)
        path = self.nodes.child_path(req.parent, name)
        handle = await self.provider.create(path, req.mode & 0o7777, mode, current_caller.get())
        try:
            attr = await handle.getattr()
            node = self.nodes.lookup(req.parent, name)
        except BaseException:
            await handle.release()
            raise
        fh = await self._add_file(handle, node, mode)
        return wire.CreateReply(self._entry(node, attr), wire.OpenReply(fh, 0))

    async def _read(self, req: wire.Read) -> wire.DataReply:
        data = await self._file(req.fh).read(req.offset, req.size)
        self.stats.bytes_read += len(data)
        return wire.DataReply(data)

    async def _write(self, req: wire.Write) -> wire.SizeReply:
        written = await self._file(req.fh).write(req.offset, req.data)
        self.stats.bytes_written += written
        return wire.SizeReply(written)

    def _span(self, span: int, size: int) -> memoryview:
        """Span ``span`` of the shared region's FUSE area (checked by the decoder too)."""
        if self.shm is None or not 0 <= span < wire.SHM_SPANS or not 0 <= size <= wire.MAX_IO:
            raise VfsError(EINVAL, "no such shared-region span")
        return self.shm[span * wire.MAX_IO:span * wire.MAX_IO + size]

    async def _read_shm(self, req: wire.ReadShm) -> wire.SizeReply:
        span = self._span(req.span, req.size)
        data = await self._file(req.fh).read(req.offset, req.size)
        n = min(len(data), req.size)
        span[:n] = data[:n]
        self.stats.bytes_read += n
        return wire.SizeReply(n)

    async def _write_shm(self, req: wire.WriteShm) -> wire.SizeReply:
        data = bytes(self._span(req.span, req.size))  # a copy: the guest may change the span meanwhile
        written = await self._file(req.fh).write(req.offset, data)
        self.stats.bytes_written += written
        return wire.SizeReply(written)

    async def _statfs(self, req: wire.Statfs) -> wire.StatFs:
        return await self.provider.statfs(self.nodes.path(req.node))

    async def _release(self, req: wire.Release) -> wire.EmptyReply:
        entry: _OpenFile = self._files.pop(req.fh)
        await entry.handle.release()
        return wire.EmptyReply()

    async def _fsync(self, req: wire.Fsync) -> wire.EmptyReply:
        await self._file(req.fh).fsync(bool(req.datasync))
        return wire.EmptyReply()

    async def _flush(self, req: wire.Flush) -> wire.EmptyReply:
        await self._file(req.fh).flush()
        return wire.EmptyReply()

    async def _opendir(self, req: wire.Opendir) -> wire.OpenReply:
        path = self.nodes.path(req.node)
        attr = await self.provider.getattr(path)
        if not stat.S_ISDIR(attr.mode):
            raise VfsError(ENOTDIR)
        listing = await self.provider.readdir(path)
        parent = Attr(ino=1, mode=stat.S_IFDIR | 0o755)
        entries = [(b".", attr), (b"..", parent if req.node != ROOT_NODE else attr)]
        entries.extend((paths.encode(e.name), e.attr) for e in listing)
        cost = sum(len(name) for name, _ in entries) + DIR_ENTRY_OVERHEAD * len(entries)
        if self.dir_bytes + cost > self.max_dir_bytes:
            raise VfsError(ENOMEM, "too much directory data held open")
        dh = self._dirs.add(_OpenDir(req.node, entries, cost))
        self.dir_bytes += cost
        return wire.OpenReply(dh, 0)

    async def _readdir(self, req: wire.Readdir) -> wire.ReaddirReply:
        snap: _OpenDir = self._dirs.get(req.dh)
        plus = bool(req.plus)
        budget = min(req.size, wire.MAX_IO)
        out: list[wire.Dirent] = []
        index = req.offset
        while index < len(snap.entries) and len(out) < wire.MAX_DIRENTS:
            name, attr = snap.entries[index]
            cost = wire.fuse_dirent_size(len(name), plus)
            if cost > budget:
                break
            entry = None
            if plus and name not in (b".", b".."):
                try:
                    node = self.nodes.lookup(snap.node, paths.decode(name))
                except VfsError:
                    if out:
                        break  # node table full: hand out what we have
                    raise
                entry = self._entry(node, attr)
            budget -= cost
            index += 1
            out.append(wire.Dirent(index, attr.ino, dtype(attr.mode), name, entry))
        return wire.ReaddirReply(plus, tuple(out))

    async def _releasedir(self, req: wire.Releasedir) -> wire.EmptyReply:
        snap: _OpenDir = self._dirs.pop(req.dh)
        self.dir_bytes -= snap.cost
        return wire.EmptyReply()

    async def _access(self, req: wire.Access) -> wire.EmptyReply:
        await self.provider.access(self.nodes.path(req.node), req.mask, current_caller.get())
        return wire.EmptyReply()

    async def _fallocate(self, req: wire.Fallocate) -> wire.EmptyReply:
        await self._file(req.fh).fallocate(req.offset, req.length, req.mode)
        return wire.EmptyReply()

    async def _copy_file_range(self, req: wire.CopyFileRange) -> wire.SizeReply:
        if req.flags:
            raise VfsError(EINVAL)
        src, dst = self._file(req.fh_in), self._file(req.fh_out)
        copied = await copy_range(src, req.off_in, dst, req.off_out, req.length)
        self.stats.bytes_written += copied
        return wire.SizeReply(copied)
