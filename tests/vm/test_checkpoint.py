"""Checkpoints: save a running VM to one file, resume it (many times) into new VMs."""

import dataclasses
import hashlib
import time

import anyio
import pytest

from gondolin import VM, Checkpoint, CheckpointError
from gondolin.images import ImageStore
from gondolin.machine.checkpoint import HEADER_SPACE, decode_header, encode_header

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

COUNTER = "nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done' >/dev/null 2>&1 &"
SERVER = ("nohup python3 -c \"import http.server as h; h.HTTPServer(('127.0.0.1', 8765), "
          "h.SimpleHTTPRequestHandler).serve_forever()\" >/dev/null 2>&1 &")
FETCH = ("python3 -c \"import urllib.request as u; "
         "print(u.urlopen('http://127.0.0.1:8765/etc/ckpt-marker', timeout=10).read().decode())\"")


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def counter(vm) -> int:
    return int((await vm.exec("cat /tmp/counter")).stdout)


@pytest.fixture(scope="module")
async def saved(tmp_path_factory):
    """A VM with a background counter and a server, checkpointed once (full and disk-only)."""
    d = tmp_path_factory.mktemp("ckpt")
    async with await VM.create(memory="512M", label="ckpt-source", env={"FROM": "source"}) as vm:
        await vm.exec("echo marker-on-disk > /etc/ckpt-marker && echo in-ram > /tmp/ram-file")
        await vm.exec(COUNTER)
        await vm.exec(SERVER, cwd="/")
        for _ in range(150):  # the server needs a moment to listen
            if (await vm.exec(FETCH)).exit_code == 0:
                break
            await anyio.sleep(0.2)
        else:
            pytest.fail("the guest's HTTP server never answered")
        t0 = time.monotonic()
        full = await vm.checkpoint(d / "full.ckpt")
        save_seconds = time.monotonic() - t0
        before = await counter(vm)
        await anyio.sleep(0.5)
        assert await counter(vm) > before  # the source keeps running after a checkpoint
        disk = await vm.checkpoint(d / "disk.ckpt", disk_only=True)
    yield {"full": full, "disk": disk, "dir": d, "save_seconds": save_seconds}


async def test_checkpoint_files_describe_themselves(saved):
    full, disk = saved["full"], saved["disk"]
    assert (full.kind, disk.kind) == ("full", "disk")
    assert full.label == "ckpt-source" and full.shape.memory_mb == 512
    assert set(full.header.sections) == {"memory", "disk"} and set(disk.header.sections) == {"disk"}
    assert disk.size < full.size
    assert full.path.stat().st_mode & 0o077 == 0  # it holds guest memory: private to the user
    assert Checkpoint.load(full.path).header == full.header
    assert not list(saved["dir"].glob(".*partial"))


async def test_resume_keeps_running_processes_alive(saved):
    cp = Checkpoint.load(saved["full"].path)
    before = digest(cp.path)
    async with await cp.resume() as vm:
        assert vm.restored_from == "checkpoint"
        first = await counter(vm)
        await anyio.sleep(0.6)
        assert await counter(vm) > first  # the background counter kept counting
        r = await vm.exec(FETCH)  # the server started before the checkpoint still answers
        assert r.stdout == "marker-on-disk\n\n"
        assert (await vm.exec("cat /tmp/ram-file; echo $FROM")).stdout == "in-ram\nsource\n"
        assert abs(float((await vm.exec("date +%s.%N")).stdout) - time.time()) < 1.0
    assert digest(cp.path) == before  # resuming never writes to the checkpoint


async def test_resume_twice_gives_two_independent_vms(saved):
    cp = Checkpoint.load(saved["full"].path)
    a = await cp.resume(label="a")
    try:
        b = await cp.resume(label="b", env={"FROM": "b"})
        try:
            assert a.id != b.id and a.qemu_pid != b.qemu_pid
            await a.exec("echo only-in-a > /etc/ckpt-marker; echo a > /tmp/ram-file")
            assert (await b.exec("cat /etc/ckpt-marker /tmp/ram-file")).stdout == "marker-on-disk\nin-ram\n"
            assert (await b.exec("echo $FROM")).stdout == "b\n"
            ra, rb = [(await vm.exec("head -c 16 /dev/urandom | od -An -tx1")).stdout for vm in (a, b)]
            assert ra != rb
        finally:
            await b.close()
    finally:
        await a.close()


async def test_disk_only_checkpoint_round_trip(saved):
    cp = Checkpoint.load(saved["disk"].path)
    async with await cp.resume(memory="256M") as vm:
        assert vm.restored_from is None and vm.memory_mb == 256  # booted, with the saved disk
        assert (await vm.exec("cat /etc/ckpt-marker")).stdout == "marker-on-disk\n"
        assert (await vm.exec("test -e /tmp/ram-file")).exit_code == 1  # memory was not saved


@pytest.mark.parametrize("damage, code", [
    (lambda data: data[: len(data) - 4096], "checkpoint_truncated"),
    (lambda data: data[:HEADER_SPACE + 1000], "checkpoint_truncated"),
    (lambda data: b"garbage!" + data[8:], "not_a_checkpoint"),
    (lambda data: data[:100] + bytes([data[100] ^ 0x55]) + data[101:], "checkpoint_corrupt"),
])
async def test_truncated_or_corrupt_checkpoints_are_clear_errors(saved, tmp_path, damage, code):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(damage(saved["full"].path.read_bytes()))
    with pytest.raises(CheckpointError) as err:
        await Checkpoint.load(bad).resume()
    assert err.value.code == code and "bad.ckpt" in str(err.value)


async def test_corrupt_memory_is_caught_before_the_vm_is_handed_out(saved, tmp_path):
    data = bytearray(saved["full"].path.read_bytes())
    mem = saved["full"].header.sections["memory"]
    data[mem.offset + mem.size // 2] ^= 0xFF
    bad = tmp_path / "flipped.ckpt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        await Checkpoint.load(bad).resume()
    assert err.value.code == "checkpoint_corrupt" and "memory" in str(err.value)


async def test_missing_or_different_image_is_refused(saved, tmp_path):
    cp = saved["full"]
    other = dataclasses.replace(cp.header, image="0123456789abcdef01234567")
    data = bytearray(cp.path.read_bytes())
    data[:HEADER_SPACE] = encode_header(other)
    moved = tmp_path / "other-image.ckpt"
    moved.write_bytes(bytes(data))
    assert decode_header(bytes(data[:HEADER_SPACE]), len(data)).image == other.image
    with pytest.raises(CheckpointError) as err:
        await Checkpoint.load(moved).resume()
    assert err.value.code == "checkpoint_image" and "0123456789abcdef01234567" in str(err.value)
    others = [i for i in ImageStore().images() if i.build_id != cp.image_id]
    if others:  # the store keeps older builds around; ask for one of them explicitly
        with pytest.raises(CheckpointError) as err:
            await cp.resume(image=others[0].build_id)
        assert err.value.code == "checkpoint_image" and others[0].build_id in str(err.value)


async def test_full_checkpoints_fix_memory_and_cpus(saved):
    with pytest.raises(ValueError):
        await saved["full"].resume(memory="1G")


async def test_mounts_are_served_afresh_by_the_resuming_host(tmp_path):
    from gondolin.vfs import RealFSProvider

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "from-first.txt").write_text("1")
    (second / "from-second.txt").write_text("2")
    async with await VM.create(network=False, mounts={"/workspace": RealFSProvider(first)}) as vm:
        assert (await vm.exec("cat /workspace/from-first.txt")).stdout == "1"
        cp = await vm.checkpoint(tmp_path / "mounted.ckpt")
    with pytest.raises(CheckpointError) as err:
        await cp.resume()  # the mount's provider is a live host object: it must be given again
    assert err.value.code == "checkpoint_incompatible" and "mounts=" in str(err.value)
    async with await cp.resume(mounts={"/workspace": RealFSProvider(second)}) as vm:
        r = await vm.exec("ls /workspace; cat /workspace/from-second.txt")
        assert (r.exit_code, r.stdout) == (0, "from-second.txt\n2")
