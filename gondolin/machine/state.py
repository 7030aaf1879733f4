"""Machinery shared by warm templates and checkpoints: save a running VM's memory and disk,
start a VM from saved state, and find the control stream's frame boundary after a restore.

Saving (QEMU migration to a file, docs/devel/migration in the QEMU tree): the host first holds
back its own sends and waits for a PONG, so no host frame is cut in half inside the guest; then
QMP ``migrate`` streams RAM and device state to ``exec:cat``. The migration is live, so the saved
run state is "running" and a restore starts the guest by itself, without a QMP round trip. When
it completes the source is stopped (``postmigrate``); its disk is copied then, so disk and memory
match, and ``cont`` lets the source run on.

Restoring: QEMU starts with the same device set and ``-incoming exec:...``; the chardev sockets
reconnect by themselves. The guest may still hold frames for the host that saved it, some half
sent, so the host sends a PING with a random nonce and discards bytes until the matching PONG
(:class:`PongScanner`); everything after it is frame-aligned.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream

from .._log import get_logger
from ..errors import GondolinError, MissingToolError, VMStartError
from ..protocol import Message, T, encode
from ..qemu.qmp import QmpClient

log = get_logger("vm")
RESYNC_JUNK_LIMIT = 64 << 20  # bytes of stale guest output skipped before the PONG, at most
RESYNC_RETRY = 1.0  # seconds before a PING that got no PONG is sent again
COPY_CHUNK = 8 << 20


class StateError(GondolinError):
    """Saving or restoring a VM's state failed."""

    code = "state_error"


# -- finding the frame boundary after a restore (sans-IO) ----------------------------------
class PongScanner:
    """Find one of a few exact frames (our PONGs) in a byte stream that may start mid-frame.

    Feed received bytes; :meth:`feed` returns the bytes after the first marker seen, else None.
    Only the longest marker's length minus one bytes are kept between feeds, so stale output
    of any length costs bounded memory; ``skipped`` counts what was discarded.
    """

    def __init__(self, marker: bytes, limit: int = RESYNC_JUNK_LIMIT) -> None:
        if not marker:
            raise ValueError("empty marker")
        self.markers = [marker]
        self.limit = limit
        self.skipped = 0
        self._tail = b""
        self.found = False

    def add(self, marker: bytes) -> None:
        """Also accept ``marker`` (the answer to a PING sent again)."""
        if not marker:
            raise ValueError("empty marker")
        self.markers.append(marker)

    def feed(self, data: bytes) -> bytes | None:
        if self.found:
            return data
        buf = self._tail + data
        hits = [(at, m) for m in self.markers if (at := buf.find(m)) >= 0]
        if hits:
            at, marker = min(hits, key=lambda h: h[0])
            self.found = True
            self.skipped += at
            self._tail = b""
            return buf[at + len(marker):]
        keep = min(len(buf), max(len(m) for m in self.markers) - 1)
        self.skipped += len(buf) - keep
        self._tail = buf[len(buf) - keep:] if keep else b""
        if self.skipped > self.limit:
            raise StateError(f"the restored guest sent {self.skipped} bytes without answering the resync PING")
        return None


def pong_marker(ident: int, nonce: bytes) -> tuple[bytes, bytes]:
    """The PING we send and the exact PONG frame the agent answers it with."""
    return encode(Message(T.PING, ident, {}, nonce)), encode(Message(T.PONG, ident, {}, nonce))


class PrefixedStream(ByteStream):
    """A byte stream that first returns bytes already read from the underlying one."""

    def __init__(self, stream: ByteStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return await self._stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self._stream.extra_attributes


class Resync:
    """Find the frame boundary on a restored VM's control stream: :meth:`ping` right away (the
    guest answers once QEMU has loaded it), other set-up meanwhile, then :meth:`wait`.

    A PING is sent again after RESYNC_RETRY (doubling) in case one was lost; the answer to any
    of them ends the search. Bound :meth:`wait` with a deadline."""

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._ident = int.from_bytes(os.urandom(4), "big") | 1
        self._scanner: PongScanner | None = None

    async def ping(self) -> None:
        ping, marker = pong_marker(self._ident, os.urandom(16))
        if self._scanner is None:
            self._scanner = PongScanner(marker)
        else:
            self._scanner.add(marker)
        try:
            await self._stream.send(ping)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise VMStartError("the restored VM closed its control port") from exc

    async def wait(self) -> ByteStream:
        """The control stream, positioned just after the PONG."""
        if self._scanner is None:
            await self.ping()
        assert self._scanner is not None
        wait = RESYNC_RETRY
        while True:
            with anyio.move_on_after(wait):
                while True:
                    try:
                        data = await self._stream.receive(1 << 20)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                        raise VMStartError("the restored VM closed its control port") from exc
                    rest = self._scanner.feed(data)
                    if rest is not None:
                        if self._scanner.skipped:
                            log.debug("resync skipped %d stale bytes", self._scanner.skipped)
                        return PrefixedStream(self._stream, rest)
            log.debug("no PONG within %.1fs of a restore; pinging again", wait)
            wait *= 2
            await self.ping()


async def resync_control(stream: ByteStream) -> ByteStream:
    """PING the restored agent and skip everything before its PONG (see :class:`Resync`)."""
    return await Resync(stream).wait()


# -- where a restored VM's state comes from ------------------------------------------------
@dataclass(frozen=True)
class Section:
    """A byte range of a file: the whole file when ``size`` is None."""

    path: Path
    offset: int = 0
    size: int | None = None


@dataclass(frozen=True)
class RestoreSource:
    """Saved state a VM starts from instead of booting: a template or a checkpoint."""

    kind: str  # "template" | "checkpoint"
    memory: Section
    disk: Section | None  # the saved qcow2 overlay (cow mode), copied to become this VM's own
    backing: str | None = None  # backing file recorded in that overlay

    def incoming_uri(self) -> str:
        """QEMU's ``-incoming``: a command that writes the migration stream to its stdout."""
        path = shlex.quote(str(self.memory.path))
        if self.memory.offset == 0 and self.memory.size is None:
            return f"exec:cat {path}"
        count = f" count={self.memory.size}" if self.memory.size is not None else ""
        return f"exec:dd if={path} iflag=skip_bytes,count_bytes skip={self.memory.offset}{count} bs=1M status=none"


def copy_section(src: Section, dest: Path) -> int:
    """Copy a section of a file to a new file (kernel-side copy when it can). Returns the size."""
    with open(src.path, "rb") as fin, open(dest, "wb") as fout:
        size = src.size if src.size is not None else os.fstat(fin.fileno()).st_size - src.offset
        return _copy_fd(fin.fileno(), fout.fileno(), size, src.offset, 0)


def append_file(src: Path, fout: int, dest_offset: int) -> int:
    """Copy all of ``src`` into the open file ``fout`` at ``dest_offset``."""
    with open(src, "rb") as fin:
        return _copy_fd(fin.fileno(), fout, os.fstat(fin.fileno()).st_size, 0, dest_offset)


def _copy_fd(fin: int, fout: int, size: int, src_off: int, dst_off: int) -> int:
    done = 0
    while done < size:
        want = min(COPY_CHUNK, size - done)
        try:
            n = os.copy_file_range(fin, fout, want, src_off + done, dst_off + done)
        except OSError:
            n = -1
        if n <= 0:  # not supported here (or a short source): plain reads and writes
            data = os.pread(fin, want, src_off + done)
            if not data:
                raise StateError(f"unexpected end of file after {done} of {size} bytes")
            n = os.pwrite(fout, data, dst_off + done)
        done += n
    return done


def qcow2_backing(path: Path, offset: int = 0) -> str | None:
    """The backing file name recorded in a qcow2 header (QEMU docs/interop/qcow2.txt)."""
    with open(path, "rb") as f:
        head = os.pread(f.fileno(), 32, offset)
        if len(head) < 20 or head[:4] != b"QFI\xfb":
            raise StateError(f"{path} is not a qcow2 image")
        name_off = int.from_bytes(head[8:16], "big")
        name_len = int.from_bytes(head[16:20], "big")
        if not name_off or not name_len:
            return None
        if name_len > 4096:
            raise StateError(f"{path}: backing file name of {name_len} bytes")
        return os.pread(f.fileno(), name_len, offset + name_off).decode(errors="replace")


def rebase_overlay(overlay: Path, backing: str) -> None:
    """Point a qcow2 overlay at ``backing`` without touching its data (``qemu-img rebase -u``)."""
    qemu_img = shutil.which("qemu-img")
    if not qemu_img:
        raise MissingToolError("qemu-img", "qemu-utils", "restore copy-on-write disks")
    proc = subprocess.run([qemu_img, "rebase", "-u", "-F", "raw", "-b", backing, str(overlay)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise StateError(f"qemu-img could not rebase {overlay}: {proc.stderr.strip()}")


def prepare_restored_disk(saved: Section, dest: Path, backing: str) -> None:
    """Give a VM its own copy of a saved overlay, backed by the image's root disk."""
    copy_section(saved, dest)
    if qcow2_backing(dest) != backing:
        rebase_overlay(dest, backing)


# -- saving ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SaveStats:
    seconds: float  # from the start of the save until the VM runs again
    downtime_ms: float | None  # QEMU's own figure for the time the guest was stopped
    memory_bytes: int


async def save_running_vm(
    qmp: QmpClient,
    quiesce: Callable[[], Any],
    memory_command: str,
    memory_file: Path,
    after_stop: Callable[[], Awaitable[None]] | None = None,
    *,
    timeout: float = 120.0,
) -> SaveStats:
    """Stream the VM's memory into ``memory_command`` (a shell command reading stdin), run
    ``after_stop`` while the VM is stopped (copy its disk there), then let it run on.

    ``quiesce`` is an async context manager factory that holds back host sends meanwhile."""
    t0 = time.monotonic()
    async with quiesce():
        try:
            info = await qmp.migrate_to(f"exec:{memory_command}", timeout=timeout)
        except TimeoutError:
            raise StateError(f"saving the VM's memory took longer than {timeout:.0f}s") from None
        try:
            if after_stop is not None:
                await after_stop()
        finally:
            await qmp.execute("cont")
    elapsed = time.monotonic() - t0
    try:
        size = memory_file.stat().st_size
    except OSError as exc:
        raise StateError(f"QEMU did not write the memory image {memory_file}: {exc}") from exc
    downtime = info.get("downtime") if isinstance(info, dict) else None
    log.debug("saved memory in %.3fs (%d bytes, downtime %s ms)", elapsed, size, downtime)
    return SaveStats(elapsed, float(downtime) if downtime is not None else None, size)


async def pause_and_copy(qmp: QmpClient, work: Callable[[], Awaitable[None]]) -> float:
    """Stop the VM, run ``work`` (a disk copy), let it run again. Returns seconds stopped."""
    t0 = time.monotonic()
    await qmp.execute("stop")
    try:
        await work()
    finally:
        await qmp.execute("cont")
    return time.monotonic() - t0
