"""The sandbox actor: one VM in one Ray actor process, its calls as actor methods.

The actor is an async actor: Ray runs its methods as tasks of one asyncio loop in the actor's
process, so calls on one sandbox run concurrently (an exec does not hold up a file read), as
they do on a local :class:`gondolin.VM`. QEMU is started from that loop's thread and dies with
it (``PR_SET_PDEATHSIG``): when the actor's process ends, however it ends, its VM ends too.

Every method answers its value or a :class:`Failure` (see :mod:`._errors`); none raises into
Ray. Large data never travels as a method's own argument or value: file contents and
checkpoints move as parts of at most :data:`PART_SIZE` bytes, each its own object in Ray's
object store, owned by the client that asked for it.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal as _signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import anyio

from .._log import get_logger
from ..errors import GondolinError
from ..exec import ExecProcess, ExecResult, OutputChunk
from ..fstypes import DirEntry
from ..options import VMOptions
from ..vm import VM, Checkpoint
from ._errors import ClusterError, Failure, failure_of

log = get_logger("cluster")
P = ParamSpec("P")
R = TypeVar("R")
PART_SIZE = 8 << 20  # bytes per object-store part of a file or checkpoint
MAX_PROCESSES = 256  # started, unfinished processes one sandbox keeps for its client
MAX_WALK_ENTRIES = 100_000  # a walk without max_entries stops here
FS_CALLS = frozenset({"stat", "exists", "listdir", "scandir", "mkdir", "rename", "remove"})


@dataclass(frozen=True)
class Facts:
    """What a client knows about a sandbox without asking again."""

    id: str
    node_id: str
    actor_pid: int
    qemu_pid: int | None
    hostname: str
    label: str | None
    accel: str
    cpus: int
    memory_mb: int
    image: str
    restored_from: str | None
    boot_time: float | None
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SavedFile:
    """A checkpoint file an actor wrote on its node."""

    node_id: str
    path: str
    size: int
    kind: str


@dataclass(frozen=True)
class Boot:
    """How an actor starts its VM: fresh from ``options``, or resumed from a checkpoint that is
    a file on this node (``path``) or parts in the object store (``parts``, in order)."""

    options: VMOptions | None = None
    path: str | None = None
    parts: list[Any] | None = None  # ObjectRefs of bytes, nested so that Ray does not resolve them
    resume: bool = False


def replying(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R | Failure]]:
    """Answer the error a call raised as a :class:`Failure` instead of raising it into Ray."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | Failure:
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - answered to the client, which raises it again
            if not isinstance(exc, GondolinError | ValueError | TypeError):
                log.exception("sandbox actor call %s failed", fn.__name__)
            return failure_of(exc)

    return wrapper


@dataclass
class _Process:
    proc: ExecProcess
    output: AsyncIterator[OutputChunk] | None = None


def _node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


class SandboxActor:
    """A sandbox: one VM. Created by :class:`gondolin.cluster.Cluster`, never directly."""

    def __init__(self) -> None:
        self._vm: VM | None = None
        self._procs: dict[int, _Process] = {}
        self._last_proc = 0
        self._tmp_dir: Path | None = None  # made on first use: a killed actor leaves nothing it never needed
        self._saved: set[str] = set()  # checkpoint files this actor wrote; only these are read back or removed
        self._record: dict[str, Any] | None = None  # what its owner keeps with it (plain data), see ClusterVM.record

    def _tmp(self) -> Path:
        if self._tmp_dir is None:
            self._tmp_dir = Path(tempfile.mkdtemp(prefix="gondolin-cluster-"))
        return self._tmp_dir

    def _running(self) -> VM:
        if self._vm is None:
            raise ClusterError("this sandbox has no VM (it was closed, or never started)", code="sandbox_closed")
        return self._vm

    # -- starting ---------------------------------------------------------------------------------
    @replying
    async def boot(self, how: Boot) -> Facts:
        if self._vm is not None:
            raise ClusterError("this sandbox already has a VM", code="sandbox_started")
        if not how.resume:
            self._vm = await VM.create(how.options)
            return self._facts()
        path = Path(how.path) if how.path is not None else None
        received = None
        if path is None:
            received = path = self._tmp() / f"received-{time.monotonic_ns()}.ckpt"
            await self._receive(path, how.parts or [])
        try:
            checkpoint = await anyio.to_thread.run_sync(Checkpoint.load, path)
            self._vm = await checkpoint.resume(how.options) if how.options is not None else await checkpoint.resume()
        finally:
            if received is not None:
                received.unlink(missing_ok=True)  # a resume only reads the file, then needs it no more
        return self._facts()

    async def _receive(self, path: Path, parts: list[Any]) -> None:
        async with await anyio.open_file(path, "wb") as f:
            for ref in parts:
                await f.write(await ref)

    @replying
    async def facts(self) -> Facts:
        return self._facts()

    def _facts(self) -> Facts:
        vm = self._running()
        return Facts(id=vm.id, node_id=_node_id(), actor_pid=os.getpid(), qemu_pid=vm.qemu_pid,
                     hostname=vm.hostname, label=vm.label, accel=vm.accel, cpus=vm.cpus, memory_mb=vm.memory_mb,
                     image=vm.image.build_id, restored_from=vm.restored_from, boot_time=vm.boot_time, env=vm.env)

    @replying
    async def set_record(self, record: dict[str, Any]) -> None:
        self._record = dict(record)

    @replying
    async def record(self) -> dict[str, Any] | None:
        return None if self._record is None else dict(self._record)

    @replying
    async def network_events(self) -> list[dict[str, Any]]:
        """The VM's recent HTTP audit events as plain data (empty without a network)."""
        network = self._running().network
        if network is None:
            return []
        return [{f.name: getattr(ev, f.name) for f in fields(ev)} | {"decision": ev.decision.value}
                for ev in network.events()]

    @replying
    async def ping(self, timeout: float) -> float:
        return await self._running().ping(timeout)

    @replying
    async def console(self, lines: int) -> list[str]:
        return self._running().console(lines)

    # -- commands -----------------------------------------------------------------------------
    @replying
    async def exec(self, command: str | list[str], kwargs: dict[str, Any]) -> ExecResult:
        return await self._running().exec(command, **kwargs)

    @replying
    async def start(self, command: str | list[str], kwargs: dict[str, Any]) -> tuple[int, int | None]:
        """Start a process; its handle here and its guest pid (when the guest said so yet)."""
        if len(self._procs) >= MAX_PROCESSES:
            raise ClusterError(f"this sandbox already has {MAX_PROCESSES} processes its client has not waited "
                               "for; wait for some (or release them) first", code="too_many_processes")
        proc = await self._running().start(command, **kwargs)
        self._last_proc += 1
        self._procs[self._last_proc] = _Process(proc)
        return self._last_proc, proc.pid

    def _proc(self, handle: int) -> _Process:
        entry = self._procs.get(handle)
        if entry is None:
            raise ClusterError(f"no process {handle} in this sandbox (it was waited for or released)",
                               code="process_not_found")
        return entry

    @replying
    async def read(self, handle: int) -> OutputChunk | None:
        """The next piped chunk of output, or None at the end."""
        entry = self._procs.get(handle)
        if entry is None:
            return None
        if entry.output is None:
            entry.output = aiter(entry.proc)
        return await anext(entry.output, None)

    @replying
    async def write(self, handle: int, data: bytes) -> None:
        await self._proc(handle).proc.write(data)

    @replying
    async def close_stdin(self, handle: int) -> None:
        await self._proc(handle).proc.close_stdin()

    @replying
    async def signal(self, handle: int, signum: int) -> None:
        await self._proc(handle).proc.signal(_signal.Signals(signum))

    @replying
    async def resize(self, handle: int, rows: int, cols: int) -> None:
        await self._proc(handle).proc.resize(rows, cols)

    @replying
    async def wait(self, handle: int, timeout: float | None) -> ExecResult:
        entry = self._proc(handle)
        result = await entry.proc.wait(timeout)
        self._procs.pop(handle, None)
        return result

    @replying
    async def release(self, handle: int) -> None:
        entry = self._procs.pop(handle, None)
        if entry is not None and entry.proc.result is None:
            await entry.proc.kill()

    # -- files ----------------------------------------------------------------------------------
    @replying
    async def fs(self, call: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if call not in FS_CALLS:
            raise ValueError(f"unknown file operation {call!r}")
        return await getattr(self._running().fs, call)(*args, **kwargs)

    @replying
    async def read_part(self, path: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of a guest file from ``offset`` (fewer only at its end)."""
        parts = []
        async for chunk in await self._running().fs.open_read(path, offset=offset, length=length):
            parts.append(chunk)
        return b"".join(parts)

    @replying
    async def write_parts(self, path: str, parts: list[Any], kwargs: dict[str, Any]) -> int:
        async def chunks() -> AsyncIterator[bytes]:
            for ref in parts:
                yield await ref

        return await self._running().fs.write(path, chunks(), **kwargs)

    @replying
    async def walk(self, top: str, max_entries: int | None, include_hidden: bool) -> list[tuple[str, list[DirEntry]]]:
        limit = MAX_WALK_ENTRIES if max_entries is None else min(max_entries, MAX_WALK_ENTRIES)
        walk = self._running().fs.walk(top, max_entries=limit, include_hidden=include_hidden)
        try:
            return [batch async for batch in walk]
        finally:
            await walk.aclose()

    # -- saved state ----------------------------------------------------------------------------
    @replying
    async def checkpoint(self, path: str | None, disk_only: bool) -> SavedFile:
        """Save the VM to ``path`` (a shared path), or to a file of this actor on its node."""
        target = Path(path) if path is not None else self._tmp() / f"checkpoint-{time.monotonic_ns()}.ckpt"
        saved = await self._running().checkpoint(target, disk_only=disk_only)
        if path is None:
            self._saved.add(str(target))
        return SavedFile(_node_id(), str(target), saved.size, saved.header.kind)

    def _saved_file(self, path: str) -> Path:
        if path not in self._saved:
            raise ClusterError(f"{path} is not a checkpoint this sandbox saved", code="checkpoint_not_found")
        return Path(path)

    @replying
    async def checkpoint_part(self, path: str, offset: int, length: int) -> bytes:
        def read() -> bytes:
            with open(self._saved_file(path), "rb") as f:
                f.seek(offset)
                return f.read(length)

        return await anyio.to_thread.run_sync(read)

    @replying
    async def drop_checkpoint(self, path: str) -> None:
        self._saved_file(path).unlink(missing_ok=True)
        self._saved.discard(path)

    # -- teardown -------------------------------------------------------------------------------
    @replying
    async def close(self) -> None:
        """Stop the VM and remove this actor's files; the client then ends the actor."""
        vm, self._vm = self._vm, None
        self._procs.clear()
        try:
            if vm is not None:
                await vm.close()
        finally:
            if self._tmp_dir is not None:
                shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._saved.clear()


def prepare_node(options: VMOptions) -> tuple[str, float, str | None]:
    """Start one VM on this node and close it, so that the node has its image and warm
    template: ``(node id, seconds, how it started)``. Runs as a Ray task pinned to a node."""

    async def run() -> tuple[str, float, str | None]:
        t0 = time.monotonic()
        async with await VM.create(options) as vm:
            await vm.exec(["/bin/true"])
            how = vm.restored_from
        return _node_id(), time.monotonic() - t0, how

    try:
        return anyio.run(run)
    except GondolinError as exc:
        raise ClusterError(f"preparing node {_node_id()} failed: {exc}", code="prepare_failed") from None


__all__ = ["MAX_PROCESSES", "PART_SIZE", "Boot", "Facts", "SandboxActor", "SavedFile", "prepare_node"]
