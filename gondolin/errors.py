"""The public error vocabulary. Every error has a stable ``code`` and a message that says what to do."""

from __future__ import annotations

from typing import Any


class GondolinError(Exception):
    """Base class of every error Gondolin raises on purpose."""

    code = "gondolin_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross process boundaries (the VM registry, Ray actors): rebuild them from their
        # rendered message and fields, whatever the subclass's constructor takes.
        return _rebuild, (type(self), self.args, self.__dict__.copy())


def _rebuild(cls: type[GondolinError], args: tuple[Any, ...], state: dict[str, Any]) -> GondolinError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class ImageError(GondolinError):
    """The guest image is missing, corrupt, or cannot be built."""

    code = "image_error"


class MissingToolError(GondolinError):
    """A host program Gondolin needs (QEMU, mmdebstrap, ...) is not installed."""

    code = "missing_tool"

    def __init__(self, tool: str, package: str, purpose: str) -> None:
        super().__init__(
            f"{tool} is not installed (needed to {purpose}); install the Debian/Ubuntu package "
            f"`{package}`: sudo apt-get install {package}"
        )
        self.tool = tool
        self.package = package


class VMStartError(GondolinError):
    """QEMU could not be started, or the guest agent never answered."""

    code = "vm_start_failed"

    def __init__(self, message: str, console: list[str] | None = None, *, code: str | None = None) -> None:
        self.console = console or []
        if self.console:
            message += "\n--- last console lines ---\n" + "\n".join(self.console[-20:])
        super().__init__(message, code=code)


class VMDiedError(GondolinError):
    """The VM stopped while an operation was pending. ``console`` has the last console lines."""

    code = "vm_died"

    def __init__(self, message: str, console: list[str] | None = None) -> None:
        self.console = console or []
        if self.console:
            message += "\n--- last console lines ---\n" + "\n".join(self.console[-20:])
        super().__init__(message)


class VMUnresponsiveError(VMDiedError):
    """The guest stopped answering the host's pings (frozen, or too busy to schedule the agent)
    for longer than ``timeouts.unresponsive``; the VM was stopped."""

    code = "vm_unresponsive"


class VMClosedError(GondolinError):
    """The VM was closed by its owner; no further operations are possible."""

    code = "vm_closed"


class GuestTimeoutError(GondolinError):
    """The guest did not answer a request within its host-side deadline (``timeouts.call``,
    or the ``timeout`` of the call). The VM may still be running."""

    code = "guest_timeout"


class ExecTimeout(GuestTimeoutError):
    """A command did not finish within a host-side deadline: ``ExecProcess.wait(timeout=...)``
    expired (the command keeps running), or the guest did not report the end of a command
    ``exec(timeout=t)`` had to kill by ``t + timeouts.grace``."""

    code = "exec_timeout"


class GuestFileError(GondolinError):
    """A file operation failed in the guest. ``errno`` is the guest's errno value."""

    code = "guest_file_error"

    def __init__(self, message: str, *, errno: int, errno_name: str, path: str | None = None) -> None:
        super().__init__(message, code=errno_name)
        self.errno = errno
        self.errno_name = errno_name
        self.path = path


class ProtocolError(GondolinError):
    """The guest sent something the host could not understand, or refused a request."""

    code = "protocol_error"


class GuestConnectionError(GondolinError):
    """A TCP connection to a guest port (``vm.open_tcp``, a port forward) failed: nothing
    listens there (``code`` ``"ECONNREFUSED"``), the guest side reset or closed it, or the
    address is not guest loopback."""

    code = "guest_connection_error"
