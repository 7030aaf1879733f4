"""Helpers shared by the VFS tests."""

from __future__ import annotations

from collections.abc import Awaitable

from gondolin.vfs import OpenMode, Provider, VfsError

RW = OpenMode(read=True, write=True)
WO = OpenMode(read=False, write=True)
RO = OpenMode()
NEW = OpenMode(read=True, write=True, exclusive=True)


async def errno_of(aw: Awaitable[object]) -> int:
    """The errno an operation fails with; fails the test if it succeeds."""
    try:
        await aw
    except VfsError as exc:
        assert exc.errno is not None
        return exc.errno
    raise AssertionError("operation succeeded but an error was expected")


async def write_file(fs: Provider, path: str, data: bytes, mode: int = 0o644) -> None:
    handle = await fs.create(path, mode, OpenMode(read=True, write=True, truncate=True))
    try:
        offset = 0
        while offset < len(data):
            offset += await handle.write(offset, data[offset : offset + 65536])
    finally:
        await handle.release()


async def read_file(fs: Provider, path: str) -> bytes:
    handle = await fs.open(path, RO)
    try:
        out = bytearray()
        while chunk := await handle.read(len(out), 65536):
            out += chunk
        return bytes(out)
    finally:
        await handle.release()


async def names(fs: Provider, path: str) -> list[str]:
    return sorted(e.name for e in await fs.readdir(path))
