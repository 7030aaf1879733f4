"""Build the QEMU command line for one VM. Pure: no processes, no file system access."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# qboot boots a bzImage ~0.5 s faster than SeaBIOS under TCG, but with a PVH kernel it does not
# start the guest at all once a vmgenid device is present, so the default is SeaBIOS + vmgenid.
QBOOT_ROM = "/usr/share/qemu/qboot.rom"
GUEST_MAC = "02:00:00:00:00:01"
BASE_APPEND = (
    "console=ttyS0 panic=-1 quiet loglevel=3 reboot=t 8250.nr_uarts=1 "
    "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd random.trust_cpu=on "
    "cryptomgr.notests no_timer_check tsc=reliable"
)


@dataclass(frozen=True)
class SerialPort:
    name: str  # guest-visible virtio-serial port name, e.g. "gondolin.control"
    socket_path: str  # host unix socket the host listens on; QEMU connects


@dataclass(frozen=True)
class MachineSpec:
    kernel: str
    initrd: str
    disk: str
    disk_format: str = "raw"  # raw | qcow2
    disk_readonly: bool = False
    root_mode: str = "rw"  # what the initramfs does with /dev/vda: rw | ro | overlay
    memory_mb: int = 512
    cpus: int = 1
    accel: str = "tcg"  # tcg | kvm
    ports: tuple[SerialPort, ...] = ()
    net_socket: str | None = None  # -netdev stream unix socket (host listens), None = no NIC
    qmp_socket: str | None = None  # QEMU listens
    incoming: str | None = None  # migration source URI for a restore
    vmgenid: bool = True
    bios: str | None = None
    extra_append: str = ""
    # bulk-transfer region: a host file QEMU maps as an ivshmem-plain BAR (migratable RAM)
    shared_region: str | None = None
    shared_region_mb: int = 64  # gondolin.shm.REGION_MB
    extra_args: tuple[str, ...] = field(default_factory=tuple)


def build_argv(spec: MachineSpec, qemu: str = "qemu-system-x86_64") -> list[str]:
    if spec.cpus < 1:
        raise ValueError("cpus must be >= 1")
    if spec.accel not in ("tcg", "kvm"):
        raise ValueError(f"unknown accelerator {spec.accel!r}")
    argv = [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    argv += ["-machine", "pc"]
    if spec.accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", "tcg,thread=multi", "-cpu", "max"]
    argv += ["-m", f"{spec.memory_mb}M", "-smp", str(spec.cpus)]
    if spec.bios and os.path.exists(spec.bios):
        argv += ["-bios", spec.bios]
    append = f"{BASE_APPEND} gondolin.root={spec.root_mode} {spec.extra_append}".strip()
    argv += ["-kernel", spec.kernel, "-initrd", spec.initrd, "-append", append]
    argv += ["-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con"]
    drive = f"file={spec.disk},if=none,id=root,format={spec.disk_format},cache=unsafe,discard=unmap"
    if spec.disk_readonly:
        drive += ",readonly=on"
    argv += ["-drive", drive, "-device", "virtio-blk-pci,drive=root"]
    argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0"]
    if spec.ports:
        argv += ["-device", "virtio-serial-pci,id=vser"]
        for i, port in enumerate(spec.ports):
            argv += ["-chardev", f"socket,id=vp{i},path={port.socket_path},server=off"]
            argv += ["-device", f"virtserialport,bus=vser.0,chardev=vp{i},name={port.name}"]
    if spec.net_socket:
        argv += ["-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={spec.net_socket}"]
        argv += ["-device", f"virtio-net-pci,netdev=n0,romfile=,mac={GUEST_MAC}"]
    if spec.shared_region:
        argv += ["-object", f"memory-backend-file,id=xfer,mem-path={spec.shared_region},"
                            f"size={spec.shared_region_mb}M,share=on",
                 "-device", "ivshmem-plain,memdev=xfer,master=on"]  # master: migratable
    if spec.vmgenid:
        argv += ["-device", "vmgenid"]
    if spec.qmp_socket:
        argv += ["-qmp", f"unix:{spec.qmp_socket},server=on,wait=off"]
    if spec.incoming:
        argv += ["-incoming", spec.incoming]
    argv += list(spec.extra_args)
    return argv
