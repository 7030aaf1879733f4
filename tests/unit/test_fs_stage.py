"""The staging directory vm.fs copies large files through on a virtiofs VM (no VM needed)."""

import os

import pytest

from gondolin.fs_stage import STAGE_MAX_BYTES, STAGE_MOUNT, Stage
from gondolin.vfs import MemoryProvider

pytestmark = pytest.mark.anyio


def test_the_mount_point_must_be_free() -> None:
    assert Stage.fits({"/workspace": MemoryProvider(), "/run/other": MemoryProvider()})
    for taken in ("/", "/run", "/run/gondolin", STAGE_MOUNT, STAGE_MOUNT + "/"):
        assert not Stage.fits({taken: MemoryProvider()}), taken


async def test_put_then_take_returns_the_bytes_and_removes_the_file() -> None:
    stage = Stage()
    data = os.urandom(3 << 20 | 123)
    name = stage.new_name()
    assert await stage.put(name, memoryview(data))
    assert stage.provider.used_bytes == len(data)
    pieces = await stage.take(name, len(data), 256 << 10)
    assert b"".join(pieces) == data and max(len(p) for p in pieces) == 256 << 10
    assert stage.provider.used_bytes == 0 and await stage.provider.readdir("/") == []


async def test_a_full_stage_refuses_and_leaves_nothing() -> None:
    stage = Stage()
    junk = stage.new_name()  # what a guest could leave there
    assert await stage.put(junk, memoryview(bytes(STAGE_MAX_BYTES - 100)))
    assert not await stage.put(stage.new_name(), memoryview(bytes(1 << 20)))
    assert [e.name for e in await stage.provider.readdir("/")] == [junk]


async def test_take_reads_no_more_than_reported() -> None:
    stage = Stage()
    name = stage.new_name()
    assert await stage.put(name, memoryview(b"x" * 1000))
    assert b"".join(await stage.take(name, 10, 4)) == b"x" * 10
    assert stage.new_name() != stage.new_name()
