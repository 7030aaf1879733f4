from __future__ import annotations

import errno as E

import pytest

from gondolin.vfs import HookedProvider, HookEvent, MemoryProvider, VfsError

from .support import NEW, RO, RW, errno_of, read_file, write_file

pytestmark = pytest.mark.anyio


async def test_before_denies_with_errno() -> None:
    inner = MemoryProvider()
    calls: list[str] = []

    def before(event: HookEvent) -> int | None:
        calls.append(f"{event.op} {event.path}")
        return E.EPERM if event.path.endswith(".secret") else None

    fs = HookedProvider(inner, before=before)
    assert await errno_of(fs.create("/a.secret", 0o644, NEW)) == E.EPERM
    assert await errno_of(inner.getattr("/a.secret")) == E.ENOENT  # never reached the provider
    await write_file(fs, "/ok", b"1")
    assert calls[:3] == ["create /a.secret", "create /ok", "write /ok"]


async def test_async_hooks_and_raising() -> None:
    async def before(event: HookEvent) -> None:
        if event.op == "rename" and event.new_path == "/forbidden":
            raise VfsError(E.EACCES)

    fs = HookedProvider(MemoryProvider(), before=before)
    await write_file(fs, "/a", b"")
    assert await errno_of(fs.rename("/a", "/forbidden")) == E.EACCES
    await fs.rename("/a", "/b")


async def test_after_sees_result_and_can_override() -> None:
    seen: list[tuple[str, int]] = []

    def after(event: HookEvent, errno: int) -> int | None:
        seen.append((event.op, errno))
        return E.EIO if event.op == "mkdir" else None

    inner = MemoryProvider()
    fs = HookedProvider(inner, after=after)
    assert await errno_of(fs.getattr("/nope")) == E.ENOENT
    assert await errno_of(fs.mkdir("/d", 0o755)) == E.EIO
    assert (await inner.getattr("/d")) is not None  # the effect happened anyway
    assert seen == [("getattr", E.ENOENT), ("mkdir", 0)]


async def test_handle_ops_carry_path_and_data() -> None:
    events: list[HookEvent] = []

    def record(event: HookEvent) -> None:
        events.append(event)

    fs = HookedProvider(MemoryProvider(), before=record)
    await write_file(fs, "/f", b"payload")
    assert await read_file(fs, "/f") == b"payload"
    writes = [e for e in events if e.op == "write"]
    assert writes[0].path == "/f" and writes[0].data == b"payload" and writes[0].offset == 0
    assert [e.op for e in events if e.path == "/f"][-2:] == ["read", "release"]


async def test_read_deny_and_release_never_leaks() -> None:
    inner = MemoryProvider()
    await write_file(inner, "/f", b"x")

    def before(event: HookEvent) -> int | None:
        return E.EACCES if event.op in ("read", "release") else None

    fs = HookedProvider(inner, before=before)
    handle = await fs.open("/f", RO)
    assert await errno_of(handle.read(0, 1)) == E.EACCES
    assert await errno_of(handle.release()) == E.EACCES
    await inner.unlink("/f")
    assert inner.used_nodes == 1  # the inner handle was released regardless


async def test_after_denied_open_releases_handle() -> None:
    inner = MemoryProvider()
    await write_file(inner, "/f", b"x")
    fs = HookedProvider(inner, after=lambda e, err: E.EPERM if e.op == "open" else None)
    assert await errno_of(fs.open("/f", RW)) == E.EPERM
    await inner.unlink("/f")
    assert inner.used_nodes == 1


async def test_ops_filter() -> None:
    hits: list[str] = []

    def record(event: HookEvent) -> None:
        hits.append(event.op)

    fs = HookedProvider(MemoryProvider(), before=record, ops={"unlink"})
    await write_file(fs, "/f", b"")
    await fs.unlink("/f")
    assert hits == ["unlink"]
    with pytest.raises(ValueError):
        HookedProvider(MemoryProvider(), ops={"chmod"})


async def test_bad_hook_result() -> None:
    fs = HookedProvider(MemoryProvider(), before=lambda e: "no")  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError):
        await fs.getattr("/")
