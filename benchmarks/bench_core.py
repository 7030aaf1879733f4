"""Core runtime pairs: boot, exec round trip, file copy, host memory.

| ours                                         | baseline, same run                                  |
|----------------------------------------------|-----------------------------------------------------|
| cold VM.create + exec(["/bin/true"])         | plain QEMU, same argv, to the agent's first byte    |
| exec(["/bin/true"]) round trip, warm VM      | os.fork + os.execv + os.waitpid inside the guest    |
| vm.fs upload / download of 64 MiB (/tmp)     | the same copy through QEMU's virtio-9p (-virtfs)    |
| the same on a virtiofs VM (staged copies)     | the same 9p copy                                    |
| host RSS per idle VM, QEMU excluded          | (absolute goal, no baseline)                        |

Stages: (1) a warm VM and a raw QEMU guest with a 9p share, both up, while blocks of exec round
trips alternate with in-guest fork+exec blocks and each copy alternates with its 9p twin;
(2) cold boots, raw / readonly / cow in turn; (3) memory, in a fresh process that boots its VMs
together. Interleaving makes drift in the machine's load hit both sides of a pair alike.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from gondolin import VM
from gondolin.images import Image, ImageStore, ensure_image
from gondolin.machine.launch import probe_boot
from gondolin.qemu import accel as _accel
from gondolin.vfs import MemoryProvider

from ._raw import RawGuest, cold_kwargs, process_cpu_seconds, raw_guest
from ._runner import REPO, Context
from ._table import Goal, Measure, Row

AREA = "core"
MiB = 1024 * 1024
COPY_SIZE = 64 * MiB
COPY_BLOCK = 4 * MiB  # host writes the test file in blocks of this size
EXEC_ROUNDS = 50
EXEC_WARMUP = 5
EXEC_BLOCK = 10  # host round trips and in-guest fork+execs alternate in blocks of this many
MEMORY_VMS = 3
STAGE_TIMEOUT = 600.0  # one stage (all repetitions of one pair)
NINEP_TAG = "benchfs"
NINEP_MOUNT = "/tmp/9p"

# In-guest baseline for the exec round trip (runs under the guest's python3).
FORK_EXEC_SCRIPT = """
import json, os, sys, time
n, warm = int(sys.argv[1]), 2
out = []
for i in range(n + warm):
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execv("/bin/true", ["/bin/true"])
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        sys.exit("/bin/true failed: status %d" % status)
    if i >= warm:
        out.append(time.perf_counter() - t)
print(json.dumps(out))
"""

# In-guest copy for the 9p baseline: plain read/write of 1 MiB blocks, timed in the guest.
COPY_SCRIPT = """
import json, os, sys, time
src, dst, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
buf = bytearray(1 << 20)
view = memoryview(buf)
times = []
for _ in range(reps):
    try:
        os.unlink(dst)
    except FileNotFoundError:
        pass
    total = 0
    t = time.perf_counter()
    with open(src, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as g:
        while n := f.readinto(buf):
            done = 0
            while done < n:
                done += g.write(view[done:n])
            total += n
    times.append(time.perf_counter() - t)
print(json.dumps({"seconds": times, "bytes": total}))
"""


class BenchError(RuntimeError):
    """A measurement produced something other than what it should have."""


@dataclass
class Results:
    measures: dict[str, Measure] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)

    def note(self, key: str, text: str) -> None:
        self.notes.setdefault(key, []).append(text)


@dataclass(frozen=True)
class Pair:
    what: str
    ours: str  # key into Results.measures
    baseline: str | None
    baseline_what: str
    goal: Goal | None


def pairs(cold_reps: int, exec_rounds: int) -> list[Pair]:
    raw = ("plain QEMU started with the argv VM.create(rootfs='readonly', network=False) builds (no QMP), "
           f"timed to the agent's first byte on the control port (median of {cold_reps})")
    return [
        Pair(f"cold create -> first exec, rootfs=readonly, network=False: the baseline's machine (median of {cold_reps})",
             "cold_ro", "raw_boot", raw, Goal(max_ratio=1.2)),
        Pair(f"cold create -> first exec, default options: cow disk, network on (median of {cold_reps})",
             "cold_default", "raw_boot", raw, Goal(max_ratio=1.2)),
        Pair(f"exec([\"/bin/true\"]) round trip, warm VM (median of {exec_rounds})", "exec", "fork",
             f"os.fork + os.execv('/bin/true') + os.waitpid timed inside the guest by python3 (median of {exec_rounds})",
             Goal(max_ratio=1.2)),
        Pair("copy 64 MiB host -> guest /tmp, vm.fs.upload", "h2g", "9p_h2g",
             "the same copy inside the guest from a virtio-9p mount (msize=512000) to /tmp, timed in the guest",
             None),
        Pair("copy 64 MiB guest /tmp -> host, vm.fs.download", "g2h", "9p_g2h",
             "the same copy inside the guest from /tmp to a virtio-9p mount, timed in the guest", None),
        Pair("virtiofs VM: copy 64 MiB host -> guest /tmp, vm.fs.upload (staged through the device)", "h2g_vfs",
             "9p_h2g", "the same copy inside the guest from a virtio-9p mount (msize=512000) to /tmp, timed in the guest",
             Goal(min_ratio=0.5)),
        Pair("virtiofs VM: copy 64 MiB guest /tmp -> host, vm.fs.download (staged through the device)", "g2h_vfs",
             "9p_g2h", "the same copy inside the guest from /tmp to a virtio-9p mount, timed in the guest",
             Goal(min_ratio=0.5)),
        Pair(f"host process memory per idle VM, QEMU excluded ({MEMORY_VMS} VMs)", "memory", None, "", Goal(max_value=50)),
    ]


async def collect(ctx: Context) -> list[Row]:
    res = Results()
    cold_reps = ctx.reps(3)
    exec_rounds = 10 if ctx.quick else EXEC_ROUNDS
    with tempfile.TemporaryDirectory(prefix="gondolin-bench-") as tmp:
        stages: list[tuple[str, tuple[str, ...], Callable[[Setup], Awaitable[None]]]] = [
            ("warm VM next to a raw 9p guest: exec round trip and 64 MiB copies",
             ("exec", "fork", "h2g", "g2h", "9p_h2g", "9p_g2h", "h2g_vfs", "g2h_vfs"),
             lambda s: _warm_stage(ctx, res, s, exec_rounds)),
            ("cold create vs raw QEMU boot", ("cold_ro", "cold_default", "raw_boot"),
             lambda s: _cold_stage(ctx, res, s, cold_reps)),
            ("host memory per idle VM", ("memory",), lambda s: _memory_stage(ctx, res, s)),
        ]
        try:
            setup = await _setup(ctx, Path(tmp))
        except Exception as exc:  # noqa: BLE001 - reported as error rows; cancellation passes
            _failed(ctx, res, "setup", [k for _, keys, _ in stages for k in keys], exc)
            return _rows(res, cold_reps, exec_rounds)
        for title, keys, stage in stages:
            ctx.log(f"core: {title}")
            try:
                with anyio.fail_after(STAGE_TIMEOUT):
                    await stage(setup)
            # A failed stage becomes error rows and the other stages still run. Cancellation is a
            # BaseException and passes through.
            except Exception as exc:  # noqa: BLE001
                _failed(ctx, res, title, keys, exc)
    return _rows(res, cold_reps, exec_rounds)


def _failed(ctx: Context, res: Results, title: str, keys: Sequence[str], exc: BaseException) -> None:
    ctx.log(f"core: {title} failed:\n{''.join(traceback.format_exception(exc))}")
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    first = (str(exc).strip().splitlines() or [""])[0]
    for key in keys:
        res.errors.setdefault(key, f"{type(exc).__name__}: {first}"[:300])


def _rows(res: Results, cold_reps: int, exec_rounds: int) -> list[Row]:
    rows = []
    for p in pairs(cold_reps, exec_rounds):
        notes = list(res.notes.get(p.ours, []))
        baseline = res.measures.get(p.baseline) if p.baseline else None
        if p.baseline and baseline is None:
            notes.append(f"baseline failed: {res.errors.get(p.baseline, 'not measured')}")
        error = "" if p.ours in res.measures else res.errors.get(p.ours, "not measured")
        rows.append(Row(AREA, p.what, res.measures.get(p.ours), baseline, p.baseline_what, p.goal,
                        "; ".join(notes), error))
    return rows


# -- setup: one image for the whole run ---------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    image: Image  # pinned: VMs are created with image=<build id>, so a concurrent rebuild of
    accel: str  # "default" (someone editing guest/) cannot land in the middle of a measurement
    shared: Path  # host directory exported over 9p; holds the 64 MiB test file


async def _setup(ctx: Context, shared: Path) -> Setup:
    image = await anyio.to_thread.run_sync(ensure_image, "default", ImageStore())
    choice = await _accel.decide(image, probe_boot)
    reason = choice.reason if len(choice.reason) <= 110 else choice.reason[:110] + "..."
    ctx.machine["accelerator"] = f"{choice.accel} ({reason})"
    ctx.machine["guest image"] = (f"{image.build_id} (kernel {image.kernel_version}), pinned for the run: "
                                  "VMs are created with image=<build id>")
    ctx.machine["VM options"] = ("every VM boots cold (no warm-start template); the warm VM and the first cold "
                                 "row have network=False like the raw QEMU baselines; the memory probe uses the defaults")
    await anyio.to_thread.run_sync(_write_random, shared / "in.bin", COPY_SIZE)
    return Setup(image, choice.accel, shared)


# -- stage 1: a warm VM and a raw 9p guest side by side, measurements interleaved -----------------
async def _warm_stage(ctx: Context, res: Results, setup: Setup, exec_rounds: int) -> None:
    async with AsyncExitStack() as stack:
        vm = await VM.create(image=setup.image.build_id, network=False, **cold_kwargs())
        stack.push_async_callback(vm.close)
        ctx.machine["VM shape"] = f"{vm.cpus} vCPU, {vm.memory_mb} MiB"
        ctx.log(f"core: warm VM up in {vm.boot_time:.1f}s ({vm.accel})")
        ninep: RawGuest | None = None
        try:
            ninep = await stack.enter_async_context(_ninep_guest(setup))
        except Exception as exc:  # noqa: BLE001 - the baseline is lost, ours is still measured
            _failed(ctx, res, "9p guest", ("9p_h2g", "9p_g2h"), exc)
        await _exec_pair(ctx, res, vm, exec_rounds)
        staged: VM | None = None
        try:  # vm.fs over the virtiofs device's staging directory (gondolin/fs_stage.py)
            staged = await VM.create(image=setup.image.build_id, network=False, fs_transport="virtiofs",
                                     mounts={"/bench-unused": MemoryProvider()}, **cold_kwargs())
            stack.push_async_callback(staged.close)
        except Exception as exc:  # noqa: BLE001 - those rows are lost, the others are still measured
            _failed(ctx, res, "virtiofs VM", ("h2g_vfs", "g2h_vfs"), exc)
        await _copy_pairs(ctx, res, vm, ninep, setup, ctx.reps(3), staged)


@asynccontextmanager
async def _ninep_guest(setup: Setup) -> AsyncIterator[RawGuest]:
    virtfs = f"local,path={setup.shared},mount_tag={NINEP_TAG},security_model=none"
    async with raw_guest(setup.image, accel=setup.accel, extra_args=("-virtfs", virtfs)) as g:
        await g.check(["/bin/sh", "-c",
                       f"modprobe 9p && modprobe 9pnet_virtio && mkdir -p {NINEP_MOUNT} && "
                       f"mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {NINEP_TAG} {NINEP_MOUNT}"])
        yield g


async def _exec_pair(ctx: Context, res: Results, vm: VM, rounds: int) -> None:
    """Blocks of host round trips alternate with blocks of in-guest fork+exec, so a change in
    machine load during the stage hits both sides."""
    for _ in range(EXEC_WARMUP):
        await vm.exec(["/bin/true"])
    ours: list[float] = []
    guest: list[float] = []
    for _ in range(max(1, rounds // EXEC_BLOCK)):
        for _ in range(EXEC_BLOCK):
            t0 = time.perf_counter()
            r = await vm.exec(["/bin/true"])
            ours.append(time.perf_counter() - t0)
            if r.exit_code != 0:
                raise BenchError(f"/bin/true exited {r.exit_code}: {r.stderr}")
        r = await vm.exec(["/usr/bin/python3", "-c", FORK_EXEC_SCRIPT, str(EXEC_BLOCK)], timeout=300)
        if r.exit_code != 0:
            raise BenchError(f"in-guest fork+exec script exited {r.exit_code}: {r.stderr[-500:]}")
        guest.extend(json.loads(r.stdout))
    res.measures["exec"] = Measure.median_of((s * 1000 for s in ours), "ms")
    res.measures["fork"] = Measure.median_of((s * 1000 for s in guest), "ms")
    ctx.log(f"core: exec round trip median {res.measures['exec'].value:.1f} ms, "
            f"in-guest fork+exec {res.measures['fork'].value:.1f} ms")


async def _copy_pairs(ctx: Context, res: Results, vm: VM, ninep: RawGuest | None, setup: Setup, reps: int,
                      staged: VM | None = None) -> None:
    src = setup.shared / "in.bin"
    dst = setup.shared / "out-ours.bin"
    guest = "/tmp/bench-in.bin"
    up: list[float] = []
    down: list[float] = []
    up9: list[float] = []
    down9: list[float] = []
    up_vfs: list[float] = []
    down_vfs: list[float] = []
    for i in range(reps):
        await vm.fs.remove(guest, force=True)
        t0 = time.perf_counter()
        _check_size("upload", await vm.fs.upload(src, guest))
        up.append(time.perf_counter() - t0)
        if ninep is not None:
            up9.append(await _ninep_copy(ninep, f"{NINEP_MOUNT}/in.bin", "/tmp/in.bin"))
        if staged is not None:
            await staged.fs.remove(guest, force=True)
            t0 = time.perf_counter()
            _check_size("staged upload", await staged.fs.upload(src, guest))
            up_vfs.append(time.perf_counter() - t0)
        dst.unlink(missing_ok=True)
        t0 = time.perf_counter()
        _check_size("download", await vm.fs.download(guest, dst))
        down.append(time.perf_counter() - t0)
        _check_size("downloaded file", dst.stat().st_size)
        if ninep is not None:
            down9.append(await _ninep_copy(ninep, "/tmp/in.bin", f"{NINEP_MOUNT}/out.bin"))
            _check_size("file written through 9p", (setup.shared / "out.bin").stat().st_size)
        if staged is not None:
            dst.unlink(missing_ok=True)
            t0 = time.perf_counter()
            _check_size("staged download", await staged.fs.download(guest, dst))
            down_vfs.append(time.perf_counter() - t0)
            _check_size("downloaded file (staged)", dst.stat().st_size)
            ctx.log(f"core: copy rep {i + 1}/{reps}, virtiofs VM: upload {_mibs(up_vfs[-1])}, "
                    f"download {_mibs(down_vfs[-1])}")
        ctx.log(f"core: copy rep {i + 1}/{reps}: upload {_mibs(up[-1])}, download {_mibs(down[-1])}"
                + (f"; 9p read {_mibs(up9[-1])}, write {_mibs(down9[-1])}" if ninep is not None else ""))
    await vm.fs.remove(guest, force=True)
    for f in (dst, setup.shared / "out.bin"):
        f.unlink(missing_ok=True)
    res.measures["h2g"] = _throughput(up)
    res.measures["g2h"] = _throughput(down)
    if staged is not None:
        res.measures["h2g_vfs"] = _throughput(up_vfs)
        res.measures["g2h_vfs"] = _throughput(down_vfs)
    if ninep is not None:
        res.measures["9p_h2g"] = _throughput(up9)
        res.measures["9p_g2h"] = _throughput(down9)


async def _ninep_copy(g: RawGuest, src: str, dst: str) -> float:
    out = json.loads(await g.check(["/usr/bin/python3", "-c", COPY_SCRIPT, src, dst, "1"], timeout=300))
    _check_size(f"9p copy {src} -> {dst}", out["bytes"])
    return float(out["seconds"][0])


# -- stage 2: cold boots, interleaved so drift in machine load hits both sides alike -----------
async def _cold_stage(ctx: Context, res: Results, setup: Setup, reps: int) -> None:
    raw: list[Boot] = []
    ro: list[Boot] = []
    default: list[Boot] = []
    for i in range(reps):
        async with raw_guest(setup.image, accel=setup.accel) as g:
            raw.append(Boot(g.first_byte_s, g.first_byte_cpu_s, 0.0, 0))
        ro.append(await _cold_create(setup, rootfs="readonly", network=False))
        default.append(await _cold_create(setup))
        ctx.log(f"core: cold rep {i + 1}/{reps}: raw {raw[-1].wall:.2f}s, readonly+no network {ro[-1].wall:.2f}s, "
                f"defaults {default[-1].wall:.2f}s")
    res.measures["raw_boot"] = Measure.median_of((b.wall for b in raw), "s")
    for key, boots in (("cold_ro", ro), ("cold_default", default)):
        res.measures[key] = Measure.median_of((b.wall for b in boots), "s")
        # CPU time is far less sensitive than wall time to other work on a shared machine.
        res.note(key, f"CPU time (median) to the first exec result: QEMU {_median(b.qemu_cpu for b in boots):.2f} s "
                      f"+ this process {_median(b.host_cpu for b in boots):.2f} s; raw QEMU to its first byte "
                      f"{_median(b.qemu_cpu for b in raw):.2f} s")
        uptimes = [b.guest_ms for b in boots if b.guest_ms]
        if uptimes:
            span = f"{min(uptimes)}" if min(uptimes) == max(uptimes) else f"{min(uptimes)}-{max(uptimes)}"
            res.note(key, f"the agent sent HELLO at a guest uptime of {span} ms")


@dataclass(frozen=True)
class Boot:
    wall: float  # seconds to the first exec result (ours) or the agent's first byte (raw)
    qemu_cpu: float  # QEMU's CPU seconds by then
    host_cpu: float  # this process's CPU seconds spent meanwhile (ours only)
    guest_ms: int  # guest uptime when the agent said HELLO (ours only)


async def _cold_create(setup: Setup, **options: Any) -> Boot:
    t0 = time.perf_counter()
    c0 = time.process_time()
    vm = await VM.create(image=setup.image.build_id, **options, **cold_kwargs())
    try:
        r = await vm.exec(["/bin/true"])
        elapsed = time.perf_counter() - t0
        boot = Boot(elapsed, process_cpu_seconds(vm.qemu_pid) if vm.qemu_pid else 0.0,
                    time.process_time() - c0, vm.guest_boot_ms or 0)
    finally:
        await vm.close()
    if r.exit_code != 0:
        raise BenchError(f"/bin/true exited {r.exit_code}: {r.stderr}")
    return boot


# -- stage 3: host memory per idle VM, in a fresh process ----------------------------------------
async def _memory_stage(ctx: Context, res: Results, setup: Setup) -> None:
    n = MEMORY_VMS
    proc = await anyio.run_process(
        [sys.executable, "-m", "benchmarks._memprobe", str(n), setup.image.build_id], cwd=REPO, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"memory probe exited {proc.returncode}: {' | '.join(tail)}")
    data = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    per_vm = (data["after"] - data["before"]) / data["n"]
    res.measures["memory"] = Measure(per_vm / 1e6, "MB")
    res.note("memory", f"RSS of a fresh host process {data['before'] / 1e6:.1f} MB before and "
                       f"{data['after'] / 1e6:.1f} MB after creating {n} idle VMs")
    qemu = data["qemu_rss"]
    if qemu:
        res.note("memory", f"for scale, each QEMU process held {min(qemu) / 1e6:.0f}-{max(qemu) / 1e6:.0f} MB RSS")
    ctx.log(f"core: {per_vm / 1e6:.1f} MB host RSS per idle VM")


# -- helpers ---------------------------------------------------------------------------------
def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // COPY_BLOCK):
            f.write(os.urandom(COPY_BLOCK))


def _check_size(what: str, n: int) -> None:
    if n != COPY_SIZE:
        raise BenchError(f"{what}: {n} bytes moved, expected {COPY_SIZE}")


def _median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def _mibs(seconds: float) -> str:
    return f"{COPY_SIZE / MiB / seconds:.0f} MiB/s"


def _throughput(seconds: list[float]) -> Measure:
    return Measure.median_of((COPY_SIZE / MiB / s for s in seconds), "MiB/s")
