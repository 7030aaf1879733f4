"""vm.fork(): independent copies of a running VM (memory, processes, disk), the source running on."""

import anyio
import pytest

from gondolin import VM, VMClosedError, open_vm
from gondolin.vfs import MemoryProvider

from .conftest import both_backends as anyio_backend  # noqa: F401 - these tests run under asyncio and trio
from .conftest import own_run_dirs

pytestmark = [pytest.mark.anyio, pytest.mark.vm]


async def counter(vm: VM) -> int:
    return int((await vm.fs.read_text("/tmp/count")).strip() or 0)


async def test_copies_keep_running_processes_and_diverge(no_leaks):
    async with open_vm() as source:
        await source.start("i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; "
                           "mv /tmp/count.new /tmp/count; sleep 0.1; done")
        await source.fs.write("/root/shared.txt", "before the fork\n")
        with anyio.fail_after(20):
            while not await source.fs.exists("/tmp/count"):  # noqa: ASYNC110 - polling the guest
                await anyio.sleep(0.1)
        copies = await source.fork(2)
        try:
            assert len(copies) == 2 and len({source.id, *(c.id for c in copies)}) == 3
            assert all(c.restored_from == "fork" and c.running for c in copies)
            everyone = [source, *copies]
            # the counter process lives on in the source and in every copy
            first = [await counter(vm) for vm in everyone]
            await anyio.sleep(1.5)
            second = [await counter(vm) for vm in everyone]
            assert all(b > a for a, b in zip(first, second, strict=True)), (first, second)
            # the disk was copied: each sees the file written before the fork, and nobody sees
            # what another writes after it
            for i, vm in enumerate(everyone):
                assert await vm.fs.read_text("/root/shared.txt") == "before the fork\n"
                await vm.fs.write("/root/mine.txt", f"vm {i}\n")
            for i, vm in enumerate(everyone):
                assert await vm.fs.read_text("/root/mine.txt") == f"vm {i}\n"
                assert (await vm.exec("cat /root/mine.txt")).stdout == f"vm {i}\n"
            # each has its own entropy
            randoms = {(await vm.exec("head -c 16 /dev/urandom | od -An -tx1")).stdout for vm in everyone}
            assert len(randoms) == 3
            hostnames = {(await vm.exec("hostname")).stdout for vm in everyone}
            assert len(hostnames) == 1  # same configuration, different machines
        finally:
            for c in copies:
                await c.close()


async def test_a_copy_is_a_vm_like_any_other(no_leaks, asyncio_only):
    async with open_vm(mounts={"/data": MemoryProvider()}) as source:
        await source.fs.write("/data/note", "from the host")
        [copy] = await source.fork(label="branch")
        async with copy:
            assert copy.label == "branch"
            assert (await copy.exec("cat /data/note")).stdout == "from the host"  # same mount providers
            more = await copy.fork(1)  # a copy can be forked again
            assert (await more[0].exec("echo grandchild")).stdout == "grandchild\n"
            await more[0].close()
            assert len(own_run_dirs()) == 2
        assert (await source.exec("echo still here")).stdout == "still here\n"


async def test_fork_of_a_closed_vm_or_bad_count_is_refused():
    vm = await VM.create()
    with pytest.raises(ValueError):
        await vm.fork(0)
    await vm.close()
    with pytest.raises(VMClosedError):
        await vm.fork(1)
