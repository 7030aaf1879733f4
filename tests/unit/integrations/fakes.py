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


class NamingFakeBackend(FakeBackend):
    """A backend that keeps sandboxes by id (an ``integrations.runtime.NamingBackend``), like
    ``gondolin.cluster.RayBackend``: share one ``kept`` dict between two instances to stand for
    two managers (a server and its restart) on one cluster."""

    def __init__(self, kept: dict[str, tuple[FakeVM, dict]] | None = None):
        super().__init__()
        self.kept = {} if kept is None else kept
        self.attached: list[str] = []

    async def create_named(self, sandbox_id, options, record):
        vm = await self.create(options)
        self.kept[sandbox_id] = (vm, dict(record))
        return vm

    async def resume_named(self, sandbox_id, checkpoint_path, options, record):
        vm = await self.resume(checkpoint_path, options)
        self.kept[sandbox_id] = (vm, dict(record))
        return vm

    async def attach(self, sandbox_id):
        self.attached.append(sandbox_id)
        found = self.kept.get(sandbox_id)
        if found is None or not found[0].running:
            return None
        return found
