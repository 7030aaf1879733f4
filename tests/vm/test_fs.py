import errno
import hashlib
import os
import stat

import anyio
import pytest

from gondolin import GuestFileError

from .conftest import both_backends as anyio_backend  # noqa: F401 - these tests run under asyncio and trio
from .conftest import max_rss_mb

pytestmark = [pytest.mark.anyio, pytest.mark.vm]
GiB = 1 << 30


async def test_write_read_round_trip_bytes_and_text(vm):
    data = os.urandom(300_000) + b"\x00tail"
    assert await vm.fs.write("/tmp/rt.bin", data) == len(data)
    assert await vm.fs.read_bytes("/tmp/rt.bin") == data
    await vm.fs.write("/tmp/rt.txt", "héllo\n")
    assert await vm.fs.read_text("/tmp/rt.txt") == "héllo\n"
    r = await vm.exec("sha256sum /tmp/rt.bin")
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()


async def test_append_mode_parents_and_owner(vm):
    await vm.fs.write("/tmp/a/b/c.txt", "one\n", parents=True, mode=0o600, user="agent")
    await vm.fs.write("/tmp/a/b/c.txt", "two\n", append=True)
    assert await vm.fs.read_text("/tmp/a/b/c.txt") == "one\ntwo\n"
    st = await vm.fs.stat("/tmp/a/b/c.txt")
    assert st.is_file and st.permissions == 0o600 and (st.uid, st.gid) == (1000, 1000) and st.size == 8


async def test_stat_listdir_mkdir_rename_remove(vm):
    await vm.fs.mkdir("/tmp/tree/x/y")
    await vm.fs.write("/tmp/tree/file", b"12345")
    await vm.exec("ln -s file /tmp/tree/link")
    entries = {e.name: e.kind for e in await vm.fs.scandir("/tmp/tree")}
    assert entries == {"x": "dir", "file": "file", "link": "symlink"}
    assert await vm.fs.listdir("/tmp/tree") == ["file", "link", "x"]
    assert (await vm.fs.stat("/tmp/tree/link")).size == 5
    assert (await vm.fs.stat("/tmp/tree/link", follow_symlinks=False)).is_symlink
    assert stat.S_ISDIR((await vm.fs.stat("/tmp/tree/x")).mode)
    await vm.fs.rename("/tmp/tree/file", "/tmp/tree/x/moved")
    assert await vm.fs.exists("/tmp/tree/x/moved") and not await vm.fs.exists("/tmp/tree/file")
    with pytest.raises(GuestFileError) as err:
        await vm.fs.remove("/tmp/tree/x")
    assert err.value.errno == errno.ENOTEMPTY
    assert await vm.fs.remove("/tmp/tree", recursive=True)
    assert not await vm.fs.exists("/tmp/tree")
    assert await vm.fs.remove("/tmp/tree", force=True) is False


async def test_errors_carry_errno_and_path(vm):
    with pytest.raises(GuestFileError) as err:
        await vm.fs.read_bytes("/no/such/file")
    assert err.value.errno == errno.ENOENT and err.value.errno_name == "ENOENT"
    assert err.value.path == "/no/such/file" and "/no/such/file" in str(err.value)
    with pytest.raises(GuestFileError) as err:
        await vm.fs.write("/no/such/dir/file", b"x")
    assert err.value.errno == errno.ENOENT
    with pytest.raises(GuestFileError) as err:
        await vm.fs.read_bytes("/tmp")
    assert err.value.errno == errno.EISDIR
    with pytest.raises(GuestFileError) as err:
        await vm.fs.mkdir("/tmp/exists-already", parents=False)
        await vm.fs.mkdir("/tmp/exists-already", parents=False)
    assert err.value.errno == errno.EEXIST
    with pytest.raises(ValueError):
        await vm.fs.read_bytes("relative/path")
    with pytest.raises(ValueError):
        await vm.fs.remove("/", recursive=True)


async def test_read_range_and_max_size(vm):
    await vm.fs.write("/tmp/range", bytes(range(256)) * 10)
    chunks = [c async for c in await vm.fs.open_read("/tmp/range", offset=250, length=12)]
    assert b"".join(chunks) == bytes(range(250, 256)) + bytes(range(6))
    with pytest.raises(GuestFileError) as err:
        await vm.fs.read_bytes("/tmp/range", max_size=100)
    assert err.value.errno == errno.EFBIG


BLOCK = 256 * 1024
# Checks a stream of numbered blocks (8-byte big-endian index, then zeros) at C speed: the guest
# CPU is emulated here, so hashing a gibibyte in the guest would take minutes.
GUEST_CHECKER = """
import sys
f = open(sys.argv[1], "rb", buffering=0)
expect, total, buf = 0, 0, b""
block_size = int(sys.argv[2])
zeros = bytes(block_size - 8)
while True:
    data = f.read(1 << 20)
    if not data:
        break
    buf += data
    while len(buf) >= block_size:
        block, buf = buf[:block_size], buf[block_size:]
        assert int.from_bytes(block[:8], "big") == expect and block[8:] == zeros, expect
        expect += 1
        total += len(block)
assert not buf
print(total)
"""
GUEST_PRODUCER = """
import sys
out = open(sys.argv[1], "wb", buffering=0)
zeros = bytes(int(sys.argv[3]) - 8)
for i in range(int(sys.argv[2])):
    out.write(i.to_bytes(8, "big") + zeros)
"""


async def test_one_gib_streams_both_ways_with_bounded_memory(vm, asyncio_only):
    """1 GiB host->guest into a FIFO that the guest checks, then 1 GiB guest->host from a FIFO."""
    blocks = GiB // BLOCK
    await vm.exec("rm -f /tmp/in.fifo /tmp/out.fifo; mkfifo /tmp/in.fifo /tmp/out.fifo")
    await vm.fs.write("/tmp/check.py", GUEST_CHECKER)
    await vm.fs.write("/tmp/produce.py", GUEST_PRODUCER)
    zeros = bytes(BLOCK - 8)

    async def produce():
        for i in range(blocks):
            yield i.to_bytes(8, "big") + zeros

    before = max_rss_mb()
    checker = await vm.start(["python3", "/tmp/check.py", "/tmp/in.fifo", str(BLOCK)], stdout="buffer",
                             stderr="buffer")
    assert await vm.fs.write("/tmp/in.fifo", produce()) == GiB
    result = await checker.wait(timeout=300)
    assert result.exit_code == 0, result.stderr
    assert int(result.stdout) == GiB

    producer = await vm.start(["python3", "/tmp/produce.py", "/tmp/out.fifo", str(blocks), str(BLOCK)])
    expect, total, pending = 0, 0, b""
    async for chunk in await vm.fs.open_read("/tmp/out.fifo"):
        pending += chunk
        total += len(chunk)
        while len(pending) >= BLOCK:
            block, pending = pending[:BLOCK], pending[BLOCK:]
            assert int.from_bytes(block[:8], "big") == expect and block[8:] == zeros
            expect += 1
    assert (total, expect, pending) == (GiB, blocks, b"")
    assert (await producer.wait(timeout=60)).exit_code == 0
    assert max_rss_mb() - before < 100, "a 1 GiB transfer must stream, not buffer"


async def test_file_ops_run_while_a_long_exec_runs(vm):
    proc = await vm.start("sleep 5; echo slept", stdout="buffer")
    with anyio.fail_after(3):  # would take 5 s if file ops waited for the exec
        await vm.fs.write("/tmp/concurrent.txt", "during exec")
        assert await vm.fs.read_text("/tmp/concurrent.txt") == "during exec"
        assert "concurrent.txt" in await vm.fs.listdir("/tmp")
    assert (await proc.wait()).stdout == "slept\n"


async def test_upload_and_download(vm, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(700_000))
    assert await vm.fs.upload(src, "/tmp/up.bin") == 700_000
    dst = tmp_path / "dst.bin"
    assert await vm.fs.download("/tmp/up.bin", dst) == 700_000
    assert dst.read_bytes() == src.read_bytes()
