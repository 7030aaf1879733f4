"""The one VFS error type, and the translation of host errors into Linux errno values."""

from __future__ import annotations

import errno as _errno
import os

# Linux errno values by name (include/uapi/asm-generic/errno*.h). The guest is always Linux;
# the host may not be (macOS numbers differ past 34), so host errors are mapped by name.
LINUX_ERRNO: dict[str, int] = {
    "EPERM": 1, "ENOENT": 2, "ESRCH": 3, "EINTR": 4, "EIO": 5, "ENXIO": 6, "E2BIG": 7,
    "ENOEXEC": 8, "EBADF": 9, "ECHILD": 10, "EAGAIN": 11, "ENOMEM": 12, "EACCES": 13,
    "EFAULT": 14, "EBUSY": 16, "EEXIST": 17, "EXDEV": 18, "ENODEV": 19, "ENOTDIR": 20,
    "EISDIR": 21, "EINVAL": 22, "ENFILE": 23, "EMFILE": 24, "ENOTTY": 25, "ETXTBSY": 26,
    "EFBIG": 27, "ENOSPC": 28, "ESPIPE": 29, "EROFS": 30, "EMLINK": 31, "EPIPE": 32,
    "EDOM": 33, "ERANGE": 34, "EDEADLK": 35, "ENAMETOOLONG": 36, "ENOLCK": 37, "ENOSYS": 38,
    "ENOTEMPTY": 39, "ELOOP": 40, "ENODATA": 61, "ENOATTR": 61, "EPROTO": 71,
    "EOVERFLOW": 75, "EBADFD": 77, "EILSEQ": 84, "EOPNOTSUPP": 95, "ENOTSUP": 95,
    "ETIMEDOUT": 110, "ESTALE": 116, "EDQUOT": 122, "ECANCELED": 125,
}  # fmt: skip


def linux_errno(host_errno: int | None) -> int:
    """The Linux errno for an errno number raised on this host (EIO when unknown)."""
    if not host_errno:
        return LINUX_ERRNO["EIO"]
    name = _errno.errorcode.get(host_errno)
    if name is None:
        return LINUX_ERRNO["EIO"]
    return LINUX_ERRNO.get(name, LINUX_ERRNO["EIO"])


class VfsError(OSError):
    """A filesystem operation failed; ``errno`` is a Linux errno value the guest will see."""

    def __init__(self, errno: int, message: str | None = None) -> None:
        super().__init__(errno, message or os.strerror(errno))

    @classmethod
    def from_os_error(cls, exc: OSError) -> VfsError:
        if isinstance(exc, VfsError):
            return exc
        return cls(linux_errno(exc.errno), exc.strerror)


ENOENT = LINUX_ERRNO["ENOENT"]
EIO = LINUX_ERRNO["EIO"]
EBADF = LINUX_ERRNO["EBADF"]
EACCES = LINUX_ERRNO["EACCES"]
EPERM = LINUX_ERRNO["EPERM"]
EBUSY = LINUX_ERRNO["EBUSY"]
EEXIST = LINUX_ERRNO["EEXIST"]
EXDEV = LINUX_ERRNO["EXDEV"]
ENOTDIR = LINUX_ERRNO["ENOTDIR"]
EISDIR = LINUX_ERRNO["EISDIR"]
EINVAL = LINUX_ERRNO["EINVAL"]
ENFILE = LINUX_ERRNO["ENFILE"]
ENOMEM = LINUX_ERRNO["ENOMEM"]
EFBIG = LINUX_ERRNO["EFBIG"]
ENOSPC = LINUX_ERRNO["ENOSPC"]
EROFS = LINUX_ERRNO["EROFS"]
EMLINK = LINUX_ERRNO["EMLINK"]
ENAMETOOLONG = LINUX_ERRNO["ENAMETOOLONG"]
ENOSYS = LINUX_ERRNO["ENOSYS"]
ENOTEMPTY = LINUX_ERRNO["ENOTEMPTY"]
ELOOP = LINUX_ERRNO["ELOOP"]
EPROTO = LINUX_ERRNO["EPROTO"]
EOPNOTSUPP = LINUX_ERRNO["EOPNOTSUPP"]
ESTALE = LINUX_ERRNO["ESTALE"]
