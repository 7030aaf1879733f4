from __future__ import annotations

import errno as E
import stat

import pytest

from gondolin.vfs import Caller, MemoryProvider, OpenMode, SetAttr

from .support import NEW, errno_of, write_file

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        return self.now


async def test_byte_quota() -> None:
    fs = MemoryProvider(max_bytes=10)
    handle = await fs.create("/f", 0o644, NEW)
    assert await handle.write(0, b"0123456789") == 10
    assert await errno_of(handle.write(10, b"x")) == E.ENOSPC
    assert await errno_of(handle.setattr(SetAttr(size=11))) == E.ENOSPC
    assert await errno_of(fs.setattr("/f", SetAttr(size=1 << 40))) == E.ENOSPC
    await handle.setattr(SetAttr(size=4))
    assert fs.used_bytes == 4
    await handle.release()
    info = await fs.statfs("/")
    assert info.bfree == 0 and info.blocks == 0  # 10 bytes is less than a block


async def test_node_quota() -> None:
    fs = MemoryProvider(max_nodes=3)  # the root counts
    await fs.mkdir("/a", 0o755)
    await fs.symlink("/b", "a")
    assert await errno_of(fs.mkdir("/c", 0o755)) == E.ENOSPC
    assert await errno_of(fs.create("/c", 0o644, NEW)) == E.ENOSPC
    await fs.unlink("/b")
    await fs.mkdir("/c", 0o755)


async def test_space_is_returned_when_last_link_and_handle_go() -> None:
    fs = MemoryProvider()
    await write_file(fs, "/a", b"x" * 100)
    await fs.link("/a", "/b")
    handle = await fs.open("/b", OpenMode())
    await fs.unlink("/a")
    await fs.unlink("/b")
    assert fs.used_bytes == 100  # still open
    assert fs.used_nodes == 2
    await handle.release()
    assert fs.used_bytes == 0 and fs.used_nodes == 1
    await write_file(fs, "/c", b"y" * 10)
    await fs.rename("/c", "/d")
    await write_file(fs, "/e", b"z" * 5)
    await fs.rename("/e", "/d")  # replacing frees the old file
    assert fs.used_bytes == 5 and fs.used_nodes == 2


async def test_owner_times_and_nlink() -> None:
    clock = FakeClock()
    fs = MemoryProvider(clock=clock)
    attr = await fs.mkdir("/d", 0o755, Caller(uid=1000, gid=100))
    assert (attr.uid, attr.gid, attr.nlink, attr.mtime_ns) == (1000, 100, 2, 1_000)
    assert (await fs.getattr("/")).nlink == 3
    clock.now = 2_000
    handle = await fs.create("/d/f", 0o600, NEW, Caller(uid=7, gid=8))
    await handle.release()
    attr = await fs.getattr("/d/f")
    assert (attr.uid, attr.gid, attr.ctime_ns) == (7, 8, 2_000)
    assert (await fs.getattr("/d")).mtime_ns == 2_000
    await fs.mkdir("/e", 0o755)
    await fs.rename("/d", "/e/d")
    assert (await fs.getattr("/")).nlink == 3 and (await fs.getattr("/e")).nlink == 3


async def test_exchange_across_parents_fixes_link_counts() -> None:
    fs = MemoryProvider()
    await fs.mkdir("/p", 0o755)
    await fs.mkdir("/p/dir", 0o755)
    await write_file(fs, "/file", b"")
    await fs.rename("/file", "/p/dir", 2)
    assert stat.S_ISDIR((await fs.getattr("/file")).mode)
    assert (await fs.getattr("/")).nlink == 4  # ".", "p", "file" (now a directory)
    assert (await fs.getattr("/p")).nlink == 2


async def test_rename_hard_link_onto_itself_is_a_no_op() -> None:
    fs = MemoryProvider()
    await write_file(fs, "/a", b"1")
    await fs.link("/a", "/b")
    await fs.rename("/a", "/b")
    assert sorted(e.name for e in await fs.readdir("/")) == ["a", "b"]
