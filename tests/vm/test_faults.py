"""What the lifecycle owner guarantees when things go wrong: a crashed background service, a
frozen guest, a program that never calls close(), a VM dropped without closing it."""

import gc
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import anyio
import pytest

from gondolin import (
    VM,
    ExecTimeout,
    GuestTimeoutError,
    Timeouts,
    VMDiedError,
    VMUnresponsiveError,
    open_vm,
)
from gondolin.net.driver import NetworkDriver
from gondolin.vfs import MemoryProvider
from gondolin.vfs.port import VfsServer

from .conftest import both_backends as anyio_backend  # noqa: F401 - these tests run under asyncio and trio
from .conftest import qemu_pids

pytestmark = [pytest.mark.anyio, pytest.mark.vm]
FAST = Timeouts(call=3.0, grace=2.0, ping_interval=0.5, unresponsive=4.0)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def crash_when_set(monkeypatch, cls, name, exc):
    """Patch ``cls.name`` (a background service) to raise ``exc`` once the returned event is set."""
    crashed = anyio.Event()
    real = getattr(cls, name)

    async def crashing(self, stream):
        async with anyio.create_task_group() as tg:
            tg.start_soon(real, self, stream)
            await crashed.wait()
            raise exc

    monkeypatch.setattr(cls, name, crashing)
    return crashed


async def test_a_crashed_network_driver_is_raised_by_the_next_call(monkeypatch, no_leaks):
    crashed = crash_when_set(monkeypatch, NetworkDriver, "run", RuntimeError("network driver crashed"))
    vm = await VM.create(warm=False)
    try:
        assert (await vm.exec("echo up")).stdout == "up\n"
        crashed.set()
        with anyio.fail_after(10):
            stopped_by = await vm.wait_stopped()
        assert isinstance(stopped_by, VMDiedError) and not vm.running
        with pytest.raises(VMDiedError) as err:
            await vm.exec("true")
        assert "network driver" in str(err.value)
        assert isinstance(err.value.__cause__, RuntimeError)
    finally:
        await vm.close()  # already raised by the call: close is quiet


async def test_a_crashed_file_service_is_raised_by_close(monkeypatch, no_leaks):
    crashed = crash_when_set(monkeypatch, VfsServer, "serve", OSError("file service lost its disk"))
    vm = await VM.create(mounts={"/data": MemoryProvider()}, warm=False)
    await vm.exec("ls /data")
    crashed.set()
    with anyio.fail_after(10):
        await vm.wait_stopped()
    with pytest.raises(VMDiedError) as err:
        await vm.close()
    assert "file service" in str(err.value) and isinstance(err.value.__cause__, OSError)
    await vm.close()  # reported once


async def test_a_frozen_guest_fails_calls_at_their_deadlines(no_leaks):
    async with open_vm(timeouts=FAST) as vm:
        pass  # a warm template for the VM below
    vm = await VM.create(timeouts=Timeouts(call=2.0, grace=1.0, ping_interval=5.0, unresponsive=30.0))
    pid = vm.qemu_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(ExecTimeout):
            await vm.exec("sleep 1", timeout=1)
        assert time.monotonic() - t0 < 8
        t0 = time.monotonic()
        with pytest.raises(GuestTimeoutError):
            await vm.fs.stat("/etc/hostname")
        with pytest.raises(GuestTimeoutError):
            await vm.fs.read_bytes("/etc/hostname")
        with pytest.raises(GuestTimeoutError):
            await vm.ping(timeout=0.5)
        assert time.monotonic() - t0 < 12
    finally:
        os.kill(pid, signal.SIGCONT)
        await vm.discard()


async def test_a_guest_that_stops_answering_pings_is_declared_unresponsive(no_leaks):
    vm = await VM.create(timeouts=FAST)
    pid = vm.qemu_pid
    proc = await vm.start("sleep 600")
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with anyio.fail_after(30), pytest.raises(VMUnresponsiveError):
            await proc.wait()  # no timeout of its own: the health monitor ends it
        assert time.monotonic() - t0 < 20
        with pytest.raises(VMUnresponsiveError):
            await vm.fs.stat("/")
        assert not vm.running
    finally:
        os.kill(pid, signal.SIGCONT)
        await vm.close()
    assert not pid_alive(pid)


async def test_close_raises_an_unresponsive_guest_nobody_noticed(no_leaks):
    vm = await VM.create(timeouts=FAST)
    os.kill(vm.qemu_pid, signal.SIGSTOP)
    with anyio.fail_after(30):
        assert isinstance(await vm.wait_stopped(), VMUnresponsiveError)
    with pytest.raises(VMUnresponsiveError):
        await vm.close()


async def test_a_vm_dropped_without_close_is_stopped_by_the_garbage_collector(no_leaks):
    vm = await VM.create()
    pid = vm.qemu_pid
    del vm
    gc.collect()
    with anyio.fail_after(10):
        while pid_alive(pid) and pid in qemu_pids():  # noqa: ASYNC110 - polling another process
            await anyio.sleep(0.05)
    await anyio.sleep(0.3)  # the service task notices and removes the run directory


SCRIPTS = {
    "asyncio": """
        import anyio, gondolin
        async def main():
            vm = await gondolin.VM.create()
            print(vm.qemu_pid, flush=True)
            raise RuntimeError("the user's bug")
        anyio.run(main, backend="asyncio")
    """,
    "trio": """
        import anyio, gondolin
        async def main():
            vm = await gondolin.VM.create()
            print(vm.qemu_pid, flush=True)
            return  # forgot close()
        anyio.run(main, backend="trio")
    """,
    "sync": """
        from gondolin.sync import VM
        vm = VM.create()
        print(vm.qemu_pid, flush=True)
        raise RuntimeError("the user's bug")
    """,
}


@pytest.mark.parametrize("kind", sorted(SCRIPTS))
def test_a_program_that_forgets_close_exits_promptly(kind, tmp_path):
    script = tmp_path / "forgot.py"
    script.write_text(textwrap.dedent(SCRIPTS[kind]))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    elapsed = time.monotonic() - t0
    qemu = int(out.split()[0])
    assert elapsed < 30, f"took {elapsed:.1f}s to exit"
    assert not pid_alive(qemu), "QEMU outlived its program"
    base = tempfile.gettempdir()
    leftovers = [d for d in os.listdir(base) if d.startswith("gondolin-vm-")
                 and _owner(os.path.join(base, d)) == proc.pid]
    assert not leftovers, f"run directories left behind: {leftovers}"
    if kind != "trio":
        assert "the user's bug" in err


def _owner(run_dir: str) -> int:
    try:
        with open(os.path.join(run_dir, "owner.pid")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0
