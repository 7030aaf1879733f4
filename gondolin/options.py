"""What a VM is made of: one typed options value, shared by every way of starting a VM.

:class:`VMOptions` is used by :meth:`gondolin.VM.create`, :func:`gondolin.open_vm`, checkpoint
resume, :class:`gondolin.VMPool`, the synchronous facade, the CLI and the agent integrations.
It is plain data: checking it needs no QEMU, and it imports nothing from the rest of the
package at run time (the hook and provider types are only named for type checkers).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict

if TYPE_CHECKING:
    from .http.hooks import HttpHooks
    from .ssh.policy import SshProxyOptions
    from .vfs.provider import Provider

RootfsMode = Literal["cow", "readonly", "memory"]
DnsMode = Literal["synthetic", "trusted", "open"]
MountMode = Literal["rw", "ro", "cow"]
FsTransport = Literal["port", "virtiofs"]
ROOTFS_MODES: tuple[str, ...] = ("cow", "readonly", "memory")
DNS_MODES: tuple[str, ...] = ("synthetic", "trusted", "open")
MOUNT_MODES: tuple[str, ...] = ("rw", "ro", "cow")
FS_TRANSPORTS: tuple[str, ...] = ("port", "virtiofs")
# Guest paths no mount may cover: the guest's own system directories (the agent, the kernel's
# pseudo file systems and the programs every command needs live there).
RESERVED_MOUNT_POINTS: frozenset[str] = frozenset(
    {"/", "/proc", "/sys", "/dev", "/run", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/boot"})
MAX_CPUS = 64
MIN_MEMORY_MB = 128
# Processes one exec may have at once in the guest (its own pids cgroup there): far above what
# builds and test runners use, far below what takes a 512 MiB guest down.
DEFAULT_PIDS_MAX = 1024


def check_mount_point(guest_path: str) -> str:
    """The normalised absolute guest path of a mount point; ValueError for a reserved or relative one."""
    if not isinstance(guest_path, str) or not guest_path.startswith("/"):
        raise ValueError(f"cannot mount at {guest_path!r}: give an absolute guest path such as /workspace")
    if "\0" in guest_path:
        raise ValueError("a mount point contains a NUL byte")
    path = posixpath.normpath(guest_path)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    if path in RESERVED_MOUNT_POINTS:
        raise ValueError(f"cannot mount over {path}: it holds the guest's own system files "
                         "(mount at a path such as /workspace or /data)")
    return path


def parse_memory(value: int | str) -> int:
    """Memory size in MiB from an int (MiB) or a QEMU-style string: "512M", "1G", "2048"."""
    if isinstance(value, bool):
        raise ValueError(f"invalid memory size {value!r}")
    if isinstance(value, int):
        mb = value
    else:
        s = value.strip().upper().removesuffix("B").removesuffix("I")
        mult = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}.get(s[-1:], None)
        try:
            mb = int(float(s[:-1]) * mult) if mult is not None else int(s)
        except ValueError:
            raise ValueError(f"invalid memory size {value!r}: use MiB as an int, or '512M' / '2G'") from None
    if mb < MIN_MEMORY_MB:
        raise ValueError(f"memory of {mb} MiB is too small for the guest (at least {MIN_MEMORY_MB} MiB)")
    return mb


def _env_timeout(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass(frozen=True)
class Timeouts:
    """Host-side deadlines, in seconds. Every wait on the guest has one.

    ``start``: from QEMU's start until the agent answers (``GONDOLIN_START_TIMEOUT``).
    ``call``: longest wait for the guest's next message in a file operation or other request
    (a streamed transfer may take longer in total; each message resets the deadline).
    ``grace``: an ``exec(timeout=t)`` fails on the host at ``t + grace`` when the guest has not
    reported the kill by then. ``ping_interval``: how often an idle VM is pinged.
    ``unresponsive``: a guest that has not answered a ping for this long is declared
    unresponsive; the VM is then dead and every call fails with :class:`VMUnresponsiveError`.
    """

    start: float = dataclasses.field(default_factory=lambda: _env_timeout("GONDOLIN_START_TIMEOUT", 120.0))
    call: float = 60.0
    grace: float = 10.0
    ping_interval: float = 5.0
    unresponsive: float = 30.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"timeouts.{f.name} must be a positive number of seconds, not {value!r}")
        if self.ping_interval >= self.unresponsive:
            raise ValueError("timeouts.ping_interval must be shorter than timeouts.unresponsive")


@dataclass(frozen=True)
class VMOptions:
    """Everything that defines a VM. Unknown or ill-typed values raise ``ValueError`` in
    :meth:`checked`, before anything starts.

    ``memory`` in MiB (or "1G"); ``cpus`` vCPUs; ``env`` defaults for every exec; ``rootfs``:
    ``"cow"`` (writes go to a throwaway qcow2 overlay), ``"memory"`` (writes go to guest RAM) or
    ``"readonly"``; ``image``: a ref name, build id or image directory (``"default"`` is built on
    first use); ``accel``: ``"kvm"``/``"tcg"`` (default: probe once, or ``GONDOLIN_ACCEL``).

    Network: ``network=False`` gives the guest no NIC at all. Otherwise every guest connection
    goes through the host's network stack: ``http_hooks`` (from
    :func:`gondolin.http.create_http_hooks`) decide which HTTP(S) requests may leave (none
    without hooks), ``tcp_hosts`` maps ``"name:port"`` to a host ``"ip:port"`` for raw TCP,
    ``dns`` is ``"synthetic"`` (default), ``"trusted"`` or ``"open"``. ``mounts`` maps guest
    paths to :mod:`gondolin.vfs` providers.

    ``warm=True`` restores from a saved template of the image and machine shape instead of
    booting (see docs/snapshots.md). ``timeouts``: the host-side deadlines (:class:`Timeouts`).
    ``pids_max``: processes one exec (with everything it starts) may have at once in the
    guest, so a fork bomb cannot take the VM down; ``None`` for no limit.
    ``disk_size`` (MiB or "4G", rootfs ``"cow"`` only): the guest's root disk grows to this
    size at start, and its host-side overlay can never use more (the guest gets ENOSPC);
    ``None`` keeps the image's size (its free space, 1 GiB for the default image).
    ``fs_transport``: how ``mounts`` reach the guest. ``"port"`` (default): a guest FUSE
    daemon over a virtio-serial port. ``"virtiofs"`` (opt-in): the guest kernel's virtiofs
    driver, answered from this process over shared guest memory (much faster metadata; a
    checkpoint or fork is refused while a guest process holds a file or directory on a mount;
    host-side changes reach the guest after a 1 s TTL). See docs/filesystem.md.
    """

    image: str = "default"
    memory: int | str = 512
    cpus: int = 1
    env: Mapping[str, str] = field(default_factory=dict)
    rootfs: RootfsMode = "cow"
    hostname: str = "gondolin"
    label: str | None = None
    accel: str | None = None
    network: bool = True
    dns: DnsMode = "synthetic"
    tcp_hosts: Mapping[str, str] = field(default_factory=dict)
    http_hooks: HttpHooks | None = None
    mounts: Mapping[str, Provider] = field(default_factory=dict)
    warm: bool = True
    timeouts: Timeouts = field(default_factory=Timeouts)
    pids_max: int | None = DEFAULT_PIDS_MAX
    ssh: SshProxyOptions | None = None  # SSH egress through the host (gondolin.ssh.SshProxyOptions)
    disk_size: int | str | None = None
    fs_transport: FsTransport = "port"

    @property
    def memory_mb(self) -> int:
        return parse_memory(self.memory)

    def checked(self) -> VMOptions:
        """A copy with normalised values; ``ValueError`` naming the bad option otherwise."""
        if not isinstance(self.image, str) or not self.image:
            raise ValueError("image must be a non-empty string (a ref name, build id or image directory)")
        memory = parse_memory(self.memory)
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, int) or not 1 <= self.cpus <= MAX_CPUS:
            raise ValueError(f"cpus must be an integer between 1 and {MAX_CPUS}, not {self.cpus!r}")
        if self.rootfs not in ROOTFS_MODES:
            raise ValueError(f"rootfs must be 'cow', 'readonly' or 'memory', not {self.rootfs!r}")
        if self.dns not in DNS_MODES:
            raise ValueError(f"dns must be 'synthetic', 'trusted' or 'open', not {self.dns!r}")
        if self.accel is not None and self.accel not in ("kvm", "tcg"):
            raise ValueError(f"accel must be 'kvm', 'tcg' or None (probe), not {self.accel!r}")
        if not isinstance(self.hostname, str) or not self.hostname or len(self.hostname) > 63:
            raise ValueError(f"hostname must be 1-63 characters, not {self.hostname!r}")
        if not isinstance(self.timeouts, Timeouts):
            raise ValueError("timeouts must be a gondolin.Timeouts")
        if self.pids_max is not None and (isinstance(self.pids_max, bool) or not isinstance(self.pids_max, int)
                                          or self.pids_max < 8):
            raise ValueError(f"pids_max must be an integer of at least 8, or None for no limit; not {self.pids_max!r}")
        disk_size = None
        if self.disk_size is not None:
            try:
                disk_size = parse_memory(self.disk_size)
            except ValueError:
                raise ValueError(f"invalid disk_size {self.disk_size!r}: use MiB as an int, or '4G'") from None
            if self.rootfs != "cow":
                raise ValueError("disk_size needs rootfs='cow' (the other modes never write to the disk)")
        if self.fs_transport not in FS_TRANSPORTS:
            raise ValueError(f"fs_transport must be 'port' or 'virtiofs', not {self.fs_transport!r}")
        env = {}
        for key, value in dict(self.env).items():
            if not isinstance(key, str) or not key or "=" in key or "\0" in key:
                raise ValueError(f"env name {key!r} is not a valid variable name")
            env[key] = str(value)
        if not self.network and (self.tcp_hosts or self.http_hooks is not None or self.ssh is not None):
            raise ValueError("tcp_hosts, http_hooks and ssh need network=True")
        if self.ssh is not None:
            self.ssh.checked(dns=self.dns)
        mounts: dict[str, Any] = {}
        for guest_path, provider in dict(self.mounts).items():
            path = check_mount_point(guest_path)
            if path in mounts:
                raise ValueError(f"{path} is mounted twice")
            mounts[path] = provider
        return dataclasses.replace(self, memory=memory, env=env, disk_size=disk_size, tcp_hosts={str(k): str(v) for k, v in
                                                                             dict(self.tcp_hosts).items()},
                                   mounts=mounts)

    def replace(self, **changes: Any) -> VMOptions:
        """A copy with ``changes`` applied (the names of the fields)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown VM option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_kwargs(cls, options: VMOptions | None = None, **changes: Any) -> VMOptions:
        """``options`` (or the defaults) with keyword ``changes``: the shape every entry point takes.
        ``start_timeout=`` is accepted as a shorthand for ``timeouts.start``."""
        base = options if options is not None else cls()
        if not isinstance(base, VMOptions):
            raise TypeError(f"options must be a VMOptions, not {type(base).__name__}")
        if "start_timeout" in changes:
            start = changes.pop("start_timeout")
            if start is not None:
                changes["timeouts"] = dataclasses.replace(changes.get("timeouts", base.timeouts), start=float(start))
        return base.replace(**changes) if changes else base


class OptionChanges(TypedDict, total=False):
    """The keyword form of :class:`VMOptions` (``VM.create(memory="1G", cpus=2)``)."""

    image: str
    memory: int | str
    cpus: int
    env: Mapping[str, str]
    rootfs: RootfsMode
    hostname: str
    label: str | None
    accel: str | None
    network: bool
    dns: DnsMode
    tcp_hosts: Mapping[str, str]
    http_hooks: HttpHooks | None
    mounts: Mapping[str, Provider]
    warm: bool
    timeouts: Timeouts
    pids_max: int | None
    disk_size: int | str | None
    ssh: SshProxyOptions | None
    fs_transport: FsTransport
    start_timeout: float | None

__all__ = [
    "DNS_MODES",
    "FS_TRANSPORTS",
    "MOUNT_MODES",
    "RESERVED_MOUNT_POINTS",
    "ROOTFS_MODES",
    "DnsMode",
    "FsTransport",
    "MountMode",
    "OptionChanges",
    "RootfsMode",
    "Timeouts",
    "VMOptions",
    "check_mount_point",
    "parse_memory",
]
