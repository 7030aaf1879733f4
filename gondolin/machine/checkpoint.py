"""Checkpoints: one file holding a VM's disk and (unless disk-only) its memory, resumable any
number of times, each time into a new, independent VM.

File layout (integers big-endian)::

    0       16  MAGIC
    16       4  header length N
    20       4  CRC-32 of the header
    24       N  header: UTF-8 JSON (format, kind, created, image, shape, options, sections)
    ...         zero padding up to HEADER_SPACE
    HEADER_SPACE  memory section: a QEMU migration stream ("full" checkpoints only)
    (aligned)     disk section: the qcow2 overlay, backed by the image's root disk ("cow" only)

Each section records its offset, size and CRC-32. :func:`decode_header` is pure (bytes in, a
:class:`CheckpointHeader` or a :class:`CheckpointError` out); loading checks the header and the
file size, resuming checks every section's CRC before it returns the VM. A resume only reads
the file: the disk section is copied into the new VM's run directory, and QEMU reads the memory
section through ``dd``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

import anyio

from .._log import get_logger
from ..errors import GondolinError
from ..images.store import cache_root
from .boot import BootSource, CheckpointResume, ColdBoot
from .shape import MachineShape
from .state import Section, append_file, pause_and_copy, save_running_vm

if TYPE_CHECKING:
    from .machine import Machine

log = get_logger("vm")
MAGIC = b"\x89GONDOLIN-CKPT\r\n"
CHECKPOINT_FORMAT = 1
HEADER_SPACE = 64 * 1024  # the header must fit; sections start here
ALIGN = 4096
_PREFIX = struct.Struct(">II")  # header length, header CRC-32
SUFFIX = ".ckpt"
CRC_CHUNK = 4 << 20
Kind = Literal["full", "disk"]


class CheckpointError(GondolinError):
    """A checkpoint file is unreadable, corrupt, truncated, or does not fit this host."""

    code = "checkpoint_error"


@dataclass(frozen=True)
class SectionInfo:
    offset: int
    size: int
    crc32: int


@dataclass(frozen=True)
class SavedOptions:
    """The VM options a resume reuses unless the caller overrides them."""

    hostname: str = "gondolin"
    label: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    network: bool = True
    dns: str = "synthetic"
    tcp_hosts: dict[str, str] = field(default_factory=dict)
    mounts: tuple[str, ...] = ()
    fs_transport: str = "port"  # a virtiofs VM's machine (memfd RAM) resumes only as one


@dataclass(frozen=True)
class CheckpointHeader:
    kind: Kind
    created: float
    image: str  # build id
    kernel_version: str
    shape: MachineShape
    options: SavedOptions
    sections: dict[str, SectionInfo]
    vm_id: str = ""

    def end(self) -> int:
        """The file size the sections need."""
        return max([HEADER_SPACE] + [s.offset + s.size for s in self.sections.values()])


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def encode_header(header: CheckpointHeader) -> bytes:
    """The first HEADER_SPACE bytes of a checkpoint file."""
    body = {
        "format": CHECKPOINT_FORMAT, "kind": header.kind, "created": header.created, "vm_id": header.vm_id,
        "image": {"build_id": header.image, "kernel_version": header.kernel_version},
        "shape": header.shape.to_dict(),
        "options": {**asdict(header.options), "mounts": list(header.options.mounts)},
        "sections": {name: asdict(s) for name, s in header.sections.items()},
    }
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    blob = MAGIC + _PREFIX.pack(len(data), zlib.crc32(data)) + data
    if len(blob) > HEADER_SPACE:
        raise CheckpointError(f"checkpoint header of {len(blob)} bytes does not fit in {HEADER_SPACE} (huge env?)")
    return blob + bytes(HEADER_SPACE - len(blob))


def decode_header(head: bytes, file_size: int) -> CheckpointHeader:
    """Parse and check a header; ``file_size`` catches truncated files."""
    if len(head) < len(MAGIC) or not head.startswith(MAGIC):
        raise CheckpointError("not a gondolin checkpoint (bad magic bytes)", code="not_a_checkpoint")
    start = len(MAGIC) + _PREFIX.size
    if len(head) < start:
        raise CheckpointError("checkpoint is truncated inside its header", code="checkpoint_truncated")
    length, crc = _PREFIX.unpack_from(head, len(MAGIC))
    if length > HEADER_SPACE - start:
        raise CheckpointError(f"checkpoint header claims {length} bytes", code="checkpoint_corrupt")
    if len(head) < start + length:
        raise CheckpointError("checkpoint is truncated inside its header", code="checkpoint_truncated")
    data = head[start:start + length]
    if zlib.crc32(data) != crc:
        raise CheckpointError("checkpoint header is corrupt (CRC mismatch)", code="checkpoint_corrupt")
    try:
        body = json.loads(data)
        if not isinstance(body, dict):
            raise ValueError("header is not an object")
        if body.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint format {body.get('format')!r} is not supported by this gondolin "
                f"(it reads format {CHECKPOINT_FORMAT})", code="checkpoint_format")
        kind = body["kind"]
        if kind not in ("full", "disk"):
            raise ValueError(f"unknown kind {kind!r}")
        opts = body.get("options") or {}
        options = SavedOptions(
            hostname=str(opts.get("hostname") or "gondolin"),
            label=str(opts["label"]) if opts.get("label") is not None else None,
            env={str(k): str(v) for k, v in dict(opts.get("env") or {}).items()},
            network=bool(opts.get("network", True)), dns=str(opts.get("dns") or "synthetic"),
            tcp_hosts={str(k): str(v) for k, v in dict(opts.get("tcp_hosts") or {}).items()},
            mounts=tuple(str(m) for m in opts.get("mounts") or ()),
            fs_transport="virtiofs" if opts.get("fs_transport") == "virtiofs" else "port",
        )
        sections = {}
        for name, raw in dict(body.get("sections") or {}).items():
            sec = SectionInfo(int(raw["offset"]), int(raw["size"]), int(raw["crc32"]))
            if sec.offset < HEADER_SPACE or sec.size < 0:
                raise ValueError(f"section {name} at {sec.offset}")
            sections[str(name)] = sec
        if kind == "full" and "memory" not in sections:
            raise ValueError("a full checkpoint without a memory section")
        if kind == "disk" and "disk" not in sections:
            raise ValueError("a disk checkpoint without a disk section")
        image = body["image"]
        header = CheckpointHeader(
            kind=kind, created=float(body["created"]), image=str(image["build_id"]),
            kernel_version=str(image.get("kernel_version") or ""), shape=MachineShape.from_dict(body["shape"]),
            options=options, sections=sections, vm_id=str(body.get("vm_id") or ""),
        )
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint header is malformed: {exc}", code="checkpoint_corrupt") from None
    if file_size < header.end():
        raise CheckpointError(
            f"checkpoint is truncated: {file_size} bytes, its sections need {header.end()}",
            code="checkpoint_truncated")
    return header


def section_crc(path: Path, sec: SectionInfo) -> int:
    crc = 0
    with open(path, "rb") as f:
        done = 0
        while done < sec.size:
            data = os.pread(f.fileno(), min(CRC_CHUNK, sec.size - done), sec.offset + done)
            if not data:
                break
            crc = zlib.crc32(data, crc)
            done += len(data)
    return crc


def default_dir() -> Path:
    return Path(os.environ.get("GONDOLIN_CHECKPOINT_DIR") or cache_root() / "checkpoints")


class CheckpointFile:
    """A saved VM on disk. ``load(path)`` reads and checks the header; :meth:`boot_source` says
    how to start a machine from it (the file is only read). :class:`gondolin.Checkpoint` adds
    ``resume()``."""

    def __init__(self, path: Path, header: CheckpointHeader) -> None:
        self.path = path
        self.header = header

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        p = Path(os.fspath(path)).absolute()
        try:
            with open(p, "rb") as f:
                head = f.read(HEADER_SPACE)
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint at {p}", code="checkpoint_missing") from None
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {p}: {exc}") from exc
        try:
            return cls(p, decode_header(head, size))
        except CheckpointError as exc:
            raise CheckpointError(f"{p}: {exc.message}", code=exc.code) from None

    # -- what it holds ---------------------------------------------------------------
    @property
    def kind(self) -> Kind:
        return self.header.kind

    @property
    def created(self) -> float:
        return self.header.created

    @property
    def image_id(self) -> str:
        return self.header.image

    @property
    def shape(self) -> MachineShape:
        return self.header.shape

    @property
    def label(self) -> str | None:
        return self.header.options.label

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def verify(self) -> None:
        """Check every section's CRC-32 (reads the whole file)."""
        for name, sec in self.header.sections.items():
            if section_crc(self.path, sec) != sec.crc32:
                raise CheckpointError(f"{self.path}: the {name} section is corrupt (CRC mismatch)",
                                      code="checkpoint_corrupt")

    def __repr__(self) -> str:
        return f"<Checkpoint {self.path.name} {self.kind} image={self.image_id[:12]} {self.shape.memory_mb}MiB>"

    # -- resuming --------------------------------------------------------------------
    def boot_source(self) -> BootSource:
        """How a machine starts from this checkpoint."""
        h = self.header
        disk = h.sections.get("disk")
        disk_section = Section(self.path, disk.offset, disk.size) if disk else None
        if h.kind != "full":
            return ColdBoot(disk_section)
        mem = h.sections["memory"]
        return CheckpointResume(Section(self.path, mem.offset, mem.size), disk_section, self._file_state())

    def _file_state(self) -> Any:
        """The mounts' file-service session saved with the memory (None: none, or unreadable,
        and the resumed guest mounts afresh)."""
        sec = self.header.sections.get("files")
        if sec is None:
            return None
        try:
            with open(self.path, "rb") as f:
                f.seek(sec.offset)
                return json.loads(f.read(sec.size))
        except (OSError, ValueError) as exc:
            log.warning("checkpoint %s: its file-service session is unreadable (%s)", self.path, exc)
            return None

    def check_shape(self, here: MachineShape) -> None:
        """Refuse to resume a full checkpoint into a machine of another shape."""
        want = self.header.shape
        if self.kind == "full" and here != want:
            raise CheckpointError(
                f"{self.path.name} cannot resume on this host as configured: " + "; ".join(here.differences(want))
                + (" (pass mounts= with the same guest paths as when it was saved)"
                   if here.fs_port != want.fs_port else ""), code="checkpoint_incompatible")


def list_checkpoints(directory: Path | None = None) -> list[CheckpointFile]:
    """Readable checkpoints in ``directory`` (default: the cache's checkpoints folder), newest first."""
    root = directory or default_dir()
    out = []
    if root.is_dir():
        for p in root.glob(f"*{SUFFIX}"):
            with contextlib.suppress(CheckpointError):
                out.append(CheckpointFile.load(p))
    out.sort(key=lambda c: c.created, reverse=True)
    return out


# -- saving --------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def virtiofs_unplugged(machine: Machine, what: str) -> AsyncIterator[None]:
    """Around a save of a virtiofs VM's memory (checkpoint, fork): its device unplugged, since
    QEMU 7.2 cannot migrate a vhost-user-fs device, and plugged in and mounted again after.
    Refused while a guest process uses a mount (see :meth:`Machine.detach_virtiofs`)."""
    busy = await machine.detach_virtiofs()
    if busy is not None:
        raise CheckpointError(
            f"cannot {what} this VM while a guest process uses its virtiofs mounts ({busy}): a virtiofs mount "
            "does not survive the unplug of its device, which QEMU cannot save. Close those files and leave "
            "those directories first, or create the VM with fs_transport='port' (the default), whose open files "
            "and working directories on mounts survive checkpoints and forks", code="checkpoint_mount_busy")
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await machine.reattach_virtiofs()


async def save_checkpoint(machine: Machine, path: Path, *, disk_only: bool = False,
                          sync_disk: Callable[[], Awaitable[Any]] | None = None) -> CheckpointHeader:
    """Write ``machine`` to ``path`` (atomically: a partial file never has the final name).
    ``sync_disk`` flushes the guest's page cache first (disk-only checkpoints)."""
    overlay = machine.disk_overlay
    unmigratable = machine.unmigratable()
    if unmigratable is not None and not disk_only:
        raise CheckpointError(f"cannot checkpoint: {unmigratable} (a disk-only checkpoint, disk_only=True, "
                              "works)", code="checkpoint_unsupported")
    if disk_only and overlay is None:
        raise CheckpointError(f"a disk-only checkpoint needs rootfs='cow' (this VM's root disk is "
                              f"{machine.options.rootfs!r}: its writes live in memory); take a full checkpoint instead")
    path = path.absolute()
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot save a checkpoint in {path.parent}: no such directory")
    tmp = path.with_name(f".{path.name}.{os.urandom(3).hex()}.partial")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    sections: dict[str, SectionInfo] = {}
    try:
        os.pwrite(fd, bytes(HEADER_SPACE), 0)

        def copy_disk(at: int) -> None:
            assert overlay is not None
            size = append_file(overlay, fd, at)
            sections["disk"] = SectionInfo(at, size, 0)

        async with machine.state_lock, virtiofs_unplugged(machine, "checkpoint") if not disk_only \
                else contextlib.nullcontext():
            qmp = await machine.qmp()
            if disk_only:
                if sync_disk is not None:
                    await sync_disk()
                async with machine.health_paused():
                    await pause_and_copy(qmp, lambda: anyio.to_thread.run_sync(copy_disk, HEADER_SPACE))
            else:
                async def after_stop() -> None:
                    mem_size = os.fstat(fd).st_size - HEADER_SPACE
                    sections["memory"] = SectionInfo(HEADER_SPACE, mem_size, 0)
                    end = align(HEADER_SPACE + mem_size)
                    if overlay is not None:
                        await anyio.to_thread.run_sync(copy_disk, end)
                        end = align(sections["disk"].offset + sections["disk"].size)
                    state = await machine.file_hand_over()
                    if state is not None:  # the guest keeps its open files on mounts (see VfsServer)
                        blob = json.dumps(state, separators=(",", ":")).encode()
                        await anyio.to_thread.run_sync(os.pwrite, fd, blob, end)
                        sections["files"] = SectionInfo(end, len(blob), 0)

                with machine.recording_file_session():
                    async with machine.health_paused():
                        await save_running_vm(qmp, machine.quiesced, f"cat >> {shlex.quote(str(tmp))}", tmp,
                                              after_stop)

        def finish() -> CheckpointHeader:
            for name, sec in list(sections.items()):
                sections[name] = SectionInfo(sec.offset, sec.size, section_crc(tmp, sec))
            o = machine.options
            header = CheckpointHeader(
                kind="disk" if disk_only else "full", created=time.time(), image=machine.image.build_id,
                kernel_version=machine.image.kernel_version, shape=machine.shape(), vm_id=machine.id,
                options=SavedOptions(hostname=o.hostname, label=o.label, env=dict(o.env), network=o.network,
                                     dns=o.dns, tcp_hosts=dict(o.tcp_hosts), mounts=tuple(sorted(o.mounts)),
                                     fs_transport=o.fs_transport),
                sections=dict(sections))
            os.pwrite(fd, encode_header(header), 0)
            os.replace(tmp, path)
            return header

        header = await anyio.to_thread.run_sync(finish)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    log.debug("checkpoint %s: %s, %d bytes", path, header.kind, path.stat().st_size)
    return header
