"""The values ``vm.fs`` returns: file status and directory entries."""

from __future__ import annotations

import stat as _stat
from dataclasses import dataclass


@dataclass(frozen=True)
class FileStat:
    mode: int
    size: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    nlink: int
    ino: int

    @property
    def is_dir(self) -> bool:
        return _stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return _stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return _stat.S_ISLNK(self.mode)

    @property
    def permissions(self) -> int:
        return _stat.S_IMODE(self.mode)


@dataclass(frozen=True)
class DirEntry:
    name: str
    kind: str  # file | dir | symlink | other


__all__ = ["DirEntry", "FileStat"]
