"""CopyOnWriteProvider: a host directory the guest may edit without touching it.

Reads come from the host directory (live), writes stay in memory. The caller inspects the
result with :meth:`~CopyOnWriteProvider.changes` and :meth:`~CopyOnWriteProvider.diff`, then
either :meth:`~CopyOnWriteProvider.commit`\\ s it to the host (through the same
symlink-proof :class:`RealFSProvider` that serves the reads) or
:meth:`~CopyOnWriteProvider.discard`\\ s it.

A path counts as modified when its type, permission bits, content or link target differ
from the host; owners and timestamps alone do not count, and a commit does not apply them.

Everything here is written by the guest, so it is treated as hostile on the way out: names in
:meth:`~CopyOnWriteProvider.diff` and ``str(changes)`` are quoted like git quotes them (a name
holding a newline cannot forge a diff header), and :meth:`~CopyOnWriteProvider.commit` refuses
symlinks that would point outside the mounted directory on the host unless told otherwise.
"""

from __future__ import annotations

import difflib
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from . import paths
from .errors import EPERM, ESTALE, VfsError
from .memory import MemoryProvider
from .overlay import OverlayProvider, probe, walk
from .provider import MAX_IO, Attr, OpenMode, Provider, SetAttr
from .realfs import RealFSProvider

MAX_DIFF_BYTES = 4 * 1024 * 1024  # larger files are reported as differing, not diffed
# The guest's edits live in host memory until commit or discard: part of the VM's host memory
# budget. Past them writes fail with ENOSPC (bytes) or ENFILE (files), never host growth.
COW_MAX_BYTES = 256 << 20  # file contents in the upper layer
COW_MAX_NODES = 1 << 17  # files, directories and symlinks in the upper layer (~300 bytes each)
_READ = OpenMode()
_CREATE = OpenMode(read=False, write=True, exclusive=True)


@dataclass(frozen=True, slots=True)
class Changes:
    added: tuple[str, ...] = ()
    modified: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.modified or self.deleted)

    def __str__(self) -> str:
        """One ``A``/``M``/``D`` line per path, names quoted as git quotes them."""
        rows = [("A", p) for p in self.added] + [("M", p) for p in self.modified]
        rows += [("D", p) for p in self.deleted]
        return "".join(f"{kind}\t{quote_path(path.lstrip('/'))}\n" for kind, path in sorted(rows, key=lambda r: r[1]))


class CommitConflict(VfsError):
    """The host changed paths the guest also changed; ``paths`` lists them."""

    def __init__(self, conflicts: Iterable[str]) -> None:
        self.paths = tuple(sorted(conflicts))
        super().__init__(ESTALE, "changed on the host since copied: " + ", ".join(self.paths))


class ExternalSymlinks(VfsError):
    """``commit()`` found symlinks that would point outside the mounted directory; ``paths`` lists them."""

    def __init__(self, links: Iterable[str]) -> None:
        self.paths = tuple(sorted(links))
        super().__init__(
            EPERM,
            "symlinks pointing outside the mounted directory (commit(allow_external_symlinks=True) "
            "writes them anyway): " + ", ".join(quote_path(p) for p in self.paths),
        )


# C escapes git uses in quoted names (quote.c, sq_lookup); every other control byte is octal.
_GIT_ESCAPES = {7: "\\a", 8: "\\b", 9: "\\t", 10: "\\n", 11: "\\v", 12: "\\f", 13: "\\r",
                34: '\\"', 92: "\\\\"}


def quote_path(name: str) -> str:
    """``name`` as git prints it: unchanged when plain, else in double quotes with C escapes and
    octal bytes (``core.quotePath``), so no name can add lines to a diff or a listing."""
    raw = paths.encode(name)
    if all(0x20 <= b < 0x7F and b not in (34, 92) for b in raw):
        return name
    out = "".join(_GIT_ESCAPES.get(b) or (chr(b) if 0x20 <= b < 0x7F else f"\\{b:03o}") for b in raw)
    return f'"{out}"'


def _prefixed(prefix: str, name: str) -> str:
    """``a/name`` or ``"a/na\\nme"``: git quotes the prefix along with the name."""
    quoted = quote_path(name)
    return f'"{prefix}{quoted[1:]}' if quoted.startswith('"') else prefix + name


def link_stays_inside(path: str, target: str) -> bool:
    """Would a symlink at ``path`` (mount-relative, absolute form) to ``target`` stay inside the mount?

    Only relative targets whose ``..`` steps all come first and do not climb above the mount
    root: the steps up then go through real directories of the mount (a ``..`` after a name
    could go back up through another symlink, somewhere else).
    """
    if not target or target.startswith("/"):
        return False
    parts = [p for p in target.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    if ".." in parts[ups:]:
        return False
    return ups <= paths.parent_of(path).count("/") - (paths.parent_of(path) == "/")


def _depth(path: str) -> int:
    return path.count("/")


def _same_type(a: Attr, b: Attr) -> bool:
    return stat.S_IFMT(a.mode) == stat.S_IFMT(b.mode)


def _signature(attr: Attr | None) -> tuple[int, int, int, int] | None:
    if attr is None:
        return None
    return (stat.S_IFMT(attr.mode), attr.ino, attr.size, attr.mtime_ns)


async def read_all(provider: Provider, path: str, limit: int | None = None) -> bytes:
    handle = await provider.open(path, _READ)
    try:
        out = bytearray()
        while chunk := await handle.read(len(out), MAX_IO):
            out += chunk
            if limit is not None and len(out) > limit:
                break
        return bytes(out)
    finally:
        await handle.release()


class CopyOnWriteProvider(OverlayProvider):
    """``source`` is a host directory (served by RealFSProvider) or any provider."""

    def __init__(
        self,
        source: str | os.PathLike[str] | Provider,
        *,
        max_bytes: int = COW_MAX_BYTES,
        max_nodes: int = COW_MAX_NODES,
        use_openat2: bool | None = None,
    ) -> None:
        lower = (
            source
            if isinstance(source, Provider)
            else RealFSProvider(source, use_openat2=use_openat2)
        )
        self._max_bytes = max_bytes
        self._max_nodes = max_nodes
        super().__init__(lower, self._new_upper())

    def _new_upper(self) -> MemoryProvider:
        return MemoryProvider(max_bytes=self._max_bytes, max_nodes=self._max_nodes)

    # --- inspection ----------------------------------------------------------------------------

    async def _differs(self, path: str, up: Attr, lo: Attr) -> bool:
        if not _same_type(up, lo) or (up.mode & 0o7777) != (lo.mode & 0o7777):
            return True
        if stat.S_ISLNK(up.mode):
            return await self.upper.readlink(path) != await self.lower.readlink(path)
        if stat.S_ISREG(up.mode):
            if up.size != lo.size:
                return True
            return await read_all(self.upper, path) != await read_all(self.lower, path)
        return False

    async def changes(self) -> Changes:
        added: list[str] = []
        modified: list[str] = []
        in_upper: set[str] = set()
        async for path, up in self.walk_upper():
            in_upper.add(path)
            lo = await probe(self.lower.getattr, path)
            if lo is None:
                added.append(path)
            elif await self._differs(path, up, lo):
                modified.append(path)
        deleted: set[str] = set()
        for top in self._masked:
            async for path, _ in walk(self.lower, top):
                if path not in in_upper:
                    deleted.add(path)
        return Changes(tuple(sorted(added)), tuple(sorted(modified)), tuple(sorted(deleted)))

    async def diff(self) -> str:
        """A unified diff of the changes (``a/`` = host, ``b/`` = guest), like ``git diff``."""
        ch = await self.changes()
        out: list[str] = []
        for path in sorted({*ch.added, *ch.modified, *ch.deleted}):
            old = None if path in ch.added else await probe(self.lower.getattr, path)
            new = None if path in ch.deleted else await probe(self.upper.getattr, path)
            if old is not None and new is not None and not _same_type(old, new):
                out += await self._diff_one(path, old, None)
                out += await self._diff_one(path, None, new)
            else:
                out += await self._diff_one(path, old, new)
        return "".join(out)

    async def _content(self, provider: Provider, path: str, attr: Attr | None) -> bytes | None:
        if attr is None:
            return b""
        if stat.S_ISLNK(attr.mode):
            return paths.encode(await provider.readlink(path))
        if attr.size > MAX_DIFF_BYTES:
            return None
        return await read_all(provider, path, MAX_DIFF_BYTES)

    async def _diff_one(self, path: str, old: Attr | None, new: Attr | None) -> list[str]:
        kind = old or new
        assert kind is not None
        if stat.S_ISDIR(kind.mode):
            if old is not None and new is not None:
                rel = path.lstrip("/")
                return [f"diff --git {_prefixed('a/', rel)} {_prefixed('b/', rel)}\n"] + _mode_lines(old, new)
            return []  # like git: directories appear through their files
        rel = path.lstrip("/")
        head = [f"diff --git {_prefixed('a/', rel)} {_prefixed('b/', rel)}\n"]
        if old is None:
            assert new is not None
            head.append(f"new file mode {new.mode:o}\n")
        elif new is None:
            head.append(f"deleted file mode {old.mode:o}\n")
        else:
            head += _mode_lines(old, new)
        a = await self._content(self.lower, path, old)
        b = await self._content(self.upper, path, new)
        if a == b:
            return head
        a_name = _prefixed("a/", rel) if old is not None else "/dev/null"
        b_name = _prefixed("b/", rel) if new is not None else "/dev/null"
        text_a, text_b = _text(a), _text(b)
        if text_a is None or text_b is None:
            return head + [f"Binary files {a_name} and {b_name} differ\n"]
        lines = difflib.unified_diff(
            text_a.splitlines(keepends=True),
            text_b.splitlines(keepends=True),
            a_name,
            b_name,
        )
        for line in lines:
            head.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
        return head

    # --- commit / discard ------------------------------------------------------------------------

    async def conflicts(self, changes: Changes | None = None) -> tuple[str, ...]:
        """Changed paths whose host version is no longer the one the guest started from."""
        ch = changes if changes is not None else await self.changes()
        out = []
        for path in (*ch.added, *ch.modified, *ch.deleted):
            if path not in self._base:
                continue
            now = await probe(self.lower.getattr, path)
            if _signature(now) != _signature(self._base[path]):
                out.append(path)
        return tuple(sorted(out))

    async def commit(self, *, force: bool = False, allow_external_symlinks: bool = False) -> Changes:
        """Write the changes to the host and start over from the host's new state.

        Raises :class:`CommitConflict` (and writes nothing) when the host changed a path the
        guest changed too, unless ``force``, and :class:`ExternalSymlinks` (writes nothing)
        when a symlink the guest made would point outside the mounted directory on the host
        (an absolute target, or ``..`` climbing above the root), unless
        ``allow_external_symlinks``. Files are written to a temporary name and renamed into
        place. Handles the guest still has open on changed files keep writing to memory that
        is no longer part of the view.
        """
        async with self._lock:
            ch = await self.changes()
            if not force:
                bad = await self.conflicts(ch)
                if bad:
                    raise CommitConflict(bad)
            if not allow_external_symlinks:
                outside = [
                    path for path in (*ch.added, *ch.modified)
                    if stat.S_ISLNK((await self.upper.getattr(path)).mode)
                    and not link_stays_inside(path, await self.upper.readlink(path))
                ]
                if outside:
                    raise ExternalSymlinks(outside)
            lower = self.lower
            retyped = []
            for path in ch.modified:
                old, new = await lower.getattr(path), await self.upper.getattr(path)
                if not _same_type(old, new):
                    retyped.append(path)
            for path in sorted((*ch.deleted, *retyped), key=_depth, reverse=True):
                attr = await probe(lower.getattr, path)
                if attr is None:
                    continue
                if stat.S_ISDIR(attr.mode):
                    await lower.rmdir(path)
                else:
                    await lower.unlink(path)
            linked: dict[int, str] = {}
            for path in sorted((*ch.added, *ch.modified), key=lambda p: (_depth(p), p)):
                await self._commit_one(path, linked)
            self._reset(self._new_upper())
        return ch

    async def _commit_one(self, path: str, linked: dict[int, str]) -> None:
        lower, up = self.lower, await self.upper.getattr(path)
        perm = up.mode & 0o7777
        if stat.S_ISDIR(up.mode):
            if await probe(lower.getattr, path) is None:
                await lower.mkdir(path, perm)
            await lower.setattr(path, SetAttr(mode=perm))
            return
        tmp = paths.child(paths.parent_of(path), f".gondolin-{secrets.token_hex(6)}.tmp")
        if stat.S_ISLNK(up.mode):
            await lower.symlink(tmp, await self.upper.readlink(path))
        elif up.nlink > 1 and up.ino in linked:
            await lower.link(linked[up.ino], tmp)
        else:
            dst = await lower.create(tmp, perm, _CREATE)
            try:
                src = await self.upper.open(path, _READ)
                try:
                    offset = 0
                    while chunk := await src.read(offset, MAX_IO):
                        offset += await dst.write(offset, chunk)
                finally:
                    await src.release()
            finally:
                await dst.release()
            await lower.setattr(tmp, SetAttr(mode=perm, mtime_ns=up.mtime_ns))
            linked[up.ino] = path
        try:
            await lower.rename(tmp, path)
        except BaseException:
            await probe(lower.unlink, tmp)
            raise

    def discard(self) -> None:
        """Forget every change; the view is the host directory again."""
        self._reset(self._new_upper())


def _mode_lines(old: Attr, new: Attr) -> list[str]:
    if old.mode == new.mode:
        return []
    return [f"old mode {old.mode:o}\n", f"new mode {new.mode:o}\n"]


def _text(data: bytes | None) -> str | None:
    if data is None or b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
