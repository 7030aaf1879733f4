"""Programmable filesystem: a FUSE mount served by a host provider
against QEMU's virtio-9p (``-virtfs``) with the same kernel, same data, same run.

| ours: RealFSProvider mount (FUSE, fs port)      | baseline: virtio-9p mount of a host directory     |
|-------------------------------------------------|----------------------------------------------------|
| sequential read of 64 MiB, cold page cache      | the same file read through 9p                      |
| sequential write of 64 MiB + fsync              | the same write through 9p                          |
| listdir + stat of 2,000 files, cold caches      | the same through 9p                                |
| git status in a 5,000-file repository           | the same repository through 9p                     |
| tar -x of 1,000 small files                     | the same archive through 9p                        |
| host CPU per MiB moved (this process + QEMU)    | QEMU's own CPU per MiB for 9p                      |

A third guest serves the same workloads over the opt-in virtiofs transport
(``VM.create(fs_transport="virtiofs")``: the guest kernel's virtiofs driver answered by the
vhost-user-fs device in this process, its own copy of the data); its rows ("..., virtiofs
transport") compare it with the same 9p baseline. (A ``cache="none"`` side, every file opened
with FOPEN_DIRECT_IO, was dropped: direct I/O through the guest's virtiofs driver corrupted
guest kernel memory within minutes of ``git status`` runs; see docs/filesystem.md.)

Everything is timed inside the guest by python3 (``GUEST_SCRIPT``), so both sides pay the same
process start-up outside the timed region. Each side has its own copy of the data in its own
host directory. The two guests are up together and the workloads alternate between them, so
drift in the machine's load hits both sides alike. Caches are dropped
(``/proc/sys/vm/drop_caches``) before every cold measurement.

Host CPU per MiB: CPU seconds over the write and read workloads (64 MiB written, then read
cold and read again: 192 MiB through the mount) per MiB. Ours counts this process (the file
service or the virtiofs device, and the other gondolin VM idling) plus the VM's QEMU; 9p counts
its QEMU, where the 9p server runs. Under TCG both include the guest's own work.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from gondolin import VM
from gondolin.images import ImageStore, ensure_image
from gondolin.machine.launch import probe_boot
from gondolin.qemu import accel as _accel
from gondolin.vfs import RealFSProvider

from ._netlab import process_cpu, self_cpu
from ._raw import RawGuest, raw_guest
from ._runner import Context
from ._table import Goal, Measure, Row

AREA = "vfs"
MiB = 1 << 20
SEQ_MIB = 64
STAT_FILES = 2000
REPO_FILES = 5000
REPO_DIRS = 100
TAR_FILES = 1000
MOUNT = "/tmp/bench"  # guest path of the share on both sides (the 9p guest has a read-only root)
NINEP_TAG = "benchvfs"
NINEP_OPTS = "trans=virtio,version=9p2000.L,msize=512000"
STAGE_TIMEOUT = 1800.0
RUN_TIMEOUT = 600.0

# Runs in the guest: python3 - WORKLOAD ROOT [REP] ; prints one JSON object.
GUEST_SCRIPT = r"""
import json, os, subprocess, sys, time
what, root = sys.argv[1], sys.argv[2]
rep = sys.argv[3] if len(sys.argv) > 3 else "0"
MiB = 1 << 20

def drop():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")

def read_all(path):
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(MiB)
            if not b:
                return n
            n += len(b)

out = {}
if what == "write":
    block = os.urandom(MiB)
    t = time.perf_counter()
    with open(f"{root}/seq.bin", "wb", buffering=0) as f:
        for _ in range(int(sys.argv[4])):
            f.write(block)
        os.fsync(f.fileno())
    out["seconds"] = time.perf_counter() - t
elif what == "read":
    drop()
    t = time.perf_counter()
    out["bytes"] = read_all(f"{root}/seq.bin")
    out["seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    read_all(f"{root}/seq.bin")
    out["again"] = time.perf_counter() - t
elif what == "stat":
    drop()
    t = time.perf_counter()
    d = f"{root}/stat"
    names = os.listdir(d)
    for n in names:
        os.stat(f"{d}/{n}")
    out["seconds"] = time.perf_counter() - t
    out["files"] = len(names)
elif what == "git":
    repo = f"{root}/repo"
    git = ["git", "-c", "core.untrackedCache=false", "-C", repo, "status", "--porcelain"]
    if rep == "prepare":  # refresh the index with this guest's stat data (untimed)
        subprocess.run(git, check=True, capture_output=True)
    drop()
    t = time.perf_counter()
    r = subprocess.run(git, check=True, capture_output=True)
    out["seconds"] = time.perf_counter() - t
    out["dirty"] = len(r.stdout.splitlines())
    t = time.perf_counter()
    subprocess.run(git, check=True, capture_output=True)
    out["again"] = time.perf_counter() - t
elif what == "tar":
    dest = f"{root}/tar{rep}"
    os.mkdir(dest)
    t = time.perf_counter()
    subprocess.run(["tar", "-xf", "/tmp/small.tar", "-C", dest], check=True)
    out["seconds"] = time.perf_counter() - t
    out["files"] = sum(len(fs) for _, _, fs in os.walk(dest))
print(json.dumps(out))
"""


class BenchError(RuntimeError):
    """A workload did something other than what it should have."""


@dataclass(frozen=True)
class Pair:
    what: str
    key: str
    unit: str  # "s" or "MiB/s"
    baseline_what: str
    goal: Goal | None


PAIRS = [
    Pair(f"sequential read of {SEQ_MIB} MiB, cold page cache", "read", "MiB/s",
         "the same file read through a virtio-9p mount (msize=512000, cache=none)", Goal(min_ratio=0.5)),
    Pair(f"sequential read of {SEQ_MIB} MiB again (guest page cache kept)", "read_again", "MiB/s",
         "the same second read through 9p (cache=none reads the host again)", None),
    Pair(f"sequential write of {SEQ_MIB} MiB + fsync", "write", "MiB/s",
         "the same write through 9p", None),
    Pair(f"listdir + stat of {STAT_FILES} files, cold caches", "stat", "s",
         "the same through 9p", Goal(max_ratio=1.0)),
    Pair(f"git status, {REPO_FILES}-file repository, cold caches", "git", "s",
         "the same repository through 9p", None),
    Pair(f"git status again, {REPO_FILES}-file repository, warm", "git_again", "s",
         "the same second run through 9p", None),
    Pair(f"tar -x of {TAR_FILES} small files", "tar", "s",
         "the same archive extracted onto 9p", None),
    Pair(f"host CPU per MiB through the mount ({SEQ_MIB} MiB write + cold read + read again): "
         "this process + QEMU", "cpu", "ms/MiB",
         "QEMU's own CPU per MiB for 9p (the guest's work included on both sides under TCG)", None),
]  # fmt: skip
CPU_MIB = 3 * SEQ_MIB  # what the write and read workloads move through the mount


# The goals for the virtiofs transport (docs/filesystem.md, "virtiofs transport").
VIRTIOFS_GOALS: dict[str, Goal] = {
    "read": Goal(min_ratio=0.5), "write": Goal(min_ratio=0.5), "stat": Goal(max_ratio=0.5),
    "git": Goal(max_ratio=1.0), "tar": Goal(max_ratio=1.2), "cpu": Goal(max_ratio=1.0),
}  # fmt: skip
VIRTIOFS = "virtiofs"  # the side's name


DIRECT = "virtiofs cache=none"  # the side's name
DIRECT_TAG = "benchdirect"


@dataclass
class Samples:
    ours: dict[str, list[float]] = field(default_factory=dict)
    base: dict[str, list[float]] = field(default_factory=dict)
    virtiofs: dict[str, list[float]] = field(default_factory=dict)
    direct: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)

    def add(self, side: str, key: str, value: float) -> None:
        table = {"ours": self.ours, VIRTIOFS: self.virtiofs, DIRECT: self.direct}.get(side, self.base)
        table.setdefault(key, []).append(value)


# -- data, one copy per side -----------------------------------------------------------------------
def _prepare_tree(root: Path) -> None:
    (root / "stat").mkdir()
    for i in range(STAT_FILES):
        (root / "stat" / f"file{i:04}.txt").write_bytes(b"x" * (i % 100))
    repo = root / "repo"
    for i in range(REPO_FILES):
        d = repo / f"pkg{i % REPO_DIRS:03}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"mod{i:04}.py").write_text(f"VALUE_{i} = {i}\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.com",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.com"}  # fmt: skip
    for argv in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-q", "-m", "bench"],
    ):
        subprocess.run(argv, cwd=repo, env=env, check=True, capture_output=True)


def _small_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(TAR_FILES):
            data = (f"small file {i}\n" * (1 + i % 40)).encode()
            info = tarfile.TarInfo(f"t/d{i % 20:02}/f{i:04}.txt")
            info.size, info.mtime, info.mode = len(data), 1_600_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- the two guests ----------------------------------------------------------------------------------
class Side:
    name: str

    async def run(self, *args: str) -> dict[str, Any]:
        raise NotImplementedError

    def cpu(self) -> float:
        """CPU seconds so far of what serves this side's mount (and runs its guest)."""
        raise NotImplementedError


class Ours(Side):
    name = "ours"

    def __init__(self, vm: VM, name: str = "ours") -> None:
        self.vm = vm
        self.name = name

    async def run(self, *args: str) -> dict[str, Any]:
        r = await self.vm.exec(["python3", "/tmp/bench.py", *args], timeout=RUN_TIMEOUT)
        if r.exit_code != 0:
            raise BenchError(f"{args[0]} failed in the gondolin guest: {r.stderr[-400:]}")
        return dict(json.loads(r.stdout))

    def cpu(self) -> float:
        return self_cpu() + process_cpu(self.vm.qemu_pid)


class NinePee(Side):
    name = "9p"

    def __init__(self, guest: RawGuest) -> None:
        self.guest = guest

    async def run(self, *args: str) -> dict[str, Any]:
        out = await self.guest.check(["python3", "/tmp/bench.py", *args], timeout=RUN_TIMEOUT)
        return dict(json.loads(out))

    def cpu(self) -> float:
        return process_cpu(self.guest.qemu_pid)


async def _measure(ctx: Context, sides: list[Side], s: Samples) -> None:
    reps = ctx.reps(3)
    for side in sides:  # untimed: git refreshes its index with this guest's stat data
        await side.run("git", MOUNT, "prepare")
    for rep in range(reps):
        order = sides if rep % 2 == 0 else sides[::-1]
        for side in order:
            cpu = side.cpu()
            r = await side.run("write", MOUNT, str(rep), str(SEQ_MIB))
            s.add(side.name, "write", SEQ_MIB / r["seconds"])
            r = await side.run("read", MOUNT, str(rep))
            s.add(side.name, "cpu", (side.cpu() - cpu) * 1000 / CPU_MIB)
            if r["bytes"] != SEQ_MIB * MiB:
                raise BenchError(f"{side.name} read {r['bytes']} bytes")
            s.add(side.name, "read", SEQ_MIB / r["seconds"])
            s.add(side.name, "read_again", SEQ_MIB / r["again"])
        for side in order:
            r = await side.run("stat", MOUNT, str(rep))
            if r["files"] != STAT_FILES:
                raise BenchError(f"{side.name} listed {r['files']} files")
            s.add(side.name, "stat", r["seconds"])
        for side in order:
            r = await side.run("git", MOUNT, str(rep))
            s.add(side.name, "git", r["seconds"])
            s.add(side.name, "git_again", r["again"])
            if r["dirty"]:
                s.notes.setdefault("git", []).append(f"{side.name}: {r['dirty']} paths reported")
        for side in order:
            r = await side.run("tar", MOUNT, str(rep))
            if r["files"] != TAR_FILES:
                raise BenchError(f"{side.name} extracted {r['files']} files")
            s.add(side.name, "tar", r["seconds"])
        ctx.log(f"vfs: repetition {rep + 1}/{reps} done")


async def _stage(ctx: Context, s: Samples, tmp: Path) -> None:
    image = await anyio.to_thread.run_sync(ensure_image, "default", ImageStore())
    choice = await _accel.decide(image, probe_boot)
    ctx.machine.setdefault("accelerator", choice.accel)
    ours_dir, base_dir, vfs_dir = tmp / "ours", tmp / "9p", tmp / VIRTIOFS
    tar = _small_tar()
    for d in (ours_dir, base_dir, vfs_dir):
        d.mkdir()
        await anyio.to_thread.run_sync(_prepare_tree, d)
    (base_dir / "bench.py").write_text(GUEST_SCRIPT)
    (base_dir / "small.tar").write_bytes(tar)
    provider = RealFSProvider(ours_dir, inline_metadata=True)
    virtfs = f"local,path={base_dir},mount_tag={NINEP_TAG},security_model=none"
    async with (
        raw_guest(image, accel=choice.accel, extra_args=("-virtfs", virtfs)) as guest,
        await VM.create(
            image=image.build_id, accel=choice.accel, network=False, mounts={MOUNT: provider}
        ) as vm,  # fmt: skip
        await VM.create(
            image=image.build_id, accel=choice.accel, network=False, fs_transport="virtiofs",
            mounts={MOUNT: RealFSProvider(vfs_dir, inline_metadata=True)},
        ) as vfs_vm,  # fmt: skip
    ):
        await guest.check(["sh", "-c", f"modprobe 9p && modprobe 9pnet_virtio && mkdir -p {MOUNT} && "
                                       f"mount -t 9p -o {NINEP_OPTS} {NINEP_TAG} {MOUNT} && "
                                       f"cp {MOUNT}/bench.py {MOUNT}/small.tar /tmp/"])  # fmt: skip
        for v in (vm, vfs_vm):
            await v.fs.write("/tmp/bench.py", GUEST_SCRIPT)
            await v.fs.write("/tmp/small.tar", tar)
        await _measure(ctx, [NinePee(guest), Ours(vm), Ours(vfs_vm, VIRTIOFS)], s)


async def collect(ctx: Context) -> list[Row]:
    s = Samples()
    with tempfile.TemporaryDirectory(prefix="gondolin-bench-vfs-") as tmp:
        try:
            with anyio.fail_after(STAGE_TIMEOUT):
                await _stage(ctx, s, Path(tmp))
        # A failure becomes error rows; cancellation is a BaseException and passes through.
        except Exception as exc:  # noqa: BLE001
            ctx.log(f"vfs: failed:\n{''.join(traceback.format_exception(exc))}")
            cause: BaseException = exc
            while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
                cause = cause.exceptions[0]
            first = (str(cause).strip().splitlines() or [""])[0]
            for p in PAIRS:
                s.errors.setdefault(p.key, f"{type(cause).__name__}: {first}"[:300])
    return rows(s)


def rows(s: Samples) -> list[Row]:
    out = []
    for p in PAIRS:
        ours, base = s.ours.get(p.key), s.base.get(p.key)
        if not ours or not base:
            out.append(Row(AREA, p.what, goal=p.goal, error=s.errors.get(p.key, "not measured")))
            continue
        what = f"{p.what} (median of {len(ours)})"
        out.append(Row(AREA, what, Measure.median_of(ours, p.unit), Measure.median_of(base, p.unit),
                       p.baseline_what, p.goal, "; ".join(s.notes.get(p.key, []))))  # fmt: skip
    for label, table in (("virtiofs transport", s.virtiofs),):
        for p in PAIRS:
            vfs, base = table.get(p.key), s.base.get(p.key)
            goal = VIRTIOFS_GOALS.get(p.key)
            if not vfs or not base:
                out.append(Row(AREA, f"{p.what}, {label}", goal=goal, error=s.errors.get(p.key, "not measured")))
                continue
            what = f"{p.what}, {label} (median of {len(vfs)})"
            out.append(Row(AREA, what, Measure.median_of(vfs, p.unit), Measure.median_of(base, p.unit),
                           p.baseline_what, goal))
    return out


__all__ = ["collect", "rows", "GUEST_SCRIPT", "PAIRS", "VIRTIOFS_GOALS"]
