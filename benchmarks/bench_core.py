"""Core runtime pairs (issue 2, DESIGN.md §8): boot, exec round trip, file copy, host memory.

| ours                                         | baseline, same run                                  |
|----------------------------------------------|-----------------------------------------------------|
| VM.create + exec(["/bin/true"])              | plain QEMU, same argv, to the agent's first byte    |
| exec(["/bin/true"]) round trip, warm VM       | os.fork + os.execv + os.waitpid inside the guest    |
| vm.fs upload / download of 64 MiB (/tmp)      | the same copy through QEMU's virtio-9p (-virtfs)    |
| host RSS per idle VM, QEMU excluded          | (absolute goal, no baseline)                         |

Stages run one after another so VMs never compete with each other for the CPU, except the
memory probe, which boots its VMs together in a fresh process.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from gondolin import VM
from gondolin.images import Image, ImageStore, ensure_image
from gondolin.qemu import accel as _accel

from ._raw import raw_guest
from ._runner import REPO, Context
from ._table import Goal, Measure, Row

AREA = "core"
MiB = 1024 * 1024
COPY_SIZE = 64 * MiB
COPY_BLOCK = 4 * MiB  # host writes the test file in blocks of this size
EXEC_ROUNDS = 50
EXEC_WARMUP = 5
MEMORY_VMS = 3
STAGE_TIMEOUT = 600.0  # one stage (all repetitions of one pair)
NINEP_TAG = "benchfs"
NINEP_MOUNT = "/tmp/9p"

# In-guest baseline for the exec round trip (runs under the guest's python3).
FORK_EXEC_SCRIPT = """
import json, os, sys, time
n, warm = int(sys.argv[1]), 5
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
    build_ids: set[str] = field(default_factory=set)  # images the VMs booted (more than one: rebuilt mid-run)

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
    raw = f"plain QEMU with the argv VM.create(rootfs='readonly') uses, started -> agent's first byte (median of {cold_reps})"
    return [
        Pair(f"cold create -> first exec, rootfs=readonly (median of {cold_reps})", "cold_ro", "raw_boot", raw,
             Goal(max_ratio=1.2)),
        Pair(f"cold create -> first exec, rootfs=cow (the default; median of {cold_reps})", "cold_cow", "raw_boot",
             raw, Goal(max_ratio=1.2)),
        Pair(f"exec([\"/bin/true\"]) round trip, warm VM (median of {exec_rounds})", "exec", "fork",
             f"os.fork + os.execv('/bin/true') + os.waitpid timed inside the guest by python3 (median of {exec_rounds})",
             Goal(max_ratio=1.2)),
        Pair("copy 64 MiB host -> guest /tmp, vm.fs.upload", "h2g", "9p_h2g",
             "the same copy inside the guest from a virtio-9p mount (msize=512000) to /tmp, timed in the guest",
             None),
        Pair("copy 64 MiB guest /tmp -> host, vm.fs.download", "g2h", "9p_g2h",
             "the same copy inside the guest from /tmp to a virtio-9p mount, timed in the guest", None),
        Pair(f"host process memory per idle VM, QEMU excluded ({MEMORY_VMS} VMs)", "memory", None, "", Goal(max_value=50)),
    ]


async def collect(ctx: Context) -> list[Row]:
    res = Results()
    cold_reps = ctx.reps(3)
    exec_rounds = ctx.reps(EXEC_ROUNDS, 10)
    with tempfile.TemporaryDirectory(prefix="gondolin-bench-") as tmp:
        shared = Path(tmp)
        stages: list[tuple[str, tuple[str, ...], Callable[[], Awaitable[None]]]] = [
            ("warm VM: exec round trip and vm.fs copies", ("exec", "fork", "h2g", "g2h"),
             lambda: _warm_vm_stage(ctx, res, shared, exec_rounds)),
            ("cold create vs raw QEMU boot", ("cold_ro", "cold_cow", "raw_boot"),
             lambda: _cold_stage(ctx, res, cold_reps)),
            ("virtio-9p copy baseline", ("9p_h2g", "9p_g2h"), lambda: _ninep_stage(ctx, res, shared)),
            ("host memory per idle VM", ("memory",), lambda: _memory_stage(ctx, res)),
        ]
        for title, keys, stage in stages:
            ctx.log(f"core: {title}")
            try:
                with anyio.fail_after(STAGE_TIMEOUT):
                    await stage()
            # A failed stage becomes error rows and the other stages still run. Cancellation is a
            # BaseException and passes through.
            except Exception as exc:  # noqa: BLE001
                ctx.log(f"core: {title} failed:\n{traceback.format_exc()}")
                first = (str(exc).strip().splitlines() or [""])[0]
                for key in keys:
                    res.errors.setdefault(key, f"{type(exc).__name__}: {first}"[:300])
    if len(res.build_ids) > 1:
        res.note("cold_ro", f"the image changed during the run ({', '.join(sorted(res.build_ids))}): numbers are suspect")
    return _rows(res, cold_reps, exec_rounds)


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


# -- stage 1: one warm VM ---------------------------------------------------------------------
async def _warm_vm_stage(ctx: Context, res: Results, shared: Path, exec_rounds: int) -> None:
    src = shared / "in.bin"
    await anyio.to_thread.run_sync(_write_random, src, COPY_SIZE)
    vm = await VM.create()
    try:
        choice = await _accel.decide(vm.image, VM._probe_boot)
        reason = choice.reason if len(choice.reason) <= 110 else choice.reason[:110] + "..."
        ctx.machine["accelerator"] = f"{vm.accel} ({reason})"
        ctx.machine["guest image"] = f"{vm.image.build_id} (kernel {vm.image.kernel_version})"
        ctx.machine["VM shape"] = f"{vm.cpus} vCPU, {vm.memory_mb} MiB"
        ctx.log(f"core: warm VM up in {vm.boot_time:.1f}s ({vm.accel})")
        res.build_ids.add(vm.image.build_id)
        await _exec_pair(ctx, res, vm, exec_rounds)
        await _copy_ours(ctx, res, vm, src, shared / "out-ours.bin")
    finally:
        await vm.close()


async def _exec_pair(ctx: Context, res: Results, vm: VM, rounds: int) -> None:
    for _ in range(EXEC_WARMUP):
        await vm.exec(["/bin/true"])
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        r = await vm.exec(["/bin/true"])
        samples.append(time.perf_counter() - t0)
        if r.exit_code != 0:
            raise BenchError(f"/bin/true exited {r.exit_code}: {r.stderr}")
    res.measures["exec"] = Measure.median_of((s * 1000 for s in samples), "ms")
    ctx.log(f"core: exec round trip median {res.measures['exec'].value:.1f} ms")
    r = await vm.exec(["/usr/bin/python3", "-c", FORK_EXEC_SCRIPT, str(rounds)], timeout=300)
    if r.exit_code != 0:
        raise BenchError(f"in-guest fork+exec script exited {r.exit_code}: {r.stderr[-500:]}")
    res.measures["fork"] = Measure.median_of((s * 1000 for s in json.loads(r.stdout)), "ms")
    ctx.log(f"core: in-guest fork+exec median {res.measures['fork'].value:.1f} ms")


async def _copy_ours(ctx: Context, res: Results, vm: VM, src: Path, dst: Path) -> None:
    reps = ctx.reps(3)
    guest = "/tmp/bench-in.bin"
    up, down = [], []
    for _ in range(reps):
        await vm.fs.remove(guest, force=True)
        t0 = time.perf_counter()
        n = await vm.fs.upload(src, guest)
        up.append(time.perf_counter() - t0)
        _check_size("upload", n)
    for _ in range(reps):
        dst.unlink(missing_ok=True)
        t0 = time.perf_counter()
        n = await vm.fs.download(guest, dst)
        down.append(time.perf_counter() - t0)
        _check_size("download", n)
        _check_size("downloaded file", dst.stat().st_size)
    dst.unlink(missing_ok=True)
    await vm.fs.remove(guest, force=True)
    res.measures["h2g"] = _throughput(up)
    res.measures["g2h"] = _throughput(down)
    ctx.log(f"core: vm.fs upload {res.measures['h2g'].value:.0f} MiB/s, download {res.measures['g2h'].value:.0f} MiB/s")


# -- stage 2: cold boots, interleaved so drift in machine load hits both sides alike -----------
async def _cold_stage(ctx: Context, res: Results, reps: int) -> None:
    image = await _image()
    accel = await _accel.choose(image, VM._probe_boot)
    raw, ro, cow = [], [], []
    guest_ms: list[int] = []
    for i in range(reps):
        async with raw_guest(image, accel=accel) as g:
            raw.append(g.first_byte_s)
        ro.append(await _cold_create("readonly", guest_ms, res.build_ids))
        cow.append(await _cold_create("cow", guest_ms, res.build_ids))
        ctx.log(f"core: cold rep {i + 1}/{reps}: raw {raw[-1]:.2f}s, readonly {ro[-1]:.2f}s, cow {cow[-1]:.2f}s")
    res.measures["raw_boot"] = Measure.median_of(raw, "s")
    res.measures["cold_ro"] = Measure.median_of(ro, "s")
    res.measures["cold_cow"] = Measure.median_of(cow, "s")
    if guest_ms:
        res.note("cold_ro", f"the agent sent HELLO at a guest uptime of {min(guest_ms)}-{max(guest_ms)} ms")


async def _image() -> Image:
    return await anyio.to_thread.run_sync(ensure_image, "default", ImageStore())


async def _cold_create(rootfs: str, guest_ms: list[int], build_ids: set[str]) -> float:
    t0 = time.perf_counter()
    vm = await VM.create(rootfs=rootfs)  # type: ignore[arg-type]
    try:
        r = await vm.exec(["/bin/true"])
        elapsed = time.perf_counter() - t0
        build_ids.add(vm.image.build_id)
        if vm.guest_boot_ms:
            guest_ms.append(vm.guest_boot_ms)
    finally:
        await vm.close()
    if r.exit_code != 0:
        raise BenchError(f"/bin/true exited {r.exit_code}: {r.stderr}")
    return elapsed


# -- stage 3: the same copies through QEMU's own 9p ---------------------------------------------
async def _ninep_stage(ctx: Context, res: Results, shared: Path) -> None:
    image = await _image()
    accel = await _accel.choose(image, VM._probe_boot)
    src = shared / "in.bin"
    if not src.exists():
        await anyio.to_thread.run_sync(_write_random, src, COPY_SIZE)
    out = shared / "out.bin"
    virtfs = f"local,path={shared},mount_tag={NINEP_TAG},security_model=none"
    reps = ctx.reps(3)
    async with raw_guest(image, accel=accel, extra_args=("-virtfs", virtfs)) as g:
        await g.check(["/bin/sh", "-c",
                       f"modprobe 9p && modprobe 9pnet_virtio && mkdir -p {NINEP_MOUNT} && "
                       f"mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {NINEP_TAG} {NINEP_MOUNT}"])
        up = json.loads(await g.check(["/usr/bin/python3", "-c", COPY_SCRIPT, f"{NINEP_MOUNT}/in.bin",
                                       "/tmp/in.bin", str(reps)], timeout=300))
        _check_size("9p read", up["bytes"])
        down = json.loads(await g.check(["/usr/bin/python3", "-c", COPY_SCRIPT, "/tmp/in.bin",
                                         f"{NINEP_MOUNT}/out.bin", str(reps)], timeout=300))
        _check_size("9p write", down["bytes"])
    _check_size("file written through 9p", out.stat().st_size)
    out.unlink()
    res.measures["9p_h2g"] = _throughput(up["seconds"])
    res.measures["9p_g2h"] = _throughput(down["seconds"])
    ctx.log(f"core: 9p read {res.measures['9p_h2g'].value:.0f} MiB/s, write {res.measures['9p_g2h'].value:.0f} MiB/s")


# -- stage 4: host memory per idle VM, in a fresh process ----------------------------------------
async def _memory_stage(ctx: Context, res: Results) -> None:
    n = MEMORY_VMS
    proc = await anyio.run_process([sys.executable, "-m", "benchmarks._memprobe", str(n)], cwd=REPO,
                                   check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"memory probe exited {proc.returncode}: {' | '.join(tail)}")
    data = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    per_vm = (data["after"] - data["before"]) / data["n"]
    res.measures["memory"] = Measure(per_vm / 1e6, "MB")
    qemu = data["qemu_rss"]
    res.note("memory", f"RSS of the host process {data['before'] / 1e6:.1f} MB before and {data['after'] / 1e6:.1f} MB "
                       f"after creating {n} idle VMs")
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


def _throughput(seconds: list[float]) -> Measure:
    return Measure.median_of((COPY_SIZE / MiB / s for s in seconds), "MiB/s")
