"""Warm start and checkpoints: restoring saved guest memory instead of booting.

| ours                                               | baseline, same run                              |
|----------------------------------------------------|-------------------------------------------------|
| VM.create() from the template + exec(["/bin/true"]) | plain QEMU ``-incoming`` of the same template    |
|                                                    | file, started -> PONG on the control port       |
| vm.checkpoint() of an idle 512 MiB VM: time, size  | (absolute goal: save <= 1 s)                    |
| Checkpoint.resume() + exec(["/bin/true"])          | plain QEMU ``-incoming`` of the same file       |
| 8 x VM.create() at once from one template          | (total time; peak RSS of this process + QEMUs)  |
| VM.create(mounts, fs_transport=port / virtiofs) +  | plain QEMU ``-incoming`` of that shape's        |
| exec(["cat", FILE_ON_THE_MOUNT])                   | template (virtiofs: memfd RAM, no device)       |

Warm creates and raw restores alternate, so drift in the machine's load hits both alike. The
raw restore gets the same QEMU machine (:func:`gondolin.machine.shape.machine_spec`: device set,
sockets) and its own copy of the saved disk overlay, prepared before its clock starts; only QEMU
and the first control-port round trip are timed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
from anyio.abc import ByteStream

from gondolin import VM, Checkpoint, VMOptions
from gondolin.images import Image
from gondolin.machine.launch import resolve
from gondolin.machine.shape import machine_spec
from gondolin.machine.state import PongScanner, RestoreSource, pong_marker, prepare_restored_disk
from gondolin.machine.templates import TemplateStore
from gondolin.qemu.argv import build_argv
from gondolin.qemu.process import QemuProcess, find_qemu
from gondolin.vfs import RealFSProvider

from ._runner import Context
from ._table import Goal, Measure, Row, error_row

AREA = "warm"
OPTIONS = VMOptions(memory="512M")  # the defaults otherwise (network on, rootfs cow, warm start)
CONCURRENT = 8
RSS_POLL = 0.05  # seconds between RSS samples while the concurrent VMs start
STEP_TIMEOUT = 300.0


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Target:
    """What the raw restores need to build the same QEMU machine as ``VM.create(OPTIONS)``."""

    options: VMOptions  # checked
    image: Image
    accel: str


async def collect(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    reps = ctx.reps(10, 2)
    try:
        target = Target(*await resolve(OPTIONS))
    except Exception as exc:  # noqa: BLE001 - no image or no QEMU: nothing here can run
        return [error_row(AREA, "the whole module (image and accelerator)", exc)]
    ctx.machine.setdefault("accelerator", target.accel)
    try:
        async with await VM.create(OPTIONS) as vm:  # makes sure the template exists
            ctx.log(f"warm: template ready ({'restored' if vm.restored_from else 'saved'} in {vm.boot_time:.2f}s)")
            shape = vm.shape()
        template = TemplateStore().lookup(shape)
        if template is None:
            raise BenchError("no template was saved for the benchmark shape")
        ours, raw = [], []
        for i in range(reps):
            with anyio.fail_after(STEP_TIMEOUT):
                ours.append(await _warm_create())
                raw.append(await _raw_restore(target, template.boot_source().restore_source()))
            ctx.log(f"warm: rep {i + 1}/{reps}: create+exec {ours[-1]:.3f}s, raw restore {raw[-1]:.3f}s")
        rows.append(Row(
            AREA, f"warm VM.create() -> first exec (median of {reps})", Measure.median_of(ours, "s"),
            Measure.median_of(raw, "s"),
            "plain QEMU -incoming of the same template file, started -> PONG on the control port",
            Goal(max_ratio=1.5, max_value=0.25),
            note=f"template {template.size / 1e6:.0f} MB ({template.memory_size / 1e6:.0f} MB memory stream)"))
    except Exception as exc:  # noqa: BLE001 - a failed pair becomes an error row, the run goes on
        rows.append(error_row(AREA, "warm VM.create() -> first exec", exc, Goal(max_ratio=1.5, max_value=0.25)))
    rows += await _checkpoint_rows(ctx, target, reps)
    rows += await _mount_rows(ctx)
    try:
        rows += await _concurrent_rows(ctx)
    except Exception as exc:  # noqa: BLE001
        rows.append(error_row(AREA, f"{CONCURRENT} VMs created at once from one template", exc))
    return rows


async def _warm_create() -> float:
    t0 = time.perf_counter()
    vm = await VM.create(OPTIONS)
    try:
        r = await vm.exec(["/bin/true"])
        elapsed = time.perf_counter() - t0
        if vm.restored_from != "template":
            raise BenchError("VM.create() booted cold instead of restoring the template")
    finally:
        await vm.close()
    if r.exit_code != 0:
        raise BenchError(f"/bin/true exited {r.exit_code}")
    return elapsed


async def _raw_restore(target: Target, source: RestoreSource) -> float:
    """QEMU with a restored VM's argv, started -> the agent's PONG on the control port."""
    with tempfile.TemporaryDirectory(prefix="gondolin-bench-") as tmp:
        spec = replace(machine_spec(target.options, target.image, target.accel, Path(tmp)),
                       incoming=source.incoming_uri())
        if source.disk is not None:
            if spec.disk_readonly:
                raise BenchError("a saved disk overlay needs rootfs='cow'")
            await anyio.to_thread.run_sync(prepare_restored_disk, source.disk, Path(spec.disk),
                                           str(target.image.rootfs))
        listeners = {"control": await anyio.create_unix_listener(spec.ports[0].socket_path)}
        for port in spec.ports[1:]:
            listeners[port.name] = await anyio.create_unix_listener(port.socket_path)
        if spec.net_socket:
            listeners["net"] = await anyio.create_unix_listener(spec.net_socket)
        qemu = QemuProcess(build_argv(spec, find_qemu()))
        streams: list[ByteStream] = []
        try:
            async with anyio.create_task_group() as tg:
                try:
                    t0 = time.perf_counter()
                    qemu.start()
                    tg.start_soon(qemu.watch)
                    with anyio.fail_after(60):
                        for listener in listeners.values():
                            streams.append(await listener.accept())
                        ping, pong = pong_marker(1, os.urandom(16))
                        await streams[0].send(ping)
                        scanner = PongScanner(pong)
                        while scanner.feed(await streams[0].receive()) is None:
                            pass
                    elapsed = time.perf_counter() - t0
                finally:
                    with anyio.CancelScope(shield=True):
                        await qemu.stop()  # before the console watcher is awaited: it reaps QEMU
        finally:
            with anyio.CancelScope(shield=True):
                for s in streams:
                    await s.aclose()
                for listener in listeners.values():
                    await listener.aclose()
    return elapsed


async def _checkpoint_rows(ctx: Context, target: Target, reps: int) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gondolin-bench-ckpt-") as tmp:
        path = Path(tmp) / "idle.ckpt"
        try:
            saves, sizes = [], []
            async with await VM.create(OPTIONS) as vm:
                await vm.exec(["/bin/true"])
                for i in range(min(reps, 5)):
                    t0 = time.perf_counter()
                    cp = await vm.checkpoint(path)
                    saves.append(time.perf_counter() - t0)
                    sizes.append(cp.size / 1e6)
                    ctx.log(f"warm: checkpoint {i + 1}: {saves[-1]:.3f}s, {sizes[-1]:.0f} MB")
                t0 = time.perf_counter()
                disk = await vm.checkpoint(Path(tmp) / "disk.ckpt", disk_only=True)
                disk_s = time.perf_counter() - t0
            rows.append(Row(AREA, "checkpoint save, idle 512 MiB VM (disk + memory)", Measure.median_of(saves, "s"),
                            goal=Goal(max_value=1.0),
                            note=f"the VM runs again before the file's CRCs are computed; disk-only checkpoint "
                                 f"{disk_s:.2f}s, {disk.size / 1e6:.1f} MB"))
            rows.append(Row(AREA, "checkpoint size, idle 512 MiB VM", Measure.median_of(sizes, "MB"),
                            note="guest pages never touched are not stored"))
        except Exception as exc:  # noqa: BLE001
            rows.append(error_row(AREA, "checkpoint save, idle 512 MiB VM (disk + memory)", exc, Goal(max_value=1.0)))
            return rows
        try:
            cp = Checkpoint.load(path)
            ours, raw = [], []
            source = cp.boot_source().restore_source()
            if source is None:
                raise BenchError(f"{path.name} is not a full checkpoint")
            for _ in range(reps):
                t0 = time.perf_counter()
                vm = await cp.resume()
                try:
                    await vm.exec(["/bin/true"])
                    ours.append(time.perf_counter() - t0)
                finally:
                    await vm.close()
                raw.append(await _raw_restore(target, source))
            rows.append(Row(AREA, f"Checkpoint.resume() -> first exec (median of {reps})", Measure.median_of(ours, "s"),
                            Measure.median_of(raw, "s"),
                            "plain QEMU -incoming of the same checkpoint's memory section -> PONG",
                            note="includes the CRC check of the whole file, run alongside the restore"))
        except Exception as exc:  # noqa: BLE001
            rows.append(error_row(AREA, "Checkpoint.resume() -> first exec", exc))
    return rows


def _rss(pid: int | str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


async def _concurrent_rows(ctx: Context) -> list[Row]:
    vms: list[VM] = []
    peak = 0
    done = anyio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            total = _rss("self") + sum(_rss(vm.qemu_pid) for vm in list(vms) if vm.qemu_pid)
            peak = max(peak, total)
            with anyio.move_on_after(RSS_POLL):
                await done.wait()

    async def one() -> None:
        vms.append(await VM.create(OPTIONS))

    base = _rss("self")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            t0 = time.perf_counter()
            with anyio.fail_after(STEP_TIMEOUT):
                async with anyio.create_task_group() as starters:
                    for _ in range(CONCURRENT):
                        starters.start_soon(one)
                for vm in vms:
                    await vm.exec(["/bin/true"])
            total = time.perf_counter() - t0
            qemu_rss = [_rss(vm.qemu_pid) / 1e6 for vm in vms if vm.qemu_pid]
            restored = sum(1 for vm in vms if vm.restored_from == "template")
            done.set()
    finally:
        with anyio.CancelScope(shield=True):
            for vm in vms:
                await vm.close()
    ctx.log(f"warm: {CONCURRENT} concurrent creates in {total:.2f}s, peak RSS {peak / 1e6:.0f} MB")
    return [
        Row(AREA, f"{CONCURRENT} VMs created at once from one template -> each ran /bin/true", Measure(total, "s"),
            note=f"{restored} of {CONCURRENT} restored from the template"),
        Row(AREA, f"peak host RSS while {CONCURRENT} VMs start (this process + every QEMU)", Measure(peak / 1e6, "MB"),
            note=f"this process {base / 1e6:.0f} MB before; each QEMU {min(qemu_rss):.0f}-{max(qemu_rss):.0f} MB "
                 f"right after its first exec"),
    ]


async def _mount_rows(ctx: Context) -> list[Row]:
    """Warm create -> first exec on a mount, for both file transports, each against the raw
    restore of its own template. A virtiofs template holds the memfd machine without the device
    (QEMU 7.2 cannot migrate it): configure() hot-plugs it and the guest mounts it."""
    rows: list[Row] = []
    reps = ctx.reps(6, 2)
    share = Path(tempfile.mkdtemp(prefix="gondolin-bench-warm-"))
    (share / "hello.txt").write_text("hello\n")
    raws: dict[str, list[float]] = {}
    try:
        for transport in ("port", "virtiofs"):
            name = f"warm VM.create(mounts, fs_transport={transport!r}) -> first exec on the mount"
            try:
                options = replace(OPTIONS, mounts={"/workspace": RealFSProvider(share)},
                                  fs_transport=transport)  # type: ignore[arg-type]
                target = Target(*await resolve(options))
                async with await VM.create(options) as vm:  # makes sure the template exists
                    shape = vm.shape()
                template = TemplateStore().lookup(shape)
                if template is None:
                    raise BenchError(f"no template was saved for the {transport} shape")
                ours, raw = [], []
                for i in range(reps):
                    with anyio.fail_after(STEP_TIMEOUT):
                        ours.append(await _warm_create_on_mount(options))
                        raw.append(await _raw_restore(target, template.boot_source().restore_source()))
                    ctx.log(f"warm: {transport} rep {i + 1}/{reps}: create+exec {ours[-1]:.3f}s, "
                            f"raw restore {raw[-1]:.3f}s")
                raws[transport] = raw
                rows.append(Row(AREA, f"{name} (median of {reps})", Measure.median_of(ours, "s"),
                                Measure.median_of(raw, "s"),
                                "plain QEMU -incoming of the same template file, started -> PONG on the control port",
                                Goal(max_ratio=1.5),
                                note=f"template {template.memory_size / 1e6:.0f} MB memory stream"))
            except Exception as exc:  # noqa: BLE001 - a failed pair becomes an error row
                rows.append(error_row(AREA, name, exc, Goal(max_ratio=1.5)))
        if "port" in raws and "virtiofs" in raws:
            rows.append(Row(AREA, "raw -incoming restore of the virtiofs template (memfd guest RAM)",
                            Measure.median_of(raws["virtiofs"], "s"), Measure.median_of(raws["port"], "s"),
                            "raw -incoming restore of the port template (anonymous guest RAM), same run",
                            note="a shared memfd has no zero page: the template's stream is saved without the "
                                 "zero-page records of pages nothing wrote (gondolin/machine/zeropages.py)"))
    finally:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(share, ignore_errors=True))
    return rows


async def _warm_create_on_mount(options: VMOptions) -> float:
    t0 = time.perf_counter()
    vm = await VM.create(options)
    try:
        r = await vm.exec(["cat", "/workspace/hello.txt"])
        elapsed = time.perf_counter() - t0
        if vm.restored_from != "template":
            raise BenchError("VM.create() booted cold instead of restoring the template")
    finally:
        await vm.close()
    if r.exit_code != 0 or r.stdout != "hello\n":
        raise BenchError(f"cat on the mount exited {r.exit_code}: {r.stderr.strip()}")
    return elapsed
