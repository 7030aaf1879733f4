"""Gondolin: run untrusted code in local QEMU micro-VMs, with host-side policy.

    async with await VM.create() as vm:
        result = await vm.exec("echo hello")
        print(result.stdout)
"""

from .checkpoint import Checkpoint, CheckpointError
from .errors import (
    ExecTimeout,
    GondolinError,
    GuestFileError,
    ImageError,
    MissingToolError,
    ProtocolError,
    VMClosedError,
    VMDiedError,
    VMStartError,
)
from .exec import ExecProcess, ExecResult, OutputChunk
from .fs import DirEntry, FileStat
from .pool import VMPool
from .vm import VM

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
    "GuestFileError",
    "ImageError",
    "MissingToolError",
    "OutputChunk",
    "ProtocolError",
    "VMClosedError",
    "VMDiedError",
    "VMPool",
    "VMStartError",
]
