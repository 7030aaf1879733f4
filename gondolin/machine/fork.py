"""Fork: copies of a running machine, each with the memory, processes and disk the source had
at that moment. The source keeps running.

The source's memory is streamed to a file in its run directory (a live QEMU migration, as for a
template) and its disk overlay copied while it is stopped; each copy then restores from those
files like a warm restore, and gets its own entropy, clock, generation id, network stack and
host connection from the configure message. The files are deleted once every copy has loaded them.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from .._log import get_logger
from ..errors import GondolinError, VMClosedError
from .boot import ForkClone
from .checkpoint import CheckpointError, virtiofs_unplugged
from .machine import Machine
from .state import Section, save_running_vm
from .templates import DISK, MEMORY, memory_command

log = get_logger("vm")
MAX_FORKS = 64  # copies one call may make


@dataclass(frozen=True)
class ForkStats:
    save_seconds: float  # the source was busy (and stopped for part of it)
    start_seconds: float  # from the saved state until every copy answered
    memory_bytes: int


async def fork_machine(source: Machine, n: int,
                       start: Callable[[ForkClone], Awaitable[Machine]]) -> tuple[list[Machine], ForkStats]:
    """Save ``source``'s state and start ``n`` machines from it with ``start`` (which must also
    configure them). If any copy fails to start, the others are closed and the error raised."""
    if not 1 <= n <= MAX_FORKS:
        raise ValueError(f"n must be between 1 and {MAX_FORKS}")
    if source.run_dir is None or not source.running:
        raise VMClosedError("only a running VM can be forked")
    unmigratable = source.unmigratable()
    if unmigratable is not None:
        raise CheckpointError(f"cannot fork: {unmigratable}", code="checkpoint_unsupported")
    state_dir = Path(tempfile.mkdtemp(prefix="fork-", dir=source.run_dir))
    try:
        t0 = time.monotonic()
        memory = state_dir / MEMORY
        overlay = source.disk_overlay
        disk = state_dir / DISK if overlay is not None else None

        file_state = None

        async def copy_disk() -> None:
            nonlocal file_state
            if overlay is not None and disk is not None:
                await anyio.to_thread.run_sync(shutil.copyfile, overlay, disk)
            file_state = await source.file_hand_over()  # the copies keep the guest's open files on mounts

        async with source.state_lock, virtiofs_unplugged(source, "fork"), source.health_paused():
            with source.recording_file_session():
                stats = await save_running_vm(await source.qmp(), source.quiesced, memory_command(memory), memory,
                                              copy_disk)
        saved = time.monotonic()
        clone = ForkClone(Section(memory), Section(disk) if disk is not None else None, source.id, file_state)
        started: list[Machine] = []
        failures: list[BaseException] = []

        async def one() -> None:
            try:
                started.append(await start(clone))
            except GondolinError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
        if failures:
            with anyio.CancelScope(shield=True):
                for machine in started:
                    await machine.close(raise_failure=False)
            raise failures[0]
        done = time.monotonic()
        log.debug("forked vm %s into %d copies: save %.3fs, start %.3fs", source.id, n, saved - t0, done - saved)
        return started, ForkStats(saved - t0, done - saved, stats.memory_bytes)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


__all__ = ["MAX_FORKS", "ForkStats", "fork_machine"]
