"""A pool of ready VMs: :meth:`VMPool.acquire` hands one out at once and starts its replacement.

    async with VMPool(size=4, memory="512M") as pool:
        async with await pool.acquire() as vm:   # closing the VM discards it
            await vm.exec("...")

VMs are restored from the shape's warm template (see :mod:`gondolin.templates`), so refilling
costs a fraction of a second each. A VM is handed out once and never reused: whatever the
caller did inside it leaves with it. The pool owns its filler tasks (an anyio task group) and
every VM it has not handed out; closing the pool closes those.
"""

from __future__ import annotations

import collections
import math
from types import TracebackType
from typing import Unpack

import anyio
from anyio.abc import TaskGroup

from ._log import get_logger
from .errors import GondolinError
from .options import OptionChanges, VMOptions
from .vm import VM

log = get_logger("vm")
RETRY_FIRST = 1.0  # seconds before a filler retries after a failed VM start; doubles each time
RETRY_MAX = 30.0


class VMPool:
    """Keeps ``size`` started VMs ready, made from ``options`` and keyword ``changes`` as
    :meth:`VM.create` makes them."""

    def __init__(self, options: VMOptions | None = None, /, *, size: int = 2,
                 **changes: Unpack[OptionChanges]) -> None:
        if size < 1:
            raise ValueError("a pool needs size >= 1")
        self.size = size
        self.options = VMOptions.from_kwargs(options, **changes).checked()
        if not self.options.warm:
            log.debug("pool of cold-booted VMs: refills take seconds each")
        self._ready: collections.deque[VM] = collections.deque()
        self._starting = 0
        self._changed = anyio.Event()
        self._error: GondolinError | None = None
        self._tg: TaskGroup | None = None
        self._closed = False
        self.handed_out = 0

    @property
    def ready(self) -> int:
        """VMs started and waiting to be acquired."""
        return len(self._ready)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # -- lifetime ------------------------------------------------------------------------
    async def __aenter__(self) -> VMPool:
        if self._tg is not None or self._closed:
            raise GondolinError("this pool was already started")
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        for _ in range(self.size):
            self._tg.start_soon(self._filler)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        self._closed = True
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            with anyio.CancelScope(shield=True):
                while self._ready:
                    await self._ready.popleft().discard()

    async def _filler(self) -> None:
        delay = RETRY_FIRST
        while True:
            while len(self._ready) + self._starting >= self.size:
                await self._changed.wait()
            self._starting += 1
            try:
                vm = await VM.create(self.options)
            except GondolinError as exc:
                log.warning("pool: a VM failed to start (%s); retrying in %.0fs", exc, delay)
                self._error = exc
                self._notify()
                await anyio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            finally:
                self._starting -= 1
            delay = RETRY_FIRST
            self._error = None
            self._ready.append(vm)
            self._notify()

    # -- use -------------------------------------------------------------------------------
    async def acquire(self, timeout: float | None = None) -> VM:
        """A ready VM, now yours (close it when done). Waits for one if the pool is drained;
        raises the last start failure if VMs cannot be started at all."""
        if self._tg is None or self._closed:
            raise GondolinError("use the pool inside `async with VMPool(...)`", code="pool_not_running")
        with anyio.move_on_after(timeout if timeout is not None else math.inf):
            while True:
                while self._ready:
                    vm = self._ready.popleft()
                    self._notify()  # a filler starts the replacement
                    if vm.running:
                        self.handed_out += 1
                        return vm
                    with anyio.CancelScope(shield=True):
                        await vm.discard()
                if self._error is not None:
                    err, self._error = self._error, None
                    raise err
                await self._changed.wait()
        raise GondolinError(f"no VM became ready within {timeout:g}s", code="pool_timeout")
