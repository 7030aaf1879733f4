"""A pool of spare VMs, configured on acquire: :meth:`VMPool.acquire` hands one out at once.

    async with VMPool(size=2, memory="512M") as pool:
        async with await pool.acquire(env={"TASK": "7"}, hostname="job-7") as vm:
            await vm.exec("...")                   # closing the VM discards it

A spare is a machine restored from its shape's warm template (see docs/snapshots.md) that has
had only the base configuration (clock, entropy) and no caller's options: its network and file
services are not running, so the guest can reach nothing, and it holds no environment, secret
or mount. :meth:`VMPool.acquire` takes the options of the VM it is asked for (the pool's,
with any changes), starts the spare's network with their policy and secrets and its file
service with their mounts, and sends the guest one configure message (fresh clock and entropy,
hostname, environment, mounts). A spare serves only options of its own machine shape (image,
memory, vCPUs, root disk mode, accelerator, network on/off, mounts on/off); other options get
a VM created directly. A spare is handed out once and never reused.

The pool owns its filler tasks (an anyio task group) and every spare it has not handed out;
closing the pool closes those. A filler that fails to start a spare logs it and retries with a
growing delay; meanwhile :meth:`VMPool.acquire` creates VMs directly.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from types import TracebackType
from typing import Unpack

import anyio
from anyio.abc import TaskGroup

from ._log import get_logger
from .errors import GondolinError
from .images import Image
from .machine import Machine
from .machine.launch import hand_out, poolable, shape_of, start_spare
from .machine.shape import MachineShape
from .options import OptionChanges, VMOptions
from .vfs.memory import MemoryProvider
from .vm import VM, vm_for

log = get_logger("vm")
RETRY_FIRST = 1.0  # seconds before a filler retries after a failed spare start; doubles each time
RETRY_MAX = 30.0
# Seconds a filler waits after a hand-out before it restores the replacement: a restore keeps a
# host core busy for a few tenths of a second, which would otherwise slow the caller's first
# commands in the VM just handed out.
REFILL_DELAY = 0.5


def spare_options(options: VMOptions) -> VMOptions:
    """What a spare for ``options`` is started with: their machine shape and nothing of the
    caller's (no environment, hostname, label, policy, secrets, TCP mappings, SSH or mount
    providers: an empty stand-in per mount point keeps the shape's fs port)."""
    return VMOptions(image=options.image, memory=options.memory, cpus=options.cpus, rootfs=options.rootfs,
                     accel=options.accel, network=options.network, warm=options.warm, timeouts=options.timeouts,
                     pids_max=options.pids_max, disk_size=options.disk_size, fs_transport=options.fs_transport,
                     mounts={path: MemoryProvider() for path in options.mounts})


@dataclass(eq=False)
class _Lane:
    """Spares of one machine shape: ``size`` kept ready by one filler task."""

    options: VMOptions  # spare_options(...) of the options this lane serves
    size: int
    ready: collections.deque[Machine] = field(default_factory=collections.deque)
    starting: int = 0
    shape: MachineShape | None = None  # known after the first spare (or the first acquire) resolved it
    image: Image | None = None  # what ``options.image`` named when the last spare was made
    error: GondolinError | None = None  # the last failure to start a spare; cleared by a success
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class VMPool:
    """Keeps ``size`` spares of the machine shape of ``options`` (keyword ``changes`` applied as
    :meth:`VM.create` applies them) and configures one for each :meth:`acquire`.

    ``follow_last=True`` also keeps one spare of the shape the last acquire asked for when that
    is not the pool's own (a caller that keeps asking for 2 GiB VMs is then served from spares
    too); a new shape replaces the previous one.
    """

    def __init__(self, options: VMOptions | None = None, /, *, size: int = 2, follow_last: bool = False,
                 **changes: Unpack[OptionChanges]) -> None:
        if size < 1:
            raise ValueError("a pool needs size >= 1")
        self.size = size
        self.options = VMOptions.from_kwargs(options, **changes).checked()
        self.follow_last = follow_last
        # No lane at all for options no spare can serve: every acquire creates its VM.
        self._lanes: list[_Lane] = [_Lane(spare_options(self.options), size)] if poolable(self.options) else []
        self._followed: _Lane | None = None
        self._changed = anyio.Event()
        self._tg: TaskGroup | None = None
        self._closed = False
        self.handed_out = 0  # acquisitions served by a spare
        self.created_directly = 0  # acquisitions served by a VM created on the spot

    @property
    def ready(self) -> int:
        """Spares started and waiting to be acquired (all shapes)."""
        return sum(len(lane.ready) for lane in self._lanes)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # -- lifetime ------------------------------------------------------------------------
    async def __aenter__(self) -> VMPool:
        if self._tg is not None or self._closed:
            raise GondolinError("this pool was already started")
        if not poolable(self.options):
            log.warning("pool: VMs with virtiofs mounts cannot be kept as spares; every acquire creates one")
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        for lane in self._lanes:
            self._tg.start_soon(self._filler, lane)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        self._closed = True
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:  # the block did not run in the fillers' task group: its exception passes through unwrapped
            await self._tg.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                for lane in self._lanes:
                    await _close_all(lane)
        return None

    async def close(self) -> None:
        """Stop making spares and close every spare not handed out (the end of the ``async
        with`` block does it too); :meth:`acquire` refuses from then on."""
        self._closed = True
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            for lane in self._lanes:
                await _close_all(lane)

    async def _filler(self, lane: _Lane) -> None:
        delay = RETRY_FIRST
        with lane.scope:
            while True:
                if len(lane.ready) + lane.starting >= lane.size:
                    while len(lane.ready) + lane.starting >= lane.size:
                        await self._changed.wait()
                    await anyio.sleep(REFILL_DELAY)
                lane.starting += 1
                try:
                    machine = await start_spare(lane.options)
                except Exception as exc:  # noqa: BLE001 - whatever it was, acquire creates VMs directly meanwhile
                    log.warning("pool: a spare VM failed to start (%s: %s); retrying in %.0fs", type(exc).__name__,
                                exc, delay)
                    lane.error = exc if isinstance(exc, GondolinError) else GondolinError(
                        f"{type(exc).__name__}: {exc}", code="pool_refill_failed")
                    self._notify()
                    await anyio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                finally:
                    lane.starting -= 1
                delay = RETRY_FIRST
                lane.error = None
                lane.shape = machine.shape()
                lane.image = machine.image
                lane.ready.append(machine)
                self._notify()

    def _follow(self, options: VMOptions, shape: MachineShape) -> None:
        """Keep one spare of ``shape`` from now on, instead of the previously followed shape."""
        old = self._followed
        if old is not None:
            old.scope.cancel()
            self._lanes.remove(old)
            assert self._tg is not None
            self._tg.start_soon(_close_all, old)
        lane = _Lane(spare_options(options), 1, shape=shape)
        self._followed = lane
        self._lanes.append(lane)
        assert self._tg is not None
        self._tg.start_soon(self._filler, lane)

    # -- use -------------------------------------------------------------------------------
    async def acquire(self, options: VMOptions | None = None, /, *, timeout: float | None = None,
                      **changes: Unpack[OptionChanges]) -> VM:
        """A VM with ``options`` (default: the pool's), keyword ``changes`` applied on top, now
        yours (close it when done). A spare of the same machine shape is configured with them;
        when the pool has none of that shape, or its spares fail to start, the VM is created
        directly. Waits up to ``timeout`` seconds for a spare that is being started
        (:class:`GondolinError` ``pool_timeout`` after that)."""
        if self._tg is None or self._closed:
            raise GondolinError("use the pool inside `async with VMPool(...)`", code="pool_not_running")
        opts = VMOptions.from_kwargs(options if options is not None else self.options, **changes)
        # The image a spare was made from stands for its ref name (no store lookup on this path).
        known = next((lane.image for lane in self._lanes if lane.image is not None and lane.options.image == opts.image),
                     None)
        checked, _image, _accel, shape = await shape_of(opts, image=known)  # bad options fail here
        for candidate in self._lanes:
            if candidate.shape is None:  # before its first spare: work out which shape it keeps
                try:
                    candidate.shape = (await shape_of(candidate.options))[3]
                except (GondolinError, ValueError) as exc:
                    log.debug("pool: the shape of its spares is unknown yet (%s)", exc)
        # warm=False asks for a cold boot: only a pool of cold-booted spares serves it
        lane = next((candidate for candidate in self._lanes
                     if candidate.shape == shape and candidate.options.warm == checked.warm), None)
        if not poolable(checked) or lane is None:
            if self.follow_last and poolable(checked):
                self._follow(checked, shape)
            return await self._create(checked)
        with anyio.move_on_after(timeout if timeout is not None else math.inf):
            while True:
                machine = await self._take(shape)
                if machine is not None:
                    try:
                        await hand_out(machine, checked)  # closes the spare if it fails
                        try:
                            vm = await vm_for(machine)
                        except BaseException:
                            with anyio.CancelScope(shield=True):
                                await machine.close(raise_failure=False)
                            raise
                    except GondolinError as exc:  # the spare died; the options are checked again below
                        log.warning("pool: a spare VM could not be handed out (%s); creating one", exc)
                        return await self._create(checked)
                    self.handed_out += 1
                    return vm
                if lane.error is not None or lane.shape != shape or lane not in self._lanes:
                    return await self._create(checked)  # its spares fail to start, or it was replaced
                await self._changed.wait()
        raise GondolinError(f"no VM became ready within {timeout:g}s", code="pool_timeout")

    async def _take(self, shape: MachineShape) -> Machine | None:
        """A running spare of ``shape``, out of the pool (dead ones are closed on the way)."""
        for lane in self._lanes:
            while lane.ready and lane.shape == shape:
                machine = lane.ready.popleft()
                self._notify()  # its filler starts the replacement
                if machine.running and machine.shape() == shape:
                    return machine
                with anyio.CancelScope(shield=True):
                    await machine.close(raise_failure=False)
        return None

    async def _create(self, options: VMOptions) -> VM:
        self.created_directly += 1
        return await VM.create(options)


async def _close_all(lane: _Lane) -> None:
    with anyio.CancelScope(shield=True):
        while lane.ready:
            await lane.ready.popleft().close(raise_failure=False)


__all__ = ["VMPool", "spare_options"]
