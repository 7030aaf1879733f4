from __future__ import annotations

import errno as E

import pytest

from gondolin.vfs import MemoryProvider, OpenMode, ReadonlyProvider, SetAttr

from .support import NEW, RO, RW, errno_of, read_file, write_file

pytestmark = pytest.mark.anyio


async def test_everything_that_writes_is_erofs() -> None:
    inner = MemoryProvider()
    await write_file(inner, "/f", b"data")
    await inner.mkdir("/d", 0o755)
    fs = ReadonlyProvider(inner)
    assert fs.readonly
    assert await read_file(fs, "/f") == b"data"
    for op in (
        fs.open("/f", RW),
        fs.open("/f", OpenMode(read=True, truncate=True)),
        fs.open("/f", OpenMode(read=True, append=True)),
        fs.create("/g", 0o644, NEW),
        fs.mkdir("/e", 0o755),
        fs.symlink("/l", "f"),
        fs.link("/f", "/h"),
        fs.unlink("/f"),
        fs.rmdir("/d"),
        fs.rename("/f", "/g"),
        fs.setattr("/f", SetAttr(mode=0o777)),
        fs.access("/f", 2),
    ):
        assert await errno_of(op) == E.EROFS
    handle = await fs.open("/f", RO)
    assert await errno_of(handle.write(0, b"x")) == E.EROFS
    assert await errno_of(handle.setattr(SetAttr(size=0))) == E.EROFS
    assert await errno_of(handle.fallocate(0, 10, 0)) == E.EROFS
    await handle.release()
    await fs.access("/f", 4)
    assert await read_file(inner, "/f") == b"data"


async def test_base_provider_defaults() -> None:
    """A provider that implements only reads refuses writes with EROFS or EOPNOTSUPP."""
    from gondolin.vfs.provider import SYNTHETIC_STATFS, Provider

    class Minimal(Provider):
        async def getattr(self, path):  # type: ignore[no-untyped-def]
            return await inner.getattr(path)

        async def readdir(self, path):  # type: ignore[no-untyped-def]
            return await inner.readdir(path)

        async def open(self, path, mode):  # type: ignore[no-untyped-def]
            return await inner.open(path, mode)

    inner = MemoryProvider()
    fs = Minimal()
    assert await errno_of(fs.mkdir("/x", 0o755)) == E.EOPNOTSUPP
    assert await errno_of(fs.readlink("/")) == E.EINVAL
    assert await fs.statfs("/") == SYNTHETIC_STATFS
