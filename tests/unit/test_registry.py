import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest

from gondolin import VM
from gondolin.errors import GondolinError
from gondolin.machine.checkpoint import CheckpointError
from gondolin.registry import (
    RegistryError,
    RemoteVM,
    VMEntry,
    find_vm,
    list_vms,
    register,
)
from tests.support import EchoAgent, FakeMachine, fake_machine

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def entries_dir(tmp_path, monkeypatch):
    d = tmp_path / "vms"
    monkeypatch.setenv("GONDOLIN_REGISTRY_DIR", str(d))
    return d


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def entry(entries_dir: Path, ident: str, pid: int, socket: Path, label=None, created=None) -> VMEntry:
    socket.touch()
    info = VMEntry(id=ident, pid=pid, qemu_pid=None, label=label, created=created or time.time(),
                       socket=str(socket), image="img", memory_mb=512, cpus=1, rootfs="cow")
    entries_dir.mkdir(exist_ok=True)
    (entries_dir / f"{ident}.json").write_text(json.dumps(asdict(info)))
    return info


def test_gc_removes_entries_of_dead_owners_and_keeps_live_ones(entries_dir, tmp_path):
    entry(entries_dir, "aaa111", os.getpid(), tmp_path / "a.sock", created=1)
    entry(entries_dir, "bbb222", dead_pid(), tmp_path / "b.sock")
    entry(entries_dir, "ccc333", os.getpid(), tmp_path / "c.sock", created=2)
    (tmp_path / "c.sock").unlink()  # owner alive but the VM's socket is gone: closed without cleanup
    assert [s.id for s in list_vms(gc=False)] == ["aaa111"]
    assert (entries_dir / "bbb222.json").exists()
    assert [s.id for s in list_vms()] == ["aaa111"]
    assert sorted(p.name for p in entries_dir.iterdir()) == ["aaa111.json"]


def test_gc_removes_unreadable_entries_once_they_are_old(entries_dir):
    entries_dir.mkdir()
    junk = entries_dir / "junk.json"
    junk.write_text("{half")
    assert list_vms() == [] and junk.exists()  # may be being written right now
    os.utime(junk, (time.time() - 120, time.time() - 120))
    assert list_vms() == [] and not junk.exists()


def test_find_by_id_prefix_or_label(entries_dir, tmp_path):
    entry(entries_dir, "abc111", os.getpid(), tmp_path / "1.sock", label="web")
    entry(entries_dir, "abd222", os.getpid(), tmp_path / "2.sock", label="db")
    assert find_vm("abc111").id == "abc111"
    assert find_vm("abd").id == "abd222"
    assert find_vm("web").id == "abc111"
    with pytest.raises(RegistryError, match="several"):
        find_vm("ab")
    with pytest.raises(RegistryError, match="no running VM"):
        find_vm("zzz")


def test_no_registry_directory_means_no_sessions():
    assert list_vms() == []


class CheckpointingVM(VM):
    """The real VM facade on a fake machine; checkpoints are recorded, not saved."""

    def __init__(self, machine: FakeMachine) -> None:
        super().__init__(machine)  # type: ignore[arg-type]
        self.checkpoints: list[tuple[str, bool]] = []

    async def checkpoint(self, path, *, disk_only=False):
        if str(path).endswith("bad"):
            raise CheckpointError("nope, bad path")
        self.checkpoints.append((str(path), disk_only))
        return SimpleNamespace(path=Path(path), size=123, kind="disk" if disk_only else "full")


async def test_remote_exec_streams_both_ways(tmp_path):
    agent = EchoAgent()
    async with fake_machine(agent, run_dir=tmp_path, label="fake") as machine:
        vm = CheckpointingVM(machine)
        reg = await register(vm, machine)  # type: ignore[arg-type]
        [info] = list_vms()
        assert info.id == vm.id and info.restored_from == "template"
        remote = RemoteVM.find("fake")
        proc = await remote.start(["cat"], stdin=True, pty=True, rows=30, cols=100, env={"A": "b"})
        await proc.write(b"hello ")
        await proc.resize(40, 120)
        await proc.write("world")
        await proc.close_stdin()
        chunks = [c async for c in proc]
        result = await proc.wait()
        assert b"".join(c.data for c in chunks if c.stream == "stdout") == b"hello world"
        assert [c.data for c in chunks if c.stream == "stderr"] == [b"started\n"]
        assert result.exit_code == 1  # one resize reached the guest
        [request] = agent.execs
        assert request.p["argv"] == ["cat"]
        assert {k: request.p[k] for k in ("pty", "rows", "cols", "env", "stdin")} == {
            "pty": True, "rows": 30, "cols": 100, "env": {"A": "b"}, "stdin": True}

        cp = await remote.checkpoint(str(tmp_path / "x.ckpt"), disk_only=True)
        assert cp["size"] == 123 and vm.checkpoints == [(str(tmp_path / "x.ckpt"), True)]
        with pytest.raises(GondolinError) as err:
            await remote.checkpoint(str(tmp_path / "bad"))
        assert err.value.code == "checkpoint_error" and "nope" in str(err.value)
        reg.close()
        assert list_vms() == []


async def test_a_client_that_goes_away_kills_its_command(tmp_path):
    agent = EchoAgent()
    async with fake_machine(agent, run_dir=tmp_path) as machine:
        vm = CheckpointingVM(machine)
        reg = await register(vm, machine)  # type: ignore[arg-type]
        proc = await RemoteVM.find(vm.id).start("sleep 100", stdin=True)
        await proc._conn.stream.aclose()
        with anyio.fail_after(5):
            await agent.signalled.wait()
        assert agent.signals == [signal.SIGKILL]
        reg.close()


async def test_remote_process_knows_the_guest_pid(tmp_path):
    async with fake_machine(EchoAgent(), run_dir=tmp_path) as machine:
        vm = CheckpointingVM(machine)
        reg = await register(vm, machine)  # type: ignore[arg-type]
        proc = await RemoteVM.find(vm.id).start("cat", stdin=True)
        assert proc.pid == 42
        await proc.close_stdin()
        await proc.wait()
        reg.close()
