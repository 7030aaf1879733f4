"""Programmable filesystem: providers on the host behind the guest's FUSE mounts.

``wire`` is the stdlib-only FS RPC codec the guest FUSE daemon shares; everything else here
runs on the host.
"""

from .cow import Changes, CommitConflict, CopyOnWriteProvider
from .errors import VfsError
from .hooks import HookedProvider, HookEvent
from .memory import MemoryProvider
from .overlay import OverlayProvider
from .provider import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Attr,
    Caller,
    Dirent,
    FileHandle,
    OpenMode,
    Provider,
    ProviderWrapper,
    SetAttr,
    StatFs,
)
from .readonly import ReadonlyProvider
from .realfs import RealFSProvider
from .router import MountRouter
from .rpc import FsRpcService, FsRpcStats
from .shadow import ShadowProvider

__all__ = [
    "Attr",
    "Caller",
    "Changes",
    "CommitConflict",
    "CopyOnWriteProvider",
    "Dirent",
    "FileHandle",
    "FsRpcService",
    "FsRpcStats",
    "HookEvent",
    "HookedProvider",
    "MemoryProvider",
    "MountRouter",
    "OpenMode",
    "OverlayProvider",
    "Provider",
    "ProviderWrapper",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "ReadonlyProvider",
    "RealFSProvider",
    "SetAttr",
    "ShadowProvider",
    "StatFs",
    "VfsError",
]
