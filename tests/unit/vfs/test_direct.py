"""vm.fs on mounted paths: DirectFS over the providers, and GuestFS routing to it."""

from __future__ import annotations

import errno as E
import stat
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gondolin.errors import GuestFileError
from gondolin.fs import DirEntry, GuestFS
from gondolin.protocol import T
from gondolin.vfs import MemoryProvider, MountRouter
from gondolin.vfs.direct import DirectFS, mounted
from tests.support import Guest, fake_machine

from .support import read_file, write_file

pytestmark = pytest.mark.anyio


class FakeGuest:
    """Stands in for the guest side of vm.fs: records what DirectFS hands back to it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def stat(self, path: str, **kw: Any) -> str:
        self.calls.append(("stat", path))
        return "guest-stat"

    async def scandir(self, path: str) -> list[DirEntry]:
        self.calls.append(("scandir", path))
        return []

    async def open_read(self, path: str, **kw: Any) -> AsyncIterator[bytes]:
        self.calls.append(("open_read", path))

        async def empty() -> AsyncIterator[bytes]:
            yield b"guest"

        return empty()

    async def read_text(self, path: str) -> str:
        assert path == "/etc/passwd"
        return "root:x:0:0:root:/root:/bin/bash\nagent:x:1000:1001::/home/agent:/bin/bash\n"


@pytest.fixture
def mem() -> MemoryProvider:
    return MemoryProvider()


@pytest.fixture
def other() -> MemoryProvider:
    return MemoryProvider()


@pytest.fixture
def setup(mem: MemoryProvider, other: MemoryProvider) -> tuple[DirectFS, FakeGuest, list[str]]:
    mounts = {"/proj": mem, "/data/other": other}
    router = MountRouter(mounts)
    guest = FakeGuest()
    invalidated: list[str] = []
    direct = DirectFS(mounts, guest, lambda: router, invalidated.append)  # type: ignore[arg-type]
    return direct, guest, invalidated


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/proj", True), ("/proj/a/b", True), ("/projspace", False), ("/data", False),
     ("/data/other/x", True), ("/", False)],
)  # fmt: skip
def test_mounted(path: str, expected: bool) -> None:
    assert mounted(["/proj", "/data/other"], path) is expected


async def test_write_read_stat_and_invalidation(
    setup: tuple[DirectFS, FakeGuest, list[str]],
) -> None:
    direct, _, invalidated = setup
    assert await direct.write("/proj/a/b.txt", "hello", mode=0o600, append=False, parents=True,
                              user="agent") == 5  # fmt: skip
    assert await direct.write("/proj/a/b.txt", [b" wo", b"rld"], mode=None, append=True,
                              parents=False, user=None) == 6  # fmt: skip
    st = await direct.stat("/proj/a/b.txt")
    assert (st.size, st.permissions, st.uid, st.gid) == (11, 0o600, 1000, 1001)
    chunks = [c async for c in await direct.open_read("/proj/a/b.txt", offset=2, length=5,
                                                       chunk_size=2)]  # fmt: skip
    assert chunks == [b"ll", b"o ", b"w"]
    assert invalidated == ["/proj/a", "/proj/a/b.txt", "/proj/a/b.txt"]


async def test_symlinks_resolve_inside_and_hand_outside_paths_back(
    setup: tuple[DirectFS, FakeGuest, list[str]], mem: MemoryProvider, other: MemoryProvider
) -> None:
    direct, guest, _ = setup
    await write_file(mem, "/target", b"inside")
    await mem.mkdir("/dir", 0o755)
    await mem.symlink("/rel", "target")
    await mem.symlink("/dir/up", "../target")
    await mem.symlink("/abs", "/data/other/f")
    await write_file(other, "/f", b"other mount")
    await mem.symlink("/dirlink", "dir")
    await mem.symlink("/out", "/etc/hostname")
    await mem.symlink("/loop", "loop")
    assert (await direct.stat("/proj/rel")).size == 6
    assert (await direct.stat("/proj/rel", follow_symlinks=False)).is_symlink
    assert (await direct.stat("/proj/dirlink/up")).size == 6
    assert b"".join([c async for c in await direct.open_read("/proj/abs", offset=0, length=None,
                                                             chunk_size=4)]) == b"other mount"  # fmt: skip
    assert await direct.stat("/proj/out") == "guest-stat"
    assert [c async for c in await direct.open_read("/proj/out", offset=0, length=None,
                                                    chunk_size=4)] == [b"guest"]  # fmt: skip
    assert guest.calls == [("stat", "/etc/hostname"), ("open_read", "/etc/hostname")]
    with pytest.raises(GuestFileError) as err:
        await direct.stat("/proj/loop")
    assert (err.value.errno, err.value.errno_name) == (E.ELOOP, "ELOOP")


async def test_scandir_mkdir_rename_remove(
    setup: tuple[DirectFS, FakeGuest, list[str]], mem: MemoryProvider
) -> None:
    direct, _, invalidated = setup
    await direct.mkdir("/proj/x/y", parents=True, exist_ok=True, mode=0o700)
    await direct.mkdir("/proj/x/y", parents=True, exist_ok=True, mode=0o700)
    for kw, errno in (({"parents": True, "exist_ok": False}, E.EEXIST),
                      ({"parents": False, "exist_ok": True}, E.EEXIST)):  # fmt: skip
        with pytest.raises(GuestFileError) as err:
            await direct.mkdir("/proj/x/y", mode=0o755, **kw)
        assert err.value.errno == errno
    assert stat.S_IMODE((await mem.getattr("/x/y")).mode) == 0o700
    await write_file(mem, "/x/f", b"1")
    await mem.symlink("/x/l", "f")
    assert await direct.scandir("/proj/x") == [
        DirEntry("f", "file"), DirEntry("l", "symlink"), DirEntry("y", "dir")]  # fmt: skip
    await direct.rename("/proj/x/f", "/proj/x/g")
    assert await read_file(mem, "/x/g") == b"1"
    for dst in ("/data/other/g", "/tmp/g"):
        with pytest.raises(GuestFileError) as err:
            await direct.rename("/proj/x/g", dst)
        assert err.value.errno == E.EXDEV
    with pytest.raises(GuestFileError) as err:
        await direct.remove("/proj/x", recursive=False, force=False)
    assert err.value.errno == E.ENOTEMPTY and err.value.path == "/proj/x"
    assert await direct.remove("/proj/x", recursive=True, force=False)
    assert not await direct.remove("/proj/x", recursive=False, force=True)
    assert await mem.readdir("/") == []
    assert "/proj/x" in invalidated and "/proj/x/g" in invalidated


async def test_errors_name_the_path(setup: tuple[DirectFS, FakeGuest, list[str]]) -> None:
    direct, _, _ = setup
    for call in (direct.stat("/proj/nope"), direct.scandir("/proj/nope"),
                 direct.open_read("/proj/nope", offset=0, length=None, chunk_size=1)):  # fmt: skip
        with pytest.raises(GuestFileError) as err:
            await call
        assert (err.value.errno_name, err.value.path) == ("ENOENT", "/proj/nope")
    with pytest.raises(GuestFileError) as err:
        await direct.write("/proj/no/dir", "x", mode=None, append=False, parents=False, user=None)
    assert err.value.errno == E.ENOENT
    with pytest.raises(GuestFileError):
        await direct.write("/proj/f", "x", mode=None, append=False, parents=False, user="nobody")


async def test_guest_fs_routes_mounted_paths_to_the_provider(mem: MemoryProvider) -> None:
    to_guest: list[tuple[str, str]] = []

    async def guest(g: Guest) -> None:  # answers every request: no such file
        while True:
            msg = await g.receive()
            to_guest.append((msg.type_name, msg.p["path"]))
            await g.send(T.ERROR, msg.id, code="ENOENT", errno=E.ENOENT, message="no such file")

    async with fake_machine(guest, mounts={"/proj": mem}) as vm:
        fs = GuestFS(vm, vm)
        await fs.write("/proj/f.txt", b"direct")
        assert await fs.read_bytes("/proj/f.txt") == b"direct"
        assert await fs.listdir("/proj") == ["f.txt"]
        assert await fs.exists("/proj/f.txt") and not await fs.exists("/proj/g")
        await fs.mkdir("/proj/d")
        await fs.rename("/proj/f.txt", "/proj/d/f.txt")
        assert await fs.remove("/proj/d", recursive=True)
        assert vm.invalidated == ["/proj/f.txt", "/proj/d", "/proj/f.txt", "/proj/d/f.txt", "/proj/d"]
        assert to_guest == []
        for call in (fs.stat("/tmp/x"), fs.listdir("/projspace"), fs.read_bytes("/etc/passwd")):
            with pytest.raises(GuestFileError):
                await call
        assert to_guest == [("STAT", "/tmp/x"), ("LISTDIR", "/projspace"), ("FILE_READ", "/etc/passwd")]
