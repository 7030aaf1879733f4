"""An OpenAI Agents SDK sandbox client on Gondolin VMs (``pip install 'gondolin[openai-agents]'``).

    from agents import Runner
    from agents.run import RunConfig
    from agents.sandbox import SandboxAgent, SandboxRunConfig
    from integrations.openai_agents_sandbox import GondolinSandboxClient

    client = GondolinSandboxClient(VMOptions(memory="1G", http_hooks=hooks))
    agent = SandboxAgent(name="coder", instructions="...")
    result = await Runner.run(agent, "task", run_config=RunConfig(sandbox=SandboxRunConfig(client=client)))

A ``SandboxAgent``'s shell, file and patch tools then run in a VM: one per sandbox session,
started when the session starts and closed when it shuts down. Egress policy, secrets and
mounts are the client's :class:`gondolin.VMOptions` (``http_hooks``, placeholder ``env``,
``mounts``); they are live host objects and never part of the serialized session state.

Workspace persistence (what the SDK calls ``persist_workspace`` / ``hydrate_workspace``, run
when a session stops and when a stopped one is resumed) is a Gondolin checkpoint by default:
the whole VM, disk and memory, saved to ``checkpoint_dir`` as
``openai-agents-<session id>.ckpt`` (one file per session, replaced by each persist); the
snapshot the SDK stores holds only a reference to it, and resuming the session resumes the VM
from it. ``GondolinSandboxClientOptions(workspace_persistence="tar")`` persists a tar of the
workspace instead (portable between backends; the VM starts fresh on resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import shlex
import tempfile
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
from agents.sandbox.errors import (
    ExecTimeoutError,
    ExecTransportError,
    WorkspaceArchiveReadError,
    WorkspaceArchiveWriteError,
    WorkspaceReadNotFoundError,
    WorkspaceWriteTypeError,
)
from agents.sandbox.manifest import Manifest
from agents.sandbox.session import (
    BaseSandboxClient,
    BaseSandboxClientOptions,
    BaseSandboxSession,
    Dependencies,
    Instrumentation,
    SandboxSession,
    SandboxSessionState,
)
from agents.sandbox.session.pty_output import collect_pty_output
from agents.sandbox.session.pty_types import (
    PTY_PROCESSES_MAX,
    PtyExecUpdate,
    allocate_pty_process_id,
    clamp_pty_yield_time_ms,
    process_id_to_prune_from_meta,
    resolve_pty_write_yield_time_ms,
)
from agents.sandbox.session.tar_workspace import shell_tar_exclude_args
from agents.sandbox.snapshot import SnapshotBase, SnapshotSpec, resolve_snapshot
from agents.sandbox.types import ExecResult, User
from agents.sandbox.util.tar_utils import UnsafeTarMemberError, validate_tarfile
from agents.sandbox.workspace_paths import sandbox_path_str

from gondolin import (
    VM,
    Checkpoint,
    ExecProcess,
    ExecTimeout,
    GondolinError,
    GuestFileError,
    VMOptions,
)
from gondolin.machine.checkpoint import default_dir

Persistence = Literal["checkpoint", "tar"]
REF_MAGIC = b"gondolin-checkpoint-ref/1\n"  # a snapshot holding this names a checkpoint file
MAX_REF_BYTES = 4096
_CHECKPOINT_NAME = re.compile(r"openai-agents-[0-9a-f]{32}\.ckpt")
MAX_EXEC_OUTPUT = 16 * 1024 * 1024  # bytes kept per stream of one command; the rest is drained and dropped
SPOOL_BYTES = 8 * 1024 * 1024  # file contents larger than this are spooled to a host temp file
CHUNK = 1024 * 1024
KILL_GRACE_S = 5.0
MAX_UNREAD_OUTPUT = 4 * 1024 * 1024  # unread bytes kept per interactive process; the oldest are dropped


class _OutputQueue(deque[bytes]):
    """The SDK's PTY output queue, counting its bytes so the oldest can be dropped past a cap."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def append(self, chunk: bytes) -> None:
        super().append(chunk)
        self.size += len(chunk)
        while self.size > MAX_UNREAD_OUTPUT and len(self) > 1:
            self.size -= len(super().popleft())

    def appendleft(self, chunk: bytes) -> None:
        super().appendleft(chunk)
        self.size += len(chunk)

    def popleft(self) -> bytes:
        chunk = super().popleft()
        self.size -= len(chunk)
        return chunk


@dataclass(eq=False)
class _Interactive:
    """A command started by ``exec_command`` that may outlive the tool call."""

    proc: ExecProcess
    tty: bool
    chunks: _OutputQueue = field(default_factory=_OutputQueue)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    notify: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int | None = None
    last_used: float = field(default_factory=time.monotonic)
    pump: asyncio.Task[None] | None = None

    async def run_pump(self) -> None:
        try:
            async for chunk in self.proc:
                async with self.lock:
                    self.chunks.append(chunk.data)
                self.notify.set()
            self.exit_code = (await self.proc.wait()).exit_code
        except GondolinError:
            self.exit_code = -1  # the VM went away under the command
        finally:
            self.closed.set()
            self.notify.set()

    async def terminate(self) -> None:
        if not self.closed.is_set():
            with anyio.CancelScope(shield=True), anyio.move_on_after(KILL_GRACE_S), \
                    contextlib.suppress(GondolinError):
                await self.proc.kill()
        if self.pump is not None and not self.pump.done():
            self.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.pump


class GondolinSandboxClientOptions(BaseSandboxClientOptions):
    """Per-run choices that travel with the run state (JSON). ``memory``, ``cpus`` and
    ``image`` override the client's :class:`VMOptions` for new VMs; ``workspace_persistence``
    is ``"checkpoint"`` (the whole VM) or ``"tar"`` (the workspace files)."""

    type: Literal["gondolin"] = "gondolin"
    memory: int | str | None = None
    cpus: int | None = None
    image: str | None = None
    workspace_persistence: Persistence = "checkpoint"


class GondolinSandboxSessionState(SandboxSessionState):
    """What a session needs to be resumed, possibly by another process: plain data only."""

    type: Literal["gondolin"] = "gondolin"
    vm_id: str | None = None
    memory: int | str | None = None
    cpus: int | None = None
    image: str | None = None
    workspace_persistence: Persistence = "checkpoint"


class GondolinSandboxSession(BaseSandboxSession):
    """One sandbox session: a VM started by :meth:`start`, closed by :meth:`shutdown`."""

    state: GondolinSandboxSessionState

    def __init__(self, *, state: GondolinSandboxSessionState, vm_options: VMOptions, checkpoint_dir: Path) -> None:
        self.state = state
        self._vm_options = vm_options
        self._checkpoint_dir = checkpoint_dir
        self._vm: VM | None = None
        self._resumed_from: Path | None = None  # the checkpoint this start resumed the VM from
        self._interactive: dict[int, _Interactive] = {}
        self._reattached = False  # started with the VM of a live session of the same id
        self._handed_over = False  # gave its VM to such a session

    # -- the VM ------------------------------------------------------------------------------
    @property
    def vm(self) -> VM | None:
        """The running VM (None before :meth:`start` and after :meth:`shutdown`)."""
        return self._vm

    def _options(self) -> VMOptions:
        changes = {k: getattr(self.state, k) for k in ("memory", "cpus", "image") if getattr(self.state, k) is not None}
        return self._vm_options.replace(**changes) if changes else self._vm_options

    def _require_vm(self) -> VM:
        if self._vm is None:
            why = ("its VM was taken over by a resumed session of the same id" if self._handed_over
                   else "start it first")
            raise ExecTransportError(command=("<vm>",), message=f"the sandbox session has no running VM: {why}",
                                     retryable=False)
        return self._vm

    async def _ensure_backend_started(self) -> None:
        if self._vm is not None and self._vm.running:
            return
        await self._close_vm()
        checkpoint = await self._snapshot_checkpoint()
        if checkpoint is not None:
            await self._resume(checkpoint)
            self._resumed_from = checkpoint
        else:
            self._vm = await VM.create(self._options())
            self.state.vm_id = self._vm.id
        await self._vm_mkdir_root()

    def hand_over_to(self, other: GondolinSandboxSession) -> None:
        """Give this session's running VM to ``other`` (a resume of the same session in this
        process); this session is left without one."""
        vm, self._vm = self._vm, None
        if vm is None or not vm.running or vm.id != other.state.vm_id:
            self._vm = vm
            return
        other._vm = vm
        other._set_start_state_preserved(True)
        other._reattached = True
        self._handed_over = True

    async def _can_skip_snapshot_restore_on_resume(self, *, is_running: bool) -> bool:
        # A VM taken over from the live session is newer than any snapshot of it.
        return is_running and self._reattached

    async def _vm_mkdir_root(self) -> None:
        await self._require_vm().fs.mkdir(self._root(), parents=True, exist_ok=True)

    async def _resume(self, path: Path) -> None:
        await self._close_vm()
        self._vm = await Checkpoint.load(path).resume(self._options())
        self.state.vm_id = self._vm.id

    async def _close_vm(self) -> None:
        await self.pty_terminate_all()
        vm, self._vm = self._vm, None
        if vm is not None:
            with anyio.CancelScope(shield=True):
                await vm.discard()

    async def _after_start(self) -> None:
        self._resumed_from = None

    async def _after_start_failed(self) -> None:
        self._resumed_from = None
        await self._close_vm()

    async def _shutdown_backend(self) -> None:
        await self._close_vm()

    async def running(self) -> bool:
        return self._vm is not None and self._vm.running

    def _root(self) -> str:
        return sandbox_path_str(self._workspace_root_path())

    # -- commands ----------------------------------------------------------------------------
    def _prepare_exec_command(self, *command: str | Path, shell: bool | list[str],
                              user: str | User | None) -> list[str]:
        argv = super()._prepare_exec_command(*command, shell=shell, user=None)
        if user:  # the guest runs commands as root and has runuser (util-linux), not sudo
            name = user.name if isinstance(user, User) else user
            argv = ["runuser", "-u", name, "--", *argv]
        return argv

    async def _exec_internal(self, *command: str | Path, timeout: float | None = None) -> ExecResult:
        vm = self._require_vm()
        argv = [str(c) for c in command]
        env = await self.state.manifest.environment.resolve()
        try:
            exit_code, timed_out, out, err = await run_bounded(vm, argv, cwd=self._root(), env=env, timeout=timeout)
        except ExecTimeout as exc:  # the guest did not even report the kill in time
            raise ExecTimeoutError(command=argv, timeout_s=timeout, cause=exc) from exc
        except GondolinError as exc:
            raise ExecTransportError(command=argv, cause=exc, message=f"exec failed: {exc}") from exc
        if timed_out:
            raise ExecTimeoutError(command=argv, timeout_s=timeout)
        return ExecResult(stdout=out, stderr=err, exit_code=exit_code)

    # -- interactive commands (the SDK's unified exec: exec_command / write_stdin) -------------
    def supports_pty(self) -> bool:
        return True

    async def pty_exec_start(self, *command: str | Path, timeout: float | None = None,
                             shell: bool | list[str] = True, user: str | User | None = None, tty: bool = False,
                             yield_time_s: float | None = None, max_output_tokens: int | None = None) -> PtyExecUpdate:
        vm = self._require_vm()
        argv = self._prepare_exec_command(*command, shell=shell, user=user)
        env = await self.state.manifest.environment.resolve()
        try:
            proc = await vm.start(argv, cwd=self._root(), env=env or None, pty=tty, stdin=True if tty else None,
                                  timeout=timeout)
        except GondolinError as exc:
            raise ExecTransportError(command=argv, cause=exc, message=f"exec failed: {exc}") from exc
        entry = _Interactive(proc=proc, tty=tty)
        entry.pump = asyncio.get_running_loop().create_task(entry.run_pump())
        process_id = allocate_pty_process_id(set(self._interactive))
        pruned = self._prune_interactive()
        self._interactive[process_id] = entry
        if pruned is not None:
            await pruned.terminate()
        wait_ms = 10_000 if yield_time_s is None else int(yield_time_s * 1000)
        return await self._collect(process_id, entry, clamp_pty_yield_time_ms(wait_ms), max_output_tokens)

    async def pty_write_stdin(self, *, session_id: int, chars: str, yield_time_s: float | None = None,
                              max_output_tokens: int | None = None) -> PtyExecUpdate:
        entry = self._resolve_pty_session_entry(pty_processes=self._interactive, session_id=session_id)
        if chars:
            if not entry.tty:
                raise RuntimeError("stdin is not available for this process (start it with tty=true)")
            with contextlib.suppress(GondolinError):  # it may have just exited: its output says so
                await entry.proc.write(chars.encode("utf-8"))
            await asyncio.sleep(0.1)
        wait_ms = 250 if yield_time_s is None else int(yield_time_s * 1000)
        wait_ms = resolve_pty_write_yield_time_ms(yield_time_ms=wait_ms, input_empty=chars == "")
        entry.last_used = time.monotonic()
        return await self._collect(session_id, entry, wait_ms, max_output_tokens)

    async def _collect(self, process_id: int, entry: _Interactive, wait_ms: int,
                       max_output_tokens: int | None) -> PtyExecUpdate:
        output, token_count, closed = await collect_pty_output(
            output_chunks=entry.chunks, output_lock=entry.lock, output_notify=entry.notify,
            is_done=entry.closed.is_set, yield_time_ms=wait_ms, max_output_tokens=max_output_tokens)
        if not closed:
            return PtyExecUpdate(process_id=process_id, output=output, exit_code=None,
                                 original_token_count=token_count)
        if self._interactive.pop(process_id, None) is not None:
            await entry.terminate()
        return PtyExecUpdate(process_id=None, output=output, exit_code=entry.exit_code,
                             original_token_count=token_count)

    def _prune_interactive(self) -> _Interactive | None:
        if len(self._interactive) < PTY_PROCESSES_MAX:
            return None
        meta = [(pid, e.last_used, e.closed.is_set()) for pid, e in self._interactive.items()]
        victim = process_id_to_prune_from_meta(meta)
        return self._interactive.pop(victim, None) if victim is not None else None

    async def pty_terminate_all(self) -> None:
        entries = list(self._interactive.values())
        self._interactive.clear()
        for entry in entries:
            await entry.terminate()

    # -- files -------------------------------------------------------------------------------
    async def read(self, path: Path, *, user: str | User | None = None) -> io.IOBase:
        if user is not None:
            await self._check_read_with_exec(path, user=user)
        target = sandbox_path_str(self.normalize_path(path))
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - returned to the caller
        try:
            async for chunk in await self._require_vm().fs.open_read(target):
                spool.write(chunk)
        except GuestFileError as exc:
            spool.close()
            if exc.errno_name in ("ENOENT", "ENOTDIR"):
                raise WorkspaceReadNotFoundError(path=path, cause=exc) from exc
            raise WorkspaceArchiveReadError(path=path, cause=exc) from exc
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool  # type: ignore[return-value]

    async def _read_bounded(self, path: Path, *, max_bytes: int) -> bytes:
        target = sandbox_path_str(self.normalize_path(path))
        parts: list[bytes] = []
        try:
            async for chunk in await self._require_vm().fs.open_read(target, length=max_bytes):
                parts.append(chunk)
        except GuestFileError as exc:
            if exc.errno_name in ("ENOENT", "ENOTDIR"):
                raise WorkspaceReadNotFoundError(path=path, cause=exc) from exc
            raise
        return b"".join(parts)[:max_bytes]

    async def write(self, path: Path, data: io.IOBase, *, user: str | User | None = None) -> None:
        if user is not None:
            await self._check_write_with_exec(path, user=user)
        target = sandbox_path_str(self.normalize_path(path, for_write=True))
        vm = self._require_vm()
        try:
            await vm.fs.mkdir(str(Path(target).parent), parents=True, exist_ok=True)
            await vm.fs.write(target, _chunks(path, data))
        except GuestFileError as exc:
            raise WorkspaceArchiveWriteError(path=path, cause=exc) from exc

    async def mkdir(self, path: Path | str, *, parents: bool = False, user: str | User | None = None) -> None:
        if user is not None:
            await super().mkdir(path, parents=parents, user=user)
            return
        target = sandbox_path_str(self.normalize_path(path, for_write=True))
        try:
            await self._require_vm().fs.mkdir(target, parents=parents, exist_ok=True)
        except GuestFileError as exc:
            raise WorkspaceArchiveWriteError(path=Path(target), cause=exc) from exc

    # -- workspace persistence ---------------------------------------------------------------
    def _checkpoint_path(self) -> Path:
        return self._checkpoint_dir / f"openai-agents-{self.state.session_id.hex}.ckpt"

    async def persist_workspace(self) -> io.IOBase:
        vm = self._require_vm()
        if self.state.workspace_persistence == "tar":
            return await self._persist_tar(vm)
        path = self._checkpoint_path()
        try:
            await anyio.to_thread.run_sync(lambda: path.parent.mkdir(parents=True, exist_ok=True))
            await vm.checkpoint(path)
        except (GondolinError, OSError) as exc:
            raise WorkspaceArchiveReadError(path=Path(self._root()), context={"reason": "checkpoint_failed"},
                                            cause=exc) from exc
        ref = {"checkpoint": path.name, "vm_id": vm.id}
        return io.BytesIO(REF_MAGIC + json.dumps(ref).encode())

    def _should_compute_snapshot_fingerprint_on_persist(self) -> bool:
        # The fingerprint lets a resume skip the restore when it reattaches to a still-running
        # backend whose workspace is unchanged. A resumed session here always starts a VM of
        # its own (from the checkpoint, or fresh for a tar), so the guest-side hashing of the
        # whole workspace on every persist would buy nothing.
        return False

    async def _persist_tar(self, vm: VM) -> io.IOBase:
        tmp = f"/tmp/openai-agents-persist-{uuid.uuid4().hex}.tar"
        excludes = " ".join(shell_tar_exclude_args(self._persist_workspace_skip_relpaths()))
        script = f"tar {excludes} -C {shlex.quote(self._root())} -cf {shlex.quote(tmp)} ."
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - returned to the caller
        try:
            code, _, _, err = await run_bounded(vm, ["sh", "-c", script], cwd="/", env={}, timeout=None)
            if code != 0:
                raise WorkspaceArchiveReadError(path=Path(self._root()), context={
                    "reason": "tar_failed", "exit_code": code, "stderr": err[-2000:].decode(errors="replace")})
            async for chunk in await vm.fs.open_read(tmp):
                spool.write(chunk)
        except GondolinError as exc:
            spool.close()
            raise WorkspaceArchiveReadError(path=Path(self._root()), cause=exc) from exc
        except BaseException:
            spool.close()
            raise
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(GondolinError):
                await vm.fs.remove(tmp, force=True)
        spool.seek(0)
        return spool  # type: ignore[return-value]

    async def hydrate_workspace(self, data: io.IOBase) -> None:
        head = _read_exactly(data, len(REF_MAGIC))
        if head == REF_MAGIC:
            await self._resume(self._ref_path(data.read(MAX_REF_BYTES)))
            await self._vm_mkdir_root()
            return
        await self._hydrate_tar(head, data)

    def _ref_path(self, body: bytes) -> Path:
        """The checkpoint file a reference names; only a file of this client's own naming in
        its checkpoint directory (a snapshot is data, and must not point anywhere else)."""
        try:
            name = json.loads(body)["checkpoint"]
        except (ValueError, KeyError, TypeError) as exc:
            raise WorkspaceArchiveWriteError(path=Path(self._root()), context={"reason": "bad_checkpoint_ref"},
                                             cause=exc) from exc
        if not isinstance(name, str) or not _CHECKPOINT_NAME.fullmatch(name):
            raise WorkspaceArchiveWriteError(path=Path(self._root()), context={"reason": "bad_checkpoint_ref"})
        return self._checkpoint_dir / name

    async def _hydrate_tar(self, head: bytes, data: io.IOBase) -> None:
        vm = self._require_vm()
        root = Path(self._root())
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
            spool.write(head)
            while chunk := data.read(CHUNK):
                spool.write(chunk if isinstance(chunk, bytes) else bytes(chunk))
            spool.seek(0)
            try:
                import tarfile

                with tarfile.open(fileobj=spool, mode="r:*") as tar:
                    validate_tarfile(tar, allow_external_symlink_targets=False)
            except (UnsafeTarMemberError, OSError, ValueError) as exc:
                raise WorkspaceArchiveWriteError(path=root, context={"reason": "unsafe_or_invalid_tar"},
                                                 cause=exc) from exc
            spool.seek(0)
            tmp = f"/tmp/openai-agents-hydrate-{uuid.uuid4().hex}.tar"
            try:
                await vm.fs.write(tmp, iter(lambda: spool.read(CHUNK), b""))
                code, _, _, err = await run_bounded(
                    vm, ["tar", "-C", str(root), "-xf", tmp], cwd="/", env={}, timeout=None)
                if code != 0:
                    raise WorkspaceArchiveWriteError(path=root, context={
                        "reason": "tar_failed", "exit_code": code, "stderr": err[-2000:].decode(errors="replace")})
            except GondolinError as exc:
                raise WorkspaceArchiveWriteError(path=root, cause=exc) from exc
            finally:
                with anyio.CancelScope(shield=True), contextlib.suppress(GondolinError):
                    await vm.fs.remove(tmp, force=True)

    async def _snapshot_checkpoint(self) -> Path | None:
        """The checkpoint file the session's stored snapshot refers to, if it refers to one."""
        snapshot = self.state.snapshot
        if not await snapshot.restorable(dependencies=self.dependencies):
            return None
        archive = await snapshot.restore(dependencies=self.dependencies)
        try:
            if _read_exactly(archive, len(REF_MAGIC)) != REF_MAGIC:
                return None
            return self._ref_path(archive.read(MAX_REF_BYTES))
        finally:
            archive.close()

    async def _restore_snapshot_into_workspace_on_resume(self) -> None:
        if self._resumed_from is not None:
            return  # this start resumed the VM from the snapshot's checkpoint: nothing to restore
        checkpoint = await self._snapshot_checkpoint()
        if checkpoint is None:
            await super()._restore_snapshot_into_workspace_on_resume()  # a tar: clear, then hydrate
            return
        await self._resume(checkpoint)
        await self._vm_mkdir_root()


class GondolinSandboxClient(BaseSandboxClient[GondolinSandboxClientOptions | None]):
    """Creates and resumes :class:`GondolinSandboxSession` s. ``options``: the VMs' options
    (network policy and secrets in ``http_hooks`` / ``env``, ``mounts``, machine shape);
    ``checkpoint_dir``: where workspace checkpoints are kept (default: Gondolin's checkpoint
    directory, so ``gondolin checkpoint list`` shows them)."""

    backend_id = "gondolin"
    supports_default_options = True

    def __init__(self, options: VMOptions | None = None, *, checkpoint_dir: str | Path | None = None,
                 instrumentation: Instrumentation | None = None, dependencies: Dependencies | None = None) -> None:
        self._vm_options = (options or VMOptions()).checked()
        self._checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else default_dir()
        self._instrumentation = instrumentation or Instrumentation()
        self._dependencies = dependencies
        self._sessions: weakref.WeakValueDictionary[uuid.UUID, GondolinSandboxSession] = weakref.WeakValueDictionary()

    @property
    def checkpoint_dir(self) -> Path:
        return self._checkpoint_dir

    def _wrap(self, inner: GondolinSandboxSession) -> SandboxSession:
        self._sessions[inner.state.session_id] = inner
        return self._wrap_session(inner, instrumentation=self._instrumentation)

    async def create(self, *, snapshot: SnapshotSpec | SnapshotBase | None = None, manifest: Manifest | None = None,
                     options: GondolinSandboxClientOptions | None = None) -> SandboxSession:
        opts = options if options is not None else GondolinSandboxClientOptions()
        manifest = self._validate_manifest_for_create(manifest if manifest is not None else Manifest())
        session_id = uuid.uuid4()
        state = GondolinSandboxSessionState(
            session_id=session_id, manifest=manifest, snapshot=resolve_snapshot(snapshot, str(session_id)),
            memory=opts.memory, cpus=opts.cpus, image=opts.image, workspace_persistence=opts.workspace_persistence)
        return self._wrap(GondolinSandboxSession(state=state, vm_options=self._vm_options,
                                                 checkpoint_dir=self._checkpoint_dir))

    async def resume(self, state: SandboxSessionState) -> SandboxSession:
        if not isinstance(state, GondolinSandboxSessionState):
            raise TypeError("GondolinSandboxClient.resume expects a GondolinSandboxSessionState "
                            "(from GondolinSandboxClient.deserialize_session_state)")
        state.assert_path_grants_rebound()
        session = GondolinSandboxSession(state=state, vm_options=self._vm_options, checkpoint_dir=self._checkpoint_dir)
        live = self._sessions.get(state.session_id)
        if live is not None and live is not session:
            live.hand_over_to(session)  # its VM still runs in this process: the resumed session takes it over
        return self._wrap(session)

    async def delete(self, session: SandboxSession) -> SandboxSession:
        """Close the session's VM if it still runs (its checkpoint, if any, stays for resume)."""
        inner = self._sessions.pop(session.state.session_id, None)
        if inner is not None:
            await inner._close_vm()
        return session

    def deserialize_session_state(self, payload: dict[str, object]) -> SandboxSessionState:
        return self._deserialize_session_state_payload(payload, GondolinSandboxSessionState)


async def run_bounded(vm: VM, argv: list[str], *, cwd: str, env: dict[str, str],
                      timeout: float | None) -> tuple[int, bool, bytes, bytes]:
    """Run ``argv`` to completion keeping at most ``MAX_EXEC_OUTPUT`` bytes per stream (the
    rest is drained, so the guest never blocks): ``(exit code, timed out, stdout, stderr)``.
    A cancelled call kills the guest command."""
    kept = {"stdout": bytearray(), "stderr": bytearray()}
    proc = await vm.start(argv, cwd=cwd, env=env or None, timeout=timeout)
    try:
        async for chunk in proc:
            buf = kept[chunk.stream]
            buf += chunk.data[:max(MAX_EXEC_OUTPUT - len(buf), 0)]
        result = await proc.wait()
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True), anyio.move_on_after(KILL_GRACE_S), contextlib.suppress(GondolinError):
            await proc.kill()
        raise
    return result.exit_code, result.timed_out, bytes(kept["stdout"]), bytes(kept["stderr"])


def _chunks(path: Path, data: io.IOBase) -> Iterator[bytes]:
    while True:
        chunk = data.read(CHUNK)
        if not chunk:
            return
        if isinstance(chunk, str):
            chunk = chunk.encode("utf-8")
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise WorkspaceWriteTypeError(path=path, actual_type=type(chunk).__name__)
        yield bytes(chunk)


def _read_exactly(stream: io.IOBase, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = stream.read(n - len(out))
        if not chunk:
            break
        out += chunk.encode() if isinstance(chunk, str) else bytes(chunk)
    return out


__all__ = [
    "GondolinSandboxClient",
    "GondolinSandboxClientOptions",
    "GondolinSandboxSession",
    "GondolinSandboxSessionState",
    "run_bounded",
]
