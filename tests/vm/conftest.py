"""VM-backed tests: each module shares one warm VM where isolation allows (boots cost seconds under TCG)."""

import os
import resource
import subprocess
import tempfile
from pathlib import Path

import pytest

from gondolin import VM

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def both_backends(request):
    """Run a module under both anyio backends: ``from .conftest import both_backends as
    anyio_backend``. Module scope, so a module's shared VM is booted once per backend."""
    return request.param


@pytest.fixture
def asyncio_only(anyio_backend):
    """For a test too slow to repeat under trio, in a module that runs under both backends."""
    if anyio_backend != "asyncio":
        pytest.skip("run under asyncio only (slow); the module's other tests cover trio")


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


def own_run_dirs() -> list[Path]:
    """Run directories of VMs of this test process."""
    base = Path(tempfile.gettempdir())
    out = []
    for d in base.glob("gondolin-vm-*"):
        try:
            if int((d / "owner.pid").read_text()) == os.getpid():
                out.append(d)
        except (OSError, ValueError):
            continue
    return sorted(out)


@pytest.fixture
def no_leaks():
    """Fail if the test left QEMU processes or run directories behind."""
    before_pids = qemu_pids()
    before_dirs = set(own_run_dirs())
    yield
    leaked_pids = qemu_pids() - before_pids
    dirs = set(own_run_dirs()) - before_dirs
    assert not leaked_pids, f"QEMU processes left behind: {leaked_pids}"
    assert not dirs, f"run directories left behind: {dirs}"
