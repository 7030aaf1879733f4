"""The benchmark report: formatting, goals, merging runs. No VMs, no timings asserted."""

from __future__ import annotations

import re

import pytest

from benchmarks import (
    Context,
    Goal,
    Measure,
    ModuleResult,
    Row,
    available,
    render_report,
    render_table,
)
from benchmarks._table import MAX_SAMPLES_LISTED, fmt_number, loads, merge, render_details


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0"), (5.2357, "5.24"), (44.222, "44.2"), (225.4, "225"), (1234.5, "1234"), (0.01234, "0.0123")],
)
def test_three_significant_digits(value: float, text: str) -> None:
    assert fmt_number(value) == text


@pytest.mark.parametrize(
    ("goal", "value", "ratio", "met", "described"),
    [
        (Goal(max_ratio=1.2), 6.0, 1.1, True, "<= 1.2x"),
        (Goal(max_ratio=1.2), 6.0, 1.3, False, "<= 1.2x"),
        (Goal(min_ratio=0.5), 40.0, 0.4, False, ">= 0.5x"),
        (Goal(min_ratio=0.5), 40.0, 0.6, True, ">= 0.5x"),
        (Goal(max_value=50), 7.2, None, True, "<= 50 MB"),
        (Goal(max_value=50), 51.0, None, False, "<= 50 MB"),
        (Goal(max_ratio=1.5, max_value=0.25), 0.3, 1.1, False, "<= 1.5x, <= 0.25 MB"),
        (Goal(max_ratio=1.2), 6.0, None, None, "<= 1.2x"),  # no baseline: cannot judge
    ],
)
def test_goal(goal: Goal, value: float, ratio: float | None, met: bool | None, described: str) -> None:
    assert goal.met(value, ratio) is met
    assert goal.describe("MB") == described


def _cells(table: str, what: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) > 1 and cells[1] == what:
            return cells
    raise AssertionError(f"no row {what!r} in\n{table}")


ROWS = [
    Row("core", "boot", Measure(6.0, "s"), Measure(5.0, "s"), goal=Goal(max_ratio=1.3)),
    Row("core", "exec", Measure(44.0, "ms"), Measure(32.0, "ms"), goal=Goal(max_ratio=1.2)),
    Row("core", "copy", Measure(22.0, "MiB/s"), Measure(88.0, "MiB/s")),
    Row("core", "memory", Measure(7.25, "MB"), goal=Goal(max_value=50)),
    Row("core", "broken", goal=Goal(max_ratio=1.2), error="VMStartError: no answer"),
    Row("net", "a|b", Measure(1.0, "s"), Measure(0.0, "s")),
]


@pytest.mark.parametrize(
    ("what", "expected"),
    [
        ("boot", ["core", "boot", "6.00 s", "5.00 s", "1.20x", "<= 1.3x", "yes"]),
        ("exec", ["core", "exec", "44.0 ms", "32.0 ms", "1.38x", "<= 1.2x", "**no**"]),
        ("copy", ["core", "copy", "22.0 MiB/s", "88.0 MiB/s", "0.25x", "—", "—"]),
        ("memory", ["core", "memory", "7.25 MB", "—", "—", "<= 50 MB", "yes"]),
        ("broken", ["core", "broken", "error", "—", "—", "<= 1.2x", "error"]),
        ("a\\|b", ["net", "a\\|b", "1.00 s", "0 s", "—", "—", "—"]),  # pipe escaped; zero baseline
    ],
)
def test_table_rows(what: str, expected: list[str]) -> None:
    table = render_table(ROWS)
    assert table.splitlines()[0] == "| area | what | ours | baseline | ratio | goal | met? |"
    assert _cells(table, what) == expected


def test_units_of_a_pair_must_agree() -> None:
    with pytest.raises(ValueError, match="unit|ms"):
        Row("core", "x", Measure(1.0, "s"), Measure(1.0, "ms"))


def test_details_list_samples_and_summarise_long_ones() -> None:
    few = Row("core", "few", Measure.median_of([3.0, 1.0, 2.0], "s"), baseline_what="plain QEMU")
    many = Row("core", "many", Measure.median_of(range(1, 51), "ms"))
    text = render_details([few, many, ROWS[4]])
    assert "ours 3.00, 1.00, 2.00 s" in text and "baseline is plain QEMU" in text
    assert MAX_SAMPLES_LISTED < 50
    assert "50 samples, min/25%/50%/75%/max 1.00/13.0/25.5/38.0/50.0 ms" in text
    assert "failed: `VMStartError: no answer`" in text


def _result(name: str, rows: list[Row], command: str = "python -m benchmarks") -> ModuleResult:
    return ModuleResult(name, tuple(rows), "2026-01-01 00:00 UTC", command, {"cores": "2"})


def test_report_round_trips_and_merges_runs() -> None:
    old = {"core": _result("core", ROWS[:2]), "net": _result("net", ROWS[5:])}
    first = render_report(old, ["core", "net"], ["core", "net"])
    assert loads(first) == old
    # A later `python -m benchmarks core --quick` replaces core's rows and keeps net's.
    newer = {"core": _result("core", ROWS[2:4], "python -m benchmarks core --quick")}
    merged = merge(loads(first), newer)
    text = render_report(merged, ["core", "net"], ["core"])
    table = text.split("## Machine")[0]
    assert "boot" not in table and "| copy |" in table and "a\\|b" in table
    assert "rows of `net` come from an earlier run" in text
    assert "  - cores" not in text  # the earlier run's facts are listed only where they differ
    assert "- command: `python -m benchmarks core --quick`" in text
    comment = text[text.index("<!-- benchmarks-data"):]
    assert "--" not in comment[4:-5]  # an HTML comment may not contain "--"
    assert loads(text) == merged


def test_unparsable_embedded_data_is_ignored() -> None:
    assert loads("<!-- benchmarks-data {not json} -->") == {}
    assert loads("no data here") == {}


def test_core_module_is_listed_first() -> None:
    mods = available()
    assert next(iter(mods)) == "core"
    assert mods["core"] == "benchmarks.bench_core"


def test_core_rows_from_partial_results() -> None:
    from benchmarks.bench_core import Results, _failed, _rows

    res = Results()
    res.measures["exec"] = Measure(44.0, "ms")
    res.measures["h2g"] = Measure(22.0, "MiB/s")
    logged: list[str] = []
    ctx = Context(_out=logged.append)
    _failed(ctx, res, "9p guest", ("9p_h2g",), ExceptionGroup("g", [RuntimeError("no virtfs\nmore")]))
    rows = {r.what.split(",")[0].split(" (")[0]: r for r in _rows(res, 3, 50)}
    exec_row = rows['exec(["/bin/true"]) round trip']
    assert not exec_row.error and exec_row.baseline is None and exec_row.met is None
    assert "baseline failed: not measured" in exec_row.note
    copy = rows["copy 64 MiB host -> guest /tmp"]
    assert copy.ours == Measure(22.0, "MiB/s") and "baseline failed: RuntimeError: no virtfs" in copy.note
    assert rows["cold create -> first exec"].error == "not measured"
    assert logged and "no virtfs" in logged[0]


async def collect(ctx: Context) -> list[Row]:
    """This test module doubles as a benchmark module for the runner test below."""
    ctx.machine["accelerator"] = "fake"
    return [ROWS[0]]


def test_runner_keeps_going_when_a_module_breaks() -> None:
    import anyio

    from benchmarks._runner import run_modules

    logged: list[str] = []
    mods = {"good": __name__, "broken": "benchmarks._table", "missing": "benchmarks.bench_does_not_exist"}
    results = anyio.run(run_modules, [], Context(_out=logged.append), mods)
    assert list(results) == ["good", "broken", "missing"]
    assert results["good"].rows == (ROWS[0],) and results["good"].machine["accelerator"] == "fake"
    assert "cores" in results["good"].machine["highest 1-min load average during the run"]
    assert results["broken"].rows[0].error.startswith("TypeError: benchmarks._table has no collect")
    assert results["missing"].rows[0].error.startswith("ModuleNotFoundError")
    assert any("module broken failed" in line for line in logged)
    with pytest.raises(SystemExit, match="unknown benchmark module"):
        anyio.run(run_modules, ["nope"], Context(_out=logged.append), mods)


def test_report_stands_on_its_own() -> None:
    text = render_report({"core": _result("core", ROWS[:2])}, ["core"], ["core"])
    assert "DESIGN" not in text and "§" not in text and not re.search(r"issue \d", text, re.I)


def test_fork_rows_pair_each_fork_with_checkpoint_and_resume() -> None:
    from benchmarks.bench_fork import Samples, rows

    s = Samples()
    s.fork[1] += [0.5, 0.7, 0.6]
    s.ckpt[1] += [1.0, 1.4, 1.2]
    s.fork_pause += [0.2, 0.3]
    s.ckpt_pause += [0.25, 0.35]
    s.idle_ping += [0.001]
    s.ckpt_size += [92.0]
    out = {r.what.split(" (median")[0]: r for r in rows(s, RuntimeError("QEMU died\nmore"))}
    one = out["vm.fork(1) -> the copy answered exec(/bin/true)"]
    assert one.ours == Measure(0.6, "s", (0.5, 0.7, 0.6)) and one.baseline is not None
    assert one.ratio == pytest.approx(0.5) and "(median of 3)" in one.what
    assert "Checkpoint.resume()" in one.baseline_what and "92 MB" in one.baseline_what
    assert "stopped early: RuntimeError: QEMU died" in one.note
    assert out["vm.fork(4) -> all 4 copies answered exec(/bin/true)"].error == "RuntimeError: QEMU died"
    pause = out["source VM's pause during vm.fork(), n=1 and n=4"]
    assert pause.ours is not None and pause.ours.value == pytest.approx(0.25) and "1.0 ms" in pause.note


def test_earlier_runs_are_grouped_with_the_facts_that_differ() -> None:
    def with_machine(name: str, machine: dict[str, str]) -> ModuleResult:
        return ModuleResult(name, (ROWS[0],), "2026-01-01 00:00 UTC", "python -m benchmarks", machine)

    old = {"core": with_machine("core", {"cores": "2", "accelerator": "tcg (no KVM)"}),
           "net": with_machine("net", {"cores": "2", "accelerator": "tcg (no KVM)"})}
    now = {"warm": ModuleResult("warm", (ROWS[1],), "2026-02-01 00:00 UTC", "python -m benchmarks warm",
                                {"cores": "2", "accelerator": "tcg"})}
    text = render_report(merge(old, now), ["core", "net", "warm"], ["warm"])
    assert "- rows of `core`, `net` come from an earlier run: 2026-01-01 00:00 UTC" in text
    assert "  - accelerator: tcg (no KVM)" in text and "  - cores" not in text
