import dataclasses
import json
import os
import time

import anyio
import pytest

from gondolin.machine.shape import MachineShape, device_fingerprint
from gondolin.machine.templates import DISK, MEMORY, META, TemplateStore
from gondolin.qemu.argv import MachineSpec, SerialPort

pytestmark = pytest.mark.anyio

SHAPE = MachineShape(image="abc123", memory_mb=512, cpus=1, rootfs="cow", accel="tcg", network=True,
                     fs_port=False, qemu="QEMU emulator version 7.2.0", devices="d" * 24)


@pytest.mark.parametrize(
    "change",
    [
        {"image": "abc124"},
        {"memory_mb": 1024},
        {"cpus": 2},
        {"rootfs": "readonly"},
        {"accel": "kvm"},
        {"network": False},
        {"fs_port": True},
        {"qemu": "QEMU emulator version 8.0.0"},
        {"devices": "e" * 24},
    ],
)
def test_every_field_of_the_shape_changes_the_key(change):
    other = dataclasses.replace(SHAPE, **change)
    assert other.key() != SHAPE.key()
    assert other.differences(SHAPE)


def test_equal_shapes_share_a_key():
    assert dataclasses.replace(SHAPE).key() == SHAPE.key()
    assert len(SHAPE.key()) == 24 and SHAPE.differences(SHAPE) == []


def test_shape_round_trips_and_rejects_wrong_types():
    assert MachineShape.from_dict(json.loads(json.dumps(SHAPE.to_dict()))) == SHAPE
    for bad in ({**SHAPE.to_dict(), "memory_mb": "512"}, {**SHAPE.to_dict(), "network": 1},
                {**SHAPE.to_dict(), "cpus": True}, {k: v for k, v in SHAPE.to_dict().items() if k != "qemu"}, []):
        with pytest.raises(ValueError):
            MachineShape.from_dict(bad)


def spec(run: str, **kw):
    base = dict(kernel="/images/X/vmlinux", initrd="/images/X/initrd.img", disk=f"{run}/root.qcow2",
                disk_format="qcow2", ports=(SerialPort("gondolin.control", f"{run}/control.sock"),),
                net_socket=f"{run}/net.sock", qmp_socket=f"{run}/qmp.sock")
    base.update(kw)
    return MachineSpec(**base)


def test_fingerprint_ignores_per_vm_paths_and_the_restore_source():
    a = device_fingerprint(spec("/tmp/run-a"), "/tmp/run-a", "/images/X")
    b = device_fingerprint(spec("/tmp/run-b", incoming="exec:cat /t"), "/tmp/run-b", "/images/X")
    assert a == b


@pytest.mark.parametrize(
    "change",
    [
        {"memory_mb": 256},
        {"net_socket": None},
        {"ports": (SerialPort("gondolin.control", "/r/control.sock"), SerialPort("gondolin.fs", "/r/fs.sock"))},
        {"extra_append": "loglevel=7"},
        {"vmgenid": False},
        {"disk_readonly": True},
    ],
)
def test_fingerprint_sees_device_and_machine_changes(change):
    assert device_fingerprint(spec("/r", **change), "/r", "/images/X") != device_fingerprint(spec("/r"), "/r",
                                                                                            "/images/X")


def make_template(store: TemplateStore, shape: MachineShape, memory: bytes = b"M" * 100, disk: bool = True):
    staging = store.staging(shape)
    (staging / MEMORY).write_bytes(memory)
    if disk:
        (staging / DISK).write_bytes(b"QFI\xfb")
    return store.commit(staging, shape, len(memory), disk)


def test_commit_then_lookup(tmp_path):
    store = TemplateStore(tmp_path)
    assert store.lookup(SHAPE) is None
    t = make_template(store, SHAPE)
    found = store.lookup(SHAPE)
    assert found == t and found.has_disk and found.memory_size == 100
    src = found.boot_source()
    assert src.restore_source().kind == "template" and src.key == SHAPE.key()
    assert src.memory.path == t.path / MEMORY and src.disk.path == t.path / DISK
    assert [x.key for x in store.templates()] == [SHAPE.key()]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: (p / MEMORY).write_bytes(b"short"),  # truncated memory image
        lambda p: (p / MEMORY).unlink(),
        lambda p: (p / DISK).unlink(),
        lambda p: (p / META).write_text("{not json"),
        lambda p: (p / META).write_text(json.dumps({**json.loads((p / META).read_text()), "format": 99})),
        # a template saved for another shape under this key (e.g. a copied directory)
        lambda p: (p / META).write_text(json.dumps({**json.loads((p / META).read_text()),
                                                    "shape": {**SHAPE.to_dict(), "memory_mb": 1}})),
    ],
)
def test_a_damaged_or_mismatched_template_is_deleted_not_used(tmp_path, damage):
    store = TemplateStore(tmp_path)
    t = make_template(store, SHAPE)
    damage(t.path)
    assert store.lookup(SHAPE) is None
    assert not t.path.exists()


def test_a_template_is_never_used_for_another_shape(tmp_path):
    store = TemplateStore(tmp_path)
    make_template(store, SHAPE)
    assert store.lookup(dataclasses.replace(SHAPE, qemu="QEMU 9")) is None
    assert store.lookup(SHAPE) is not None


def test_prune_drops_unknown_images_then_least_recently_used(tmp_path):
    store = TemplateStore(tmp_path)
    shapes = [dataclasses.replace(SHAPE, memory_mb=256 + i) for i in range(4)]
    for i, s in enumerate(shapes):
        t = make_template(store, s)
        os.utime(t.path / META, (time.time() - 100 + i, time.time() - 100 + i))
    gone = make_template(store, dataclasses.replace(SHAPE, image="removed"))
    store.lookup(shapes[0])  # used just now: survives
    removed = store.prune(keep=2, known_images={"abc123"})
    assert gone.key in removed
    assert {t.shape.memory_mb for t in store.templates()} == {256, 259}


async def test_build_lock_lets_one_builder_in_at_a_time(tmp_path):
    store = TemplateStore(tmp_path)
    inside = 0
    peak = 0

    async def builder():
        nonlocal inside, peak
        async with store.build_lock(SHAPE):
            inside += 1
            peak = max(peak, inside)
            await anyio.sleep(0.1)
            inside -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(builder)
    assert peak == 1


async def test_waiting_for_the_build_lock_can_be_cancelled(tmp_path):
    store = TemplateStore(tmp_path)
    async with store.build_lock(SHAPE):
        with anyio.move_on_after(0.2) as scope:
            async with store.build_lock(SHAPE):
                pytest.fail("took a held lock")
        assert scope.cancelled_caught
    async with store.build_lock(SHAPE):  # released for the next one
        pass
