"""The one VM stand-in for tests of the manager, the tools and the adapters that need no guest.

:class:`FakeBackend` takes the place of :class:`integrations.runtime.LocalBackend`: it records
the :class:`gondolin.VMOptions` each VM was started with, and every checkpoint it saved.
"""

from __future__ import annotations

from gondolin import VMOptions
from gondolin.errors import GuestFileError


class FakeFS:
    async def stat(self, path, follow_symlinks=True):
        raise GuestFileError("no such file", errno=2, errno_name="ENOENT", path=path)


class FakeVM:
    """What the manager uses of a :class:`gondolin.VM`: options, running, fs, network, close, checkpoint."""

    def __init__(self, options: VMOptions, backend: FakeBackend, resumed_from: str | None = None):
        self.id = f"fake{len(backend.booted)}"
        self.options = options
        self.resumed_from = resumed_from
        self.running = True
        self.closed = 0
        self.fs = FakeFS()
        self.network = None
        self._backend = backend

    async def checkpoint(self, path, *, disk_only=False):
        self._backend.saved.append((str(path), disk_only))

    async def close(self):
        self.closed += 1
        self.running = False


class FakeBackend:
    def __init__(self):
        self.booted: list[FakeVM] = []
        self.saved: list[tuple[str, bool]] = []

    async def create(self, options: VMOptions) -> FakeVM:
        return self._boot(options.checked())

    async def resume(self, checkpoint_path: str, options: VMOptions) -> FakeVM:
        if (checkpoint_path, False) not in self.saved and (checkpoint_path, True) not in self.saved:
            raise AssertionError(f"no checkpoint was saved at {checkpoint_path}")
        return self._boot(options.checked(), resumed_from=checkpoint_path)

    def _boot(self, options: VMOptions, resumed_from: str | None = None) -> FakeVM:
        vm = FakeVM(options, self, resumed_from)
        self.booted.append(vm)
        return vm
