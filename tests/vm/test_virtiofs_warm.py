"""virtiofs VMs across restores: the device hot-plugged after a warm template restore, a
checkpoint resume and a fork, unplugged around every memory save, and the refusals.

QEMU 7.2 cannot migrate a vhost-user-fs device, so a virtiofs VM's saved state never holds it:
configure() plugs it in (QMP chardev-add + device_add) and the guest mounts it. A save unmounts
it first (the guest kernel's mount dies with its device), so a guest process that holds a file
or its working directory on a mount makes vm.checkpoint() and vm.fork() refuse, changing
nothing. One VM for the module; the failure tests start their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gondolin import VM, Checkpoint, CheckpointError, VMStartError
from gondolin.machine import machine as machine_mod
from gondolin.vfs import RealFSProvider

from .conftest import own_run_dirs, qemu_pids

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

# Keeps a file on the mount open and its working directory in it, and reports every 0.2 s
# whether both still work (the lines go to /tmp, off the mount).
HOLDER = r"""
import os, sys, time
fd = os.open("/workspace/held.txt", os.O_RDONLY)
os.chdir("/workspace/sub")
while True:
    try:
        line = f"ok {os.pread(fd, 64, 0).decode().strip()} {sorted(os.listdir('.'))}"
    except OSError as exc:
        line = f"error {exc.strerror}"
    with open("/tmp/holder.log", "a") as log:
        log.write(line + "\n")
    time.sleep(0.2)
"""


@dataclass
class Env:
    vm: VM
    work: Path


def mounts(work: Path) -> dict[str, RealFSProvider]:
    return {"/workspace": RealFSProvider(work)}


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    work = tmp_path_factory.mktemp("virtiofs-warm")
    (work / "held.txt").write_text("held\n")
    (work / "sub").mkdir()
    (work / "sub" / "a").write_text("a\n")
    vm = await VM.create(memory="512M", mounts=mounts(work), fs_transport="virtiofs", network=False)
    if vm.restored_from is None:  # no template of this shape yet: that VM booted cold and saved it
        await vm.close()
        vm = await VM.create(memory="512M", mounts=mounts(work), fs_transport="virtiofs", network=False)
    try:
        yield Env(vm, work)
    finally:
        await vm.close()


async def sh(vm: VM, script: str) -> str:
    r = await vm.exec(["sh", "-c", script], timeout=120)
    assert r.exit_code == 0, (script, r.stdout, r.stderr)
    return r.stdout


async def test_a_warm_create_hot_plugs_the_device(env: Env) -> None:
    assert env.vm.restored_from == "template"
    out = await sh(env.vm, "grep ' virtiofs ' /proc/mounts | cut -d' ' -f2 | sort; cat /workspace/held.txt; "
                           "ls /sys/bus/virtio/drivers/virtiofs | grep -c virtio")  # fmt: skip
    assert out == "/run/gondolin/fs\n/workspace\nheld\n1\n"
    await sh(env.vm, "echo from the guest > /workspace/guest.txt")
    assert (env.work / "guest.txt").read_text() == "from the guest\n"


async def test_a_busy_mount_refuses_checkpoint_and_fork(env: Env, tmp_path: Path) -> None:
    await env.vm.fs.write("/tmp/holder.py", HOLDER)
    await sh(env.vm, "nohup python3 /tmp/holder.py >/dev/null 2>&1 & "
                     "while ! grep -q '^ok' /tmp/holder.log 2>/dev/null; do sleep 0.1; done")  # fmt: skip
    try:
        with pytest.raises(CheckpointError, match="uses its virtiofs mounts") as info:
            await env.vm.checkpoint(tmp_path / "busy.ckpt")
        assert info.value.code == "checkpoint_mount_busy"
        assert "python3" in str(info.value) and "/workspace" in str(info.value)
        assert not list(tmp_path.iterdir())
        with pytest.raises(CheckpointError, match="uses its virtiofs mounts"):
            await env.vm.fork()
        # Nothing changed: the holder's file and directory still work, the mounts are all there.
        await sh(env.vm, ": > /tmp/holder.log; while ! grep -q '^ok' /tmp/holder.log; do sleep 0.1; done")
        log = await sh(env.vm, "cat /tmp/holder.log")
        assert "error" not in log and "ok held ['a']" in log
        assert (await sh(env.vm, "grep -c ' virtiofs ' /proc/mounts")).strip() == "2"
    finally:
        await sh(env.vm, "pkill -f '[h]older.py'; while pgrep -f '[h]older.py' >/dev/null; do sleep 0.1; done")


async def test_checkpoint_resume_and_fork_plug_the_device_in_again(env: Env, tmp_path: Path) -> None:
    await sh(env.vm, "echo before > /workspace/before.txt; echo kept-in-memory > /tmp/mem.txt")
    saved = await env.vm.checkpoint(tmp_path / "vm.ckpt")
    assert saved.header.kind == "full" and saved.header.options.fs_transport == "virtiofs"
    # The source plugged its device in again and mounted it.
    assert await sh(env.vm, "cat /workspace/before.txt; echo after > /workspace/after.txt") == "before\n"
    assert (env.work / "after.txt").read_text() == "after\n"

    [child] = await env.vm.fork()
    async with child:
        assert child.restored_from == "fork"
        assert await sh(child, "cat /tmp/mem.txt /workspace/after.txt; echo forked > /workspace/forked.txt; "
                               "cd /workspace/sub && ls") == "kept-in-memory\nafter\na\n"  # fmt: skip
    assert (env.work / "forked.txt").read_text() == "forked\n"

    resumed = await Checkpoint.load(tmp_path / "vm.ckpt").resume(mounts=mounts(env.work))
    async with resumed:
        assert resumed.restored_from == "checkpoint"
        assert await sh(resumed, "cat /tmp/mem.txt /workspace/before.txt /workspace/forked.txt") == \
            "kept-in-memory\nbefore\nforked\n"
    assert await sh(env.vm, "cat /workspace/forked.txt") == "forked\n"


async def test_large_vm_fs_copies_use_the_shared_region_in_a_virtiofs_vm(env: Env) -> None:
    import hashlib
    import os

    region = env.vm._machine.shared_region
    assert region is not None and region.usable  # every VM has it, virtiofs ones included
    data = os.urandom(3 * (1 << 20) + 12345)
    assert await env.vm.fs.write("/tmp/big.bin", data, mode=0o600) == len(data)
    out = await sh(env.vm, "sha256sum /tmp/big.bin; stat -c %a /tmp/big.bin")
    assert out.split() == [hashlib.sha256(data).hexdigest(), "/tmp/big.bin", "600"]
    assert await env.vm.fs.read_bytes("/tmp/big.bin") == data
    part = [c async for c in await env.vm.fs.open_read("/tmp/big.bin", offset=1000, length=1 << 20)]
    assert b"".join(part) == data[1000:1000 + (1 << 20)]
    assert region.free_slots == 4
    await sh(env.vm, "rm /tmp/big.bin")


async def test_qemu_refusing_the_device_is_a_start_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         no_leaks: None) -> None:
    real = machine_mod.virtiofs_device
    monkeypatch.setattr(machine_mod, "virtiofs_device", lambda: {**real(), "queue-size": 3})  # not a power of 2
    with pytest.raises(VMStartError, match="QEMU refused to plug in the virtiofs device") as info:
        await VM.create(memory="512M", mounts=mounts(tmp_path), fs_transport="virtiofs", network=False)
    assert info.value.code == "virtiofs_attach"


async def test_a_device_the_guest_cannot_mount_is_a_start_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               no_leaks: None) -> None:
    real = machine_mod.virtiofs_device
    monkeypatch.setattr(machine_mod, "virtiofs_device", lambda: {**real(), "tag": "elsewhere"})
    monkeypatch.setattr(machine_mod, "VIRTIOFS_ATTACH_WAIT", 2.0)
    pids, dirs = qemu_pids(), set(own_run_dirs())
    with pytest.raises(VMStartError, match="could not mount its virtiofs device") as info:
        await VM.create(memory="512M", mounts=mounts(tmp_path), fs_transport="virtiofs", network=False)
    assert info.value.code == "virtiofs_attach"
    assert qemu_pids() <= pids and set(own_run_dirs()) <= dirs
