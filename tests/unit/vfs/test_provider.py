"""The provider contract: every op and errno, against every full provider (see conftest)."""

from __future__ import annotations

import errno as E
import stat

import pytest

from gondolin.vfs import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Caller,
    OpenMode,
    Provider,
    SetAttr,
    StatFs,
)
from gondolin.vfs.provider import check_permission, copy_range
from gondolin.vfs.wire import MAX_IO, Attr

from .support import NEW, RO, RW, WO, errno_of, names, read_file, write_file

pytestmark = pytest.mark.anyio


async def test_root_and_missing(fs: Provider) -> None:
    assert stat.S_ISDIR((await fs.getattr("/")).mode)
    assert await errno_of(fs.getattr("/missing")) == E.ENOENT
    await write_file(fs, "/f", b"x")
    assert await errno_of(fs.getattr("/f/below")) == E.ENOTDIR
    assert await errno_of(fs.open("/missing", RO)) == E.ENOENT


async def test_create_write_read(fs: Provider) -> None:
    handle = await fs.create("/a", 0o640, NEW)
    assert await handle.write(0, b"hello") == 5
    assert await handle.write(10, b"world") == 5  # a hole in between reads as zeros
    attr = await handle.getattr()
    assert stat.S_ISREG(attr.mode) and attr.mode & 0o7777 == 0o640 and attr.size == 15
    assert await handle.read(0, 100) == b"hello\0\0\0\0\0world"
    assert await handle.read(100, 10) == b""
    await handle.release()
    assert (await fs.getattr("/a")).size == 15
    assert await errno_of(fs.create("/a", 0o644, NEW)) == E.EEXIST
    # Without O_EXCL, create opens the existing file (and truncates when asked).
    again = await fs.create("/a", 0o644, OpenMode(read=True, write=True, truncate=True))
    assert (await again.getattr()).size == 0
    await again.release()


async def test_open_modes(fs: Provider) -> None:
    await write_file(fs, "/f", b"abc")
    ro = await fs.open("/f", RO)
    assert await errno_of(ro.write(0, b"x")) == E.EBADF
    await ro.release()
    wo = await fs.open("/f", WO)
    assert await errno_of(wo.read(0, 1)) == E.EBADF
    await wo.release()
    app = await fs.open("/f", OpenMode(read=True, write=True, append=True))
    await app.write(0, b"def")
    await app.release()
    assert await read_file(fs, "/f") == b"abcdef"
    trunc = await fs.open("/f", OpenMode(read=False, write=True, truncate=True))
    await trunc.release()
    assert await read_file(fs, "/f") == b""


async def test_oversized_io_is_refused(fs: Provider) -> None:
    handle = await fs.create("/f", 0o644, NEW)
    assert await errno_of(handle.write(0, bytes(MAX_IO + 1))) == E.EINVAL
    assert await errno_of(handle.read(0, MAX_IO + 1)) == E.EINVAL
    assert await errno_of(handle.read(-1, 1)) == E.EINVAL
    assert await handle.write(0, bytes(MAX_IO)) == MAX_IO
    await handle.release()


@pytest.mark.parametrize(
    ("path", "errno"),
    [
        ("relative", E.EINVAL),
        ("/a/../b", E.EINVAL),
        ("/./a", E.EINVAL),
        ("/a\0b", E.EINVAL),
        ("/" + "n" * 256, E.ENAMETOOLONG),
        ("/" + "d/" * 2100, E.ENAMETOOLONG),
    ],
)
async def test_bad_paths(fs: Provider, path: str, errno: int) -> None:
    assert await errno_of(fs.getattr(path)) == errno
    assert await errno_of(fs.mkdir(path, 0o755)) == errno
    assert await errno_of(fs.create(path, 0o644, NEW)) == errno


async def test_mkdir_rmdir_unlink_errnos(fs: Provider) -> None:
    attr = await fs.mkdir("/d", 0o750)
    assert stat.S_ISDIR(attr.mode) and attr.mode & 0o7777 == 0o750
    assert await errno_of(fs.mkdir("/d", 0o755)) == E.EEXIST
    assert await errno_of(fs.mkdir("/missing/d", 0o755)) == E.ENOENT
    await write_file(fs, "/d/f", b"1")
    assert await errno_of(fs.mkdir("/d/f/g", 0o755)) == E.ENOTDIR
    assert await errno_of(fs.rmdir("/d")) == E.ENOTEMPTY
    assert await errno_of(fs.rmdir("/d/f")) == E.ENOTDIR
    assert await errno_of(fs.unlink("/d")) == E.EISDIR
    assert await errno_of(fs.unlink("/d/nope")) == E.ENOENT
    assert await errno_of(fs.rmdir("/nope")) == E.ENOENT
    assert await errno_of(fs.rmdir("/")) == E.EBUSY
    await fs.unlink("/d/f")
    await fs.rmdir("/d")
    assert await names(fs, "/") == []


async def test_readdir(fs: Provider) -> None:
    await fs.mkdir("/d", 0o755)
    await write_file(fs, "/d/b", b"")
    await write_file(fs, "/d/a", b"123")
    await fs.symlink("/d/l", "a")
    entries = {e.name: e.attr for e in await fs.readdir("/d")}
    assert sorted(entries) == ["a", "b", "l"]
    assert entries["a"].size == 3 and stat.S_ISLNK(entries["l"].mode)
    assert await errno_of(fs.readdir("/d/a")) == E.ENOTDIR
    assert await errno_of(fs.readdir("/nope")) == E.ENOENT


async def test_symlinks_are_never_followed(fs: Provider) -> None:
    await write_file(fs, "/target", b"data")
    attr = await fs.symlink("/link", "target")
    assert stat.S_ISLNK(attr.mode)
    assert await fs.readlink("/link") == "target"
    assert stat.S_ISLNK((await fs.getattr("/link")).mode)
    assert await errno_of(fs.open("/link", RO)) == E.ELOOP
    assert await errno_of(fs.readlink("/target")) == E.EINVAL
    assert await errno_of(fs.symlink("/link", "x")) == E.EEXIST
    await fs.symlink("/dirlink", "/")
    assert await errno_of(fs.getattr("/dirlink/target")) in (E.ENOTDIR, E.ELOOP)
    assert await errno_of(fs.symlink("/empty", "")) == E.EINVAL
    assert await errno_of(fs.symlink("/long", "x" * 4096)) == E.ENAMETOOLONG


async def test_hard_links(fs: Provider) -> None:
    await write_file(fs, "/a", b"shared")
    attr = await fs.link("/a", "/b")
    assert attr.nlink == 2
    assert (await fs.getattr("/a")).ino == (await fs.getattr("/b")).ino
    handle = await fs.open("/b", RW)
    await handle.write(0, b"SHARED")
    await handle.release()
    assert await read_file(fs, "/a") == b"SHARED"
    await fs.mkdir("/d", 0o755)
    assert await errno_of(fs.link("/d", "/d2")) == E.EPERM
    assert await errno_of(fs.link("/a", "/b")) == E.EEXIST
    assert await errno_of(fs.link("/nope", "/c")) == E.ENOENT
    await fs.unlink("/a")
    assert (await fs.getattr("/b")).nlink == 1


async def test_rename(fs: Provider) -> None:
    await write_file(fs, "/a", b"A")
    await write_file(fs, "/b", b"B")
    await fs.mkdir("/d", 0o755)
    await fs.mkdir("/e", 0o755)
    await write_file(fs, "/e/x", b"")
    await fs.rename("/a", "/d/a")
    assert await names(fs, "/d") == ["a"]
    assert await errno_of(fs.rename("/b", "/d/a", RENAME_NOREPLACE)) == E.EEXIST
    await fs.rename("/b", "/d/a")  # replaces
    assert await read_file(fs, "/d/a") == b"B"
    assert await errno_of(fs.getattr("/b")) == E.ENOENT
    assert await errno_of(fs.rename("/missing", "/z")) == E.ENOENT
    assert await errno_of(fs.rename("/d", "/d/sub")) == E.EINVAL
    assert await errno_of(fs.rename("/d/a", "/e")) == E.EISDIR
    assert await errno_of(fs.rename("/d", "/e/x")) == E.ENOTDIR
    assert await errno_of(fs.rename("/d", "/e")) == E.ENOTEMPTY
    assert await errno_of(fs.rename("/d/a", "/z", RENAME_NOREPLACE | RENAME_EXCHANGE)) == E.EINVAL
    assert await errno_of(fs.rename("/d/a", "/z", 1 << 5)) == E.EINVAL
    await fs.mkdir("/empty", 0o755)
    await fs.rename("/d", "/empty")  # a directory may replace an empty one
    assert await names(fs, "/empty") == ["a"]
    assert await errno_of(fs.rename("/", "/x")) in (E.EBUSY, E.EINVAL)


async def test_rename_exchange(fs: Provider) -> None:
    await write_file(fs, "/a", b"A")
    await fs.mkdir("/d", 0o755)
    await write_file(fs, "/d/inner", b"I")
    await fs.rename("/a", "/d", RENAME_EXCHANGE)
    assert await read_file(fs, "/d") == b"A"
    assert await names(fs, "/a") == ["inner"]
    assert await errno_of(fs.rename("/d", "/nothing", RENAME_EXCHANGE)) == E.ENOENT


async def test_setattr(fs: Provider) -> None:
    await write_file(fs, "/f", b"0123456789")
    attr = await fs.setattr("/f", SetAttr(mode=0o600))
    assert attr.mode & 0o7777 == 0o600 and stat.S_ISREG(attr.mode)
    assert (await fs.setattr("/f", SetAttr(size=4))).size == 4
    assert await read_file(fs, "/f") == b"0123"
    assert (await fs.setattr("/f", SetAttr(size=6))).size == 6
    assert await read_file(fs, "/f") == b"0123\0\0"
    attr = await fs.setattr("/f", SetAttr(atime_ns=1_000_000_000, mtime_ns=2_000_000_000))
    assert (attr.atime_ns, attr.mtime_ns) == (1_000_000_000, 2_000_000_000)
    attr = await fs.setattr("/f", SetAttr(mtime_ns=3_000_000_000))
    assert (attr.atime_ns, attr.mtime_ns) == (1_000_000_000, 3_000_000_000)
    attr = await fs.setattr("/f", SetAttr(uid=1234, gid=4321))
    assert (attr.uid, attr.gid) == (1234, 4321)
    await fs.mkdir("/d", 0o755)
    assert await errno_of(fs.setattr("/d", SetAttr(size=0))) == E.EISDIR
    assert await errno_of(fs.setattr("/nope", SetAttr(mode=0o644))) == E.ENOENT
    assert (await fs.setattr("/d", SetAttr(mode=0o700))).mode & 0o7777 == 0o700


async def test_handle_ops(fs: Provider) -> None:
    handle = await fs.create("/f", 0o644, NEW)
    await handle.write(0, b"abc")
    await handle.fsync(False)
    await handle.fsync(True)
    await handle.flush()
    await handle.fallocate(0, 100, 0)
    assert (await handle.getattr()).size == 100
    await handle.fallocate(0, 10, 0)  # never shrinks
    assert (await handle.getattr()).size == 100
    assert await errno_of(handle.fallocate(0, 10, 1)) == E.EOPNOTSUPP
    assert (await handle.setattr(SetAttr(size=2))).size == 2
    # An open file outlives its name.
    await fs.unlink("/f")
    assert await handle.read(0, 10) == b"ab"
    await handle.write(2, b"c")
    assert (await handle.getattr()).size == 3
    await handle.release()
    await handle.release()  # idempotent


async def test_copy_range(fs: Provider) -> None:
    await write_file(fs, "/src", bytes(range(256)) * 4096)  # 1 MiB
    src = await fs.open("/src", RO)
    dst = await fs.create("/dst", 0o644, NEW)
    assert await copy_range(src, 1000, dst, 10, 500_000) == 500_000
    assert await copy_range(src, (1 << 20) - 5, dst, 0, 100) == 5  # short at EOF
    await src.release()
    await dst.release()
    data = await read_file(fs, "/dst")
    assert data[10:] == (bytes(range(256)) * 4096)[1000:501000]
    ro = await fs.open("/dst", RO)
    assert await errno_of(copy_range(ro, 0, ro, 0, 1)) == E.EBADF
    await ro.release()


async def test_statfs_and_access(fs: Provider) -> None:
    info = await fs.statfs("/")
    assert isinstance(info, StatFs) and info.bsize > 0 and info.namelen >= 255
    await write_file(fs, "/f", b"", mode=0o600)
    await fs.access("/f", 4 | 2)
    assert await errno_of(fs.access("/f", 1)) == E.EACCES  # even root needs an x bit
    assert await errno_of(fs.access("/f", 4, Caller(uid=1000, gid=1000))) == E.EACCES
    assert await errno_of(fs.access("/nope", 0)) == E.ENOENT


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "mask", "ok"),
    [
        (0o640, 1000, 1000, 4, True),  # owner read
        (0o640, 1000, 1000, 2, True),
        (0o440, 1000, 1000, 2, False),
        (0o640, 2000, 1000, 4, True),  # group read
        (0o640, 2000, 1000, 2, False),
        (0o640, 2000, 2000, 4, False),  # other: nothing
        (0o644, 2000, 2000, 4, True),
        (0o755, 2000, 2000, 1, True),
        (0o000, 0, 0, 6, True),  # root reads and writes anything
        (0o644, 0, 0, 1, False),  # but executes only with an x bit
        (0o744, 0, 0, 1, True),
    ],
)
def test_check_permission(mode: int, uid: int, gid: int, mask: int, ok: bool) -> None:
    attr = Attr(ino=2, mode=stat.S_IFREG | mode, uid=1000, gid=1000)
    caller = Caller(uid=uid, gid=gid)
    if ok:
        check_permission(attr, mask, caller)
    else:
        with pytest.raises(OSError) as info:
            check_permission(attr, mask, caller)
        assert info.value.errno == E.EACCES


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (0o0, OpenMode()),
        (0o1, OpenMode(read=False, write=True)),
        (0o2, OpenMode(read=True, write=True)),
        (0o2 | 0o2000, OpenMode(read=True, write=True, append=True)),
        (0o1 | 0o1000, OpenMode(read=False, write=True, truncate=True)),
        (0o0 | 0o1000, OpenMode()),  # O_TRUNC without write access does nothing
        (0o2 | 0o100 | 0o200, OpenMode(read=True, write=True, exclusive=True)),
        (0o2 | 0o200, OpenMode(read=True, write=True)),  # O_EXCL needs O_CREAT
        (0o1 | 0o4010000, OpenMode(read=False, write=True, sync=True)),
    ],
)
def test_open_mode_from_linux_flags(flags: int, expected: OpenMode) -> None:
    assert OpenMode.from_linux_flags(flags) == expected


def test_open_mode_bad_access() -> None:
    with pytest.raises(OSError):
        OpenMode.from_linux_flags(0o3)
