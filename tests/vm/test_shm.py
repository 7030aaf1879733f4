"""vm.fs bulk transfers through the shared region (ivshmem), in a real guest: concurrency beyond
the slots, a transfer stopped halfway, and the region across a checkpoint and a fork."""

import hashlib
import os

import anyio
import pytest

from gondolin import VM
from gondolin.shm import SLOT_COUNT

from . import vfs_workloads as workloads

pytestmark = [pytest.mark.anyio, pytest.mark.vm]
MiB = 1 << 20


def region(vm):
    return vm._machine.shared_region


async def test_the_agent_maps_the_region_and_large_copies_use_it(vm):
    r = region(vm)
    assert r is not None and r.usable and r.free_slots == SLOT_COUNT
    data = os.urandom(20 * MiB + 3)  # wraps an 8 MiB slot's ring twice
    sent = []
    real_take = r.take

    def take():
        slot = real_take()
        sent.append(slot)
        return slot

    r.take = take
    try:
        assert await vm.fs.write("/tmp/big.bin", data) == len(data)
        assert await vm.fs.read_bytes("/tmp/big.bin") == data
    finally:
        del r.take
    assert len(sent) == 2 and all(s is not None for s in sent)  # one slot each way
    assert (await vm.exec("sha256sum /tmp/big.bin")).stdout.split()[0] == hashlib.sha256(data).hexdigest()
    assert r.free_slots == SLOT_COUNT


async def test_more_transfers_than_slots_run_at_once_and_all_arrive_intact(vm):
    blobs = [os.urandom(2 * MiB + i) for i in range(SLOT_COUNT + 2)]  # two fall back to the channel
    async with anyio.create_task_group() as tg:
        for i, blob in enumerate(blobs):
            tg.start_soon(vm.fs.write, f"/tmp/c{i}.bin", blob)
    got: dict[int, bytes] = {}

    async def read(i: int) -> None:
        got[i] = await vm.fs.read_bytes(f"/tmp/c{i}.bin")

    async with anyio.create_task_group() as tg:
        for i in range(len(blobs)):
            tg.start_soon(read, i)
    assert [got[i] for i in range(len(blobs))] == blobs
    assert region(vm).free_slots == SLOT_COUNT


async def test_a_transfer_stopped_halfway_retires_its_slot_and_later_ones_work(vm):
    r = region(vm)
    before = r.free_slots
    async for _ in await vm.fs.open_read("/tmp/big.bin"):
        break  # stop after the first chunk: the guest may still fill the slot
    assert r.free_slots == before - 1
    data = os.urandom(3 * MiB)
    await vm.fs.write("/tmp/after.bin", data)
    assert await vm.fs.read_bytes("/tmp/after.bin") == data
    with pytest.raises(ValueError):
        await vm.fs.write("/tmp/x.bin", _failing_chunks())
    assert await vm.fs.read_bytes("/tmp/after.bin") == data


async def _failing_chunks():
    yield os.urandom(MiB)
    raise ValueError("the caller's source failed")


async def test_the_region_works_after_a_checkpoint_resume_and_in_a_fork(vm, tmp_path, no_leaks):
    data = os.urandom(5 * MiB)
    async with await VM.create(memory="512M") as src:
        await src.fs.write("/tmp/before.bin", data)
        ckpt = await src.checkpoint(tmp_path / "c.ckpt")
        async with await ckpt.resume() as resumed:
            assert region(resumed).usable
            assert await resumed.fs.read_bytes("/tmp/before.bin") == data
            await resumed.fs.write("/tmp/after.bin", data[::-1])
            assert await resumed.fs.read_bytes("/tmp/after.bin") == data[::-1]
        [child] = await src.fork()
        async with child:
            assert region(child).usable and region(child).path != region(src).path
            await child.fs.write("/tmp/child.bin", data)
            assert await child.fs.read_bytes("/tmp/child.bin") == data
            assert not await src.fs.exists("/tmp/child.bin")


HOLDER = r'''
import os, sys, time
os.chdir("/workspace")
f = open("held.bin", "wb", buffering=0)
f.write(b"a" * (2 << 20))
open("/tmp/ready", "w").close()
while not os.path.exists("/tmp/go"):
    time.sleep(0.05)
f.write(b"b" * (2 << 20))
f.close()
with open("held.bin", "rb") as g:  # relative: through the working directory on the mount
    data = g.read()
with open("/tmp/result", "w") as out:
    out.write(f"{len(data)} {data.count(b'a')} {data.count(b'b')} {os.getcwd()} {sorted(os.listdir('.'))}")
'''


HELD_RESULT = f"{4 << 20} {2 << 20} {2 << 20} /workspace ['held.bin']"


async def start_holder(vm) -> None:
    """A guest process with ``held.bin`` open and its cwd on /workspace, waiting for /tmp/go."""
    await vm.fs.write("/tmp/holder.py", HOLDER)
    await vm.start(["python3", "/tmp/holder.py"], stdout="ignore", stderr="ignore")
    await vm.exec("for i in $(seq 600); do [ -e /tmp/ready ] && break; sleep 0.1; done")


async def finish_holder(vm) -> str:
    """Let the holder go on; what it found (HELD_RESULT when its file and cwd kept working)."""
    pid = (await vm.exec("pgrep -f holder.py")).stdout.split()[0]
    await vm.exec("touch /tmp/go")
    return (await vm.exec(f"while kill -0 {pid} 2>/dev/null; do sleep 0.1; done; cat /tmp/result")).stdout


async def test_a_file_held_open_on_a_mount_survives_a_checkpoint_resume(tmp_path, no_leaks):
    from gondolin.vfs import RealFSProvider

    share = tmp_path / "share"
    share.mkdir()
    async with await VM.create(memory="512M", mounts={"/workspace": RealFSProvider(share)}) as src:
        await start_holder(src)
        ckpt = await src.checkpoint(tmp_path / "held.ckpt")
    async with await ckpt.resume(mounts={"/workspace": RealFSProvider(share)}) as resumed:
        assert await finish_holder(resumed) == HELD_RESULT
        data = (share / "held.bin").read_bytes()
        assert (len(data), data.count(b"a"), data.count(b"b")) == (4 << 20, 2 << 20, 2 << 20)
        big = os.urandom(3 * MiB)  # the resumed VM's own region carries mounted-file payloads
        (share / "from-host.bin").write_bytes(big)
        r = await resumed.exec("sha256sum /workspace/from-host.bin")
        assert r.stdout.split()[0] == hashlib.sha256(big).hexdigest()
        await workloads.git_init_add_commit_status(resumed, share)  # the transport's workloads, resumed
        await workloads.sqlite_create_insert_query(resumed, share)


async def test_a_fork_keeps_a_file_held_open_on_a_mount(tmp_path, no_leaks):
    from gondolin.vfs import RealFSProvider

    share = tmp_path / "share"
    share.mkdir()
    async with await VM.create(memory="512M", mounts={"/workspace": RealFSProvider(share)}) as src:
        await start_holder(src)
        [child] = await src.fork()
        async with child:
            assert await finish_holder(child) == HELD_RESULT
            assert await finish_holder(src) == HELD_RESULT  # the source's own process goes on as well
            await workloads.git_init_add_commit_status(child, share)  # the transport's workloads, in a fork
            await workloads.sqlite_create_insert_query(child, share)
