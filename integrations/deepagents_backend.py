"""A Deep Agents sandbox backend on a Gondolin VM (``pip install 'gondolin[deepagents]'``).

    from deepagents import create_deep_agent
    from integrations.deepagents_backend import GondolinSandbox

    with GondolinSandbox(memory="1G") as backend:      # boots a VM; closed at the end of the block
        agent = create_deep_agent(model=..., backend=backend)
        agent.invoke({"messages": [{"role": "user", "content": "..."}]})

:class:`GondolinSandbox` implements ``SandboxBackendProtocol`` on top of ``BaseSandbox``:
``execute`` runs a shell command in the VM; file reads, writes, edits, listings, deletes,
uploads and downloads go through the VM's file channel (``vm.fs``: a few milliseconds each)
instead of a Python interpreter started in the guest per call (about half a second under
emulation). ``grep`` and ``glob`` keep the base class's one-round-trip guest scripts.

The VM runs on an event loop in a thread this backend owns, so the synchronous methods work
from any thread (LangGraph runs sync tools in worker threads) and the ``a``-methods from any
asyncio loop; cancelling an awaited ``aexecute`` kills the guest command. Network policy,
secrets and mounts are the :class:`gondolin.VMOptions` you pass.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import errno as _errno
import posixpath
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar, Unpack

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal
from deepagents.backends.protocol import (
    FILE_NOT_FOUND,
    INVALID_PATH,
    IS_DIRECTORY,
    PERMISSION_DENIED,
    DeleteResult,
    EditResult,
    ExecuteResponse,
    FileData,
    FileDownloadResponse,
    FileInfo,
    FileUploadResponse,
    LsResult,
    ReadResult,
    WriteResult,
)
from deepagents.backends.sandbox import (
    MAX_BINARY_BYTES,
    MAX_OUTPUT_BYTES,
    TRUNCATION_MSG,
    BaseSandbox,
)
from deepagents.backends.utils import (
    EMPTY_CONTENT_WARNING,
    EMPTY_OLD_STRING_ERROR,
    normalize_read_bounds,
)

from gondolin import VM, GondolinError, GuestFileError, VMOptions
from gondolin.options import OptionChanges

R = TypeVar("R")

DEFAULT_TIMEOUT_S = 300  # an execute() without a timeout is killed after this long
MAX_EXECUTE_OUTPUT = 1024 * 1024  # bytes of combined output an execute() returns; the rest is dropped
# Files up to this size are read whole over the file channel and paged on the host; larger
# ones are paged in the guest by the base class's script (only the page crosses the channel).
HOST_PAGING_LIMIT = 4 * 1024 * 1024
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024  # download_files returns bytes in memory: larger files are refused
CLOSE_TIMEOUT_S = 30.0
KILL_GRACE_S = 5.0

_FS_ERRORS = {_errno.ENOENT: FILE_NOT_FOUND, _errno.ENOTDIR: FILE_NOT_FOUND, _errno.EACCES: PERMISSION_DENIED,
              _errno.EPERM: PERMISSION_DENIED, _errno.EISDIR: IS_DIRECTORY, _errno.EROFS: PERMISSION_DENIED}


def _valid_path(path: str) -> bool:
    """An absolute guest path without NUL bytes (what ``vm.fs`` accepts)."""
    return isinstance(path, str) and path.startswith("/") and "\0" not in path


def _fs_error(exc: GondolinError) -> str:
    if isinstance(exc, GuestFileError):
        return _FS_ERRORS.get(exc.errno, exc.errno_name)
    return f"{exc.code}: {exc}"


class GondolinSandbox(BaseSandbox):
    """A Deep Agents backend whose shell and files are one Gondolin VM.

    ``GondolinSandbox(options, **changes)`` starts the VM (the same options as
    :meth:`gondolin.VM.create`: ``http_hooks`` for egress policy and secrets, ``mounts``,
    ``memory``, ...). ``timeout``: seconds an ``execute`` may run when the caller gives no
    timeout (``0`` from a caller means no limit). ``cwd``: where commands start.
    ``max_output_bytes``: combined output an ``execute`` returns (the rest is counted, not
    kept). Close it with :meth:`close` or a ``with`` block; one left open is closed at garbage
    collection or exit.
    """

    enable_capture_offload = True  # the guest has sh, head, tail and wc (the wrapper's needs)

    def __init__(self, options: VMOptions | None = None, /, *, timeout: int = DEFAULT_TIMEOUT_S,
                 cwd: str | None = "/workspace", max_output_bytes: int = MAX_EXECUTE_OUTPUT,
                 **changes: Unpack[OptionChanges]) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be a positive number of seconds")
        if cwd is not None and not cwd.startswith("/"):
            raise ValueError(f"cwd must be an absolute guest path, got {cwd!r}")
        self._timeout = timeout
        self.max_output_bytes = max_output_bytes
        self._stack = contextlib.ExitStack()
        portal: BlockingPortal = self._stack.enter_context(start_blocking_portal())
        vm: VM | None = None
        try:
            vm = portal.call(lambda: VM.create(options, **changes))
            if cwd is not None:
                portal.call(lambda: vm.fs.mkdir(cwd, parents=True, exist_ok=True))
        except BaseException:
            try:
                if vm is not None:
                    portal.call(vm.discard)
            finally:
                self._stack.close()
            raise
        self._portal = portal
        self._vm = vm
        self._cwd = cwd
        self._finalizer = weakref.finalize(self, _close_quietly, portal, vm, self._stack)

    # -- lifetime --------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._vm.id

    @property
    def vm(self) -> VM:
        """The VM (its methods must run on this backend's loop: use :meth:`call`)."""
        return self._vm

    def call(self, fn: Callable[[VM], Awaitable[R]]) -> R:
        """``await fn(vm)`` on the VM's loop, from synchronous code."""
        return self._portal.call(lambda: fn(self._vm))

    async def acall(self, fn: Callable[[VM], Awaitable[R]]) -> R:
        """``await fn(vm)`` on the VM's loop, from an asyncio task; cancelling it cancels ``fn``."""
        return await asyncio.wrap_future(self._portal.start_task_soon(lambda: fn(self._vm)))

    def close(self) -> None:
        """Stop the VM and its loop thread. Safe to call twice."""
        if not self._finalizer.alive:
            return
        self._finalizer.detach()
        try:
            self._portal.call(self._vm.close)
        finally:
            self._stack.close()

    def __enter__(self) -> GondolinSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands --------------------------------------------------------------------------
    def execute(self, command: str, *, timeout: int | None = None) -> ExecuteResponse:
        return self.call(lambda vm: self._execute(vm, command, timeout))

    async def aexecute(self, command: str, *, timeout: int | None = None) -> ExecuteResponse:  # noqa: ASYNC109
        return await self.acall(lambda vm: self._execute(vm, command, timeout))

    async def _execute(self, vm: VM, command: str, timeout: int | None) -> ExecuteResponse:
        limit: float | None = self._timeout if timeout is None else (timeout or None)
        output = bytearray()
        dropped = 0
        proc = await vm.start(command, cwd=self._cwd, timeout=limit)
        try:
            async for chunk in proc:  # stdout and stderr in arrival order
                room = self.max_output_bytes - len(output)
                output += chunk.data[:max(room, 0)]
                dropped += max(len(chunk.data) - max(room, 0), 0)
            result = await proc.wait()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(KILL_GRACE_S), contextlib.suppress(GondolinError):
                await proc.kill()
            raise
        text = output.decode("utf-8", errors="replace")
        if dropped:
            text += f"\n[output truncated: {dropped} more bytes were not kept]"
        if result.timed_out:
            text += f"\n[command killed: it ran longer than {limit:g} s]"
        return ExecuteResponse(output=text, exit_code=result.exit_code, truncated=bool(dropped))

    # -- transfers -------------------------------------------------------------------------
    def upload_files(self, files: list[tuple[str, bytes]]) -> list[FileUploadResponse]:
        return self.call(lambda vm: self._upload(vm, files))

    async def aupload_files(self, files: list[tuple[str, bytes]]) -> list[FileUploadResponse]:
        return await self.acall(lambda vm: self._upload(vm, files))

    async def _upload(self, vm: VM, files: list[tuple[str, bytes]]) -> list[FileUploadResponse]:
        out = []
        for path, content in files:
            if not _valid_path(path):
                out.append(FileUploadResponse(path=path, error=INVALID_PATH))
                continue
            try:
                await vm.fs.mkdir(posixpath.dirname(path) or "/", parents=True, exist_ok=True)
                await vm.fs.write(path, content)
            except GondolinError as exc:
                out.append(FileUploadResponse(path=path, error=_fs_error(exc)))
            else:
                out.append(FileUploadResponse(path=path, error=None))
        return out

    def download_files(self, paths: list[str]) -> list[FileDownloadResponse]:
        return self.call(lambda vm: self._download(vm, paths))

    async def adownload_files(self, paths: list[str]) -> list[FileDownloadResponse]:
        return await self.acall(lambda vm: self._download(vm, paths))

    async def _download(self, vm: VM, paths: list[str]) -> list[FileDownloadResponse]:
        out = []
        for path in paths:
            if not _valid_path(path):
                out.append(FileDownloadResponse(path=path, error=INVALID_PATH))
                continue
            try:
                st = await vm.fs.stat(path)
                if st.is_dir:
                    out.append(FileDownloadResponse(path=path, error=IS_DIRECTORY))
                    continue
                if st.size > MAX_DOWNLOAD_BYTES:
                    out.append(FileDownloadResponse(path=path, error=f"file_too_large: over {MAX_DOWNLOAD_BYTES} bytes"))
                    continue
                content = await vm.fs.read_bytes(path, max_size=MAX_DOWNLOAD_BYTES)
                out.append(FileDownloadResponse(path=path, content=content))
            except GondolinError as exc:
                out.append(FileDownloadResponse(path=path, error=_fs_error(exc)))
        return out

    # -- file operations over vm.fs --------------------------------------------------------
    def ls(self, path: str) -> LsResult:
        return self.call(lambda vm: self._ls(vm, path))

    async def als(self, path: str) -> LsResult:
        return await self.acall(lambda vm: self._ls(vm, path))

    async def _ls(self, vm: VM, path: str) -> LsResult:
        if not _valid_path(path):
            return LsResult(error=f"Path '{path}': {INVALID_PATH}")
        try:
            entries = await vm.fs.scandir(path)
        except GuestFileError as exc:
            reason = {_errno.ENOENT: "path_not_found", _errno.ENOTDIR: "not_a_directory",
                      _errno.EACCES: "permission_denied"}.get(exc.errno, exc.errno_name)
            return LsResult(error=f"Path '{path}': {reason}")
        infos: list[FileInfo] = [{"path": posixpath.join(path, e.name), "is_dir": e.kind == "dir"} for e in entries]
        return LsResult(entries=infos)

    def write(self, file_path: str, content: str) -> WriteResult:
        return self.call(lambda vm: self._write(vm, file_path, content))

    async def awrite(self, file_path: str, content: str) -> WriteResult:
        return await self.acall(lambda vm: self._write(vm, file_path, content))

    async def _write(self, vm: VM, file_path: str, content: str) -> WriteResult:
        [response] = await self._upload(vm, [(file_path, content.encode("utf-8"))])
        if response.error:
            return WriteResult(error=f"Failed to write file '{file_path}': {response.error}")
        return WriteResult(path=file_path)

    def delete(self, file_path: str) -> DeleteResult:
        return self.call(lambda vm: self._delete(vm, file_path))

    async def adelete(self, file_path: str) -> DeleteResult:
        return await self.acall(lambda vm: self._delete(vm, file_path))

    async def _delete(self, vm: VM, file_path: str) -> DeleteResult:
        if not _valid_path(file_path):
            return DeleteResult(error=f"Error deleting file '{file_path}': {INVALID_PATH}")
        if posixpath.normpath(file_path) == "/":
            return DeleteResult(error="Error deleting file '/': refusing to delete the root directory")
        try:
            st = await vm.fs.stat(file_path, follow_symlinks=False)
            await vm.fs.remove(file_path, recursive=st.is_dir)
        except GuestFileError as exc:
            if exc.errno in (_errno.ENOENT, _errno.ENOTDIR):
                return DeleteResult(error=f"Error: '{file_path}' not found")
            return DeleteResult(error=f"Error deleting file '{file_path}': {exc}")
        except GondolinError as exc:
            return DeleteResult(error=f"Error deleting file '{file_path}': {exc}")
        return DeleteResult(path=file_path)

    def read(self, file_path: str, offset: int = 0, limit: int = 2000) -> ReadResult:
        result = self.call(lambda vm: self._read(vm, file_path, offset, limit))
        return result if result is not None else super().read(file_path, offset, limit)

    async def aread(self, file_path: str, offset: int = 0, limit: int = 2000) -> ReadResult:
        result = await self.acall(lambda vm: self._read(vm, file_path, offset, limit))
        return result if result is not None else await super().aread(file_path, offset, limit)

    async def _read(self, vm: VM, file_path: str, offset: int, limit: int) -> ReadResult | None:
        """The base class's read semantics for small text files; None hands the read to the
        base class (large files, and names whose type is not text: images, PDFs, ...)."""
        if not _valid_path(file_path):
            return ReadResult(error=f"File '{file_path}': {INVALID_PATH}")
        if not _is_text_name(file_path):
            return None
        try:
            st = await vm.fs.stat(file_path)
            if not st.is_file:
                return ReadResult(error=f"File '{file_path}': not_a_file")
            if st.size == 0:
                return ReadResult(file_data=FileData(content=EMPTY_CONTENT_WARNING, encoding="utf-8"))
            if st.size > HOST_PAGING_LIMIT:
                return None
            raw = await vm.fs.read_bytes(file_path, max_size=HOST_PAGING_LIMIT)
        except GuestFileError as exc:
            if exc.errno in (_errno.ENOENT, _errno.ENOTDIR):
                return ReadResult(error=f"File '{file_path}': file_not_found")
            if exc.errno in (_errno.EACCES, _errno.EPERM):
                return ReadResult(error=f"File '{file_path}': permission_denied")
            return None
        return page_text(raw, offset, limit)

    def edit(self, file_path: str, old_string: str, new_string: str, replace_all: bool = False) -> EditResult:  # noqa: FBT001, FBT002
        if not old_string:
            return EditResult(error=EMPTY_OLD_STRING_ERROR)
        result = self.call(lambda vm: self._edit(vm, file_path, old_string, new_string, replace_all))
        return result if result is not None else super().edit(file_path, old_string, new_string, replace_all)

    async def aedit(self, file_path: str, old_string: str, new_string: str,
                    replace_all: bool = False) -> EditResult:  # noqa: FBT001, FBT002
        if not old_string:
            return EditResult(error=EMPTY_OLD_STRING_ERROR)
        result = await self.acall(lambda vm: self._edit(vm, file_path, old_string, new_string, replace_all))
        return result if result is not None else await super().aedit(file_path, old_string, new_string, replace_all)

    async def _edit(self, vm: VM, file_path: str, old: str, new: str, replace_all: bool) -> EditResult | None:
        """The edit on the host for files up to ``HOST_PAGING_LIMIT``; None hands larger ones
        to the base class (which edits in the guest)."""
        if not _valid_path(file_path):
            return EditResult(error=f"Error editing file '{file_path}': {INVALID_PATH}")
        try:
            st = await vm.fs.stat(file_path)
            if not st.is_file:
                return EditResult(error=f"Error: '{file_path}' is not a regular file")
            if st.size > HOST_PAGING_LIMIT:
                return None
            raw = await vm.fs.read_bytes(file_path, max_size=HOST_PAGING_LIMIT)
        except GuestFileError as exc:
            if exc.errno in (_errno.ENOENT, _errno.ENOTDIR):
                return EditResult(error=f"Error: File '{file_path}' not found")
            if exc.errno in (_errno.EACCES, _errno.EPERM):
                return EditResult(error=f"Error: Permission denied editing file '{file_path}'")
            return EditResult(error=f"Error editing file '{file_path}': {exc}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return EditResult(error=f"Error: File '{file_path}' is not a text file")
        replaced = replace_text(text, old, new, replace_all=replace_all)
        if isinstance(replaced, str):
            return EditResult(error=replaced.format(path=file_path, old=old))
        result, count = replaced
        try:
            await vm.fs.write(file_path, result.encode("utf-8"))
        except GondolinError as exc:
            return EditResult(error=f"Error editing file '{file_path}': {_fs_error(exc)}")
        return EditResult(path=file_path, occurrences=count)


def _is_text_name(path: str) -> bool:
    try:  # the same by-name classification the base class's read uses
        from deepagents.backends.utils import _get_backend_read_file_type
    except ImportError:  # a newer deepagents moved it: let the base class read everything
        return False
    return bool(_get_backend_read_file_type(path) == "text")


def page_text(raw: bytes, offset: int, limit: int) -> ReadResult:
    """One page of a file's lines, with the base class's semantics: non-UTF-8 content is
    returned base64-encoded (up to ``MAX_BINARY_BYTES``), line endings are normalised to LF,
    a page is capped at ``MAX_OUTPUT_BYTES`` with ``TRUNCATION_MSG``."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(raw[:8192], final=False)
    except UnicodeDecodeError:
        if len(raw) > MAX_BINARY_BYTES:
            return ReadResult(error=f"Binary file exceeds maximum preview size of {MAX_BINARY_BYTES} bytes")
        return ReadResult(file_data=FileData(content=base64.b64encode(raw).decode("ascii"), encoding="base64"))
    offset, limit = normalize_read_bounds(offset, limit)
    if limit <= 0:
        return ReadResult(file_data=FileData(content="", encoding="utf-8"), no_lines_requested=True)
    text = raw.decode("utf-8", errors="surrogateescape").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    total = len(lines)
    window = lines[offset:offset + limit]
    if not window:
        return ReadResult(error=f"Line offset {offset} exceeds file length ({total} lines)")
    budget = MAX_OUTPUT_BYTES - len(TRUNCATION_MSG.encode("utf-8"))
    parts: list[str] = []
    used = 0
    returned = 0
    truncated = False
    for line in window:
        piece = (line if returned == 0 else "\n" + line).encode("utf-8", errors="surrogateescape")
        if used + len(piece) > budget:
            truncated = True
            prefix = piece[:max(budget - used, 0)].decode("utf-8", errors="ignore")
            parts.append(prefix)
            break
        parts.append(piece.decode("utf-8", errors="replace"))
        used += len(piece)
        returned += 1
    content = "".join(parts) + (TRUNCATION_MSG if truncated else "")
    returned = max(returned, 1) if truncated else returned
    end = offset + returned
    return ReadResult(file_data=FileData(content=content, encoding="utf-8"), total_lines=total,
                      start_line=offset + 1, end_line=end, next_offset=end if end < total else None)


def replace_text(text: str, old: str, new: str, *, replace_all: bool) -> tuple[str, int] | str:
    """``(new text, occurrences)``, or an error template (``{path}``, ``{old}``). As the base
    class's edit: ``old`` is tried as given, then with CRLF, then with LF line endings, and
    ``new`` gets the line endings of the variant that matched."""
    old_lf, new_lf = old.replace("\r\n", "\n"), new.replace("\r\n", "\n")
    candidates = ((old, new), (old_lf.replace("\n", "\r\n"), new_lf.replace("\n", "\r\n")), (old_lf, new_lf))
    for cand_old, cand_new in candidates:
        count = text.count(cand_old)
        if count == 0:
            continue
        if count > 1 and not replace_all:
            return ("Error: String '{old}' appears multiple times. "
                    "Use replace_all=True to replace all occurrences.")
        return text.replace(cand_old, cand_new, -1 if replace_all else 1), count
    return "Error: String not found in file: '{old}'"


def _close_quietly(portal: BlockingPortal, vm: VM, stack: contextlib.ExitStack) -> None:
    """Finalizer: close the VM (bounded) and stop the loop thread."""
    try:
        portal.start_task_soon(vm.discard).result(CLOSE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - a finalizer reports nothing; the VM's own finalizer kills QEMU
        pass
    finally:
        with contextlib.suppress(Exception):
            stack.close()


__all__ = ["GondolinSandbox", "page_text", "replace_text"]
