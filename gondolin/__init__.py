"""Gondolin: run untrusted code in local QEMU micro-VMs, with host-side policy.

    async with gondolin.open_vm(memory="1G") as vm:
        result = await vm.exec("echo hello")
        print(result.stdout)

Options are one typed value, :class:`VMOptions` (keywords of ``VM.create`` / ``open_vm``
apply on top of it). Network policy hooks come from :func:`gondolin.http.create_http_hooks`,
mount providers from :mod:`gondolin.vfs`.
"""

from .errors import (
    ExecTimeout,
    GondolinError,
    GuestConnectionError,
    GuestFileError,
    GuestTimeoutError,
    ImageError,
    MissingToolError,
    ProtocolError,
    VMClosedError,
    VMDiedError,
    VMStartError,
    VMUnresponsiveError,
)
from .exec import ExecProcess, ExecResult, OutputChunk
from .fstypes import DirEntry, FileStat
from .http.hooks import HttpHooks
from .machine.checkpoint import CheckpointError
from .options import MountMode, RootfsMode, Timeouts, VMOptions
from .pool import VMPool
from .vfs.provider import Provider
from .vm import VM, Checkpoint, open_vm

__all__ = [
    "VM",
    "Checkpoint",
    "CheckpointError",
    "DirEntry",
    "ExecProcess",
    "ExecResult",
    "ExecTimeout",
    "FileStat",
    "GondolinError",
    "GuestConnectionError",
    "GuestFileError",
    "GuestTimeoutError",
    "HttpHooks",
    "ImageError",
    "MissingToolError",
    "MountMode",
    "OutputChunk",
    "Provider",
    "ProtocolError",
    "RootfsMode",
    "Timeouts",
    "VMClosedError",
    "VMDiedError",
    "VMOptions",
    "VMPool",
    "VMStartError",
    "VMUnresponsiveError",
    "open_vm",
]
