"""The tool registry: every tool once, as pydantic models plus an async handler.

MCP, LangChain, OpenAI and Anthropic adapters are generated from :data:`TOOLS`; none of them
decides anything. :class:`ToolRegistry` validates arguments, runs the handler against a
:class:`~integrations.manager.SandboxManager`, redacts secrets and renders the text a model
reads. A non-zero exit code is a result; a :class:`ToolError` is an error.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import posixpath
import stat as stat_mod
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal
from pydantic import BaseModel, ValidationError

from gondolin import VM, FileStat, GondolinError
from gondolin.fs import GuestFS

from . import models as m
from . import runtime
from .commands import CommandRun, ProgressFn
from .errors import ErrorInfo, ToolError, translate
from .files import apply_edit, glob_match, glob_regex, guest_path, parse_mode, slice_lines
from .manager import Sandbox, SandboxManager, iso

log = logging.getLogger("gondolin.integrations")
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
STAT_CONCURRENCY = 16  # parallel stat calls while listing a directory
DEFAULT_LIST_ENTRIES = 500
DEFAULT_EVENTS = 50


@dataclass
class ToolContext:
    manager: SandboxManager
    progress: ProgressFn | None = None

    @property
    def limits(self) -> Any:
        return self.manager.config.limits


Handler = Callable[[ToolContext, Any], Awaitable[BaseModel]]


@dataclass(frozen=True)
class ToolSpec:
    """One tool, described once for every framework."""

    name: str
    title: str
    description: str
    input_model: type[BaseModel]
    output_model: type[BaseModel]
    handler: Handler
    read_only: bool
    destructive: bool
    idempotent: bool
    open_world: bool
    render: Callable[[Any], str] | None = None


@dataclass(frozen=True)
class ToolOutcome:
    """What one tool call produced, already redacted."""

    tool: str
    output: BaseModel | None
    error: ErrorInfo | None
    text: str

    @property
    def is_error(self) -> bool:
        return self.error is not None

    def data(self) -> dict[str, Any]:
        """JSON-ready structured result (``{"error": {...}}`` for errors)."""
        if self.output is not None:
            return self.output.model_dump(mode="json")
        assert self.error is not None
        return {"error": self.error.as_dict()}


# -- rendering -----------------------------------------------------------------------------------
def _render_json(output: BaseModel) -> str:
    return output.model_dump_json(exclude_none=False)


def _render_exec(out: m.ExecOutput) -> str:
    if out.status == "running":
        head = (f"status: running  exec_id: {out.exec_id}  elapsed: {out.duration_s:.1f}s\n"
                "(still running: call exec_poll to wait for more output, exec_write to send input, "
                "exec_kill to stop it)")
    else:
        head = f"status: {out.status}  exit_code: {out.exit_code}"
        if out.signal:
            head += f"  signal: {out.signal}"
        head += f"  duration: {out.duration_s:.2f}s  exec_id: {out.exec_id}"
    parts = [head]
    for name, text, total in (("stdout", out.stdout, out.stdout_bytes), ("stderr", out.stderr, out.stderr_bytes)):
        if text or name == "stdout":
            parts.append(f"--- {name} ({total} bytes in total) ---")
            parts.append(text if text else "(empty)")
    if out.truncated:
        parts.append(f"[{out.omitted_bytes} bytes of output omitted; redirect output to a file and use read_file "
                     "with offset/limit to see all of it]")
    return "\n".join(parts)


def _render_read(out: m.ReadFileOutput) -> str:
    if out.encoding == "base64":
        head = f"{out.path}: bytes {out.byte_offset}-{out.byte_offset + out.bytes_returned} of {out.size_bytes} (base64)"
    elif out.total_lines is not None:
        head = f"{out.path}: lines {out.start_line}-{out.end_line} of {out.total_lines} ({out.size_bytes} bytes)"
    else:
        head = f"{out.path}: bytes {out.byte_offset}-{out.byte_offset + out.bytes_returned} of {out.size_bytes}"
    text = head + "\n" + out.content
    if out.truncated:
        if out.next_offset is not None:
            more = f"continue with offset={out.next_offset}"
        else:
            more = f"continue with byte_offset={out.next_byte_offset}"
        text += ("" if text.endswith("\n") else "\n") + f"[truncated: the file continues; {more}]"
    return text


# -- sandbox lifecycle ---------------------------------------------------------------------------
async def sandbox_create(ctx: ToolContext, inp: m.SandboxCreateInput) -> m.SandboxInfo:
    sandbox = await ctx.manager.create(inp, progress=ctx.progress)
    return sandbox.info()


async def sandbox_list(ctx: ToolContext, inp: m.SandboxListInput) -> m.SandboxListOutput:
    cfg = ctx.manager.config
    return m.SandboxListOutput(sandboxes=[s.info() for s in ctx.manager.sandboxes()],
                               max_sandboxes=cfg.limits.max_sandboxes, network_profiles=sorted(cfg.profiles()),
                               secrets=sorted(cfg.secrets), images=list(cfg.allowed_images))


async def sandbox_destroy(ctx: ToolContext, inp: m.SandboxDestroyInput) -> m.SandboxDestroyOutput:
    destroyed = await ctx.manager.destroy(inp.sandbox_id)
    return m.SandboxDestroyOutput(sandbox_id=inp.sandbox_id, destroyed=destroyed)


# -- exec ----------------------------------------------------------------------------------------
def _output_limit(ctx: ToolContext, requested: int | None) -> int:
    limit = requested or ctx.limits.max_output_bytes
    return min(limit, ctx.limits.max_output_bytes_limit)


def _exec_output(job: CommandRun, limit: int) -> m.ExecOutput:
    stdout, omitted_out = job.take_text("stdout", limit)
    stderr, omitted_err = job.take_text("stderr", limit)
    result = job.result
    done = not job.running
    return m.ExecOutput(
        exec_id=job.exec_id, status=job.status,
        exit_code=result.exit_code if done and result is not None else None,
        signal=result.signal if done and result is not None else None,
        stdout=stdout, stderr=stderr,
        stdout_bytes=job.total_bytes("stdout"), stderr_bytes=job.total_bytes("stderr"),
        truncated=bool(omitted_out or omitted_err), omitted_bytes=omitted_out + omitted_err,
        duration_s=round(job.duration, 3))


async def _wait_command(job: CommandRun, wait_s: float, ctx: ToolContext, *, kill_on_cancel: bool) -> None:
    try:
        await job.wait(wait_s, ctx.progress)
    except anyio.get_cancelled_exc_class():
        if kill_on_cancel:
            with anyio.CancelScope(shield=True):
                await job.kill_quietly()
        raise


def _raise_command_error(sandbox: Sandbox, job: CommandRun) -> None:
    if job.error is not None and job.result is None:
        sandbox.execs.pop(job.exec_id, None)
        raise job.error


async def exec_command(ctx: ToolContext, inp: m.ExecInput) -> m.ExecOutput:
    limits = ctx.limits
    timeout = inp.timeout_s or limits.exec_timeout_s
    if timeout > limits.max_exec_timeout_s:
        raise ToolError("invalid_argument", f"timeout_s={timeout} exceeds the server's limit of "
                                            f"{limits.max_exec_timeout_s}s",
                        "Use a shorter timeout, or run the command in the background and poll it.")
    if not inp.command.strip():
        raise ToolError("invalid_argument", "command is empty")
    yield_s = limits.exec_yield_s if inp.yield_s is None else inp.yield_s
    async with ctx.manager.using(inp.sandbox_id) as sandbox:
        cwd = guest_path(inp.cwd, what="cwd") if inp.cwd else sandbox.default_cwd
        env = {v.name: v.value for v in inp.env or []}
        job = await ctx.manager.start_exec(sandbox, inp.command, env=env, cwd=cwd, user=inp.user,
                                         stdin=inp.stdin if not inp.stdin_open else None,
                                         stdin_open=bool(inp.stdin_open), timeout=timeout)
        if inp.stdin_open and inp.stdin:
            await job.write(inp.stdin)
        await _wait_command(job, min(yield_s, timeout + 5), ctx, kill_on_cancel=True)
        _raise_command_error(sandbox, job)
        return _exec_output(job, _output_limit(ctx, inp.max_output_bytes))


async def exec_poll(ctx: ToolContext, inp: m.ExecPollInput) -> m.ExecOutput:
    wait_s = ctx.limits.exec_yield_s if inp.wait_s is None else inp.wait_s
    async with ctx.manager.using(inp.sandbox_id) as sandbox:
        job = ctx.manager.get_exec(sandbox, inp.exec_id)
        await _wait_command(job, wait_s, ctx, kill_on_cancel=False)
        _raise_command_error(sandbox, job)
        return _exec_output(job, _output_limit(ctx, inp.max_output_bytes))


async def exec_write(ctx: ToolContext, inp: m.ExecWriteInput) -> m.ExecWriteOutput:
    if inp.stdin is None and not inp.close_stdin:
        raise ToolError("invalid_argument", "give stdin text to write, close_stdin=true, or both")
    async with ctx.manager.using(inp.sandbox_id) as sandbox:
        job = ctx.manager.get_exec(sandbox, inp.exec_id)
        written = await job.write(inp.stdin) if inp.stdin else 0
        if inp.close_stdin:
            await job.close_stdin()
        return m.ExecWriteOutput(exec_id=job.exec_id, written_bytes=written,
                                 stdin_closed=not job.stdin_open, status=job.status)


async def exec_kill(ctx: ToolContext, inp: m.ExecKillInput) -> m.ExecOutput:
    async with ctx.manager.using(inp.sandbox_id) as sandbox:
        job = ctx.manager.get_exec(sandbox, inp.exec_id)
        await job.send_signal(inp.signal or "KILL")
        await job.wait(5.0)
        return _exec_output(job, ctx.limits.max_output_bytes)


# -- files ---------------------------------------------------------------------------------------
async def _stat(vm: VM, path: str, *, follow: bool = True) -> FileStat:
    try:
        return await vm.fs.stat(path, follow_symlinks=follow)
    except GondolinError as exc:
        raise translate(exc, path=path) from exc


async def _read_range(vm: VM, path: str, offset: int, length: int) -> bytes:
    parts: list[bytes] = []
    try:
        async for chunk in await vm.fs.open_read(path, offset=offset, length=length):
            parts.append(chunk)
    except GondolinError as exc:
        raise translate(exc, path=path) from exc
    return b"".join(parts)[:length]


def _decode(data: bytes, encoding: str) -> tuple[str, str]:
    if encoding == "base64":
        return base64.b64encode(data).decode(), "base64"
    if encoding == "text":
        return data.decode(errors="replace"), "text"
    try:
        return data.decode(), "text"
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the end of a range is still text.
        if exc.start >= len(data) - 3 and exc.reason == "unexpected end of data":
            return data[:exc.start].decode(), "text"
        return base64.b64encode(data).decode(), "base64"


async def read_file(ctx: ToolContext, inp: m.ReadFileInput) -> m.ReadFileOutput:
    path = guest_path(inp.path)
    limits = ctx.limits
    encoding = inp.encoding or "auto"
    async with ctx.manager.using(inp.sandbox_id) as sandbox:
        st = await _stat(sandbox.vm, path)
        if st.is_dir:
            raise ToolError("is_a_directory", f"{path} is a directory", "Use list_files to see what it contains.")
        size = st.size
        byte_mode = inp.byte_offset is not None or inp.byte_length is not None or encoding == "base64"
        if inp.byte_offset is not None and (inp.offset is not None or inp.limit is not None):
            raise ToolError("invalid_argument", "give either a line range (offset/limit) or a byte range "
                                                "(byte_offset/byte_length), not both")
        if not byte_mode and size > limits.max_file_bytes:
            raise ToolError("file_too_large", f"{path} has {size} bytes; reading by lines is limited to "
                                              f"{limits.max_file_bytes} bytes",
                            "Read a byte range with byte_offset and byte_length.")
        if byte_mode:
            start = inp.byte_offset or 0
            cap = limits.max_read_bytes if encoding == "text" else limits.max_read_bytes * 3 // 4  # base64 grows 4/3
            length = min(inp.byte_length or cap, cap)
            data = await _read_range(sandbox.vm, path, start, length) if start < size else b""
            content, used = _decode(data, encoding)
            more = start + len(data) < size
            return m.ReadFileOutput(path=path, content=content, encoding=used,  # type: ignore[arg-type]
                                    size_bytes=size, start_line=None, end_line=None, total_lines=None,
                                    byte_offset=start, bytes_returned=len(data), truncated=more,
                                    next_byte_offset=start + len(data) if more else None)
        data = await _read_range(sandbox.vm, path, 0, size) if size else b""
        if encoding == "auto":
            try:
                text = data.decode()
            except UnicodeDecodeError:
                head = data[:limits.max_read_bytes * 3 // 4]
                more = len(head) < size
                return m.ReadFileOutput(path=path, content=base64.b64encode(head).decode(), encoding="base64",
                                        size_bytes=size, start_line=None, end_line=None, total_lines=None,
                                        byte_offset=0, bytes_returned=len(head), truncated=more,
                                        next_byte_offset=len(head) if more else None)
        else:
            text = data.decode(errors="replace")
        piece = slice_lines(text, inp.offset, inp.limit)
        content, end_line, more = piece.content, piece.end_line, piece.more
        encoded = content.encode()
        next_offset: int | None = end_line + 1 if more else None
        next_byte: int | None = None
        if len(encoded) > limits.max_read_bytes:  # cut at a line boundary within the cap
            cut = encoded[:limits.max_read_bytes]
            newline = cut.rfind(b"\n")
            more = True
            if newline >= 0:
                content = cut[:newline + 1].decode(errors="ignore")
                end_line = piece.start_line + content.count("\n") - 1
                next_offset = end_line + 1
            else:  # one line longer than the cap: go on by bytes, from where this part ends
                content = cut.decode(errors="ignore")
                end_line = piece.start_line
                line_start = len("".join(text.splitlines(keepends=True)[:piece.start_line - 1]).encode())
                next_offset, next_byte = None, line_start + len(content.encode())
        return m.ReadFileOutput(path=path, content=content, encoding="text", size_bytes=size,
                                start_line=piece.start_line, end_line=end_line, total_lines=piece.total_lines,
                                byte_offset=0, bytes_returned=len(content.encode()), truncated=more,
                                next_offset=next_offset, next_byte_offset=next_byte)


async def write_file(ctx: ToolContext, inp: m.WriteFileInput) -> m.WriteFileOutput:
    path = guest_path(inp.path)
    if (inp.encoding or "text") == "base64":
        try:
            data = base64.b64decode(inp.content, validate=True)
        except (binascii.Error, ValueError):
            raise ToolError("invalid_argument", "content is not valid base64",
                            "Use encoding='text' for plain text.") from None
    else:
        data = inp.content.encode()
    if len(data) > ctx.limits.max_write_bytes:
        raise ToolError("file_too_large", f"content has {len(data)} bytes; the limit is {ctx.limits.max_write_bytes}")
    mode = parse_mode(inp.mode)
    async with ctx.manager.using(inp.sandbox_id) as sandbox:
        fs = sandbox.vm.fs
        try:
            created = not await fs.exists(path)
            await fs.write(path, data, mode=mode, append=bool(inp.append), parents=True)
            size = (await fs.stat(path)).size
        except GondolinError as exc:
            raise translate(exc, path=path) from exc
        return m.WriteFileOutput(path=path, size_bytes=size, written_bytes=len(data),
                                 sha256=hashlib.sha256(data).hexdigest(), created=created)


async def edit_file(ctx: ToolContext, inp: m.EditFileInput) -> m.EditFileOutput:
    path = guest_path(inp.path)
    async with ctx.manager.using(inp.sandbox_id) as sandbox:
        st = await _stat(sandbox.vm, path)
        if st.is_dir:
            raise ToolError("is_a_directory", f"{path} is a directory")
        if st.size > ctx.limits.max_file_bytes:
            raise ToolError("file_too_large", f"{path} has {st.size} bytes; edit_file handles up to "
                                              f"{ctx.limits.max_file_bytes}", "Use exec with sed or python instead.")
        data = await _read_range(sandbox.vm, path, 0, st.size) if st.size else b""
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise ToolError("invalid_argument", f"{path} is not UTF-8 text",
                            "edit_file changes text files; use write_file with base64 for binary files.") from None
        new_text, count = apply_edit(text, inp.old_string, inp.new_string, replace_all=bool(inp.replace_all))
        encoded = new_text.encode()
        try:
            await sandbox.vm.fs.write(path, encoded)
        except GondolinError as exc:
            raise translate(exc, path=path) from exc
        return m.EditFileOutput(path=path, replacements=count, size_bytes=len(encoded))


def _file_type(mode: int) -> str:
    if stat_mod.S_ISREG(mode):
        return "file"
    if stat_mod.S_ISDIR(mode):
        return "dir"
    if stat_mod.S_ISLNK(mode):
        return "symlink"
    return "other"


async def _walk(fs: GuestFS, root: str, inp: m.ListFilesInput, max_entries: int,
                max_walk: int) -> tuple[list[tuple[str, str]], bool, int]:
    """``(path, kind)`` of the entries under the directory ``root`` that match the glob,
    breadth-first and sorted by name; whether the list was cut; how many entries were visited."""
    found: list[tuple[str, str]] = []
    visited = 0
    # One entry past the cap tells a walk that was cut from one that ended exactly there.
    walk = fs.walk(root, max_entries=max_walk + 1, include_hidden=bool(inp.include_hidden))
    async with contextlib.aclosing(walk):  # type: ignore[type-var]  # an async generator
        async for directory, items in walk:
            for item in items:
                if visited == max_walk:
                    return found, True, visited
                visited += 1
                full = posixpath.join(directory, item.name)
                if inp.glob is None or glob_match(posixpath.relpath(full, root), inp.glob):
                    if len(found) >= max_entries:
                        return found, True, visited
                    found.append((full, item.kind))
            if not inp.recursive:
                break
    return found, False, visited


async def list_files(ctx: ToolContext, inp: m.ListFilesInput) -> m.ListFilesOutput:
    root = guest_path(inp.path or runtime.DEFAULT_CWD)
    max_entries = min(inp.max_entries or DEFAULT_LIST_ENTRIES, ctx.limits.max_list_entries)
    max_walk = ctx.limits.max_walk_entries
    if inp.glob is not None:
        glob_regex(inp.glob.lstrip("/"))  # reject a bad pattern before walking
    async with ctx.manager.using(inp.sandbox_id) as sandbox:
        fs = sandbox.vm.fs
        st = await _stat(sandbox.vm, root)
        if st.is_dir:
            try:
                found, truncated, visited = await _walk(fs, root, inp, max_entries, max_walk)
            except GondolinError as exc:
                raise translate(exc, path=root) from exc
        else:
            found, truncated, visited = [(root, _file_type(st.mode))], False, 0
        entries: list[m.FileEntry | None] = [None] * len(found)
        limiter = anyio.Semaphore(STAT_CONCURRENCY)

        async def describe(i: int, path: str, kind: str) -> None:
            async with limiter:
                try:
                    info = await fs.stat(path, follow_symlinks=False)
                except GondolinError:
                    entries[i] = m.FileEntry(path=path, type=kind if kind in ("file", "dir", "symlink")  # type: ignore[arg-type]
                                             else "other", size_bytes=0, mode="?", mtime="")
                    return
                entries[i] = m.FileEntry(path=path, type=_file_type(info.mode),  # type: ignore[arg-type]
                                         size_bytes=info.size, mode=f"{stat_mod.S_IMODE(info.mode):04o}",
                                         mtime=iso(info.mtime_ns / 1e9))

        async with anyio.create_task_group() as tg:
            for i, (path, kind) in enumerate(found):
                tg.start_soon(describe, i, path, kind)
        return m.ListFilesOutput(path=root, entries=[e for e in entries if e is not None], truncated=truncated,
                                 visited=visited)


# -- checkpoints ---------------------------------------------------------------------------------
async def checkpoint_create(ctx: ToolContext, inp: m.CheckpointCreateInput) -> m.CheckpointInfo:
    async with ctx.manager.using(inp.sandbox_id) as sandbox:
        if ctx.progress is not None:
            await ctx.progress(0, None, "saving checkpoint")
        record = await ctx.manager.checkpoint(sandbox, inp.name, bool(inp.disk_only))
        return record.info()


async def checkpoint_restore(ctx: ToolContext, inp: m.CheckpointRestoreInput) -> m.SandboxInfo:
    if ctx.progress is not None:
        await ctx.progress(0, None, "restoring checkpoint")
    sandbox = await ctx.manager.restore(inp.checkpoint_id, sandbox_id=inp.sandbox_id)
    return sandbox.info()


async def checkpoint_list(ctx: ToolContext, inp: m.CheckpointListInput) -> m.CheckpointListOutput:
    return m.CheckpointListOutput(checkpoints=[c.info() for c in ctx.manager.list_checkpoints(inp.sandbox_id)])


# -- network -------------------------------------------------------------------------------------
async def network_events(ctx: ToolContext, inp: m.NetworkEventsInput) -> m.NetworkEventsOutput:
    limit = inp.limit or DEFAULT_EVENTS
    wanted = inp.decision or "all"
    async with ctx.manager.using(inp.sandbox_id) as sandbox:
        events = await runtime.network_events(sandbox.vm)
        out: list[m.NetworkEvent] = []
        for ev in events:
            decision = getattr(ev.decision, "value", str(ev.decision))
            if wanted == "allowed" and decision != "allowed":
                continue
            if wanted == "blocked" and decision == "allowed":
                continue
            default_port = {"http": 80, "https": 443}.get(ev.scheme)
            netloc = ev.host if ev.port == default_port else f"{ev.host}:{ev.port}"
            out.append(m.NetworkEvent(time=iso(ev.time), method=ev.method, url=f"{ev.scheme}://{netloc}{ev.path}",
                                      status=ev.status, decision=decision, reason=ev.reason,
                                      secrets=list(ev.secrets)))
        profile = sandbox.profile
        return m.NetworkEventsOutput(sandbox_id=sandbox.id, network=sandbox.network,
                                     allowed_hosts=list(dict.fromkeys(profile.hosts()
                                                                      + profile.allowed_internal_hosts)),
                                     events=out[-limit:])


# -- access --------------------------------------------------------------------------------------
async def expose_port(ctx: ToolContext, inp: m.ExposePortInput) -> m.ExposePortOutput:
    async with ctx.manager.using(inp.sandbox_id) as sandbox:
        url, listening = await ctx.manager.expose_port(sandbox, inp.port)
        return m.ExposePortOutput(sandbox_id=sandbox.id, port=inp.port, url=url, listening=listening)


# -- the table -----------------------------------------------------------------------------------
_SID = "Every sandbox tool takes the sandbox_id returned by sandbox_create."

TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        "sandbox_create", "Create a sandbox",
        "Start a new isolated Linux micro-VM sandbox (Debian, Python 3, curl; work in /workspace) and return its "
        "sandbox_id. Use it before any other tool when you need to run code or handle files safely; reuse one "
        "sandbox for a whole task instead of creating many, and destroy it with sandbox_destroy when done. "
        "Network access, secrets and host mounts are limited to what the operator configured; secrets are "
        "given by name and appear in the sandbox only as placeholders.",
        m.SandboxCreateInput, m.SandboxInfo, sandbox_create,
        read_only=False, destructive=False, idempotent=False, open_world=False),
    ToolSpec(
        "sandbox_list", "List sandboxes",
        "List live sandboxes (ids, status, network profile, expiry) and what the operator allows: network "
        "profiles, secret names, images. Use it when you lost a sandbox_id or before sandbox_create to see the "
        "available choices.",
        m.SandboxListInput, m.SandboxListOutput, sandbox_list,
        read_only=True, destructive=False, idempotent=True, open_world=False),
    ToolSpec(
        "sandbox_destroy", "Destroy a sandbox",
        "Stop a sandbox and delete everything in it (files, processes). Use it when the task is finished. "
        "Destroying an unknown or already destroyed sandbox returns destroyed=false.",
        m.SandboxDestroyInput, m.SandboxDestroyOutput, sandbox_destroy,
        read_only=False, destructive=True, idempotent=True, open_world=False),
    ToolSpec(
        "exec", "Run a command",
        "Run a shell command in a sandbox and return its exit code, stdout and stderr. A non-zero exit code is a "
        "normal result, not a tool error. If the command is still running after yield_s seconds (default 10) "
        "it keeps running and you get status 'running' plus an exec_id for exec_poll, exec_write and exec_kill; "
        "use that for servers, long builds and interactive programs. Long output is cut to its head and tail. "
        "Prefer read_file/write_file/edit_file over cat, echo and sed for files.",
        m.ExecInput, m.ExecOutput, exec_command,
        read_only=False, destructive=True, idempotent=False, open_world=True, render=_render_exec),
    ToolSpec(
        "exec_poll", "Wait for a running command",
        "Wait up to wait_s seconds for a command started with exec that was still running, and return the "
        "output it produced since the last exec or exec_poll, plus its exit code once it has finished.",
        m.ExecPollInput, m.ExecOutput, exec_poll,
        read_only=True, destructive=False, idempotent=False, open_world=False, render=_render_exec),
    ToolSpec(
        "exec_write", "Write to a command's stdin",
        "Send text to the stdin of a running command started with exec(stdin_open=true), and/or close its stdin. "
        "Then call exec_poll to read what it printed.",
        m.ExecWriteInput, m.ExecWriteOutput, exec_write,
        read_only=False, destructive=False, idempotent=False, open_world=False),
    ToolSpec(
        "exec_kill", "Stop a running command",
        "Send a signal (default KILL) to a running command started with exec, wait briefly for it to end, and "
        "return its final output. Use it for commands that hang or servers you no longer need.",
        m.ExecKillInput, m.ExecOutput, exec_kill,
        read_only=False, destructive=True, idempotent=True, open_world=False, render=_render_exec),
    ToolSpec(
        "read_file", "Read a file",
        "Read a file in a sandbox. Text comes back as is (use offset/limit for a line range of a long file); "
        "binary files come back base64-encoded (use byte_offset/byte_length for a byte range). One call returns "
        "at most about 32 KB; when 'truncated' is true, call again with offset=next_offset (or "
        "byte_offset=next_byte_offset) to read on.",
        m.ReadFileInput, m.ReadFileOutput, read_file,
        read_only=True, destructive=False, idempotent=True, open_world=False, render=_render_read),
    ToolSpec(
        "write_file", "Write a file",
        "Create or overwrite a file in a sandbox (parent directories are created). Use encoding='base64' for "
        "binary content, append=true to add to the end, mode='0755' for scripts. For small changes to an "
        "existing file, edit_file is cheaper.",
        m.WriteFileInput, m.WriteFileOutput, write_file,
        read_only=False, destructive=True, idempotent=True, open_world=False),
    ToolSpec(
        "edit_file", "Edit a file",
        "Replace an exact string in a text file in a sandbox. old_string must match exactly once (including "
        "whitespace and indentation) unless replace_all=true; otherwise you get a no_match or ambiguous_match "
        "error and the file is left unchanged. Read the file first to copy the text exactly.",
        m.EditFileInput, m.EditFileOutput, edit_file,
        read_only=False, destructive=True, idempotent=False, open_world=False),
    ToolSpec(
        "list_files", "List files",
        "List a directory in a sandbox (default /workspace) with type, size, mode and modification time. Set "
        "recursive=true to walk subdirectories and glob to filter (e.g. '*.py'). Hidden names are skipped unless "
        "include_hidden=true. The result is capped; 'truncated' tells you when entries were left out.",
        m.ListFilesInput, m.ListFilesOutput, list_files,
        read_only=True, destructive=False, idempotent=True, open_world=False),
    ToolSpec(
        "checkpoint_create", "Checkpoint a sandbox",
        "Save a sandbox's state (disk and, unless disk_only, memory and running processes) as a checkpoint. "
        "Use it before a risky step so you can go back with checkpoint_restore, or to start several sandboxes "
        "from one prepared state.",
        m.CheckpointCreateInput, m.CheckpointInfo, checkpoint_create,
        read_only=False, destructive=False, idempotent=False, open_world=False),
    ToolSpec(
        "checkpoint_restore", "Restore a checkpoint",
        "Start a new sandbox from a checkpoint, or, with sandbox_id, roll that sandbox back to the checkpoint "
        "(everything it did since is lost). Returns the sandbox.",
        m.CheckpointRestoreInput, m.SandboxInfo, checkpoint_restore,
        read_only=False, destructive=True, idempotent=False, open_world=False),
    ToolSpec(
        "checkpoint_list", "List checkpoints",
        "List saved checkpoints (optionally of one sandbox) with their ids, names and sizes.",
        m.CheckpointListInput, m.CheckpointListOutput, checkpoint_list,
        read_only=True, destructive=False, idempotent=True, open_world=False),
    ToolSpec(
        "network_events", "Show network requests",
        "Show a sandbox's recent HTTP(S) requests and whether each was allowed or blocked, with the reason. "
        "Use it when a download or API call from the sandbox fails, to learn which host was blocked.",
        m.NetworkEventsInput, m.NetworkEventsOutput, network_events,
        read_only=True, destructive=False, idempotent=True, open_world=False),
    ToolSpec(
        "expose_port", "Expose a web server",
        "Give the user a link to an HTTP server running in a sandbox (a web app, a notebook, an API): returns a "
        "URL on the user's machine that forwards HTTP and WebSocket requests to the port. Start the server first "
        "(in the background with exec; it must listen on 127.0.0.1 or 0.0.0.0); the link works until the sandbox "
        "is destroyed. Calling it again for the same port returns the same URL.",
        m.ExposePortInput, m.ExposePortOutput, expose_port,
        read_only=False, destructive=False, idempotent=True, open_world=False),
)

TOOL_NAMES: tuple[str, ...] = tuple(spec.name for spec in TOOLS)


def _config_notes(manager: SandboxManager) -> dict[str, str]:
    """Operator-specific text appended to descriptions, so the model sees its real choices."""
    cfg = manager.config
    profiles = "; ".join(f"{name}: {p.summary()}" for name, p in sorted(cfg.profiles().items()))
    notes = [f"Network profiles (default {cfg.default_network}): {profiles}."]
    if cfg.secrets:
        notes.append("Secrets: " + "; ".join(
            f"{name} (sent only to {', '.join(s.hosts)})" for name, s in sorted(cfg.secrets.items())) + ".")
    if cfg.mounts:
        notes.append("Mountable host directories: " + "; ".join(
            f"{r.host_path} (at most {r.mode})" for r in cfg.mounts) + ".")
    if len(cfg.allowed_images) > 1:
        notes.append("Images: " + ", ".join(cfg.allowed_images) + ".")
    return {"sandbox_create": " ".join(notes)}


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:8]:
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


class ToolRegistry:
    """The tools bound to one manager. ``await registry.call(name, arguments)`` runs one.

    With ``portal`` (the manager lives on another event loop, see :func:`start_in_thread`),
    calls hop to that loop, and :meth:`call_sync` works from plain threads.
    """

    def __init__(self, manager: SandboxManager, *, tools: Iterable[str] | None = None,
                 portal: BlockingPortal | None = None) -> None:
        self.manager = manager
        self._portal = portal
        chosen = list(tools) if tools is not None else list(TOOL_NAMES)
        unknown = sorted(set(chosen) - set(TOOL_NAMES))
        if unknown:
            raise ValueError(f"unknown tools: {', '.join(unknown)} (known: {', '.join(TOOL_NAMES)})")
        notes = _config_notes(manager)
        self.specs: tuple[ToolSpec, ...] = tuple(
            ToolSpec(**{**spec.__dict__, "description": (spec.description + " " + notes[spec.name]).strip()})
            if spec.name in notes else spec
            for spec in TOOLS if spec.name in chosen)
        self._by_name = {spec.name: spec for spec in self.specs}

    def spec(self, name: str) -> ToolSpec:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    async def call(self, name: str, arguments: Mapping[str, Any] | str | BaseModel | None = None, *,
                   progress: ProgressFn | None = None, owner: str | None = None) -> ToolOutcome:
        """Run a tool; never raises for tool failures (they come back as an error outcome).
        ``owner`` (an MCP session id) scopes it to that session's sandboxes
        (:meth:`SandboxManager.acting_as`)."""
        if self._portal is not None:
            portal = self._portal
            return await anyio.to_thread.run_sync(lambda: portal.call(self._call, name, arguments, None, owner))
        return await self._call(name, arguments, progress, owner)

    def call_sync(self, name: str, arguments: Mapping[str, Any] | str | BaseModel | None = None) -> ToolOutcome:
        if self._portal is None:
            raise RuntimeError("this registry lives on an event loop: use `await registry.call(...)`, or build it "
                               "with start_in_thread() for synchronous use")
        return self._portal.call(self._call, name, arguments, None)

    async def _call(self, name: str, arguments: Mapping[str, Any] | str | BaseModel | None,
                    progress: ProgressFn | None, owner: str | None = None) -> ToolOutcome:
        with self.manager.acting_as(owner):
            return await self._call_as(name, arguments, progress)

    async def _call_as(self, name: str, arguments: Mapping[str, Any] | str | BaseModel | None,
                       progress: ProgressFn | None) -> ToolOutcome:
        spec = self._by_name.get(name)
        if spec is None:
            info = ErrorInfo("invalid_argument", f"unknown tool {name!r}", f"Available tools: {', '.join(self._by_name)}.")
            return ToolOutcome(name, None, info, info.render())
        try:
            inp = self.parse(spec, arguments)
            output = await spec.handler(ToolContext(self.manager, progress), inp)
        except ToolError as exc:
            return self._error(spec.name, exc.info())
        except GondolinError as exc:
            return self._error(spec.name, translate(exc).info())
        except Exception as exc:  # a bug or an unexpected runtime error: report it, never crash the caller
            log.exception("tool %s failed", spec.name)
            return self._error(spec.name, translate(exc).info())
        redacted = self.manager.redactor.redact_obj(output.model_dump(mode="json"))
        output = spec.output_model.model_validate(redacted)
        text = (spec.render or _render_json)(output)
        return ToolOutcome(spec.name, output, None, text)

    def _error(self, name: str, info: ErrorInfo) -> ToolOutcome:
        r = self.manager.redactor
        info = ErrorInfo(info.code, r.redact(info.message), r.redact(info.hint), info.retryable)
        return ToolOutcome(name, None, info, info.render())

    @staticmethod
    def parse(spec: ToolSpec, arguments: Mapping[str, Any] | str | BaseModel | None) -> BaseModel:
        if isinstance(arguments, spec.input_model):
            return arguments
        if isinstance(arguments, BaseModel):
            arguments = arguments.model_dump()
        if arguments is None or arguments == "":
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as exc:
                raise ToolError("invalid_argument", f"arguments are not valid JSON: {exc}") from None
        if not isinstance(arguments, Mapping):
            raise ToolError("invalid_argument", "arguments must be a JSON object")
        try:
            return spec.input_model.model_validate(dict(arguments))
        except ValidationError as exc:
            raise ToolError("invalid_argument", f"invalid arguments for {spec.name}: {_validation_message(exc)}",
                            "Check the tool's input schema.") from None

    async def read_resource(self, sandbox_id: str, path: str, *, owner: str | None = None) -> bytes:
        """Whole-file read for resource templates (capped like read_file)."""
        guest = guest_path(path)
        with self.manager.acting_as(owner):
            return await self._read_resource(sandbox_id, guest)

    async def _read_resource(self, sandbox_id: str, guest: str) -> bytes:
        async with self.manager.using(sandbox_id) as sandbox:
            st = await _stat(sandbox.vm, guest)
            if st.is_dir:
                raise ToolError("is_a_directory", f"{guest} is a directory")
            cap = self.manager.config.limits.max_file_bytes
            if st.size > cap:
                raise ToolError("file_too_large", f"{guest} has {st.size} bytes (limit {cap})",
                                "Use the read_file tool with a byte range.")
            data = await _read_range(sandbox.vm, guest, 0, st.size) if st.size else b""
            return self.manager.redactor.redact_bytes(data)


def tool_names(specs: Sequence[ToolSpec]) -> list[str]:
    return [s.name for s in specs]
