from __future__ import annotations

import errno as E
import stat

import pytest

from gondolin.vfs import MemoryProvider, MountRouter, ReadonlyProvider
from gondolin.vfs.router import single_or_router

from .support import NEW, RO, errno_of, names, read_file, write_file

pytestmark = pytest.mark.anyio


@pytest.fixture
async def mounts() -> tuple[MountRouter, MemoryProvider, MemoryProvider, MemoryProvider]:
    root, ws, deep = MemoryProvider(), MemoryProvider(), MemoryProvider()
    await write_file(root, "/etc-file", b"root")
    await root.mkdir("/workspace", 0o755)
    await write_file(root, "/workspace/masked", b"under the mount")
    await write_file(ws, "/code.py", b"ws")
    await write_file(deep, "/x", b"deep")
    router = MountRouter({"/": root, "/workspace": ws, "/data/cache/deep": deep})
    return router, root, ws, deep


@pytest.mark.parametrize(
    ("path", "index", "sub"),
    [
        ("/", 1, "/"),
        ("/etc-file", 1, "/etc-file"),
        ("/workspace", 2, "/"),
        ("/workspace/a/b", 2, "/a/b"),
        ("/workspacex", 1, "/workspacex"),  # a prefix of the name is not a prefix of the path
        ("/data/cache/deep/x", 3, "/x"),
        ("/data/cache", 1, "/data/cache"),
    ],
)
async def test_route(mounts: tuple, path: str, index: int, sub: str) -> None:
    router = mounts[0]
    hit = router.route(path)
    assert hit is not None and hit[1:] == (index, sub)


async def test_views(mounts: tuple) -> None:
    router, root, ws, deep = mounts
    assert await names(router, "/") == ["data", "etc-file", "workspace"]
    assert await names(router, "/workspace") == ["code.py"]  # the mount hides "masked"
    assert await names(router, "/data") == ["cache"]  # synthesised
    assert stat.S_ISDIR((await router.getattr("/data/cache")).mode)
    assert await read_file(router, "/data/cache/deep/x") == b"deep"
    assert await errno_of(router.getattr("/data/nope")) == E.ENOENT
    inos = {(await router.getattr(p)).ino for p in ("/etc-file", "/workspace/code.py", "/data")}
    assert len(inos) == 3  # every mount numbers from 1 internally; the router keeps them apart
    assert (await router.statfs("/data")).blocks > 0


async def test_writes_route_and_boundaries_hold(mounts: tuple) -> None:
    router, root, ws, deep = mounts
    await write_file(router, "/workspace/new", b"n")
    assert await read_file(ws, "/new") == b"n"
    handle = await router.open("/workspace/new", RO)
    assert (await handle.getattr()).ino == (await router.getattr("/workspace/new")).ino
    await handle.release()
    assert await errno_of(router.rename("/workspace/new", "/moved")) == E.EXDEV
    assert await errno_of(router.link("/workspace/new", "/hard")) == E.EXDEV
    for op in (
        router.rmdir("/workspace"),
        router.rename("/workspace", "/w2"),
        router.rmdir("/data"),
        router.unlink("/data/cache/deep"),
    ):
        assert await errno_of(op) == E.EBUSY
    assert await errno_of(router.create("/data/cache/file", 0o644, NEW)) == E.EROFS
    assert await errno_of(router.mkdir("/data/new", 0o755)) == E.EROFS


async def test_without_root_mount() -> None:
    router = MountRouter({"/a": MemoryProvider()})
    assert await names(router, "/") == ["a"]
    assert await errno_of(router.getattr("/b")) == E.ENOENT
    assert await errno_of(router.create("/b", 0o644, NEW)) == E.EROFS  # synthesised root
    assert await errno_of(router.unlink("/b/c")) == E.ENOENT
    assert await errno_of(router.open("/", RO)) == E.EISDIR
    assert not router.readonly
    ro = MountRouter({"/a": ReadonlyProvider(MemoryProvider())})
    assert ro.readonly


@pytest.mark.parametrize("bad", [{}, {"relative": MemoryProvider()}, {"/a/": MemoryProvider()}])
def test_bad_mount_tables(bad: dict) -> None:
    with pytest.raises((ValueError, OSError)):
        MountRouter(bad)


def test_single_or_router() -> None:
    only = MemoryProvider()
    assert single_or_router({"/": only}) is only
    assert isinstance(single_or_router({"/x": only}), MountRouter)
