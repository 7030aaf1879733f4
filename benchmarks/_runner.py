"""Find the benchmark modules, run the selected ones, merge their rows into the report.

A benchmark module is ``benchmarks/bench_<name>.py`` exposing ``async def collect(ctx) -> list[Row]``.
``python -m benchmarks core net`` runs ``bench_core`` and ``bench_net``; without names every
module runs. Rows of modules not run this time are kept from the existing report.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Protocol, cast

import anyio

from . import _table
from ._table import ModuleResult, Row, error_row

PREFIX = "bench_"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "docs" / "benchmarks.md"


@dataclass
class Context:
    """What a benchmark module gets: options, a progress logger, and a place for machine facts."""

    quick: bool = False  # fewer repetitions: check that the harness works, not the numbers
    reps_override: int | None = None  # --reps: repetitions of each boot / copy measurement
    machine: dict[str, str] = field(default_factory=dict)
    _out: Callable[[str], None] = field(default=lambda s: print(s, file=sys.stderr, flush=True))

    def reps(self, full: int, quick: int = 1) -> int:
        if self.reps_override is not None:
            return self.reps_override
        return quick if self.quick else full

    def log(self, message: str) -> None:
        self._out(f"[bench {time.strftime('%H:%M:%S')}] {message}")


class BenchModule(Protocol):
    collect: Callable[[Context], Awaitable[list[Row]]]


def available() -> dict[str, str]:
    """Module short names -> import paths, in table order: core first, then alphabetical."""
    pkg_dir = str(Path(__file__).parent)
    names = sorted(i.name[len(PREFIX):] for i in pkgutil.iter_modules([pkg_dir]) if i.name.startswith(PREFIX))
    names.sort(key=lambda n: n != "core")
    return {n: f"{__package__}.{PREFIX}{n}" for n in names}


def load(module_path: str) -> BenchModule:
    mod: ModuleType = importlib.import_module(module_path)
    if not callable(getattr(mod, "collect", None)):
        raise TypeError(f"{module_path} has no collect(ctx) function")
    return cast(BenchModule, mod)


def machine_info() -> dict[str, str]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cores": f"{os.cpu_count()}" + (f" ({model})" if model else "")}
    from gondolin import GondolinError
    from gondolin.qemu.accel import qemu_version
    from gondolin.qemu.process import find_qemu

    try:
        info["QEMU"] = qemu_version(find_qemu())
    except GondolinError as exc:
        info["QEMU"] = f"not found ({exc.message})"
    info["host"] = f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    return info


LOAD_POLL = 5.0  # seconds between samples of the 1-minute load average during a run


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


class LoadWatch:
    """The highest 1-minute load average seen while the modules run: other work on the machine
    (other test runs, builds) slows both sides of a pair, but not always alike."""

    def __init__(self) -> None:
        self.highest: float | None = None

    def sample(self) -> None:
        try:
            one = float(_loadavg().split()[0])
        except (ValueError, IndexError):
            return
        self.highest = one if self.highest is None else max(self.highest, one)

    async def run(self) -> None:
        while True:
            self.sample()
            await anyio.sleep(LOAD_POLL)

    def describe(self) -> str:
        cores = os.cpu_count() or 0
        if self.highest is None:
            return "unknown"
        busy = (" (more runnable work than cores, other jobs included: timings are noisy, compare each pair's "
                "ratio rather than absolute times)" if cores and self.highest > cores else "")
        return f"{self.highest:.2f} on {cores} cores{busy}"


async def run_modules(names: Sequence[str], ctx: Context,
                      modules: Mapping[str, str] | None = None) -> dict[str, ModuleResult]:
    """Run the named modules (all when empty) of ``modules`` (default: :func:`available`)."""
    mods = dict(available() if modules is None else modules)
    unknown = [n for n in names if n not in mods]
    if unknown:
        raise SystemExit(f"unknown benchmark module(s): {', '.join(unknown)}; available: {', '.join(mods)}")
    selected = list(names) or list(mods)
    command = f"python -m benchmarks {shlex.join(sys.argv[1:])}".strip()
    ctx.machine.update(machine_info())
    load_start = _loadavg()
    watch = LoadWatch()
    results: dict[str, ModuleResult] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.run)
        for name in selected:
            ctx.log(f"module {name}")
            started = time.monotonic()
            try:
                rows = await load(mods[name]).collect(ctx)
            # One broken module (an import error, a bug) must not cost the other modules' results.
            # Cancellation and Ctrl-C are BaseExceptions and pass through.
            except Exception as exc:  # noqa: BLE001
                ctx.log(f"module {name} failed:\n{''.join(traceback.format_exception(exc))}")
                rows = [error_row(name, "the whole module", exc)]
            ctx.log(f"module {name} done in {time.monotonic() - started:.0f}s")
            results[name] = ModuleResult(name, tuple(rows), "", command)
        tg.cancel_scope.cancel()
    watch.sample()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    ctx.machine["load average (1/5/15 min) at start, end"] = f"{load_start}; {_loadavg()}"
    ctx.machine["highest 1-min load average during the run"] = watch.describe()
    return {n: ModuleResult(n, r.rows, date, command, dict(ctx.machine)) for n, r in results.items()}


def write_report(current: dict[str, ModuleResult], output: Path | None) -> str:
    previous: dict[str, ModuleResult] = {}
    if output is not None and output.exists():
        previous = _table.loads(output.read_text())
    results = _table.merge(previous, current)
    text = _table.render_report(results, list(available()), list(current))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, output)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="modules to run (default: all); see --list")
    parser.add_argument("--list", action="store_true", help="list the benchmark modules and exit")
    parser.add_argument("--quick", action="store_true", help="one repetition each: checks the harness, not the numbers")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of each boot and copy (default 3)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"report file (default {DEFAULT_OUTPUT})")
    parser.add_argument("--no-write", action="store_true", help="print the report, do not write it")
    args = parser.parse_args(argv)
    if args.list:
        for name, path in available().items():
            print(f"{name}\t{path}")
        return 0
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    ctx = Context(quick=args.quick, reps_override=args.reps)
    current = anyio.run(run_modules, args.modules, ctx)
    text = write_report(current, None if args.no_write else args.output)
    print(text)
    if not args.no_write:
        ctx.log(f"wrote {args.output}")
    failed = [r for res in current.values() for r in res.rows if r.error]
    return 1 if failed else 0
