"""Warm start: VMs restored from a per-shape template (see gondolin/templates.py)."""

import hashlib
import subprocess
import time

import anyio
import pytest

from gondolin import VM, VMPool
from gondolin.machine.templates import MEMORY, META, TemplateStore
from gondolin.sync import VM as SyncVM

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

SHAPE = {"memory": "384M", "network": False}  # a shape of our own: these tests own its template


@pytest.fixture(scope="module")
def saved_template(tmp_path_factory):
    """A template store holding one template of SHAPE, saved once by a cold boot. Tests get
    copies (``template_dir``), so a test that damages its template hurts no other."""
    path = tmp_path_factory.mktemp("template-source")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GONDOLIN_TEMPLATE_DIR", str(path))
        with SyncVM.create(**SHAPE) as vm:
            vm.exec("true")
        assert len(TemplateStore().templates()) == 1
    return path


@pytest.fixture
def template_dir(saved_template, tmp_path, monkeypatch):
    """This test's own template store: a copy of the saved one."""
    path = tmp_path / "templates"
    subprocess.run(["cp", "-a", "--reflink=auto", "--sparse=always", str(saved_template), str(path)], check=True)
    monkeypatch.setenv("GONDOLIN_TEMPLATE_DIR", str(path))
    return path


@pytest.fixture
def empty_template_dir(tmp_path, monkeypatch):
    path = tmp_path / "templates"
    monkeypatch.setenv("GONDOLIN_TEMPLATE_DIR", str(path))
    return path


def file_digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_first_create_saves_a_template_and_later_ones_restore_it(empty_template_dir):
    async with await VM.create(**SHAPE, hostname="first") as vm:
        assert vm.restored_from is None
        assert (await vm.exec("hostname")).stdout == "first\n"
    [tpl] = TemplateStore().templates()
    assert tpl.shape == vm.shape() and tpl.has_disk
    digests = {p.name: file_digest(p) for p in tpl.path.iterdir()}

    async with await VM.create(**SHAPE, hostname="clone-a", env={"WHO": "a"}) as a:
        assert a.restored_from == "template"
        r = await a.exec("echo $WHO $(hostname); echo kept > /etc/clone-file; cat /etc/clone-file")
        assert r.stdout == "a clone-a\nkept\n"
        await a.fs.write("/root/note.txt", "hello")
        assert await a.fs.read_text("/root/note.txt") == "hello"
    async with await VM.create(**SHAPE) as b:
        assert b.restored_from == "template"
        assert not await b.fs.exists("/etc/clone-file")  # each clone has its own disk
    assert {p.name: file_digest(p) for p in tpl.path.iterdir()} == digests  # template files untouched


async def test_clones_read_different_random_bytes(template_dir):
    async def urandom(vm):
        return (await vm.exec("head -c 32 /dev/urandom | od -An -tx1")).stdout

    a = await VM.create(**SHAPE)
    try:
        b = await VM.create(**SHAPE)
        try:
            assert a.restored_from == b.restored_from == "template"
            ra, rb = await urandom(a), await urandom(b)
            assert ra != rb and len(ra.split()) == 32
            # Python in the guest draws from the same kernel CRNG
            code = "import os; print(os.urandom(16).hex())"
            pa, pb = [(await vm.exec(["python3", "-c", code])).stdout for vm in (a, b)]
            assert pa != pb
        finally:
            await b.close()
    finally:
        await a.close()


async def test_clock_is_right_after_restoring_a_template_saved_long_ago(template_dir):
    [tpl] = TemplateStore().templates()
    await anyio.sleep(max(0.0, 3.0 - (time.time() - tpl.created)))  # saved at least 3 s ago
    async with await VM.create(**SHAPE) as vm:
        assert vm.restored_from == "template"
        guest = float((await vm.exec("date +%s.%N")).stdout)
        assert abs(guest - time.time()) < 1.0


async def test_a_template_qemu_cannot_load_is_rebuilt_not_used(template_dir):
    store = TemplateStore()
    [tpl] = store.templates()
    memory = tpl.path / MEMORY
    data = memory.read_bytes()
    memory.write_bytes(data[: len(data) // 2])  # damage it so that only QEMU notices
    meta = (tpl.path / META).read_text().replace(f'"memory_size": {len(data)}',
                                                 f'"memory_size": {len(data) // 2}')
    (tpl.path / META).write_text(meta)
    async with await VM.create(**SHAPE) as vm:
        assert vm.restored_from is None  # booted cold instead
        assert (await vm.exec("echo ok")).stdout == "ok\n"
    [fresh] = store.templates()
    assert fresh.memory_size == len(data) or fresh.created > tpl.created
    async with await VM.create(**SHAPE) as vm:
        assert vm.restored_from == "template"


async def test_a_template_is_not_used_for_another_shape(template_dir):
    store = TemplateStore()
    [tpl] = store.templates()
    async with await VM.create(**SHAPE, warm=False) as vm:
        assert vm.restored_from is None
        assert vm.shape() == tpl.shape
    [after] = store.templates()  # warm=False neither uses nor replaces it
    assert (after.path, after.created, after.memory_size) == (tpl.path, tpl.created, tpl.memory_size)


async def test_a_pool_of_four_hands_out_four_distinct_vms(template_dir):
    async with VMPool(size=4, **SHAPE) as pool:
        vms = [await pool.acquire(timeout=120) for _ in range(4)]
        try:
            assert len({vm.id for vm in vms}) == 4
            assert len({vm.qemu_pid for vm in vms}) == 4
            outs = [(await vm.exec("head -c 16 /dev/urandom | od -An -tx1")).stdout for vm in vms]
            assert len(set(outs)) == 4
            await vms[0].exec("touch /tmp/used")
        finally:
            for vm in vms:
                await vm.close()
        fresh = await pool.acquire(timeout=120)  # refilled meanwhile; never a used one
        async with fresh:
            assert fresh.id not in {vm.id for vm in vms}
            assert not await fresh.fs.exists("/tmp/used")
        assert pool.handed_out == 5
