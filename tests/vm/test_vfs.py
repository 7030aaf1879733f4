"""Programmable filesystem in a real guest: real workloads on FUSE mounts served from the host.

One VM for the module, with four mounts: a host directory read-write, an in-memory scratch
space, a read-only host directory and a copy-on-write host directory.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from gondolin import VM
from gondolin.vfs import (
    CopyOnWriteProvider,
    MemoryProvider,
    OpenMode,
    ReadonlyProvider,
    RealFSProvider,
)

from . import vfs_workloads as workloads

pytestmark = [pytest.mark.anyio, pytest.mark.vm]


@dataclass
class Env:
    vm: VM
    work: Path  # behind /workspace
    ro: Path  # behind /ro
    cow_dir: Path  # behind /cow
    scratch: MemoryProvider
    cow: CopyOnWriteProvider


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    base = tmp_path_factory.mktemp("vfs")
    work, ro, cow_dir = base / "work", base / "ro", base / "cow"
    for d in (work, ro, cow_dir):
        d.mkdir()
    (ro / "readme.txt").write_text("read only\n")
    (cow_dir / "keep.txt").write_text("keep\n")
    (cow_dir / "edit.txt").write_text("line one\nline two\n")
    (cow_dir / "gone.txt").write_text("bye\n")
    scratch = MemoryProvider()
    cow = CopyOnWriteProvider(cow_dir)
    mounts = {
        "/workspace": RealFSProvider(work, inline_metadata=True),
        "/scratch": scratch,
        "/ro": ReadonlyProvider(RealFSProvider(ro)),
        "/cow": cow,
    }
    async with await VM.create(memory="512M", mounts=mounts) as vm:
        yield Env(vm, work, ro, cow_dir, scratch, cow)


async def sh(env: Env, script: str, timeout: float = 120) -> str:
    return await workloads.sh(env.vm, script, timeout)


async def test_mounts_are_fuse_bind_mounts(env: Env) -> None:
    out = await sh(env, "grep fuse.gondolin /proc/mounts | cut -d' ' -f2 | sort")
    assert out.split() == ["/cow", "/ro", "/run/gondolin/fs", "/scratch", "/workspace"]


async def test_git_init_add_commit_status(env: Env) -> None:
    await workloads.git_init_add_commit_status(env.vm, env.work)


async def test_venv_and_import_from_the_mount(env: Env) -> None:
    (env.work / "pkg").mkdir()
    (env.work / "pkg" / "hostmod.py").write_text("VALUE = 41 + 1\n")
    out = await sh(
        env,
        """
        python3 -m venv --without-pip /workspace/venv
        /workspace/venv/bin/python -c 'import sys, hostmod; print(hostmod.VALUE, sys.prefix)'
    """.replace(
            "/workspace/venv/bin/python", "PYTHONPATH=/workspace/pkg /workspace/venv/bin/python"
        ),
    )
    assert out.split() == ["42", "/workspace/venv"]
    assert (env.work / "venv" / "pyvenv.cfg").is_file()


async def test_sqlite_create_insert_query(env: Env) -> None:
    await workloads.sqlite_create_insert_query(env.vm, env.work)


async def test_tar_extract_then_find_and_du(env: Env) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(1000):
            data = f"file {i}\n".encode() * (i % 7 + 1)
            info = tarfile.TarInfo(f"tree/d{i % 10}/f{i}.txt")
            info.size, info.mtime, info.mode = len(data), 1_000_000_000, 0o640
            tar.addfile(info, io.BytesIO(data))
    await env.vm.fs.write("/tmp/tree.tar", buf.getvalue())
    t0 = time.monotonic()
    out = await sh(env, """
        mkdir -p /workspace/x && tar -xf /tmp/tree.tar -C /workspace/x
        find /workspace/x -type f | wc -l
        du -s --apparent-size -B1 /workspace/x/tree | cut -f1
    """, timeout=300)  # fmt: skip
    count, size = out.split()
    files = sorted((env.work / "x" / "tree").rglob("*.txt"))
    assert int(count) == len(files) == 1000
    assert (env.work / "x/tree/d3/f13.txt").read_bytes() == b"file 13\n" * 7
    st = (env.work / "x/tree/d3/f13.txt").stat()
    assert (st.st_mode & 0o777, int(st.st_mtime)) == (0o640, 1_000_000_000)
    assert int(size) >= sum(f.stat().st_size for f in files)
    print(f"tar -x of 1000 files: {time.monotonic() - t0:.1f}s")


async def test_chmod_chown_touch_visible_on_the_host(env: Env) -> None:
    await sh(
        env,
        """
        cd /workspace && echo x > meta.txt
        chmod 0751 meta.txt && chown 1234:2345 meta.txt && touch -m -d '2001-02-03 04:05:06Z' meta.txt
        ln -s meta.txt meta.lnk && ln meta.txt meta.hard && mkdir -m 0700 private
    """,
    )
    st = os.lstat(env.work / "meta.txt")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_nlink) == (0o751, 1234, 2345, 2)
    assert st.st_mtime == 981173106
    assert os.readlink(env.work / "meta.lnk") == "meta.txt"
    assert os.stat(env.work / "private").st_mode & 0o777 == 0o700
    out = await sh(env, "stat -c '%a %u %g %Y' /workspace/meta.txt")
    assert out.split() == ["751", "1234", "2345", "981173106"]


async def test_concurrent_writers_and_large_files(env: Env) -> None:
    out = await sh(
        env,
        """
        cd /workspace
        (head -c 3000000 /dev/urandom > a.bin; sha256sum a.bin > a.sum) &
        (head -c 5000000 /dev/urandom > b.bin; sha256sum b.bin > b.sum) &
        wait
        cat a.sum b.sum
    """,
    )
    for line in out.splitlines():
        digest, name = line.split()
        assert hashlib.sha256((env.work / name).read_bytes()).hexdigest() == digest
    big = os.urandom(3 << 20)
    (env.work / "host.bin").write_bytes(big)
    out = await sh(env, "sha256sum /workspace/host.bin && dd if=/workspace/host.bin bs=1M "
                        "skip=1 count=1 status=none | sha256sum")  # fmt: skip
    first, second = out.split("\n")[:2]
    assert first.split()[0] == hashlib.sha256(big).hexdigest()
    assert second.split()[0] == hashlib.sha256(big[1 << 20 : 2 << 20]).hexdigest()


async def test_host_side_changes_reach_the_guest(env: Env) -> None:
    (env.work / "note.txt").write_text("v1\n")
    assert await sh(env, "cat /workspace/note.txt") == "v1\n"
    # Through vm.fs: straight to the provider, and the guest's caches are told at once.
    await env.vm.fs.write("/workspace/note.txt", "v2 via vm.fs\n")
    assert await sh(env, "cat /workspace/note.txt") == "v2 via vm.fs\n"
    assert await env.vm.fs.read_text("/workspace/note.txt") == "v2 via vm.fs\n"
    # Behind gondolin's back: visible once the cache TTLs (10 s for names and attributes,
    # 1 s for "no such file") have passed.
    (env.work / "note.txt").write_text("v3 from the host, longer\n")
    (env.work / "fresh.txt").write_text("new\n")
    deadline = time.monotonic() + 20
    while True:
        out = await sh(env, "cat /workspace/note.txt; cat /workspace/fresh.txt 2>/dev/null || true")
        if out == "v3 from the host, longer\nnew\n":
            break
        assert time.monotonic() < deadline, out
        await anyio.sleep(1)


async def test_df_statfs(env: Env) -> None:
    out = await sh(env, "df -P -B1 /workspace /scratch | tail -n 2")
    work, scratch = (line.split() for line in out.splitlines())
    host = os.statvfs(env.work)
    assert work[0] == "gondolin" and int(work[1]) == host.f_blocks * host.f_frsize
    fs = await env.scratch.statfs("/")
    assert scratch[5] == "/scratch" and int(scratch[1]) == fs.blocks * fs.frsize


async def test_scratch_is_memory(env: Env) -> None:
    await sh(
        env, "mkdir -p /scratch/s && printf hello > /scratch/s/f && mv /scratch/s/f /scratch/s/g"
    )
    handle = await env.scratch.open("/s/g", OpenMode())
    try:
        assert await handle.read(0, 100) == b"hello"
    finally:
        await handle.release()
    assert await env.vm.fs.listdir("/scratch/s") == ["g"]
    r = await env.vm.exec("mv /scratch/s/g /workspace/g")  # across mounts: copy + delete
    assert r.exit_code == 0 and (env.work / "g").read_text() == "hello"


async def test_readonly_mount_refuses_writes(env: Env) -> None:
    assert await sh(env, "cat /ro/readme.txt") == "read only\n"
    for cmd in ("echo x > /ro/new", "touch /ro/readme.txt", "rm /ro/readme.txt", "mkdir /ro/d",
                "chmod 600 /ro/readme.txt"):  # fmt: skip
        r = await env.vm.exec(["bash", "-c", cmd])
        assert r.exit_code != 0 and "Read-only file system" in r.stderr, (cmd, r.stderr)
    assert sorted(p.name for p in env.ro.iterdir()) == ["readme.txt"]


async def test_copy_on_write_changes_diff_commit(env: Env) -> None:
    await sh(
        env,
        """
        cd /cow && echo 'line two, edited' > tmp && sed -i 's/line two/line 2/' edit.txt
        rm gone.txt && mkdir sub && echo added > sub/new.txt && rm tmp
    """,
    )
    changes = await env.cow.changes()
    assert changes.added == ("/sub", "/sub/new.txt")
    assert changes.modified == ("/edit.txt",) and changes.deleted == ("/gone.txt",)
    diff = await env.cow.diff()
    assert "-line two\n+line 2\n" in diff and "+added\n" in diff
    assert (env.cow_dir / "gone.txt").exists() and "line two" in (
        env.cow_dir / "edit.txt"
    ).read_text()
    await env.cow.commit()
    assert not (env.cow_dir / "gone.txt").exists()
    assert (env.cow_dir / "sub" / "new.txt").read_text() == "added\n"
    assert (env.cow_dir / "edit.txt").read_text() == "line one\nline 2\n"
