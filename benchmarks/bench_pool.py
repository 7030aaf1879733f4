"""Ready sandboxes: spare VMs configured on acquire, and the configure step itself.

| ours                                                   | baseline, same run                               |
|--------------------------------------------------------|--------------------------------------------------|
| sandbox_create -> exec("true") result, tool registry,  | exec("true") through the registry on a sandbox   |
| manager with its default pool of one spare             | already running + one configure message to it    |
| VMPool.acquire(env=...) -> vm.exec(["/bin/true"])      | vm.exec(["/bin/true"]) on a running VM + one     |
|                                                        | configure message to it                          |
| the configure step alone: hand a spare its options     | a PING round trip on the same VM right after     |
| VM.create() (no pool) -> exec(["/bin/true"])           | plain QEMU -incoming of the same template file,  |
|                                                        | started -> PONG on the control port              |

Each rep waits until the pool holds a spare again (refills run between reps, not during the
timed part), so ours measures a hand-out, not a restore. Ours and the baseline alternate.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from gondolin import VM, VMPool
from gondolin.machine.launch import hand_out, resolve, shape_of, start_spare
from gondolin.machine.templates import TemplateStore
from gondolin.protocol import T
from integrations import OperatorConfig, SandboxManager, ToolRegistry

from ._runner import Context
from ._table import Goal, Measure, Row, error_row
from .bench_warm import OPTIONS, Target, _raw_restore, _warm_create

AREA = "pool"
STEP_TIMEOUT = 300.0
SETTLE = 0.3  # seconds after a spare is ready, so its refill's last work is not timed
POOLED_GOAL = Goal(max_ratio=1.2, max_value=0.25)


class BenchError(RuntimeError):
    pass


async def collect(ctx: Context) -> list[Row]:
    reps = ctx.reps(10, 2)
    rows: list[Row] = []
    for what, measure in (("sandbox_create -> first exec result through the tool registry, pool of 1", _registry),
                          ("VMPool.acquire() -> first exec", _sdk_pool),
                          ("configure step: a spare given its caller's options", _configure),
                          ("VM.create() without a pool -> first exec", _create)):
        try:
            with anyio.fail_after(STEP_TIMEOUT * 2):
                rows.append(await measure(ctx, reps))
        except Exception as exc:  # noqa: BLE001 - a failed pair becomes an error row, the run goes on
            rows.append(error_row(AREA, what, exc))
    return rows


async def _wait_spare(pool: VMPool | None) -> None:
    if pool is None:
        raise BenchError("the manager has no pool")
    with anyio.fail_after(STEP_TIMEOUT):
        while pool.ready < 1:  # noqa: ASYNC110 - polls the pool's count; no event to wait on
            await anyio.sleep(0.02)
    await anyio.sleep(SETTLE)


def _machine(vm: VM) -> Any:
    return vm._machine  # noqa: SLF001 - the baseline sends a configure message to a running VM


async def _registry(ctx: Context, reps: int) -> Row:
    async with SandboxManager(OperatorConfig(limits={"pool_size": 1}), reap=False) as manager:
        registry = ToolRegistry(manager)

        async def call(name: str, args: dict[str, Any]) -> dict[str, Any]:
            outcome = await registry.call(name, args)
            if outcome.is_error:
                raise BenchError(f"{name}: {outcome.data()}")
            return outcome.data()

        await _wait_spare(manager.pool)
        running = (await call("sandbox_create", {}))["sandbox_id"]
        await call("exec", {"sandbox_id": running, "command": "true"})
        machine = _machine(manager.get(running).vm)
        ours, execs, configures = [], [], []
        for i in range(reps):
            await _wait_spare(manager.pool)
            t0 = time.perf_counter()
            sandbox = (await call("sandbox_create", {}))["sandbox_id"]
            result = await call("exec", {"sandbox_id": sandbox, "command": "true"})
            ours.append(time.perf_counter() - t0)
            if result.get("exit_code") != 0:
                raise BenchError(f"true exited {result.get('exit_code')}")
            await call("sandbox_destroy", {"sandbox_id": sandbox})
            t0 = time.perf_counter()
            await call("exec", {"sandbox_id": running, "command": "true"})
            execs.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await machine.configure()
            configures.append(time.perf_counter() - t0)
            ctx.log(f"pool: rep {i + 1}/{reps}: create+exec {ours[-1]:.3f}s; exec {execs[-1]:.3f}s + configure "
                    f"{configures[-1]:.3f}s on a running sandbox")
        pool = manager.pool
        assert pool is not None
        served = f"{pool.handed_out} of {pool.handed_out + pool.created_directly} creates served by a spare"
    base = [e + c for e, c in zip(execs, configures, strict=True)]
    return Row(AREA, f"sandbox_create -> first exec result through the tool registry, pool of 1 (median of {reps})",
               Measure.median_of(ours, "s"), Measure.median_of(base, "s"),
               "exec('true') through the registry on a sandbox already running, plus one configure message to it "
               f"(medians: exec {Measure.median_of(execs, 's').value * 1000:.0f} ms, configure "
               f"{Measure.median_of(configures, 's').value * 1000:.0f} ms)", POOLED_GOAL,
               note=f"{served}; default sandbox (512 MiB, network on, deny-all policy)")


async def _sdk_pool(ctx: Context, reps: int) -> Row:
    ours, base = [], []
    async with VMPool(OPTIONS, size=1) as pool, await VM.create(OPTIONS) as running:
        await running.exec(["/bin/true"])
        for i in range(reps):
            await _wait_spare(pool)
            t0 = time.perf_counter()
            vm = await pool.acquire(env={"JOB": str(i)}, hostname=f"job-{i}")
            try:
                await vm.exec(["/bin/true"])
                ours.append(time.perf_counter() - t0)
            finally:
                await vm.close()
            t0 = time.perf_counter()
            await running.exec(["/bin/true"])
            await _machine(running).configure()
            base.append(time.perf_counter() - t0)
            ctx.log(f"pool: rep {i + 1}/{reps}: acquire+exec {ours[-1]:.3f}s; exec+configure {base[-1]:.3f}s")
        if pool.created_directly:
            raise BenchError(f"{pool.created_directly} acquisitions were not served by a spare")
    return Row(AREA, f"VMPool.acquire(env, hostname) -> first exec(/bin/true) (median of {reps})",
               Measure.median_of(ours, "s"), Measure.median_of(base, "s"),
               "exec(/bin/true) on a VM already running, plus one configure message to it", POOLED_GOAL)


async def _configure(ctx: Context, reps: int) -> Row:
    options, image, _accel, _shape = await shape_of(OPTIONS.replace(env={"JOB": "1"}, hostname="job"))
    ours, pings = [], []
    for i in range(reps):
        machine = await start_spare(options, image=image)
        try:
            await anyio.sleep(SETTLE)
            t0 = time.perf_counter()
            await hand_out(machine, options)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await machine.control().request(T.PING, timeout=30)
            pings.append(time.perf_counter() - t0)
        finally:
            await machine.close()
        ctx.log(f"pool: rep {i + 1}/{reps}: configure {ours[-1] * 1000:.1f} ms, ping {pings[-1] * 1000:.1f} ms")
    return Row(AREA, f"configure step: a spare given its caller's options (median of {reps})",
               Measure.median_of([x * 1000 for x in ours], "ms"),
               Measure.median_of([x * 1000 for x in pings], "ms"), "a PING round trip on the same VM right after",
               note="network and file services started with the caller's policy, then one CONFIGURE message "
                    "(clock, entropy, hostname, env, network, CA) and its reply")


async def _create(ctx: Context, reps: int) -> Row:
    target = Target(*await resolve(OPTIONS))
    async with await VM.create(OPTIONS) as vm:  # makes sure the template exists
        shape = vm.shape()
    template = TemplateStore().lookup(shape)
    if template is None:
        raise BenchError("no template was saved for the benchmark shape")
    source = template.boot_source().restore_source()
    ours, raw = [], []
    for i in range(reps):
        ours.append(await _warm_create())
        raw.append(await _raw_restore(target, source))
        ctx.log(f"pool: rep {i + 1}/{reps}: VM.create+exec {ours[-1]:.3f}s, raw restore {raw[-1]:.3f}s")
    return Row(AREA, f"VM.create() without a pool -> first exec (median of {reps})", Measure.median_of(ours, "s"),
               Measure.median_of(raw, "s"),
               "plain QEMU -incoming of the same template file, started -> PONG on the control port",
               Goal(max_ratio=1.5))
