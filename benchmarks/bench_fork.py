"""Fork of a running VM against what a user would do without it: checkpoint, then resume.

| ours                                              | baseline, same run, same source VM                |
|---------------------------------------------------|---------------------------------------------------|
| vm.fork(1) -> the copy answered exec(/bin/true)   | vm.checkpoint(path) + resume() -> exec(/bin/true) |
| vm.fork(4) -> all 4 copies answered an exec       | vm.checkpoint(path) + 4 resume() at once -> each  |
|                                                   | answered an exec                                  |
| the source VM's pause during fork()               | its pause during vm.checkpoint()                  |

Every clock starts at the call and stops when the last copy's ``exec(["/bin/true"])`` returned;
closing the copies is not timed. The source is one warm-started 512 MiB VM (default options
otherwise) that keeps running for the whole module; fork and checkpoint rounds alternate, and
which side goes first alternates too, so drift in the machine's load hits both sides alike.

The pause is seen from the host: a task pings the source's agent back to back (``vm.ping()``)
while the fork or the checkpoint runs, and the longest round trip is the time the source could
not answer. It covers the whole save: while the guest's memory is streamed (the guest still
runs) the host holds its own sends back, so the pause is an upper bound on the time the guest
itself was stopped.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.lowlevel

from gondolin import VM, VMOptions

from ._runner import Context
from ._table import Measure, Row, error_row

AREA = "fork"
OPTIONS = VMOptions(memory="512M")  # the defaults otherwise (network on, rootfs cow, warm start)
COPIES = (1, 4)
IDLE_PINGS = 20
PING_GAP = 0.005  # seconds between the pinger's round trips
PING_TIMEOUT = 120.0
ROUND_TIMEOUT = 300.0  # one fork or one checkpoint round, copies closed included


class BenchError(RuntimeError):
    """A measurement produced something other than what it should have."""


@dataclass
class Samples:
    fork: dict[int, list[float]] = field(default_factory=lambda: {n: [] for n in COPIES})
    ckpt: dict[int, list[float]] = field(default_factory=lambda: {n: [] for n in COPIES})
    fork_pause: list[float] = field(default_factory=list)
    ckpt_pause: list[float] = field(default_factory=list)
    idle_ping: list[float] = field(default_factory=list)
    ckpt_size: list[float] = field(default_factory=list)


async def collect(ctx: Context) -> list[Row]:
    reps = ctx.reps(10, 1)
    s = Samples()
    error: BaseException | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="gondolin-bench-fork-") as tmp:
            async with await VM.create(OPTIONS) as source:
                ctx.machine.setdefault("accelerator", source.accel)
                await _exec_all([source])
                for _ in range(IDLE_PINGS):
                    s.idle_ping.append(await source.ping())
                ctx.log(f"fork: source VM up ({source.restored_from or 'cold boot'}, {source.boot_time:.2f}s)")
                for rep in range(reps):
                    for n in COPIES:
                        sides = [("fork", _fork), ("checkpoint", _checkpoint)]
                        if rep % 2:
                            sides.reverse()
                        for name, measure in sides:
                            with anyio.fail_after(ROUND_TIMEOUT):
                                elapsed, pause = await measure(source, n, Path(tmp), s)
                            (s.fork if name == "fork" else s.ckpt)[n].append(elapsed)
                            (s.fork_pause if name == "fork" else s.ckpt_pause).append(pause)
                        ctx.log(f"fork: rep {rep + 1}/{reps}, n={n}: fork {s.fork[n][-1]:.3f}s "
                                f"(pause {s.fork_pause[-1]:.3f}s), checkpoint + resume {s.ckpt[n][-1]:.3f}s "
                                f"(pause {s.ckpt_pause[-1]:.3f}s)")
    # A failure becomes error rows for what was not measured; cancellation passes through.
    except Exception as exc:  # noqa: BLE001
        ctx.log(f"fork: failed:\n{''.join(traceback.format_exception(exc))}")
        error = exc
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
    return rows(s, error)


def rows(s: Samples, error: BaseException | None = None) -> list[Row]:
    """The module's rows from what was measured; a row with no samples carries ``error``."""
    out: list[Row] = []
    stopped = f"stopped early: {type(error).__name__}: {error}"[:300] if error is not None else ""

    def row(what: str, ours: list[float], base: list[float], baseline_what: str, notes: list[str]) -> None:
        if not ours:
            err = RuntimeError("not measured") if error is None else error
            out.append(error_row(AREA, what, err))
            return
        if not base:
            notes.append("baseline not measured")
        out.append(Row(AREA, f"{what} (median of {len(ours)})", Measure.median_of(ours, "s"),
                       Measure.median_of(base, "s") if base else None, baseline_what,
                       note="; ".join([*notes, *([stopped] if stopped else [])])))

    size = f"; the checkpoint file is {statistics.median(s.ckpt_size):.0f} MB" if s.ckpt_size else ""
    for n in COPIES:
        what = "vm.fork(1) -> the copy answered exec(/bin/true)" if n == 1 else \
            f"vm.fork({n}) -> all {n} copies answered exec(/bin/true)"
        how = "Checkpoint.resume()" if n == 1 else f"{n} Checkpoint.resume() at once"
        row(what, s.fork[n], s.ckpt[n],
            f"vm.checkpoint(path) then {how} -> exec(/bin/true), same source VM, same run{size}",
            ["each resume checks the CRCs of the whole checkpoint file while QEMU loads it"] if n > 1 else [])
    idle = f"{statistics.median(s.idle_ping) * 1000:.1f} ms" if s.idle_ping else "not measured"
    row("source VM's pause during vm.fork(), n=1 and n=4", s.fork_pause, s.ckpt_pause,
        "its pause during vm.checkpoint(path) in the baseline rounds",
        [f"longest vm.ping() round trip to the source while the call ran, pings back to back; an idle round "
         f"trip takes {idle}; the host holds its sends back for the whole save, including the live memory "
         f"stream while the guest still runs, so this bounds the guest's own stop from above"])
    return out


# -- one round of each side --------------------------------------------------------------------
async def _fork(source: VM, n: int, tmp: Path, s: Samples) -> tuple[float, float]:
    async with _pinger(source) as pause:
        t0 = time.perf_counter()
        copies = await source.fork(n)
        try:
            await _exec_all(copies, "fork")
            elapsed = time.perf_counter() - t0
        finally:
            await _close_all(copies)
    return elapsed, pause()


async def _checkpoint(source: VM, n: int, tmp: Path, s: Samples) -> tuple[float, float]:
    path = tmp / "clone.ckpt"
    copies: list[VM] = []
    try:
        async with _pinger(source) as pause:
            t0 = time.perf_counter()
            cp = await source.checkpoint(path)
            try:
                async with anyio.create_task_group() as tg:
                    for _ in range(n):
                        tg.start_soon(_append, copies, cp.resume)
                await _exec_all(copies, "checkpoint")
                elapsed = time.perf_counter() - t0
            finally:
                await _close_all(copies)
        s.ckpt_size.append(cp.size / 1e6)
    finally:
        path.unlink(missing_ok=True)
    return elapsed, pause()


async def _append(out: list[VM], start: Callable[[], Awaitable[VM]]) -> None:
    out.append(await start())


async def _exec_all(vms: Sequence[VM], restored_from: str | None = None) -> None:
    """``exec(["/bin/true"])`` on every VM at once; each must succeed."""
    async def one(vm: VM) -> None:
        r = await vm.exec(["/bin/true"])
        if r.exit_code != 0:
            raise BenchError(f"/bin/true exited {r.exit_code} in {vm.id}")
        if restored_from is not None and vm.restored_from != restored_from:
            raise BenchError(f"{vm.id} started from {vm.restored_from!r}, expected {restored_from!r}")

    async with anyio.create_task_group() as tg:
        for vm in vms:
            tg.start_soon(one, vm)


async def _close_all(vms: Sequence[VM]) -> None:
    with anyio.CancelScope(shield=True):
        for vm in vms:
            await vm.close()


@asynccontextmanager
async def _pinger(vm: VM) -> AsyncIterator[Callable[[], float]]:
    """Ping ``vm`` back to back while the block runs; yields a function giving the longest
    round trip (including the one still in flight when the block ended)."""
    longest = 0.0
    stop = anyio.Event()

    async def loop() -> None:
        nonlocal longest
        while not stop.is_set():
            rtt = await vm.ping(timeout=PING_TIMEOUT)
            longest = max(longest, rtt)
            with anyio.move_on_after(PING_GAP):
                await stop.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(loop)
        await anyio.lowlevel.checkpoint()  # let the first ping start before the measured call
        try:
            yield lambda: longest
        finally:
            stop.set()  # the ping in flight completes, so a pause still going on is counted
