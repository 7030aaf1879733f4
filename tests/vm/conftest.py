"""VM-backed tests: each module shares one warm VM where isolation allows (boots cost seconds under TCG)."""

import os
import resource
import subprocess

import pytest

from gondolin import VM

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def vm():
    async with await VM.create(memory="512M") as machine:
        yield machine


def qemu_pids() -> set[int]:
    """QEMU processes started by this test process (other test runs may share the machine)."""
    out = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "qemu-system"],
                         capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture
def no_leaks():
    """Fail if the test left QEMU processes or run directories behind."""
    import tempfile

    before_pids = qemu_pids()
    def own_dirs() -> set[str]:
        base = tempfile.gettempdir()
        out = set()
        for d in os.listdir(base):
            if d.startswith("gondolin-vm-"):
                try:
                    if int(open(os.path.join(base, d, "owner.pid")).read()) == os.getpid():
                        out.add(d)
                except (OSError, ValueError):
                    continue
        return out

    before_dirs = own_dirs()
    yield
    leaked_pids = qemu_pids() - before_pids
    dirs = own_dirs() - before_dirs
    assert not leaked_pids, f"QEMU processes left behind: {leaked_pids}"
    assert not dirs, f"run directories left behind: {dirs}"
