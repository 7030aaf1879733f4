"""Mounts over the opt-in virtiofs transport (``fs_transport="virtiofs"``): the guest kernel's
virtiofs driver answered by the vhost-user-fs device in this process (gondolin/vhost).

One VM for the module (restored from its warm template, device hot-plugged) with a host directory (RealFSProvider) and an in-memory
scratch space (MemoryProvider); the workloads of tests/vm/test_vfs.py in short, the escape
basics, a disk-only checkpoint and a close that leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from gondolin import VM, GondolinError, VMOptions
from gondolin.vfs import MemoryProvider, OpenMode, ReadonlyProvider, RealFSProvider

from . import vfs_workloads as workloads
from .conftest import own_run_dirs, qemu_pids

pytestmark = [pytest.mark.anyio, pytest.mark.vm]
SECRET = "host secret outside the mount\n"


def vm_fds() -> dict[str, int]:
    """How many descriptors and mappings of the kinds a virtiofs device holds this process has."""
    counts = {"memfd": 0, "eventfd": 0}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:"):
            counts["memfd"] += 1
        elif "eventfd" in target:
            counts["eventfd"] += 1
    with open("/proc/self/maps") as f:  # guest RAM the device mapped
        counts["memfd mappings"] = sum("/memfd:" in line for line in f)
    return counts


@dataclass
class Env:
    vm: VM
    work: Path  # behind /workspace
    scratch: MemoryProvider
    fds_before: dict[str, int]
    pids_before: set[int]
    dirs_before: set[Path]


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    base = tmp_path_factory.mktemp("virtiofs")
    work = base / "work"
    work.mkdir()
    (base / "secret.txt").write_text(SECRET)
    os.symlink("../secret.txt", work / "rel-out")
    os.symlink(str(base / "secret.txt"), work / "abs-out")
    scratch = MemoryProvider()
    fds, pids, dirs = vm_fds(), qemu_pids(), set(own_run_dirs())
    (base / "ro").mkdir()
    (base / "ro" / "readme.txt").write_text("read only\n")
    mounts = {"/workspace": RealFSProvider(work, inline_metadata=True), "/scratch": scratch,
              "/ro": ReadonlyProvider(RealFSProvider(base / "ro"))}
    vm = await VM.create(memory="512M", mounts=mounts, fs_transport="virtiofs")
    try:
        yield Env(vm, work, scratch, fds, pids, dirs)
    finally:
        await vm.close()


async def sh(env: Env, script: str, timeout: float = 120) -> str:
    return await workloads.sh(env.vm, script, timeout)


async def test_option_is_checked() -> None:
    assert VMOptions(fs_transport="virtiofs").checked().fs_transport == "virtiofs"
    with pytest.raises(ValueError, match="fs_transport"):
        VMOptions(fs_transport="9p").checked()  # type: ignore[arg-type]


async def test_mounts_are_virtiofs_bind_mounts(env: Env) -> None:
    out = await sh(env, "grep ' virtiofs ' /proc/mounts | cut -d' ' -f2,4 | sort")
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["/ro", "/run/gondolin/fs", "/scratch", "/workspace"]
    assert all("nosuid" in line and "nodev" in line for line in lines)
    assert "fuse.py" not in await sh(env, "ps -eo args")  # no guest daemon
    assert env.vm.restored_from in ("template", None)  # None: this VM booted cold and saved the template


async def test_git_init_add_commit_status(env: Env) -> None:
    await workloads.git_init_add_commit_status(env.vm, env.work)


async def test_write_read_rename_unlink_and_a_large_file(env: Env) -> None:
    script = (
        "import hashlib, os\n"
        "d = '/workspace/py'; os.mkdir(d)\n"
        "open(d + '/a', 'w').write('alpha')\n"
        "os.rename(d + '/a', d + '/b')\n"
        "assert open(d + '/b').read() == 'alpha' and not os.path.exists(d + '/a')\n"
        "open(d + '/c', 'w').write('gone'); os.unlink(d + '/c')\n"
        "data = os.urandom(8 << 20)\n"
        "with open(d + '/big', 'wb') as f: f.write(data); f.flush(); os.fsync(f.fileno())\n"
        "print(hashlib.sha256(data).hexdigest(), hashlib.sha256(open(d + '/big', 'rb').read()).hexdigest())\n"
        "print(sorted(os.listdir(d)))\n"
    )
    await env.vm.fs.write("/tmp/w.py", script)
    out = await sh(env, "python3 /tmp/w.py")
    digests, listing = out.splitlines()
    wrote, read = digests.split()
    assert wrote == read == hashlib.sha256((env.work / "py" / "big").read_bytes()).hexdigest()
    assert listing == "['b', 'big']"
    assert (env.work / "py" / "b").read_text() == "alpha"


async def test_tar_extract(env: Env) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(300):
            data = f"file {i}\n".encode() * (i % 7 + 1)
            info = tarfile.TarInfo(f"tree/d{i % 10}/f{i}.txt")
            info.size, info.mtime, info.mode = len(data), 1_000_000_000, 0o640
            tar.addfile(info, io.BytesIO(data))
    await env.vm.fs.write("/tmp/tree.tar", buf.getvalue())
    out = await sh(env, "mkdir -p /workspace/x && tar -xf /tmp/tree.tar -C /workspace/x && "
                        "find /workspace/x -type f | wc -l")  # fmt: skip
    assert int(out) == len(list((env.work / "x" / "tree").rglob("*.txt"))) == 300
    assert (env.work / "x/tree/d3/f13.txt").read_bytes() == b"file 13\n" * 7
    st = (env.work / "x/tree/d3/f13.txt").stat()
    assert (st.st_mode & 0o777, int(st.st_mtime)) == (0o640, 1_000_000_000)


async def test_sqlite(env: Env) -> None:
    await workloads.sqlite_create_insert_query(env.vm, env.work)


async def test_concurrent_writers(env: Env) -> None:
    out = await sh(env, """
        cd /workspace
        (head -c 3000000 /dev/urandom > a.bin; sha256sum a.bin > a.sum) &
        (head -c 2000000 /dev/urandom > /scratch/b.bin; sha256sum /scratch/b.bin > b.sum) &
        wait
        cat a.sum b.sum
    """)  # fmt: skip
    (a_digest, _), (b_digest, _) = (line.split() for line in out.splitlines())
    assert hashlib.sha256((env.work / "a.bin").read_bytes()).hexdigest() == a_digest
    assert hashlib.sha256(await env.vm.fs.read_bytes("/scratch/b.bin")).hexdigest() == b_digest


async def test_memory_mount(env: Env) -> None:
    await sh(env, "mkdir -p /scratch/s && printf hello > /scratch/s/f && mv /scratch/s/f /scratch/s/g")
    handle = await env.scratch.open("/s/g", OpenMode())
    try:
        assert await handle.read(0, 100) == b"hello"
    finally:
        await handle.release()
    r = await env.vm.exec("mv /scratch/s/g /workspace/g")  # across mounts: copy + delete
    assert r.exit_code == 0 and (env.work / "g").read_text() == "hello"


async def test_readonly_mount_refuses_writes(env: Env) -> None:
    assert await sh(env, "cat /ro/readme.txt") == "read only\n"
    for cmd in ("echo x > /ro/new", "touch /ro/readme.txt", "rm /ro/readme.txt", "mkdir /ro/d"):
        r = await env.vm.exec(["bash", "-c", cmd])
        assert r.exit_code != 0 and "Read-only file system" in r.stderr, (cmd, r.stderr)


async def test_host_side_changes_reach_the_guest_after_the_ttl(env: Env) -> None:
    (env.work / "note.txt").write_text("v1\n")
    assert await sh(env, "cat /workspace/note.txt") == "v1\n"
    (env.work / "note.txt").write_text("v2 from the host, longer\n")
    (env.work / "fresh.txt").write_text("new\n")
    deadline = time.monotonic() + 10  # the TTLs are 1 s on this transport
    while True:
        out = await sh(env, "cat /workspace/note.txt; cat /workspace/fresh.txt 2>/dev/null || true")
        if out == "v2 from the host, longer\nnew\n":
            break
        assert time.monotonic() < deadline, out
        await anyio.sleep(0.5)


async def test_vm_fs_on_a_mounted_path(env: Env) -> None:
    await env.vm.fs.write("/workspace/viafs.txt", "written through vm.fs\n")
    assert (env.work / "viafs.txt").read_text() == "written through vm.fs\n"
    assert await sh(env, "cat /workspace/viafs.txt") == "written through vm.fs\n"
    await sh(env, "echo from the guest > /workspace/fromguest.txt")
    assert await env.vm.fs.read_text("/workspace/fromguest.txt") == "from the guest\n"
    assert "fromguest.txt" in await env.vm.fs.listdir("/workspace")
    assert (await env.vm.fs.stat("/workspace/fromguest.txt")).size == len("from the guest\n")


async def test_escapes_stay_inside_the_mount(env: Env) -> None:
    # Links on the host that point out of the mounted directory are resolved by the guest
    # kernel in the guest's tree, never by the host: the host file stays out of reach.
    r = await env.vm.exec(["bash", "-c", "cat /workspace/rel-out /workspace/abs-out /workspace/../secret.txt; "
                                         "readlink /workspace/rel-out"])  # fmt: skip
    assert SECRET.strip() not in r.stdout
    assert r.stdout.strip() == "../secret.txt"
    # The guest's own links: whatever they point at, the host never leaves its root.
    await sh(env, "cd /workspace && ln -s ../../../../etc/passwd up && ln -s /etc/hostname abs")
    r = await env.vm.exec(["bash", "-c", "cat /workspace/up /workspace/abs"])
    assert "root:" in r.stdout  # the guest's /etc/passwd, not the host's
    assert os.readlink(env.work / "up") == "../../../../etc/passwd"
    with pytest.raises(GondolinError):
        await env.vm.fs.read_text("/workspace/rel-out/../secret.txt")
    assert SECRET not in (await env.vm.exec("cat /workspace/../secret.txt 2>&1")).stdout


async def test_disk_only_checkpoint_keeps_the_device(env: Env, tmp_path: Path) -> None:
    # Full checkpoints and forks unplug the device (tests/vm/test_virtiofs_warm.py); a disk-only
    # checkpoint only pauses the VM.
    saved = await env.vm.checkpoint(tmp_path / "disk.ckpt", disk_only=True)  # no device state in it
    assert saved.header.kind == "disk"
    # The VM was paused and resumed for it: the device stopped its rings and took them up again.
    assert await sh(env, "echo after > /workspace/after.txt && cat /workspace/after.txt /workspace/py/b") == \
        "after\nalpha"


async def test_a_failed_device_start_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path, no_leaks: None) -> None:
    from gondolin.vhost import fs_device

    async def broken(listener: object, vfs: object, **options: object) -> None:
        raise RuntimeError("backend broke at start")

    monkeypatch.setattr(fs_device, "serve_virtiofs", broken)
    before = vm_fds()
    with pytest.raises(GondolinError):
        await VM.create(mounts={"/w": RealFSProvider(tmp_path)}, fs_transport="virtiofs", network=False,
                        start_timeout=60)
    assert vm_fds() == before


async def test_close_leaves_nothing_behind(env: Env) -> None:
    pid = env.vm.qemu_pid
    await env.vm.close()
    assert pid not in qemu_pids()
    assert qemu_pids() <= env.pids_before
    assert set(own_run_dirs()) <= env.dirs_before
    assert vm_fds() == env.fds_before
    # the device's per-queue worker threads are gone with it
    assert not [t for t in threading.enumerate() if t.name.startswith("virtiofs-queue")]
