"""What a saved memory image depends on: the machine's shape, and the QEMU machine of a VM.

A memory image restores only into a QEMU with the same device set, memory size, vCPU count and
QEMU version; :class:`MachineShape` names all of it, and its key names a warm template.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..images import Image
from ..options import VMOptions
from ..qemu.accel import qemu_version
from ..qemu.argv import MachineSpec, SerialPort, build_argv
from ..qemu.process import find_qemu
from ..shm import REGION_MB

TEMPLATE_FORMAT = 1  # bump when what a template holds or how it is taken changes
RUN_PLACEHOLDER = "/@run"
IMAGE_PLACEHOLDER = "/@image"
CONTROL_PORT = "gondolin.control"
FS_PORT = "gondolin.fs"
VIRTIOFS_SOCKET = "virtiofs.sock"  # in the run directory
VIRTIOFS_TAG = "gondolin"  # what the guest mounts (guest/agent.py start_virtiofs)
VIRTIOFS_QUEUE_SIZE = 1024
SHARED_REGION_FILE = "xfer.mem"  # in the run directory: vm.fs bulk data (gondolin.shm)
VIRTIOFS_CHARDEV = "vfs"  # QMP ids of the hot-plugged chardev and device
VIRTIOFS_DEVICE = "vfs0"


def machine_spec(options: VMOptions, image: Image, accel: str, run_dir: Path) -> MachineSpec:
    """The QEMU machine for a VM; every per-VM path lives under ``run_dir``."""
    ports = [SerialPort(CONTROL_PORT, str(run_dir / "control.sock"))]
    extra: tuple[str, ...] = ()
    if uses_virtiofs(options):
        extra = virtiofs_args(options.memory_mb)
    elif options.mounts:
        ports.append(SerialPort(FS_PORT, str(run_dir / "fs.sock")))
    base = str(image.rootfs)
    if options.rootfs == "readonly":
        disk, fmt, readonly, mode = base, "raw", True, "ro"
    elif options.rootfs == "memory":
        disk, fmt, readonly, mode = base, "raw", True, "overlay"
    else:
        disk, fmt, readonly, mode = str(run_dir / "root.qcow2"), "qcow2", False, "rw"
    return MachineSpec(
        kernel=str(image.kernel), initrd=str(image.initrd), disk=disk, disk_format=fmt,
        disk_readonly=readonly, root_mode=mode, memory_mb=options.memory_mb, cpus=options.cpus,
        accel=accel, ports=tuple(ports),
        net_socket=str(run_dir / "net.sock") if options.network else None,
        qmp_socket=str(run_dir / "qmp.sock"),
        shared_region=str(run_dir / SHARED_REGION_FILE), shared_region_mb=REGION_MB,
        extra_append=" ".join(filter(None, (
            "gondolin.debug=1 loglevel=6" if os.environ.get("GONDOLIN_GUEST_DEBUG") else "",
            f"gondolin.disk={options.disk_size}M" if options.disk_size and options.rootfs == "cow" else "",
            os.environ.get("GONDOLIN_KERNEL_APPEND", "")))),
        extra_args=extra,
    )


def uses_virtiofs(options: VMOptions) -> bool:
    """Whether the VM serves its mounts through the virtiofs device (opt-in, mounts given)."""
    return options.fs_transport == "virtiofs" and bool(options.mounts)


def virtiofs_args(memory_mb: int) -> tuple[str, ...]:
    """QEMU arguments of a virtiofs VM: guest RAM in a shared memfd (the vhost-user backend in
    this process maps it). The ``vhost-user-fs-pci`` device itself is not on the command line:
    QEMU 7.2 cannot migrate it, so it is hot-plugged after every start (:func:`virtiofs_chardev`,
    :func:`virtiofs_device`) and unplugged before every save; templates, checkpoints and forks
    of virtiofs VMs hold the memfd machine without it."""
    return ("-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on", "-machine", "memory-backend=mem")


def virtiofs_chardev(socket_path: str) -> dict[str, Any]:
    """QMP ``chardev-add`` arguments: a client socket to the host's vhost-user listener."""
    return {"id": VIRTIOFS_CHARDEV, "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": socket_path}}, "server": False}}}


def virtiofs_device() -> dict[str, Any]:
    """QMP ``device_add`` arguments of the virtiofs device (hot-plugged on pci.0)."""
    return {"driver": "vhost-user-fs-pci", "id": VIRTIOFS_DEVICE, "chardev": VIRTIOFS_CHARDEV,
            "tag": VIRTIOFS_TAG, "queue-size": VIRTIOFS_QUEUE_SIZE}


def machine_shape(options: VMOptions, image: Image, accel: str) -> MachineShape:
    """The shape of the VM ``options`` describe (the template key)."""
    spec = machine_spec(options, image, accel, Path(RUN_PLACEHOLDER))
    return MachineShape(
        image=image.build_id, memory_mb=options.memory_mb, cpus=options.cpus, rootfs=options.rootfs,
        accel=accel, network=options.network, fs_port=bool(options.mounts),
        qemu=qemu_version_cached(find_qemu()),
        devices=device_fingerprint(spec, RUN_PLACEHOLDER, str(image.path)),
    )


@dataclass(frozen=True)
class MachineShape:
    """Everything a saved memory image depends on. Equal shapes can share a template."""

    image: str  # image build id
    memory_mb: int
    cpus: int
    rootfs: str
    accel: str
    network: bool
    fs_port: bool
    qemu: str  # `qemu-system-x86_64 --version`, first line
    devices: str  # fingerprint of the QEMU command line (see device_fingerprint)

    def key(self) -> str:
        blob = json.dumps({"format": TEMPLATE_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> MachineShape:
        if not isinstance(data, dict):
            raise ValueError("machine shape is not an object")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                raise ValueError(f"machine shape lacks {f.name!r}")
            value = data[f.name]
            want = {"int": int, "bool": bool, "str": str}[str(f.type)]
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ValueError(f"machine shape field {f.name!r} has the wrong type")
            kwargs[f.name] = value
        return cls(**kwargs)

    def differences(self, other: MachineShape) -> list[str]:
        """Human-readable list of what differs (for refusals)."""
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name}: {a!r} != {b!r}" if f.name != "devices" else "QEMU device set differs")
        return out

    def describe(self) -> str:
        return (f"image {self.image[:12]}, {self.memory_mb} MiB, {self.cpus} vCPU, rootfs {self.rootfs}, "
                f"{self.accel}, network {'on' if self.network else 'off'}, mounts {'on' if self.fs_port else 'off'}")


def device_fingerprint(spec: MachineSpec, run_dir: str, image_dir: str) -> str:
    """Hash of the QEMU command line with the per-VM run directory and the image directory
    replaced by placeholders, and without the restore source."""
    argv = build_argv(replace(spec, incoming=None), "qemu")
    normalized = [a.replace(run_dir, RUN_PLACEHOLDER).replace(image_dir, IMAGE_PLACEHOLDER) for a in argv]
    return hashlib.sha256("\0".join(normalized).encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=8)
def _qemu_version(path: str, mtime_ns: int) -> str:
    return qemu_version(path)


def qemu_version_cached(path: str) -> str:
    """QEMU's version string, asked once per binary (it costs a process start)."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        mtime = 0
    return _qemu_version(path, mtime)
