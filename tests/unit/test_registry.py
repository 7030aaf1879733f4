import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest

from gondolin.exec import ExecResult, OutputChunk
from gondolin.registry import (
    RemoteVM,
    SessionError,
    SessionInfo,
    find_session,
    list_sessions,
    register,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def session_dir(tmp_path, monkeypatch):
    d = tmp_path / "sessions"
    monkeypatch.setenv("GONDOLIN_SESSION_DIR", str(d))
    return d


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def entry(session_dir: Path, ident: str, pid: int, socket: Path, label=None, created=None) -> SessionInfo:
    socket.touch()
    info = SessionInfo(id=ident, pid=pid, qemu_pid=None, label=label, created=created or time.time(),
                       socket=str(socket), image="img", memory_mb=512, cpus=1, rootfs="cow")
    session_dir.mkdir(exist_ok=True)
    (session_dir / f"{ident}.json").write_text(json.dumps(asdict(info)))
    return info


def test_gc_removes_entries_of_dead_owners_and_keeps_live_ones(session_dir, tmp_path):
    entry(session_dir, "aaa111", os.getpid(), tmp_path / "a.sock", created=1)
    entry(session_dir, "bbb222", dead_pid(), tmp_path / "b.sock")
    entry(session_dir, "ccc333", os.getpid(), tmp_path / "c.sock", created=2)
    (tmp_path / "c.sock").unlink()  # owner alive but the VM's socket is gone: closed without cleanup
    assert [s.id for s in list_sessions(gc=False)] == ["aaa111"]
    assert (session_dir / "bbb222.json").exists()
    assert [s.id for s in list_sessions()] == ["aaa111"]
    assert sorted(p.name for p in session_dir.iterdir()) == ["aaa111.json"]


def test_gc_removes_unreadable_entries_once_they_are_old(session_dir):
    session_dir.mkdir()
    junk = session_dir / "junk.json"
    junk.write_text("{half")
    assert list_sessions() == [] and junk.exists()  # may be being written right now
    os.utime(junk, (time.time() - 120, time.time() - 120))
    assert list_sessions() == [] and not junk.exists()


def test_find_by_id_prefix_or_label(session_dir, tmp_path):
    entry(session_dir, "abc111", os.getpid(), tmp_path / "1.sock", label="web")
    entry(session_dir, "abd222", os.getpid(), tmp_path / "2.sock", label="db")
    assert find_session("abc111").id == "abc111"
    assert find_session("abd").id == "abd222"
    assert find_session("web").id == "abc111"
    with pytest.raises(SessionError, match="several"):
        find_session("ab")
    with pytest.raises(SessionError, match="no running VM"):
        find_session("zzz")


def test_no_registry_directory_means_no_sessions():
    assert list_sessions() == []


class FakeProc:
    """Echoes stdin back on stdout; exit code = number of resizes (to prove they arrive)."""

    def __init__(self, command):
        self.command = command
        self.pid = 42
        self.buf: list[bytes] = []
        self.eof = anyio.Event()
        self.resizes = 0
        self.killed = anyio.Event()
        self._send, self._recv = anyio.create_memory_object_stream(100)

    async def start(self):
        return self

    async def write(self, data):
        await self._send.send(OutputChunk("stdout", data))

    async def close_stdin(self):
        await self._send.send(None)

    async def resize(self, rows, cols):
        self.resizes += 1

    async def signal(self, signum):
        self.killed.set()
        await self._send.send(None)

    async def kill(self):
        await self.signal(9)

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        yield OutputChunk("stderr", b"started\n")
        while (item := await self._recv.receive()) is not None:
            yield item

    async def wait(self):
        return ExecResult(self.resizes, None, b"", b"", 0.1)


class FakeVM:
    def __init__(self, run_dir, tg):
        self.id = "f00dfeed0001"
        self.label = "fake"
        self.created = time.time()
        self.qemu_pid = None
        self.image = SimpleNamespace(build_id="img")
        self.memory_mb, self.cpus, self.rootfs, self.restored_from = 512, 1, "cow", "template"
        self.running = True
        self.run_dir = run_dir  # the machine side: run_dir, spawn, on_close
        self.tg = tg
        self.procs = []
        self.checkpoints = []
        self.closers = []

    def spawn(self, name, fn, *args, critical=True):
        self.tg.start_soon(fn, *args)

    def on_close(self, callback):
        self.closers.append(callback)

    async def start(self, command, **kw):
        p = FakeProc(command)
        p.kw = kw
        self.procs.append(p)
        return p

    async def checkpoint(self, path, disk_only=False):
        if path.endswith("bad"):
            from gondolin.machine.checkpoint import CheckpointError

            raise CheckpointError("nope, bad path")
        self.checkpoints.append((path, disk_only))
        return SimpleNamespace(path=Path(path), size=123, kind="disk" if disk_only else "full")


async def test_remote_exec_streams_both_ways(tmp_path):
    async with anyio.create_task_group() as tg:
        vm = FakeVM(tmp_path, tg)
        reg = await register(vm, vm)
        [info] = list_sessions()
        assert info.id == vm.id and info.restored_from == "template"
        remote = RemoteVM.find("fake")
        proc = await remote.start(["cat"], stdin=True, pty=True, rows=30, cols=100, env={"A": "b"})
        assert proc.pid == 42
        await proc.write(b"hello ")
        await proc.resize(40, 120)
        await proc.write("world")
        await proc.close_stdin()
        chunks = [c async for c in proc]
        result = await proc.wait()
        assert b"".join(c.data for c in chunks if c.stream == "stdout") == b"hello world"
        assert [c.data for c in chunks if c.stream == "stderr"] == [b"started\n"]
        assert result.exit_code == 1
        kw = vm.procs[0].kw
        assert (kw["pty"], kw["rows"], kw["cols"], kw["env"], kw["stdin"]) == (True, 30, 100, {"A": "b"}, True)

        cp = await remote.checkpoint(str(tmp_path / "x.ckpt"), disk_only=True)
        assert cp["size"] == 123 and vm.checkpoints == [(str(tmp_path / "x.ckpt"), True)]
        from gondolin.errors import GondolinError

        with pytest.raises(GondolinError) as err:
            await remote.checkpoint(str(tmp_path / "bad"))
        assert err.value.code == "checkpoint_error" and "nope" in str(err.value)
        reg.close()
        assert list_sessions() == []
        tg.cancel_scope.cancel()


async def test_a_client_that_goes_away_kills_its_command(tmp_path):
    async with anyio.create_task_group() as tg:
        vm = FakeVM(tmp_path, tg)
        reg = await register(vm, vm)
        proc = await RemoteVM.find(vm.id).start("sleep 100", stdin=True)
        await proc._conn.stream.aclose()
        with anyio.fail_after(5):
            await vm.procs[0].killed.wait()
        reg.close()
        tg.cancel_scope.cancel()
