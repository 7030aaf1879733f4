"""Rows, goals and the markdown report. Pure: no VMs, no clocks, no files.

A benchmark module returns :class:`Row` objects; each pairs one of our numbers with a baseline
measured in the same run. ``ratio`` is always ours / baseline, so a time goal reads ``<= 1.2x``
and a throughput goal ``>= 0.5x``. The report embeds every row as JSON, so a run of one module
can replace that module's rows and keep the others (see :func:`merge`).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DATA_MARKER = "benchmarks-data"
_DATA_RE = re.compile(r"<!-- " + DATA_MARKER + r" (.*?) -->", re.S)
DASH = "—"
MAX_SAMPLES_LISTED = 10  # beyond this, Details shows quartiles instead of every sample


@dataclass(frozen=True)
class Measure:
    """A median (in ``unit``) and the samples it came from."""

    value: float
    unit: str
    samples: tuple[float, ...] = ()

    @classmethod
    def median_of(cls, samples: Iterable[float], unit: str) -> Measure:
        values = tuple(samples)
        if not values:
            raise ValueError("a measure needs at least one sample")
        return cls(statistics.median(values), unit, values)


@dataclass(frozen=True)
class Goal:
    """The project's target for a pair: bounds on ours / baseline and on our number. Every
    bound that is set must hold."""

    max_ratio: float | None = None  # ours / baseline at most this (times)
    min_ratio: float | None = None  # ours / baseline at least this (throughput)
    max_value: float | None = None  # ours at most this, in ours' unit
    min_value: float | None = None

    def describe(self, unit: str) -> str:
        parts = []
        if self.max_ratio is not None:
            parts.append(f"<= {self.max_ratio:g}x")
        if self.min_ratio is not None:
            parts.append(f">= {self.min_ratio:g}x")
        if self.max_value is not None:
            parts.append(f"<= {self.max_value:g} {unit}")
        if self.min_value is not None:
            parts.append(f">= {self.min_value:g} {unit}")
        return ", ".join(parts) or DASH

    def met(self, value: float, ratio: float | None) -> bool | None:
        """True/False, or None when a ratio bound cannot be judged (no baseline)."""
        checks: list[bool | None] = []
        if self.max_ratio is not None:
            checks.append(None if ratio is None else ratio <= self.max_ratio)
        if self.min_ratio is not None:
            checks.append(None if ratio is None else ratio >= self.min_ratio)
        if self.max_value is not None:
            checks.append(value <= self.max_value)
        if self.min_value is not None:
            checks.append(value >= self.min_value)
        if not checks or None in checks:
            return None
        return all(checks)


@dataclass(frozen=True)
class Row:
    """One line of the table. ``error`` replaces the numbers when the measurement failed."""

    area: str
    what: str
    ours: Measure | None = None
    baseline: Measure | None = None
    baseline_what: str = ""  # what the baseline is, for the details list
    goal: Goal | None = None
    note: str = ""
    error: str = ""

    def __post_init__(self) -> None:
        if self.ours and self.baseline and self.ours.unit != self.baseline.unit:
            raise ValueError(f"{self.what}: ours in {self.ours.unit}, baseline in {self.baseline.unit}")

    @property
    def ratio(self) -> float | None:
        if self.error or not self.ours or not self.baseline or self.baseline.value == 0:
            return None
        return self.ours.value / self.baseline.value

    @property
    def met(self) -> bool | None:
        if self.error or not self.ours or not self.goal:
            return None
        return self.goal.met(self.ours.value, self.ratio)


def error_row(area: str, what: str, exc: BaseException, goal: Goal | None = None) -> Row:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return Row(area, what, goal=goal, error=f"{type(exc).__name__}: {first}"[:300])


def fmt_number(value: float) -> str:
    """Three significant digits, no exponent for the sizes we print."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(value)))))
    return f"{value:.{digits}f}"


def fmt_measure(m: Measure | None) -> str:
    return DASH if m is None else f"{fmt_number(m.value)} {m.unit}"


def fmt_ratio(r: float | None) -> str:
    return DASH if r is None else f"{r:.2f}x"


def fmt_met(row: Row) -> str:
    if row.error:
        return "error"
    return {True: "yes", False: "**no**", None: DASH}[row.met]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: Sequence[Row]) -> str:
    lines = [
        "| area | what | ours | baseline | ratio | goal | met? |",
        "|---|---|---:|---:|---:|---|:---:|",
    ]
    for r in rows:
        ours = "error" if r.error else fmt_measure(r.ours)
        unit = r.ours.unit if r.ours else ""
        goal = r.goal.describe(unit) if r.goal else DASH
        cells = [r.area, r.what, ours, fmt_measure(r.baseline), fmt_ratio(r.ratio), goal, fmt_met(r)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def render_details(rows: Sequence[Row]) -> str:
    lines = []
    for r in rows:
        parts = []
        if r.error:
            parts.append(f"failed: `{r.error}`")
        if r.ours and r.ours.samples:
            parts.append(f"ours {_samples(r.ours)}")
        if r.baseline and r.baseline.samples:
            parts.append(f"baseline {_samples(r.baseline)}")
        if r.baseline_what:
            parts.append(f"baseline is {r.baseline_what}")
        if r.note:
            parts.append(r.note)
        if parts:
            lines.append(f"- **{r.area}: {r.what}** — " + "; ".join(parts) + ".")
    return "\n".join(lines)


def _samples(m: Measure) -> str:
    values = sorted(m.samples) if len(m.samples) > MAX_SAMPLES_LISTED else m.samples
    if len(values) > MAX_SAMPLES_LISTED:
        n = len(values)
        quart = [values[0], values[n // 4], statistics.median(values), values[(3 * n) // 4], values[-1]]
        return f"{n} samples, min/25%/50%/75%/max " + "/".join(fmt_number(v) for v in quart) + f" {m.unit}"
    return ", ".join(fmt_number(v) for v in values) + f" {m.unit}"


# -- the report: several modules' results, each with when and how it was produced ------------
@dataclass(frozen=True)
class ModuleResult:
    name: str
    rows: tuple[Row, ...]
    date: str
    command: str
    machine: Mapping[str, str] = field(default_factory=dict)


def merge(previous: Mapping[str, ModuleResult], current: Mapping[str, ModuleResult]) -> dict[str, ModuleResult]:
    """Results of this run replace a module's earlier ones; modules not run now are kept."""
    out = dict(previous)
    out.update(current)
    return out


def render_report(results: Mapping[str, ModuleResult], order: Sequence[str], current: Sequence[str]) -> str:
    """The whole docs/benchmarks.md. ``order``: module display order; ``current``: run just now."""
    names = [n for n in order if n in results] + sorted(n for n in results if n not in order)
    rows = [row for n in names for row in results[n].rows]
    latest = results[current[0]] if current else results[names[0]] if names else None
    out = [
        "# Benchmarks",
        "",
        "Pairs measured side by side in one run: each of our numbers next to a baseline from the same",
        "run on the same machine. Values are medians; ratio = ours / baseline, so for times lower is",
        "better and for throughput higher is better. A goal is the project's target for the pair: a",
        "bound on the ratio, on our number, or both (— where there is none yet). The samples behind",
        "every median are listed under Details. Regenerate with `make bench`; a module alone with",
        "`python -m benchmarks NAME` (its rows are replaced, the others kept). A new pair is a",
        "`benchmarks/bench_NAME.py` with `async def collect(ctx) -> list[Row]`.",
        "",
        render_table(rows),
        "",
    ]
    if latest is not None:
        out += ["## Machine and run", ""]
        out += [f"- {k}: {v}" for k, v in latest.machine.items()]
        out += [f"- date: {latest.date}", f"- command: `{latest.command}`"]
        out += _earlier_runs([results[n] for n in names if n not in current], latest.machine)
        out.append("")
    details = render_details(rows)
    if details:
        out += ["## Details", "", details, ""]
    out += [f"<!-- {DATA_MARKER} {dumps(results)} -->", ""]
    return "\n".join(out)


def _earlier_runs(older: Sequence[ModuleResult], latest: Mapping[str, str]) -> list[str]:
    """One line per earlier run (modules that ran together share it), with the facts of that
    run that differ from the latest one's (accelerator, load, options) below it."""
    runs: dict[tuple[str, str, str], list[ModuleResult]] = {}
    for r in older:
        runs.setdefault((r.date, r.command, json.dumps(dict(r.machine), sort_keys=True)), []).append(r)
    out = []
    for (date, command, _), group in runs.items():
        names = ", ".join(f"`{r.name}`" for r in group)
        out.append(f"- rows of {names} come from an earlier run: {date}, `{command}`")
        out += [f"  - {k}: {v}" for k, v in group[0].machine.items() if latest.get(k) != v]
    return out


def dumps(results: Mapping[str, ModuleResult]) -> str:
    data = {name: asdict(r) for name, r in results.items()}
    # "--" may not appear inside an HTML comment; JSON never needs it outside strings.
    return json.dumps(data, sort_keys=True, ensure_ascii=True).replace("--", "-\\u002d")


def loads(text: str) -> dict[str, ModuleResult]:
    """Results embedded in an earlier report; {} when there are none or they do not parse."""
    m = _DATA_RE.search(text)
    if not m:
        return {}
    try:
        data = json.loads(m.group(1))
        return {name: _result_from(name, v) for name, v in data.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}


def _measure_from(d: Any) -> Measure | None:
    if d is None:
        return None
    return Measure(float(d["value"]), str(d["unit"]), tuple(float(s) for s in d.get("samples") or ()))


def _result_from(name: str, d: Mapping[str, Any]) -> ModuleResult:
    rows = []
    for r in d["rows"]:
        goal = Goal(**r["goal"]) if r.get("goal") else None
        rows.append(Row(
            area=str(r["area"]), what=str(r["what"]), ours=_measure_from(r.get("ours")),
            baseline=_measure_from(r.get("baseline")), baseline_what=str(r.get("baseline_what", "")),
            goal=goal, note=str(r.get("note", "")), error=str(r.get("error", "")),
        ))
    machine = {str(k): str(v) for k, v in (d.get("machine") or {}).items()}
    return ModuleResult(name, tuple(rows), str(d["date"]), str(d["command"]), machine)
