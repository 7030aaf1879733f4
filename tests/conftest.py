import os
import shutil
import tempfile

import pytest

from gondolin.machine.machine import Machine
from gondolin.qemu.process import QemuProcess

NO_VM = ("{} boots a VM but has no `vm` marker: mark it `pytest.mark.vm` (so `pytest -m 'not vm'` "
         "boots nothing) or use the fakes in tests/support.py")
# Stands in for QEMU in tests without the marker, for the processes they start (the CLI, scripts):
# it answers `--version` (template keys ask for it) from the real binary and refuses to boot.
QEMU_REFUSER = """#!/bin/sh
if [ "$1" = "--version" ]; then exec "$GONDOLIN_REAL_QEMU" "$@"; fi
echo "gondolin tests: a test without the vm marker tried to start QEMU" >&2
exit 1
"""
_refuser: dict[str, str] = {}  # the environment that points started processes at QEMU_REFUSER


@pytest.fixture(scope="session")
def anyio_backend():
    return "asyncio"


def pytest_sessionstart(session):
    real = os.environ.get("GONDOLIN_QEMU") or shutil.which("qemu-system-x86_64")
    if real is None:
        return  # nothing could boot anyway
    path = os.path.join(tempfile.mkdtemp(prefix="gondolin-tests-"), "qemu-system-x86_64")
    with open(path, "w") as f:
        f.write(QEMU_REFUSER)
    os.chmod(path, 0o700)
    _refuser.update(GONDOLIN_QEMU=path, GONDOLIN_REAL_QEMU=real)


def pytest_sessionfinish(session):
    if "GONDOLIN_QEMU" in _refuser:
        shutil.rmtree(os.path.dirname(_refuser["GONDOLIN_QEMU"]), ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Without the `vm` marker a test, its fixtures included, cannot start a machine or QEMU, in
    this process or in one it starts."""
    if item.get_closest_marker("vm") is not None:
        return (yield)
    saved = {key: os.environ.get(key) for key in _refuser}
    real_start, real_spawn = Machine.start, QemuProcess.start

    async def refuse_machine(self, source):
        raise RuntimeError(NO_VM.format(item.nodeid))

    def refuse_qemu(self):
        raise RuntimeError(NO_VM.format(item.nodeid))

    Machine.start, QemuProcess.start = refuse_machine, refuse_qemu
    os.environ.update(_refuser)
    try:
        return (yield)
    finally:
        Machine.start, QemuProcess.start = real_start, real_spawn
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
