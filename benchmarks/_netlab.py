"""Shared pieces of the network benchmarks: a slirp baseline guest, in-guest timing, CPU clocks.

The baseline guest is the same image booted by plain QEMU with ``-netdev user`` (slirp), where
the host's loopback is 10.0.2.2. Loopback servers come from ``tests/vm/netservers.py`` and run in
a child process, so neither side shares the GIL with them. Every time is taken inside the guest
(``date +%s%N`` around the command) so both sides pay the same clock and the same exec overhead.
"""

from __future__ import annotations

import os
import resource
import traceback
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from gondolin import VM
from gondolin.images import Image

from ._raw import RawGuest, raw_guest
from ._runner import Context
from ._table import Goal, Measure, Row

MiB = 1024 * 1024
SLIRP_HOST = "10.0.2.2"  # the host's loopback as the slirp guest sees it
SLIRP_ARGS = ("-netdev", "user,id=s0", "-device", "virtio-net-pci,netdev=s0,romfile=,mac=52:54:00:12:34:56")
SLIRP_SETUP = ("ip link set lo up && ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && "
               "ip route add default via 10.0.2.2")
TIME_MARK = "T_US "


class BenchError(RuntimeError):
    """A measurement produced something other than what it should have."""


class Shell(Protocol):
    """Run a shell command in a guest; its stdout, or :class:`BenchError` on a non-zero exit."""

    async def sh(self, command: str, timeout: float = 300.0) -> str: ...

    def qemu_pid(self) -> int | None: ...


@dataclass
class VmShell:
    vm: VM

    async def sh(self, command: str, timeout: float = 300.0) -> str:
        r = await self.vm.exec(["/bin/sh", "-c", command], timeout=timeout)
        if r.exit_code != 0:
            raise BenchError(f"{command[:120]!r} exited {r.exit_code}: {r.stderr[-400:]}")
        return r.stdout

    def qemu_pid(self) -> int | None:
        return self.vm.qemu_pid


@dataclass
class RawShell:
    guest: RawGuest

    async def sh(self, command: str, timeout: float = 300.0) -> str:
        return (await self.guest.check(["/bin/sh", "-c", command], timeout)).decode(errors="replace")

    def qemu_pid(self) -> int | None:
        return self.guest.qemu_pid


@asynccontextmanager
async def slirp_guest(image: Image, accel: str) -> AsyncIterator[RawShell]:
    """The baseline: same image, plain QEMU, ``-netdev user``; eth0 configured like slirp's DHCP would."""
    async with raw_guest(image, accel=accel, extra_args=SLIRP_ARGS) as g:
        shell = RawShell(g)
        await shell.sh(SLIRP_SETUP, timeout=60)
        yield shell


def timed(command: str) -> str:
    """``command`` wrapped so the guest prints its wall time (microseconds) on a last line."""
    return f's=$(date +%s%N); {command}; rc=$?; e=$(date +%s%N); echo "{TIME_MARK}$(( (e - s) / 1000 ))"; exit $rc'


def split_timed(out: str) -> tuple[str, float]:
    """(output before the time line, seconds)."""
    head, _, tail = out.rpartition(TIME_MARK)
    try:
        return head, int(tail.strip()) / 1e6
    except ValueError:
        raise BenchError(f"no timing line in guest output: {out[-300:]!r}") from None


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def process_cpu(pid: int | None) -> float:
    """utime + stime of another process, in seconds (0 when it cannot be read)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- rows, the same way bench_core builds them ----------------------------------------------------
@dataclass
class Results:
    measures: dict[str, Measure] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)

    def note(self, key: str, text: str) -> None:
        self.notes.setdefault(key, []).append(text)

    def failed(self, ctx: Context, area: str, title: str, keys: Sequence[str], exc: BaseException) -> None:
        ctx.log(f"{area}: {title} failed:\n{''.join(traceback.format_exception(exc))}")
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        first = (str(exc).strip().splitlines() or [""])[0]
        for key in keys:
            self.errors.setdefault(key, f"{type(exc).__name__}: {first}"[:300])


@dataclass(frozen=True)
class Pair:
    what: str
    ours: str
    baseline: str | None
    baseline_what: str
    goal: Goal | None = None


def rows(area: str, res: Results, pairs: Sequence[Pair]) -> list[Row]:
    out = []
    for p in pairs:
        notes = list(res.notes.get(p.ours, []))
        baseline = res.measures.get(p.baseline) if p.baseline else None
        if p.baseline and baseline is None:
            notes.append(f"baseline failed: {res.errors.get(p.baseline, 'not measured')}")
        error = "" if p.ours in res.measures else res.errors.get(p.ours, "not measured")
        out.append(Row(area, p.what, res.measures.get(p.ours), baseline, p.baseline_what, p.goal,
                       "; ".join(notes), error))
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
