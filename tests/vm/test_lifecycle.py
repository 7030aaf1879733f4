import os
import urllib.request

import anyio
import pytest

from gondolin import VM, VMClosedError, VMDiedError, VMStartError
from gondolin.sync import VM as SyncVM

from .conftest import both_backends as anyio_backend  # noqa: F401 - these tests run under asyncio and trio
from .conftest import own_run_dirs, qemu_pids

pytestmark = [pytest.mark.anyio, pytest.mark.vm]


async def test_killing_qemu_mid_exec_fails_pending_calls_clearly(no_leaks):
    vm = await VM.create()
    pid = vm.qemu_pid
    assert pid in qemu_pids()
    proc = await vm.start("echo about to sleep; sleep 60")
    await anyio.sleep(0.3)
    vm.kill_qemu()
    with anyio.fail_after(10), pytest.raises(VMDiedError) as err:
        await proc.wait()
    assert "stopped" in str(err.value)
    with pytest.raises(VMDiedError):
        await vm.exec("true")
    with pytest.raises(VMDiedError):
        await vm.fs.read_bytes("/etc/hostname")
    await vm.close()
    assert pid not in qemu_pids()
    with pytest.raises(VMClosedError):
        await vm.exec("true")


async def test_rootfs_modes_and_cleanup(no_leaks, asyncio_only):
    async with await VM.create(rootfs="readonly") as vm:
        r = await vm.exec("touch /usr/x")
        assert r.exit_code != 0 and "Read-only file system" in r.stderr
        assert (await vm.exec("echo ok > /tmp/x && cat /tmp/x")).stdout == "ok\n"
    async with await VM.create(rootfs="memory") as vm:
        assert (await vm.exec("echo kept > /usr/local/x && cat /usr/local/x")).stdout == "kept\n"
        assert "overlay" in (await vm.exec("grep ' / ' /proc/mounts")).stdout
    async with await VM.create(rootfs="cow", env={"VM_WIDE": "yes"}, hostname="box1") as vm:
        assert (await vm.exec("echo cow > /etc/cow && cat /etc/cow")).stdout == "cow\n"
        assert (await vm.exec("echo $VM_WIDE $(hostname)")).stdout == "yes box1\n"
        mine = own_run_dirs()
        assert len(mine) == 1 and (mine[0] / "root.qcow2").exists()
    assert not mine[0].exists()


async def test_writes_in_cow_mode_never_reach_the_base_image():
    async with await VM.create() as vm:
        await vm.exec("echo scribble > /etc/scribble && sync")
        base = vm.image.rootfs
    async with await VM.create() as vm:
        assert not await vm.fs.exists("/etc/scribble")
    assert base.exists()


async def test_invalid_options_are_refused_before_booting():
    with pytest.raises(ValueError):
        await VM.create(rootfs="tmpfs")
    with pytest.raises(ValueError):
        await VM.create(memory="12")
    with pytest.raises(ValueError):
        await VM.create(cpus=0)


async def test_start_timeout_is_a_clear_error(no_leaks):
    with pytest.raises(VMStartError) as err:
        await VM.create(start_timeout=0.5, warm=False)  # a warm restore may well finish in 0.5 s
    assert err.value.code == "vm_start_timeout" and "timeouts.start" in str(err.value)


async def test_qemu_that_cannot_start_reports_its_console(monkeypatch, no_leaks):
    monkeypatch.setenv("GONDOLIN_QEMU", "/bin/false")
    with pytest.raises(VMStartError) as err:
        await VM.create(accel="tcg")
    assert "exit code 1" in str(err.value)


def test_sync_facade(no_leaks):
    with SyncVM.create() as vm:
        assert vm.exec("echo sync").stdout == "sync\n"
        vm.fs.write("/tmp/s.txt", "from sync")
        assert vm.fs.read_text("/tmp/s.txt") == "from sync"
        assert list(vm.exec_lines("seq 3")) == ["1", "2", "3"]
        assert vm.exec("exit 4").exit_code == 4
        # expose_http: a guest server answers through the host gateway, and close() stops it
        vm.fs.write("/srv/index.html", "served from the guest")
        vm.exec("cd /srv && (python3 -m http.server 8080 --bind 127.0.0.1 >/dev/null 2>&1 &)")
        vm.exec("for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null && break; sleep 0.1; done")
        with vm.expose_http(8080) as gateway:
            assert gateway.url.startswith("http://127.0.0.1:")
            with urllib.request.urlopen(gateway.url + "index.html", timeout=30) as reply:
                assert reply.read() == b"served from the guest"
            gateway.set_routes({"/api": 8081})
            assert [r.prefix for r in gateway.routes.routes] == ["/api"]
            assert any(e.status == 200 for e in gateway.events())
        with pytest.raises(OSError):
            urllib.request.urlopen(gateway.url, timeout=5)


def test_run_dirs_of_dead_owners_are_collected(tmp_path):
    import tempfile

    from gondolin.machine.machine import RUN_PREFIX, gc_run_dirs

    stale = tempfile.mkdtemp(prefix=RUN_PREFIX)
    with open(os.path.join(stale, "owner.pid"), "w") as f:
        f.write("999999999")
    assert gc_run_dirs() >= 1
    assert not os.path.exists(stale)
