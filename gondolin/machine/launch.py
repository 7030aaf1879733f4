"""From options to a running, configured machine: resolve the image and the accelerator, then
start from a boot source (a warm template, a cold boot, a checkpoint, a fork)."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from ..images import Image, ImageStore, ensure_image
from ..images.store import apply_image_defaults
from ..net.tcp_hosts import TcpHostRules
from ..options import VMOptions
from ..qemu import accel as _accel
from ..qemu.process import find_qemu
from .boot import BootSource, ColdBoot
from .machine import Machine
from .shape import MachineShape, machine_shape, uses_virtiofs
from .templates import start_warm, warm_up

PROBE_MEMORY_MB = 256


async def probe_boot(image: Image, accel: str, timeout: float) -> None:
    """Boot a throwaway machine with ``accel`` (the accelerator probe)."""
    options = VMOptions(image=image.build_id, memory=PROBE_MEMORY_MB, rootfs="readonly", network=False,
                        hostname="probe", label="accelerator probe", warm=False).checked()
    options = options.replace(timeouts=options.timeouts.__class__(start=timeout))
    machine = Machine(options, image, accel)
    try:
        await machine.start(ColdBoot())
    finally:
        with anyio.CancelScope(shield=True):
            await machine.close(raise_failure=False)


async def resolve(options: VMOptions, *, image: Image | None = None) -> tuple[VMOptions, Image, str]:
    """Checked options, the image (built on first use) and the accelerator they run on."""
    opts = options.checked()
    if opts.tcp_hosts:
        rules = TcpHostRules(opts.tcp_hosts)  # ValueError for a malformed rule, before anything starts
        if rules.hostnames and opts.dns != "synthetic":
            raise ValueError("tcp_hosts with host names need dns='synthetic' (the names resolve to "
                             "addresses the host stack maps); use IP addresses in tcp_hosts for other DNS modes")
    find_qemu()
    img = image if image is not None else await anyio.to_thread.run_sync(ensure_image, opts.image, ImageStore())
    opts = apply_image_defaults(opts, img)
    accel = opts.accel or await _accel.choose(img, probe_boot)
    return opts, img, accel


def maker(options: VMOptions, image: Image, accel: str) -> Callable[[], Machine]:
    return lambda: Machine(options, image, accel)


async def start_machine(options: VMOptions, source: BootSource | None = None, *,
                        image: Image | None = None) -> Machine:
    """A started and configured machine. ``source=None``: a warm template when
    ``options.warm`` (saving one first if there is none), else a cold boot. A virtiofs VM's
    template holds its machine without the device, which configure() then hot-plugs."""
    opts, img, accel = await resolve(options, image=image)
    make = maker(opts, img, accel)
    if source is not None:
        machine = make()
        await machine.start(source)
    elif opts.warm:
        machine = await start_warm(make)
    else:
        machine = make()
        await machine.start(ColdBoot())
    try:
        await machine.configure()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await machine.close(raise_failure=False)
        raise
    return machine


def poolable(options: VMOptions) -> bool:
    """Whether a spare can serve ``options`` (checked): every machine can, except one whose
    mounts use the virtiofs device (plugged in per VM at configure; spares do not hold one yet)."""
    return not uses_virtiofs(options)


async def shape_of(options: VMOptions, *, image: Image | None = None) -> tuple[VMOptions, Image, str, MachineShape]:
    """:func:`resolve` plus the machine shape the options need (what a spare must match)."""
    opts, img, accel = await resolve(options, image=image)
    return opts, img, accel, machine_shape(opts, img, accel)


async def start_spare(options: VMOptions, *, image: Image | None = None) -> Machine:
    """A started spare of the machine ``options`` describe (see :class:`Machine`, ``spare``),
    ready for :func:`hand_out`: restored from the shape's template (or booted cold), given the
    base configuration (fresh clock and entropy, the default hostname; no environment, secrets
    or mounts) and run through the warm-up commands, so that under TCG the code paths of the
    caller's configure and first exec are already translated when it is handed out."""
    opts, img, accel = await resolve(options, image=image)
    if not poolable(opts):
        raise ValueError("a VM whose mounts use fs_transport='virtiofs' cannot be kept as a spare")

    def make() -> Machine:
        return Machine(opts, img, accel, spare=True)

    if opts.warm:
        machine = await start_warm(make)
    else:
        machine = make()
        await machine.start(ColdBoot())
    try:
        await machine.configure(base=True, hostname=opts.hostname)
        await warm_up(machine)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await machine.close(raise_failure=False)
        raise
    return machine


async def hand_out(machine: Machine, options: VMOptions) -> None:
    """Give a spare its caller's ``options`` (checked, same shape) and configure the guest with
    them: one CONFIGURE message. On failure the spare is closed."""
    try:
        await machine.assign(options)
        await machine.configure()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await machine.close(raise_failure=False)
        raise


__all__ = ["hand_out", "poolable", "probe_boot", "resolve", "shape_of", "start_machine", "start_spare"]
