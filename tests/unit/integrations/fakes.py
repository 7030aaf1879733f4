"""A VM stand-in for tests of the manager and adapters that need no guest."""

from gondolin.errors import GuestFileError


class FakeFS:
    async def stat(self, path, follow_symlinks=True):
        raise GuestFileError("no such file", errno=2, errno_name="ENOENT", path=path)


class FakeVM:
    def __init__(self, **options):
        self.options = options
        self.running = True
        self.closed = 0
        self.fs = FakeFS()

    async def close(self):
        self.closed += 1
        self.running = False


def fake_factory(booted=None):
    async def create(**options):
        vm = FakeVM(**options)
        if booted is not None:
            booted.append(vm)
        return vm
    return create
