"""Baseline driver: boot the image with plain QEMU and talk to its agent without gondolin's runtime.

Only the argv builder, the QEMU process wrapper (so QEMU dies with us) and the wire format are
shared with gondolin; there is no VM object, no configure step, no channel. The time to the
agent's first byte on the control port is the "raw QEMU boot" baseline; :meth:`RawGuest.exec`
runs one command at a time for baselines that need the guest to do something (a 9p copy).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketListener

from gondolin.images import Image
from gondolin.machine.shape import CONTROL_PORT
from gondolin.protocol import FrameDecoder, Message, T, message
from gondolin.qemu.argv import MachineSpec, SerialPort, build_argv
from gondolin.qemu.process import QemuProcess, find_qemu

READ_SIZE = 1 << 20
MAX_OUTPUT = 1 << 20  # a baseline command's stdout/stderr kept, in bytes


def cold_kwargs() -> dict[str, Any]:
    """VM.create options that force a cold boot (no restore from a warm-start template)."""
    return {"warm": False}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (/proc/PID/stat fields 14 and 15)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RawBootError(RuntimeError):
    """The raw guest did not come up or a command could not run."""


@dataclass(frozen=True)
class RawResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


def raw_spec(image: Image, control_socket: str, *, accel: str, memory_mb: int = 512, cpus: int = 1,
             extra_args: Sequence[str] = ()) -> MachineSpec:
    """The MachineSpec VM.create(rootfs="readonly", network=False) builds (see
    :func:`gondolin.machine.shape.machine_spec`) without the QMP socket, plus ``extra_args``."""
    return MachineSpec(
        kernel=str(image.kernel), initrd=str(image.initrd), disk=str(image.rootfs), disk_format="raw",
        disk_readonly=True, root_mode="ro", memory_mb=memory_mb, cpus=cpus, accel=accel,
        ports=(SerialPort(CONTROL_PORT, control_socket),), extra_args=tuple(extra_args),
    )


class RawGuest:
    def __init__(self, stream: ByteStream, first: bytes, first_byte_s: float, qemu: QemuProcess) -> None:
        self.first_byte_s = first_byte_s  # QEMU start -> first byte from the agent
        self.first_byte_cpu_s = process_cpu_seconds(qemu.pid) if qemu.pid else 0.0  # QEMU's CPU by then
        self._stream = stream
        self._decoder = FrameDecoder()
        self._decoder.feed(first)
        self._pending: list[Message] = []
        self._qemu = qemu
        self._next_id = 1

    @property
    def qemu_pid(self) -> int | None:
        return self._qemu.pid

    async def _next(self) -> Message:
        while not self._pending:
            try:
                data = await self._stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                raise RawBootError("the raw guest closed its control port: "
                                   + " | ".join(self._qemu.console_tail(10))) from None
            self._decoder.feed(data)
            self._pending.extend(self._decoder.messages())
        return self._pending.pop(0)

    async def exec(self, argv: Sequence[str], timeout: float = 120.0) -> RawResult:
        """Run one command (argv form) and collect its output; one command at a time."""
        ident = self._next_id
        self._next_id += 1
        out: dict[int, bytearray] = {T.STDOUT: bytearray(), T.STDERR: bytearray()}
        with anyio.fail_after(timeout):
            await self._stream.send(message(T.EXEC, ident, argv=list(argv)))
            while True:
                msg = await self._next()
                if msg.id != ident:
                    continue
                if msg.t in out:
                    buf = out[msg.t]
                    buf += msg.data[: max(0, MAX_OUTPUT - len(buf))]
                    credit = {"stdout" if msg.t == T.STDOUT else "stderr": len(msg.data)}
                    await self._stream.send(message(T.CREDIT, ident, b"", **credit))
                elif msg.t == T.EXIT:
                    code = msg.p.get("exit_code")
                    return RawResult(-1 if code is None else int(code), bytes(out[T.STDOUT]), bytes(out[T.STDERR]))
                elif msg.t == T.ERROR:
                    raise RawBootError(f"guest refused {argv[0]}: {msg.p.get('message')}")

    async def check(self, argv: Sequence[str], timeout: float = 120.0) -> bytes:
        """Run a command that must succeed; its stdout."""
        r = await self.exec(argv, timeout)
        if r.exit_code != 0:
            raise RawBootError(f"{' '.join(argv)[:200]} exited {r.exit_code}: {r.stderr.decode(errors='replace')[-500:]}")
        return r.stdout


async def _accept_or_exit(listener: SocketListener, qemu: QemuProcess) -> ByteStream:
    got: list[ByteStream] = []
    async with anyio.create_task_group() as tg:
        async def accept() -> None:
            got.append(await listener.accept())
            tg.cancel_scope.cancel()

        async def exited() -> None:
            await qemu.exited.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(accept)
        tg.start_soon(exited)
    if not got:
        raise RawBootError(f"QEMU exited at start ({qemu.returncode}): " + " | ".join(qemu.console_tail(10)))
    return got[0]


@asynccontextmanager
async def raw_guest(image: Image, *, accel: str, extra_args: Sequence[str] = (), memory_mb: int = 512,
                    timeout: float = 180.0) -> AsyncIterator[RawGuest]:
    """Boot ``image`` with plain QEMU; yield once the agent's first byte arrived. QEMU is killed
    and the socket directory removed on the way out, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="gondolin-bench-") as tmp:
        sock = str(Path(tmp) / "control.sock")
        listener = await anyio.create_unix_listener(sock)
        qemu = QemuProcess(build_argv(raw_spec(image, sock, accel=accel, memory_mb=memory_mb,
                                               extra_args=extra_args), find_qemu()))
        stream: ByteStream | None = None
        try:
            async with anyio.create_task_group() as tg:
                try:
                    t0 = time.perf_counter()
                    qemu.start()
                    tg.start_soon(qemu.watch)
                    stream, first = await _first_byte(listener, qemu, timeout)
                    yield RawGuest(stream, first, time.perf_counter() - t0, qemu)
                finally:
                    with anyio.CancelScope(shield=True):
                        if stream is not None:
                            await stream.aclose()
                        await listener.aclose()
                        await qemu.stop()
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The console watcher never fails on its own: a group holds the caller's one error.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise


async def _first_byte(listener: SocketListener, qemu: QemuProcess, timeout: float) -> tuple[ByteStream, bytes]:
    try:
        with anyio.fail_after(timeout):
            stream = await _accept_or_exit(listener, qemu)
            try:
                return stream, await stream.receive(READ_SIZE)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                raise
    except TimeoutError:
        raise RawBootError(f"no byte from the raw guest's agent within {timeout:.0f}s: "
                           + " | ".join(qemu.console_tail(10))) from None
    except anyio.EndOfStream:
        raise RawBootError("the raw guest closed its control port at boot: "
                           + " | ".join(qemu.console_tail(10))) from None
