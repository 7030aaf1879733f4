"""RealFSProvider: the escape battery. Nothing outside the root may be read, written or named."""

from __future__ import annotations

import errno as E
import os
import stat
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from gondolin.vfs import OpenMode, RealFSProvider, SetAttr, VfsError

from .support import NEW, RO, RW, errno_of, names, read_file

pytestmark = pytest.mark.anyio

SECRET = b"SECRET-OUTSIDE"
MODES = ["openat2", "walk", "walk-inline"]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret.txt").write_bytes(SECRET)
    os.chmod(out, 0o755)
    return out


@pytest.fixture(params=MODES)
async def real(
    request: pytest.FixtureRequest, tmp_path: Path, outside: Path
) -> AsyncIterator[RealFSProvider]:
    root = tmp_path / "root"
    root.mkdir()
    (root / "sub").mkdir()
    (root / "sub" / "file.txt").write_bytes(b"inside")
    os.symlink(str(outside), root / "abs")  # absolute symlink to a directory outside
    os.symlink("../outside", root / "rel")  # relative symlink to the same
    os.symlink(str(outside / "secret.txt"), root / "filelink")  # symlink to a file outside
    os.symlink("../../outside", root / "sub" / "up")  # from a subdirectory
    use = request.param == "openat2"
    inline = request.param.endswith("inline")
    try:
        provider = RealFSProvider(root, use_openat2=use, inline_metadata=inline)
    except OSError:
        pytest.skip("openat2 not available on this kernel")
    yield provider
    await provider.aclose()


def _untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert (outside / "secret.txt").read_bytes() == SECRET
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o755


@pytest.mark.parametrize(
    "path",
    [
        "/../outside/secret.txt",
        "/sub/../../outside/secret.txt",
        "/abs/secret.txt",
        "/rel/secret.txt",
        "/sub/up/secret.txt",
        "/filelink/x",
    ],
)
async def test_no_path_reaches_outside(real: RealFSProvider, outside: Path, path: str) -> None:
    for op in (
        real.getattr(path),
        real.open(path, RO),
        real.open(path, RW),
        real.readdir(path),
        real.readlink(path),
        real.create(path, 0o644, NEW),
        real.create(path, 0o644, OpenMode(read=True, write=True, truncate=True)),
        real.mkdir(path, 0o755),
        real.symlink(path, "x"),
        real.unlink(path),
        real.rmdir(path),
        real.setattr(path, SetAttr(size=0)),
        real.setattr(path, SetAttr(mode=0o777)),
        real.link("/sub/file.txt", path),
        real.link(path, "/stolen"),
        real.rename("/sub/file.txt", path),
        real.rename(path, "/stolen"),
    ):
        assert await errno_of(op) in (E.EINVAL, E.ENOTDIR, E.ELOOP, E.ENOENT)
    _untouched(outside)
    assert not (real.root and Path(real.root, "stolen").exists())


async def test_symlinks_themselves_are_handled_not_followed(
    real: RealFSProvider, outside: Path
) -> None:
    # The links are visible as links ...
    for link in ("/abs", "/rel", "/filelink"):
        assert stat.S_ISLNK((await real.getattr(link)).mode)
    assert await real.readlink("/abs") == str(outside)
    # ... every operation on them acts on the link or fails; none reaches the target.
    assert await errno_of(real.open("/filelink", RO)) == E.ELOOP
    assert await errno_of(real.open("/filelink", RW)) == E.ELOOP
    assert await errno_of(real.readdir("/abs")) in (E.ELOOP, E.ENOTDIR)
    trunc = OpenMode(read=True, write=True, truncate=True)
    assert await errno_of(real.create("/filelink", 0o644, trunc)) == E.ELOOP
    assert await errno_of(real.setattr("/filelink", SetAttr(size=0))) == E.ELOOP
    assert await errno_of(real.setattr("/abs", SetAttr(mode=0o700))) == E.EOPNOTSUPP
    await real.setattr("/abs", SetAttr(uid=4321, gid=4321))  # lchown: the link only
    await real.setattr("/filelink", SetAttr(mtime_ns=1_000_000_000))  # lutimes
    assert os.stat(outside).st_uid != 4321
    assert os.stat(outside / "secret.txt").st_mtime_ns != 1_000_000_000
    # A hard link to a symlink is another symlink, not a link to the target.
    attr = await real.link("/filelink", "/hard")
    assert stat.S_ISLNK(attr.mode)
    assert os.stat(outside / "secret.txt").st_nlink == 1
    await real.rename("/abs", "/abs2")
    await real.unlink("/abs2")
    await real.unlink("/rel")
    _untouched(outside)


async def test_existing_hard_link_is_just_a_file(tmp_path: Path, outside: Path) -> None:
    # A file in the tree that shares its inode with one outside is served like any file;
    # it can only be there because the host put it there.
    root = tmp_path / "hl-root"
    root.mkdir()
    os.link(outside / "secret.txt", root / "shared")
    provider = RealFSProvider(root)
    try:
        attr = await provider.getattr("/shared")
        assert stat.S_ISREG(attr.mode) and attr.nlink == 2
        assert await read_file(provider, "/shared") == SECRET
    finally:
        await provider.aclose()


async def test_root_swapped_after_construction(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "swap-root"
    root.mkdir()
    (root / "mine").write_bytes(b"x")
    provider = RealFSProvider(root)
    try:
        root.rename(tmp_path / "moved")
        os.symlink(str(outside), root)
        assert await names(provider, "/") == ["mine"]
    finally:
        await provider.aclose()


async def test_root_given_as_symlink_is_resolved_once(tmp_path: Path, outside: Path) -> None:
    real_root = tmp_path / "real-root"
    real_root.mkdir()
    link = tmp_path / "link-root"
    os.symlink(real_root, link)
    provider = RealFSProvider(link)
    try:
        assert provider.root == str(real_root)
        link.unlink()
        os.symlink(outside, link)
        assert await names(provider, "/") == []
    finally:
        await provider.aclose()


async def test_special_files_are_not_opened(real: RealFSProvider) -> None:
    os.mkfifo(Path(real.root, "fifo"))
    with anyio.fail_after(5):  # opening a FIFO for reading would block forever
        assert await errno_of(real.open("/fifo", RO)) == E.EACCES
        assert await errno_of(real.open("/fifo", RW)) == E.EACCES
    assert stat.S_ISFIFO((await real.getattr("/fifo")).mode)


async def test_exact_modes_despite_host_umask(real: RealFSProvider) -> None:
    old = os.umask(0o077)
    try:
        assert (await real.mkdir("/d", 0o755)).mode & 0o7777 == 0o755
        handle = await real.create("/f", 0o664, NEW)
        assert (await handle.getattr()).mode & 0o7777 == 0o664
        await handle.release()
    finally:
        os.umask(old)


async def test_no_setuid_files_on_the_host(real: RealFSProvider) -> None:
    """A setuid binary written by the guest would run with the host user's rights."""
    handle = await real.create("/f", 0o6755, NEW)
    assert (await handle.getattr()).mode & 0o7777 == 0o755
    assert (await handle.setattr(SetAttr(mode=0o4711))).mode & 0o7777 == 0o711
    await handle.release()
    assert (await real.setattr("/f", SetAttr(mode=0o2755))).mode & 0o7777 == 0o755
    assert (await real.mkdir("/d", 0o2775)).mode & 0o7777 == 0o2775  # setgid dirs are fine
    assert (await real.setattr("/d", SetAttr(mode=0o4775))).mode & 0o7777 == 0o775


@pytest.mark.parametrize("how", ["open", "truncate"])
async def test_writes_drop_setuid_of_host_files(real: RealFSProvider, how: str) -> None:
    host = Path(real.root) / "suid"
    host.write_bytes(b"#!/bin/sh\n")
    host.chmod(0o6755)
    if how == "open":
        handle = await real.open("/suid", RW)
        await handle.write(0, b"#!/bin/bash")
        await handle.release()
    else:
        await real.setattr("/suid", SetAttr(size=0))
    assert os.stat(host).st_mode & 0o7777 == 0o755
    handle = await real.open("/suid", RO)  # reading leaves the bits alone
    await handle.release()


async def test_names_are_bytes_safe(real: RealFSProvider) -> None:
    # Guest names that are not UTF-8 travel as surrogate escapes and reach the host intact.
    name = os.fsdecode(b"caf\xe9")
    handle = await real.create("/" + name, 0o644, NEW)
    await handle.release()
    assert os.path.exists(os.path.join(os.fsencode(real.root), b"caf\xe9"))
    assert name in await names(real, "/")


async def test_closed_provider_refuses(tmp_path: Path) -> None:
    provider = RealFSProvider(tmp_path)
    await provider.aclose()
    assert await errno_of(provider.getattr("/")) == E.EBADF


async def test_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(OSError):
        RealFSProvider(tmp_path / "f")


@pytest.mark.parametrize("mode", MODES)
async def test_swap_race_never_escapes(tmp_path: Path, outside: Path, mode: str) -> None:
    """A thread swaps a directory for a symlink to outside while we resolve through it."""
    root = tmp_path / "race-root"
    root.mkdir()
    (root / "d").mkdir()
    (root / "d" / "secret.txt").write_bytes(b"inside")
    try:
        provider = RealFSProvider(
            root, use_openat2=mode == "openat2", inline_metadata=mode.endswith("inline")
        )
    except OSError:
        pytest.skip("openat2 not available on this kernel")
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        while not stop.is_set():
            os.rename(root / "d", root / "d.real")
            os.symlink(str(outside), root / "d")
            time.sleep(0.0001)
            os.unlink(root / "d")
            os.rename(root / "d.real", root / "d")
            swaps += 1
            time.sleep(0.0002)  # leave the real directory in place now and then

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    seen_inside = 0
    outside_ino = os.stat(outside / "secret.txt").st_ino
    deadline = time.monotonic() + 5
    try:
        # Run until the race has gone both ways often enough (or give up after 5 s).
        while time.monotonic() < deadline and (seen_inside < 20 or swaps < 200):
            try:
                attr = await provider.getattr("/d/secret.txt")
                assert attr.ino != outside_ino
                data = await read_file(provider, "/d/secret.txt")
                assert data == b"inside"
                seen_inside += 1
            except VfsError as exc:
                assert exc.errno in (E.ENOENT, E.ENOTDIR, E.ELOOP)
            try:
                handle = await provider.create("/d/new", 0o644, NEW)
                await handle.release()
                await provider.unlink("/d/new")
            except VfsError as exc:
                assert exc.errno in (E.ENOENT, E.ENOTDIR, E.ELOOP, E.EEXIST)
    finally:
        stop.set()
        thread.join()
        await provider.aclose()
    assert swaps >= 200 and seen_inside >= 20  # the race really ran both ways
    _untouched(outside)


async def test_release_during_read_keeps_the_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest may RELEASE while a READ is in flight; the fd must not be recycled under it."""
    (tmp_path / "f").write_bytes(b"mine")
    (tmp_path / "g").write_bytes(b"other")
    provider = RealFSProvider(tmp_path)
    handle = await provider.open("/f", RO)
    gate = threading.Event()
    real_pread = os.pread

    def slow_pread(fd: int, n: int, offset: int) -> bytes:
        gate.wait(5)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", slow_pread)
    result: list[bytes] = []

    async def reader() -> None:
        result.append(await handle.read(0, 10))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            await handle.release()
            other = await provider.open("/g", RO)  # would reuse a closed descriptor number
            gate.set()
    monkeypatch.setattr(os, "pread", real_pread)
    assert result == [b"mine"]
    assert await other.read(0, 10) == b"other"
    await other.release()
    assert await errno_of(handle.read(0, 1)) == E.EBADF
    await provider.aclose()
