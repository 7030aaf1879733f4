"""MemoryProvider: a POSIX-like tree held in RAM, with hard links and quotas."""

from __future__ import annotations

import stat
import time
from collections.abc import Callable, Sequence

from . import paths
from .errors import (
    EBADF,
    EBUSY,
    EEXIST,
    EINVAL,
    EISDIR,
    ELOOP,
    EMLINK,
    ENOENT,
    ENOSPC,
    ENOTDIR,
    ENOTEMPTY,
    EPERM,
    VfsError,
)
from .provider import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT,
    Attr,
    Caller,
    Dirent,
    FileHandle,
    OpenMode,
    Provider,
    SetAttr,
    StatFs,
    blocks_for,
    check_io,
    check_rename_flags,
    check_size,
)

DEFAULT_MAX_BYTES = 1 << 30  # file contents a guest may keep in host RAM by default
DEFAULT_MAX_NODES = 1 << 20  # files, directories and symlinks
MAX_LINKS = 65000  # hard links to one file (ext4's limit)


class _Node:
    __slots__ = (
        "ino", "mode", "uid", "gid", "nlink", "atime", "mtime", "ctime",
        "data", "children", "target", "opens", "freed",
    )  # fmt: skip

    def __init__(self, ino: int, mode: int, uid: int, gid: int, now: int) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.atime = self.mtime = self.ctime = now
        self.data = bytearray()
        self.children: dict[str, _Node] = {}
        self.target = ""
        self.opens = 0
        self.freed = False

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def size(self) -> int:
        if self.is_dir:
            return 4096
        if stat.S_ISLNK(self.mode):
            return len(paths.encode(self.target))
        return len(self.data)

    def attr(self) -> Attr:
        size = self.size()
        return Attr(
            ino=self.ino,
            mode=self.mode,
            nlink=self.nlink,
            uid=self.uid,
            gid=self.gid,
            size=size,
            blocks=blocks_for(size),
            atime_ns=self.atime,
            mtime_ns=self.mtime,
            ctime_ns=self.ctime,
        )


class MemoryProvider(Provider):
    """An in-memory filesystem. ``max_bytes``/``max_nodes`` bound what the guest can store.

    ``clock`` returns nanoseconds since the epoch (inject a fake one in tests).
    """

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_nodes: int = DEFAULT_MAX_NODES,
        clock: Callable[[], int] = time.time_ns,
        root_mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_nodes = max_nodes
        self._clock = clock
        self._next_ino = 1
        self._nodes = 0
        self._bytes = 0
        self._root = self._new(stat.S_IFDIR | (root_mode & 0o7777), uid, gid)

    # --- accounting --------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._bytes

    @property
    def used_nodes(self) -> int:
        return self._nodes

    def _new(self, mode: int, uid: int, gid: int) -> _Node:
        if self._nodes >= self.max_nodes:
            raise VfsError(ENOSPC, "too many files")
        node = _Node(self._next_ino, mode, uid, gid, self._clock())
        self._next_ino += 1
        self._nodes += 1
        return node

    def _resize(self, node: _Node, size: int) -> None:
        check_size(size)
        grow = size - len(node.data)
        if grow > 0 and self._bytes + grow > self.max_bytes:
            raise VfsError(ENOSPC)
        if grow > 0:
            node.data.extend(bytes(grow))
        else:
            del node.data[size:]
        self._bytes += grow

    def _drop_link(self, node: _Node) -> None:
        node.nlink = 0 if node.is_dir else node.nlink - 1
        node.ctime = self._clock()
        self._maybe_free(node)

    def _maybe_free(self, node: _Node) -> None:
        if node.nlink <= 0 and node.opens <= 0 and not node.freed:
            node.freed = True
            self._bytes -= len(node.data)
            node.data = bytearray()
            self._nodes -= 1

    # --- lookup ------------------------------------------------------------------------------

    def _walk(self, parts: Sequence[str]) -> _Node:
        node = self._root
        for name in parts:
            if not node.is_dir:
                raise VfsError(ENOTDIR)
            nxt = node.children.get(name)
            if nxt is None:
                raise VfsError(ENOENT)
            node = nxt
        return node

    def _node(self, path: str) -> _Node:
        return self._walk(paths.split(path))

    def _parent(self, path: str) -> tuple[_Node, str]:
        parts = paths.split(path)
        if not parts:
            raise VfsError(EBUSY, "the root has no parent")
        parent = self._walk(parts[:-1])
        if not parent.is_dir:
            raise VfsError(ENOTDIR)
        return parent, parts[-1]

    def _touch_dir(self, parent: _Node) -> None:
        parent.mtime = parent.ctime = self._clock()

    # --- reading -----------------------------------------------------------------------------

    async def getattr(self, path: str) -> Attr:
        return self._node(path).attr()

    async def readdir(self, path: str) -> list[Dirent]:
        node = self._node(path)
        if not node.is_dir:
            raise VfsError(ENOTDIR)
        return [Dirent(name, child.attr()) for name, child in node.children.items()]

    async def readlink(self, path: str) -> str:
        node = self._node(path)
        if not stat.S_ISLNK(node.mode):
            raise VfsError(EINVAL)
        return node.target

    async def statfs(self, path: str) -> StatFs:
        self._node(path)
        return StatFs(
            blocks=self.max_bytes // 4096,
            bfree=max(0, self.max_bytes - self._bytes) // 4096,
            bavail=max(0, self.max_bytes - self._bytes) // 4096,
            files=self.max_nodes,
            ffree=max(0, self.max_nodes - self._nodes),
        )

    async def open(self, path: str, mode: OpenMode) -> FileHandle:
        return self._open(self._node(path), mode)

    def _open(self, node: _Node, mode: OpenMode) -> _MemoryHandle:
        if node.is_dir:
            if mode.writes:
                raise VfsError(EISDIR)
        elif stat.S_ISLNK(node.mode):
            raise VfsError(ELOOP)
        if mode.truncate and not node.is_dir:
            self._resize(node, 0)
            node.mtime = node.ctime = self._clock()
        node.opens += 1
        return _MemoryHandle(self, node, mode)

    # --- writing -----------------------------------------------------------------------------

    async def create(
        self, path: str, mode: int, open_mode: OpenMode, caller: Caller = ROOT
    ) -> FileHandle:
        parent, name = self._parent(path)
        existing = parent.children.get(name)
        if existing is not None:
            if open_mode.exclusive:
                raise VfsError(EEXIST)
            return self._open(existing, open_mode)
        node = self._new(stat.S_IFREG | (mode & 0o7777), caller.uid, caller.gid)
        parent.children[name] = node
        self._touch_dir(parent)
        node.opens += 1
        return _MemoryHandle(self, node, open_mode)

    async def mkdir(self, path: str, mode: int, caller: Caller = ROOT) -> Attr:
        parent, name = self._parent(path)
        if name in parent.children:
            raise VfsError(EEXIST)
        node = self._new(stat.S_IFDIR | (mode & 0o7777), caller.uid, caller.gid)
        parent.children[name] = node
        parent.nlink += 1
        self._touch_dir(parent)
        return node.attr()

    async def symlink(self, path: str, target: str, caller: Caller = ROOT) -> Attr:
        paths.check_target(target)
        parent, name = self._parent(path)
        if name in parent.children:
            raise VfsError(EEXIST)
        node = self._new(stat.S_IFLNK | 0o777, caller.uid, caller.gid)
        node.target = target
        parent.children[name] = node
        self._touch_dir(parent)
        return node.attr()

    async def link(self, src: str, dst: str) -> Attr:
        node = self._node(src)
        if node.is_dir:
            raise VfsError(EPERM, "hard link to a directory")
        parent, name = self._parent(dst)
        if name in parent.children:
            raise VfsError(EEXIST)
        if node.nlink >= MAX_LINKS:
            raise VfsError(EMLINK)
        parent.children[name] = node
        node.nlink += 1
        node.ctime = self._clock()
        self._touch_dir(parent)
        return node.attr()

    async def unlink(self, path: str) -> None:
        parent, name = self._parent(path)
        node = parent.children.get(name)
        if node is None:
            raise VfsError(ENOENT)
        if node.is_dir:
            raise VfsError(EISDIR)
        del parent.children[name]
        self._touch_dir(parent)
        self._drop_link(node)

    async def rmdir(self, path: str) -> None:
        parent, name = self._parent(path)
        node = parent.children.get(name)
        if node is None:
            raise VfsError(ENOENT)
        if not node.is_dir:
            raise VfsError(ENOTDIR)
        if node.children:
            raise VfsError(ENOTEMPTY)
        del parent.children[name]
        parent.nlink -= 1
        self._touch_dir(parent)
        self._drop_link(node)

    async def rename(self, src: str, dst: str, flags: int = 0) -> None:
        check_rename_flags(flags)
        sparts, dparts = paths.split(src), paths.split(dst)
        if not sparts or not dparts:
            raise VfsError(EBUSY)
        sparent, sname = self._parent(src)
        node = sparent.children.get(sname)
        if node is None:
            raise VfsError(ENOENT)
        dparent, dname = self._parent(dst)
        target = dparent.children.get(dname)
        if sparts == dparts:
            return
        # Moving a directory below itself would cut it off from the tree.
        if node.is_dir and dparts[: len(sparts)] == sparts:
            raise VfsError(EINVAL)
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise VfsError(ENOENT)
            if target.is_dir and sparts[: len(dparts)] == dparts:
                raise VfsError(EINVAL)
            sparent.children[sname], dparent.children[dname] = target, node
            if sparent is not dparent and node.is_dir != target.is_dir:
                delta = 1 if node.is_dir else -1
                sparent.nlink -= delta
                dparent.nlink += delta
            now = self._clock()
            node.ctime = target.ctime = now
            self._touch_dir(sparent)
            self._touch_dir(dparent)
            return
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise VfsError(EEXIST)
            if target is node:
                return  # two hard links to one file: rename(2) does nothing
            if node.is_dir:
                if not target.is_dir:
                    raise VfsError(ENOTDIR)
                if target.children:
                    raise VfsError(ENOTEMPTY)
            elif target.is_dir:
                raise VfsError(EISDIR)
        del sparent.children[sname]
        dparent.children[dname] = node
        if target is not None:
            if target.is_dir:
                dparent.nlink -= 1
            self._drop_link(target)
        if node.is_dir:
            sparent.nlink -= 1
            dparent.nlink += 1
        node.ctime = self._clock()
        self._touch_dir(sparent)
        self._touch_dir(dparent)

    async def setattr(self, path: str, changes: SetAttr) -> Attr:
        return self._setattr(self._node(path), changes)

    def _setattr(self, node: _Node, changes: SetAttr) -> Attr:
        if changes.size is not None:
            if node.is_dir:
                raise VfsError(EISDIR)
            if not stat.S_ISREG(node.mode):
                raise VfsError(EINVAL)
            self._resize(node, changes.size)
            node.mtime = self._clock()
        if changes.mode is not None:
            node.mode = stat.S_IFMT(node.mode) | (changes.mode & 0o7777)
        if changes.uid is not None:
            node.uid = changes.uid
        if changes.gid is not None:
            node.gid = changes.gid
        if changes.atime_ns is not None:
            node.atime = changes.atime_ns
        if changes.mtime_ns is not None:
            node.mtime = changes.mtime_ns
        if not changes.empty:
            node.ctime = self._clock()
        return node.attr()


class _MemoryHandle(FileHandle):
    def __init__(self, fs: MemoryProvider, node: _Node, mode: OpenMode) -> None:
        self._fs = fs
        self._node = node
        self.mode = mode
        self._closed = False

    def _live(self) -> _Node:
        if self._closed:
            raise VfsError(EBADF)
        return self._node

    async def read(self, offset: int, size: int) -> bytes:
        node = self._live()
        check_io(offset, size)
        if not self.mode.read:
            raise VfsError(EBADF)
        if node.is_dir:
            raise VfsError(EISDIR)
        return bytes(node.data[offset : offset + size])

    async def write(self, offset: int, data: bytes) -> int:
        node = self._live()
        check_io(offset, len(data))
        if not self.mode.write:
            raise VfsError(EBADF)
        if self.mode.append:
            offset = len(node.data)
        end = offset + len(data)
        if end > len(node.data):
            self._fs._resize(node, end)
        node.data[offset:end] = data
        node.mtime = node.ctime = self._fs._clock()
        return len(data)

    async def getattr(self) -> Attr:
        return self._live().attr()

    async def setattr(self, changes: SetAttr) -> Attr:
        node = self._live()
        if changes.size is not None and not self.mode.write:
            raise VfsError(EBADF)
        return self._fs._setattr(node, changes)

    async def release(self) -> None:
        if not self._closed:
            self._closed = True
            self._node.opens -= 1
            self._fs._maybe_free(self._node)
