"""Side-by-side benchmarks against baselines measured in the same run; writes docs/benchmarks.md.

Run ``make bench`` or ``python -m benchmarks [MODULE ...]`` from the repository root. Each
``bench_<name>.py`` module returns :class:`Row` objects from ``async def collect(ctx)``.
"""

from ._runner import Context, available, main
from ._table import Goal, Measure, ModuleResult, Row, error_row, render_report, render_table

__all__ = [
    "Context",
    "Goal",
    "Measure",
    "ModuleResult",
    "Row",
    "available",
    "error_row",
    "main",
    "render_report",
    "render_table",
]
