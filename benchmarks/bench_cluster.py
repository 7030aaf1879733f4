"""Sandboxes through Ray against the same calls in-process, on a local two-node Ray cluster.

| ours (gondolin.cluster, local 2-node Ray cluster)  | baseline, same run                               |
|----------------------------------------------------|--------------------------------------------------|
| cluster.create() -> first exec(/bin/true)          | VM.create() -> first exec(/bin/true), this process |
| exec(/bin/true) round trip on a cluster sandbox    | the same exec on a VM of this process            |
| sandboxes started per minute: SLOTS at once, each  | SLOTS VM.create() at once in this process, each  |
| to its first exec                                  | to its first exec                                |

Both sides use the same options (512 MiB, warm start from the image's template) and every
node runs on this machine, so the difference is what Ray adds: a new actor process per sandbox
(its Python starts and imports gondolin), the actor call per operation, and the scheduling.
Sides alternate, and which goes first alternates too. Closing is not timed.
"""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from gondolin import VM, VMOptions

from ._runner import Context
from ._table import Measure, Row, error_row

AREA = "cluster"
OPTIONS = VMOptions(memory="512M")
NODES = 2
SLOTS_PER_NODE = 2
EXECS = 50  # round trips per sample
ROUND_TIMEOUT = 300.0


@dataclass
class Samples:
    create: list[float] = field(default_factory=list)
    create_local: list[float] = field(default_factory=list)
    rtt: list[float] = field(default_factory=list)
    rtt_local: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    rate_local: list[float] = field(default_factory=list)


async def collect(ctx: Context) -> list[Row]:
    try:
        import ray
        from ray.cluster_utils import Cluster as RayCluster

        import gondolin.cluster as gc
    except ImportError as exc:
        return [error_row(AREA, "the whole module", exc)]
    reps = ctx.reps(5, 1)
    s = Samples()
    error: BaseException | None = None
    node = {"num_cpus": 2, "resources": {gc.VM_RESOURCE: SLOTS_PER_NODE}, "object_store_memory": 300 << 20}
    local = RayCluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        for _ in range(NODES - 1):
            local.add_node(**node)
        local.wait_for_nodes()
        cluster = gc.connect(local.address)
        ctx.log(f"cluster: {NODES} Ray nodes up at {local.address}")
        await cluster.prepare(OPTIONS)
        for rep in range(reps):
            sides: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("cluster", lambda: _one(cluster.create, s.create, s.rtt)),
                ("local", lambda: _one(VM.create, s.create_local, s.rtt_local)),
            ]
            if rep % 2:
                sides.reverse()
            for _name, measure in sides:
                with anyio.fail_after(ROUND_TIMEOUT):
                    await measure()
            ctx.log(f"cluster: rep {rep + 1}/{reps}: create {s.create[-1]:.2f}s vs {s.create_local[-1]:.2f}s, "
                    f"exec {s.rtt[-1] * 1000:.1f} ms vs {s.rtt_local[-1] * 1000:.1f} ms")
        slots = NODES * SLOTS_PER_NODE
        for rep in range(max(1, reps // 2)):
            pair = [("cluster", cluster.create, s.rate), ("local", VM.create, s.rate_local)]
            if rep % 2:
                pair.reverse()
            for _name, create, out in pair:
                with anyio.fail_after(ROUND_TIMEOUT):
                    out.append(await _rate(create, slots))
            ctx.log(f"cluster: {slots} at once: {s.rate[-1]:.1f}/min vs {s.rate_local[-1]:.1f}/min in-process")
    # A failure becomes error rows for what was not measured; cancellation passes through.
    except Exception as exc:  # noqa: BLE001
        ctx.log(f"cluster: failed:\n{''.join(traceback.format_exception(exc))}")
        error = exc
    finally:
        ray.shutdown()
        local.shutdown()
    return rows(s, error)


async def _one(create: Callable[..., Awaitable[Any]], created: list[float], rtts: list[float]) -> None:
    t0 = time.perf_counter()
    vm = await create(OPTIONS)
    try:
        await vm.exec(["/bin/true"])
        created.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        for _ in range(EXECS):
            await vm.exec(["/bin/true"])
        rtts.append((time.perf_counter() - t1) / EXECS)
    finally:
        with anyio.CancelScope(shield=True):
            await vm.close()


async def _rate(create: Callable[..., Awaitable[Any]], n: int) -> float:
    """Sandboxes per minute when ``n`` start at once, each to its first exec."""
    vms: list[Any] = []

    async def one() -> None:
        vm = await create(OPTIONS)
        vms.append(vm)
        await vm.exec(["/bin/true"])

    t0 = time.perf_counter()
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
        return n / (time.perf_counter() - t0) * 60
    finally:
        with anyio.CancelScope(shield=True):
            for vm in vms:
                await vm.close()


def rows(s: Samples, error: BaseException | None = None) -> list[Row]:
    out: list[Row] = []
    stopped = f"stopped early: {type(error).__name__}: {error}"[:300] if error is not None else ""

    def row(what: str, ours: list[float], base: list[float], unit: str, baseline_what: str, note: str) -> None:
        if not ours:
            out.append(error_row(AREA, what, error or RuntimeError("not measured")))
            return
        out.append(Row(AREA, f"{what} (median of {len(ours)})", Measure.median_of(ours, unit),
                       Measure.median_of(base, unit) if base else None, baseline_what,
                       note="; ".join(n for n in (note, stopped) if n)))

    where = f"local Ray cluster of {NODES} nodes on this machine, {SLOTS_PER_NODE} gondolin_vm slots each"
    row("cluster.create() -> first exec(/bin/true)", s.create, s.create_local, "s",
        "VM.create() -> first exec(/bin/true) in this process, same options, same run",
        f"{where}; includes starting the sandbox's actor process; warm templates on every node (prepare)")
    row("exec(/bin/true) round trip on a cluster sandbox", [x * 1000 for x in s.rtt],
        [x * 1000 for x in s.rtt_local], "ms", "the same exec on a VM in this process",
        f"{where}; mean of {EXECS} back-to-back execs per sample")
    slots = NODES * SLOTS_PER_NODE
    row(f"sandboxes started per minute, {slots} at once to their first exec", s.rate, s.rate_local, "/min",
        f"{slots} VM.create() at once in this process, each to its first exec",
        f"{where}; higher is better; on one 2-core machine both sides share the same CPUs"
        + (f"; samples {', '.join(f'{r:.0f}' for r in s.rate)}" if len(s.rate) > 1 else "")
        + (f" (median {statistics.median(s.rate):.0f})" if len(s.rate) > 2 else ""))
    return out
