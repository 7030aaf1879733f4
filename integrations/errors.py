"""Tool errors: what a model sees when a tool could not do its job.

A non-zero exit code is a result, not an error. A :class:`ToolError` is for everything else:
a bad argument, an unknown sandbox, a file that is not there, a VM that died. Each carries a
stable ``code``, a ``message`` and a ``hint`` that tells the model what to do next. Runtime
exceptions are translated here, in one place (:func:`translate`).
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass

from gondolin.errors import (
    ExecTimeout,
    GondolinError,
    GuestFileError,
    GuestTimeoutError,
    ImageError,
    ProtocolError,
    VMClosedError,
    VMDiedError,
    VMStartError,
)

# The error vocabulary, shared by every adapter. Keep it small: a model branches on these.
CODES = frozenset({
    "invalid_argument",
    "sandbox_not_found",
    "sandbox_not_running",
    "sandbox_limit",
    "exec_not_found",
    "path_not_found",
    "is_a_directory",
    "not_a_directory",
    "permission_denied",
    "file_too_large",
    "already_exists",
    "no_match",
    "ambiguous_match",
    "not_allowed",
    "checkpoint_not_found",
    "timeout",
    "vm_died",
    "vm_start_failed",
    "internal",
})


class ToolError(Exception):
    """A tool could not do what was asked. Adapters turn it into their error form."""

    def __init__(self, code: str, message: str, hint: str = "", *, retryable: bool = False) -> None:
        if code not in CODES:
            raise ValueError(f"unknown tool error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.retryable = retryable

    def info(self) -> ErrorInfo:
        return ErrorInfo(self.code, self.message, self.hint, self.retryable)

    def __str__(self) -> str:
        return self.info().render()


@dataclass(frozen=True)
class ErrorInfo:
    """The data of a :class:`ToolError`, after redaction; what adapters serialize."""

    code: str
    message: str
    hint: str = ""
    retryable: bool = False

    def render(self) -> str:
        text = f"error [{self.code}]: {self.message}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "hint": self.hint, "retryable": self.retryable}


_ERRNO_CODES = {
    _errno.ENOENT: ("path_not_found", "Check the path with list_files; guest paths are absolute."),
    _errno.ENOTDIR: ("not_a_directory", "A parent of this path is a file, not a directory."),
    _errno.EISDIR: ("is_a_directory", "Use list_files to look inside a directory."),
    _errno.EACCES: ("permission_denied", "The guest refused access to this path."),
    _errno.EPERM: ("permission_denied", "The guest refused this operation on this path."),
    _errno.EROFS: ("permission_denied", "This file system is read-only."),
    _errno.EEXIST: ("already_exists", "Something already exists at this path."),
    _errno.EFBIG: ("file_too_large", "Read a byte or line range instead of the whole file."),
    _errno.ENOTEMPTY: ("invalid_argument", "The directory is not empty."),
}


def translate(exc: BaseException, *, path: str | None = None) -> ToolError:
    """The :class:`ToolError` for a runtime exception (never called for cancellation)."""
    if isinstance(exc, ToolError):
        return exc
    if isinstance(exc, GuestFileError):
        code, hint = _ERRNO_CODES.get(exc.errno, ("invalid_argument", ""))
        where = exc.path or path
        message = f"{exc.errno_name} on {where}: {exc.message}" if where else f"{exc.errno_name}: {exc.message}"
        return ToolError(code, message, hint)
    if isinstance(exc, VMDiedError):
        return ToolError("vm_died", "the sandbox VM stopped unexpectedly: " + exc.message.split("\n")[0],
                         "Destroy this sandbox and create a new one.")
    if isinstance(exc, VMClosedError):
        return ToolError("sandbox_not_running", "the sandbox VM is closed",
                         "Call sandbox_list to see live sandboxes, or sandbox_create for a new one.")
    if isinstance(exc, VMStartError):
        return ToolError("vm_start_failed", "the sandbox VM did not start: " + exc.message.split("\n")[0],
                         "Try again; if it keeps failing, ask the operator to run `gondolin doctor`.",
                         retryable=True)
    if isinstance(exc, ImageError):
        return ToolError("invalid_argument", f"image problem: {exc.message}",
                         "Use an image the operator allows (or omit image for the default).")
    if isinstance(exc, ExecTimeout):
        return ToolError("timeout", exc.message, "Use a longer timeout, or poll with exec_poll.", retryable=True)
    if isinstance(exc, GuestTimeoutError):
        return ToolError("timeout", "the sandbox did not answer in time: " + exc.message.split("\n")[0],
                         "Retry; if the sandbox keeps not answering, destroy it and create a new one.",
                         retryable=True)
    if isinstance(exc, ProtocolError) and exc.code == "exec_failed":
        return ToolError("invalid_argument", exc.message.replace("guest refused the command: ", ""),
                         "Check the command's user, cwd and environment.")
    if isinstance(exc, GondolinError):
        return ToolError("internal", f"{exc.code}: {exc.message}")
    if isinstance(exc, ValueError):
        return ToolError("invalid_argument", str(exc))
    return ToolError("internal", f"{type(exc).__name__}: {exc}")
