"""Run one QEMU process: start it, capture its console into a ring buffer, stop it for sure.

QEMU is started with PR_SET_PDEATHSIG=SIGKILL, so it dies with the thread that started it even
when the host process is killed without a chance to clean up.
"""

from __future__ import annotations

import collections
import ctypes
import os
import shutil
import signal
import subprocess
import time

import anyio

from .._log import get_logger
from ..errors import MissingToolError

log = get_logger("qemu")
CONSOLE_LINES = 200  # console lines kept for error messages
PR_SET_PDEATHSIG = 1


def find_qemu(binary: str = "qemu-system-x86_64") -> str:
    path = os.environ.get("GONDOLIN_QEMU") or shutil.which(binary)
    if not path:
        raise MissingToolError(binary, "qemu-system-x86", "run guest VMs")
    return path


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class QemuProcess:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.console: collections.deque[str] = collections.deque(maxlen=CONSOLE_LINES)
        self._partial = b""
        self._proc: subprocess.Popen[bytes] | None = None
        self._read_fd = -1
        self.exited = anyio.Event()
        self.returncode: int | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        """Spawn QEMU. Must run on the event-loop thread (PDEATHSIG follows the spawning thread)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=w, stderr=w,
                preexec_fn=_die_with_parent, close_fds=True,
            )
        except OSError:
            os.close(r)
            raise
        finally:
            os.close(w)
        os.set_blocking(r, False)
        self._read_fd = r
        self.started_at = time.monotonic()
        log.debug("started pid %s: %s", self._proc.pid, " ".join(self.argv))

    async def watch(self) -> None:
        """Read the console until QEMU closes it, then reap QEMU. Run as a background task."""
        fd = self._read_fd
        try:
            while True:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    await anyio.wait_readable(fd)
                    continue
                if not data:
                    break
                self._feed(data)
        finally:
            if self._partial:
                self.console.append(self._partial.decode(errors="replace"))
                self._partial = b""
            os.close(fd)
            self._read_fd = -1
            self.kill()  # the reader only stops early when its owner is going away: so does QEMU
            await self._reap()

    async def _wait_exit(self, timeout: float | None = None) -> None:
        """Wait for QEMU to exit without polling: a pidfd becomes readable when it does."""
        assert self._proc is not None
        if self._proc.poll() is not None:
            return
        pidfd = os.pidfd_open(self._proc.pid)
        try:
            with anyio.move_on_after(timeout):
                while self._proc.poll() is None:
                    await anyio.wait_readable(pidfd)
        finally:
            os.close(pidfd)

    async def _reap(self) -> None:
        assert self._proc is not None
        with anyio.CancelScope(shield=True):
            await self._wait_exit()
        self.returncode = self._proc.returncode
        log.debug("pid %s exited with %s", self._proc.pid, self.returncode)
        self.exited.set()

    def _feed(self, data: bytes) -> None:
        buf = self._partial + data
        *lines, self._partial = buf.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace").rstrip("\r")
            self.console.append(text)
            log.debug("console: %s", text)
        if len(self._partial) > 4096:
            self.console.append(self._partial.decode(errors="replace"))
            self._partial = b""

    def console_tail(self, n: int = 30) -> list[str]:
        return list(self.console)[-n:]

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass

    async def stop(self, timeout: float = 5.0) -> None:
        """Kill QEMU and wait until it is reaped (its console watcher finishes on its own)."""
        self.kill()
        if self._proc is None:
            return
        with anyio.CancelScope(shield=True):
            await self._wait_exit(timeout)
            if self._proc.poll() is None:
                self._proc.wait(timeout)
        self.returncode = self._proc.returncode
