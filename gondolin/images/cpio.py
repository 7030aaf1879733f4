"""Write an uncompressed newc ("070701") cpio archive, the format the Linux initramfs reads.

Uncompressed on purpose: under TCG, decompressing the initramfs costs more boot time than
QEMU loading a few more megabytes into guest memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

_TRAILER = "TRAILER!!!"


def _header(ino: int, mode: int, size: int, namesize: int, nlink: int = 1) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize, 0)
    return ("070701" + "".join(f"{v:08X}" for v in fields)).encode()


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def write_newc(out: Path, entries: Iterable[tuple[str, Path | bytes, int]]) -> None:
    """``entries``: (archive path, content as a file path or bytes, st_mode). Symlinks carry their
    target as bytes; directories carry ``b""``. Owner is root, mtime 0 (reproducible)."""
    with open(out, "wb") as f:
        ino = 1
        for name, content, mode in [*entries, (_TRAILER, b"", 0)]:
            data = content.read_bytes() if isinstance(content, Path) else content
            encoded = name.encode() + b"\0"
            head = _header(ino if name != _TRAILER else 0, mode, len(data), len(encoded),
                           nlink=2 if mode & 0o170000 == 0o040000 else 1)
            f.write(head + encoded)
            f.write(_pad(len(head) + len(encoded)))
            f.write(data)
            f.write(_pad(len(data)))
            ino += 1
