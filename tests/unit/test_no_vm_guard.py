"""The guard in tests/conftest.py: a test without the `vm` marker cannot boot a VM."""

import subprocess

import pytest

from gondolin.errors import MissingToolError
from gondolin.machine.machine import Machine
from gondolin.qemu.process import QemuProcess, find_qemu

pytestmark = pytest.mark.anyio


async def test_a_machine_cannot_start():
    with pytest.raises(RuntimeError, match="no `vm` marker"):
        await Machine.start(None, None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="no `vm` marker"):
        QemuProcess(["qemu-system-x86_64"]).start()


def test_a_started_process_cannot_run_qemu():
    try:
        qemu = find_qemu()
    except MissingToolError:
        pytest.skip("no QEMU on this machine")
    p = subprocess.run([qemu, "-machine", "none", "-nographic"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "without the vm marker" in p.stderr
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and "QEMU emulator" in version.stdout  # template keys still work
