"""Issue 11 item 10: a fork bomb as the unprivileged user leaves the VM usable.

Each exec runs in a pids cgroup of its own (``VM.create(pids_max=...)``, sent in the configure
message); the agent stays outside it, weighted to win the CPU.
"""

from __future__ import annotations

import time

import anyio
import pytest

from gondolin import VM

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

BOMB = ":(){ :|:& };:"
# Forks children that wait until told to go, until a fork fails; prints how many it got.
FORK_MANY = """
import os, signal
children = []
for _ in range(100):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        signal.pause()
        os._exit(0)
    children.append(pid)
print(len(children))
for pid in children:
    os.kill(pid, signal.SIGKILL)
"""


@pytest.fixture(scope="module")
async def vm():
    async with await VM.create(memory="512M", pids_max=64) as machine:
        yield machine


async def test_each_exec_gets_its_own_pids_limit(vm):
    r = await vm.exec("cat /proc/self/cgroup; cat /sys/fs/cgroup/$(cut -d: -f3 /proc/self/cgroup)/pids.max")
    cgroup, limit = r.stdout.split()
    assert cgroup.startswith("0::/exec/") and limit == "64", r.stdout + r.stderr
    r = await vm.exec(["python3", "-c", FORK_MANY], timeout=60)
    assert 50 <= int(r.stdout) < 64, r.stdout + r.stderr  # python itself is one of the 64


async def test_fork_bomb_as_the_unprivileged_user_leaves_later_calls_working(vm):
    await vm.exec(["/bin/bash", "-c", BOMB], user="agent", timeout=10)
    await anyio.sleep(5)  # let it churn in the background
    started = time.monotonic()
    with anyio.fail_after(120):
        r = await vm.exec("echo alive; ps -e -o user= | grep -c '^agent' || true")
    alive, bomb_processes = r.stdout.split()
    assert alive == "alive" and int(bomb_processes) <= 64
    assert time.monotonic() - started < 120
    await vm.fs.write("/tmp/after-bomb", "file ops work too")
    assert await vm.fs.read_text("/tmp/after-bomb") == "file ops work too"
    # Clean up inside the guest: the bomb lives on in its own cgroup; kill that cgroup whole
    # (pkill cannot keep up with a bomb that forks again).
    r = await vm.exec("own=$(cut -d: -f3 /proc/self/cgroup); for d in /sys/fs/cgroup/exec/*/; do "
                      "[ \"/sys/fs/cgroup$own/\" = \"$d\" ] || echo 1 > \"$d/cgroup.kill\"; done; sleep 1; "
                      "ps -e -o user= | grep -c '^agent' || true", timeout=60)
    assert r.stdout.strip() == "0", r.stdout + r.stderr


async def test_no_limit_when_pids_max_is_none():
    async with await VM.create(memory="512M", pids_max=None) as machine:
        r = await machine.exec("cat /proc/self/cgroup")
        assert "/exec/" not in r.stdout
