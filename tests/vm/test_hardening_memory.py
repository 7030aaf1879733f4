"""Issue 11 items 6-7: a hostile guest runs into its VM's host memory budget, gets errors, and a
second VM in the same process keeps answering. Host memory is measured as RSS growth of this
process (not absolute numbers).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gondolin import VM
from gondolin.vfs import CopyOnWriteProvider, RealFSProvider
from gondolin.vfs.rpc import DEFAULT_MAX_DIR_BYTES

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

MiB = 1 << 20
COW_BYTES = 32 * MiB  # smaller than the default (cow.COW_MAX_BYTES) to keep the test short

# Opens the 2,000-entry directory again and again without reading or closing it.
OPENDIR_FLOOD = """
import os, sys
fds, errors = [], {}
for _ in range(int(sys.argv[1])):
    try:
        fds.append(os.open("/big", os.O_RDONLY | os.O_DIRECTORY))
    except OSError as exc:
        errors[exc.strerror] = errors.get(exc.strerror, 0) + 1
print(len(fds), errors)
"""

# Writes 1 MiB files into the copy-on-write mount until a write fails.
COW_FLOOD = """
import os
n = 0
try:
    for i in range(1000):
        with open(f"/cow/f{i}", "wb") as f:
            f.write(os.urandom(1 << 20))
        n += 1
except OSError as exc:
    print(n, exc.strerror)
"""


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("memory")
    big = root / "big"
    big.mkdir()
    for i in range(2000):
        (big / f"entry-with-a-longish-name-{i:05d}").touch()
    (root / "cow").mkdir()
    return {"big": big, "cow": root / "cow"}


async def test_hostile_guest_hits_its_budget_and_a_second_vm_keeps_answering(dirs):
    mounts = {"/big": RealFSProvider(dirs["big"]), "/cow": CopyOnWriteProvider(dirs["cow"], max_bytes=COW_BYTES)}
    async with await VM.create(memory="512M") as bystander, \
            await VM.create(memory="512M", mounts=mounts) as hostile:
        await hostile.fs.write("/tmp/flood.py", OPENDIR_FLOOD)
        await hostile.fs.write("/tmp/cow.py", COW_FLOOD)
        base = rss()
        r = await hostile.exec(["python3", "/tmp/flood.py", "300"], timeout=300)
        opened, errors = r.stdout.split(" ", 1)
        assert 10 < int(opened) < 300 and "Cannot allocate memory" in errors, r.stdout + r.stderr
        r = await bystander.exec("echo still here")
        assert r.stdout == "still here\n"
        r = await hostile.exec(["python3", "/tmp/cow.py"], timeout=300)
        written, error = r.stdout.split(" ", 1)
        assert int(written) <= COW_BYTES // MiB and "No space left" in error, r.stdout + r.stderr
        grown = rss() - base
        r = await bystander.exec("echo still here")
        assert r.stdout == "still here\n"
        await bystander.fs.write("/tmp/x", "ok")
        assert await bystander.fs.read_text("/tmp/x") == "ok"
        # Bounded by the two budgets (plus the interpreter's slack), not by what the guest asked for:
        # 300 snapshots of this directory would be ~330 MiB.
        assert grown < DEFAULT_MAX_DIR_BYTES + COW_BYTES + 96 * MiB, f"host RSS grew by {grown / MiB:.0f} MiB"
        print(f"host RSS growth: {grown / MiB:.0f} MiB")
        # The guest recovers once it lets go.
        r = await hostile.exec("rm -f /cow/f*; ls /big | wc -l")
        assert r.stdout.strip() == "2000"
