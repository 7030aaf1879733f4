"""CopyOnWriteProvider (and the overlay under it): host untouched until commit."""

from __future__ import annotations

import errno as E
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gondolin.vfs import (
    Changes,
    CommitConflict,
    CopyOnWriteProvider,
    MemoryProvider,
    OpenMode,
    SetAttr,
)

from .support import RW, errno_of, names, read_file, write_file

pytestmark = pytest.mark.anyio


def snapshot(root: Path) -> dict[str, object]:
    """Everything on the host under root: path -> content, link target, or 'dir'."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = "/" + str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", stat.S_IMODE(p.stat().st_mode))
            else:
                out[rel] = (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
    return out


@pytest.fixture
def host(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "README.md").write_text("hello\nworld\n")
    (root / "src").mkdir()
    (root / "src" / "main.py").write_text("print('hi')\n")
    (root / "src" / "util.py").write_text("x = 1\n")
    (root / "data.bin").write_bytes(b"\x00\x01\x02")
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_text("a\n")
    os.symlink("README.md", root / "link")
    os.chmod(root / "src" / "main.py", 0o755)
    return root


@pytest.fixture
async def cow(host: Path) -> AsyncIterator[CopyOnWriteProvider]:
    provider = CopyOnWriteProvider(host)
    yield provider
    await provider.aclose()


async def test_reads_come_from_host_and_writes_stay_in_memory(
    cow: CopyOnWriteProvider, host: Path
) -> None:
    before = snapshot(host)
    assert await read_file(cow, "/README.md") == b"hello\nworld\n"
    assert (await cow.getattr("/src/main.py")).mode & 0o7777 == 0o755
    await write_file(cow, "/src/main.py", b"print('bye')\n")
    await write_file(cow, "/new.txt", b"new\n")
    await cow.mkdir("/newdir", 0o755)
    await cow.unlink("/docs/a.txt")
    await cow.setattr("/README.md", SetAttr(mode=0o600))
    await cow.symlink("/link2", "src")
    assert snapshot(host) == before
    assert await read_file(cow, "/src/main.py") == b"print('bye')\n"
    assert (await cow.getattr("/src/main.py")).mode & 0o7777 == 0o755  # copy-up kept the mode
    assert await names(cow, "/") == [
        "README.md", "data.bin", "docs", "link", "link2", "new.txt", "newdir", "src"
    ]  # fmt: skip
    assert await names(cow, "/docs") == []
    # Untouched files are read live from the host.
    (host / "src" / "util.py").write_text("x = 2\n")
    assert await read_file(cow, "/src/util.py") == b"x = 2\n"


async def test_changes(cow: CopyOnWriteProvider) -> None:
    assert await cow.changes() == Changes()
    assert not await cow.changes()
    await write_file(cow, "/src/main.py", b"print('bye')\n")
    await write_file(cow, "/new.txt", b"n")
    await cow.unlink("/docs/a.txt")
    await cow.rmdir("/docs")
    await cow.setattr("/data.bin", SetAttr(mode=0o600))
    # Copied up but unchanged: not a change.
    handle = await cow.open("/src/util.py", RW)
    await handle.release()
    await cow.rename("/README.md", "/README.txt")
    assert await cow.changes() == Changes(
        added=("/README.txt", "/new.txt"),
        modified=("/data.bin", "/src/main.py"),
        deleted=("/README.md", "/docs", "/docs/a.txt"),
    )


async def test_diff(cow: CopyOnWriteProvider) -> None:
    await write_file(cow, "/README.md", b"hello\nthere\nworld")
    await write_file(cow, "/new.txt", b"n\n")
    await write_file(cow, "/data.bin", b"\x00\x09")
    await cow.unlink("/docs/a.txt")
    await cow.setattr("/src/util.py", SetAttr(mode=0o700))
    assert await cow.diff() == (
        "diff --git a/README.md b/README.md\n"
        "--- a/README.md\n"
        "+++ b/README.md\n"
        "@@ -1,2 +1,3 @@\n"
        " hello\n"
        "-world\n"
        "+there\n"
        "+world\n"
        "\\ No newline at end of file\n"
        "diff --git a/data.bin b/data.bin\n"
        "Binary files a/data.bin and b/data.bin differ\n"
        "diff --git a/docs/a.txt b/docs/a.txt\n"
        "deleted file mode 100644\n"
        "--- a/docs/a.txt\n"
        "+++ /dev/null\n"
        "@@ -1 +0,0 @@\n"
        "-a\n"
        "diff --git a/new.txt b/new.txt\n"
        "new file mode 100644\n"
        "--- /dev/null\n"
        "+++ b/new.txt\n"
        "@@ -0,0 +1 @@\n"
        "+n\n"
        "diff --git a/src/util.py b/src/util.py\n"
        "old mode 100644\n"
        "new mode 100700\n"
    )


async def test_commit_applies_and_resets(cow: CopyOnWriteProvider, host: Path) -> None:
    await write_file(cow, "/src/main.py", b"print('bye')\n", mode=0o755)
    await cow.mkdir("/pkg", 0o750)
    await write_file(cow, "/pkg/mod.py", b"y = 1\n", mode=0o640)
    await cow.link("/pkg/mod.py", "/pkg/alias.py")
    await cow.symlink("/pkg/link", "../README.md")
    await cow.unlink("/docs/a.txt")
    await cow.rmdir("/docs")
    await cow.setattr("/data.bin", SetAttr(mode=0o600))
    ch = await cow.commit()
    assert ch.deleted == ("/docs", "/docs/a.txt")
    assert (host / "src" / "main.py").read_bytes() == b"print('bye')\n"
    assert stat.S_IMODE(os.stat(host / "pkg").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(host / "pkg" / "mod.py").st_mode) == 0o640
    assert os.stat(host / "pkg" / "mod.py").st_ino == os.stat(host / "pkg" / "alias.py").st_ino
    assert os.readlink(host / "pkg" / "link") == "../README.md"
    assert not (host / "docs").exists()
    assert stat.S_IMODE(os.stat(host / "data.bin").st_mode) == 0o600
    assert not [p for p in host.rglob("*") if ".gondolin-" in p.name]  # no temp files left
    assert await cow.changes() == Changes()
    assert await read_file(cow, "/pkg/mod.py") == b"y = 1\n"


async def test_commit_replaces_types(cow: CopyOnWriteProvider, host: Path) -> None:
    await cow.unlink("/docs/a.txt")
    await cow.rmdir("/docs")
    await write_file(cow, "/docs", b"now a file")
    await cow.unlink("/data.bin")
    await cow.mkdir("/data.bin", 0o755)
    assert (await cow.changes()).modified == ("/data.bin", "/docs")
    diff = await cow.diff()
    assert "deleted file mode 100644\n--- a/data.bin" not in diff  # binary: no text hunks
    assert "new file mode 100644\n--- /dev/null\n+++ b/docs\n" in diff
    await cow.commit()
    assert (host / "docs").read_bytes() == b"now a file"
    assert (host / "data.bin").is_dir()


async def test_discard(cow: CopyOnWriteProvider, host: Path) -> None:
    before = snapshot(host)
    await write_file(cow, "/README.md", b"changed")
    await cow.unlink("/link")
    cow.discard()
    assert await cow.changes() == Changes()
    assert await read_file(cow, "/README.md") == b"hello\nworld\n"
    assert "link" in await names(cow, "/")
    assert snapshot(host) == before


async def test_conflict(cow: CopyOnWriteProvider, host: Path) -> None:
    await write_file(cow, "/README.md", b"guest version")
    await write_file(cow, "/added.txt", b"guest")
    (host / "README.md").write_text("host version, longer\n")
    (host / "added.txt").write_text("host")
    with pytest.raises(CommitConflict) as info:
        await cow.commit()
    assert info.value.paths == ("/README.md", "/added.txt")
    assert (host / "README.md").read_text() == "host version, longer\n"
    await cow.commit(force=True)
    assert (host / "README.md").read_text() == "guest version"


async def test_commit_cannot_be_redirected_outside(
    cow: CopyOnWriteProvider, host: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    await write_file(cow, "/src/new.py", b"payload")
    # The host (or anything) swaps a directory for a symlink before the commit runs.
    os.rename(host / "src", tmp_path / "src.moved")
    os.symlink(outside, host / "src")
    with pytest.raises(CommitConflict) as info:
        await cow.commit()
    assert "/src" in info.value.paths
    # Forced, the commit replaces the symlink with the directory; it never writes through it.
    await cow.commit(force=True)
    assert list(outside.iterdir()) == []
    assert not (host / "src").is_symlink()
    assert (host / "src" / "new.py").read_bytes() == b"payload"


async def test_overlay_semantics(cow: CopyOnWriteProvider) -> None:
    # A directory with host content cannot be renamed (like overlayfs): mv copies instead.
    assert await errno_of(cow.rename("/src", "/lib")) == E.EXDEV
    # One created in memory can.
    await cow.mkdir("/fresh", 0o755)
    await write_file(cow, "/fresh/x", b"1")
    await cow.rename("/fresh", "/moved")
    assert await read_file(cow, "/moved/x") == b"1"
    # Removing a host directory and making a new one hides the old content.
    for name in await names(cow, "/docs"):
        await cow.unlink("/docs/" + name)
    await cow.rmdir("/docs")
    await cow.mkdir("/docs", 0o700)
    assert await names(cow, "/docs") == []
    assert await errno_of(cow.getattr("/docs/a.txt")) == E.ENOENT
    # Files renamed over host files replace them.
    await cow.rename("/moved/x", "/README.md")
    assert await read_file(cow, "/README.md") == b"1"
    # Exchange of two host files.
    await cow.rename("/src/main.py", "/src/util.py", 2)
    assert await read_file(cow, "/src/util.py") == b"print('hi')\n"
    assert await read_file(cow, "/src/main.py") == b"x = 1\n"
    # Merged directories keep the host's inode number; copied-up files get new ones.
    host_ino = (await cow.lower.getattr("/src")).ino
    assert (await cow.getattr("/src")).ino == host_ino
    assert (await cow.getattr("/src")).nlink == 1
    assert (await cow.getattr("/src/util.py")).ino != (await cow.lower.getattr("/src/util.py")).ino


async def test_open_truncate_skips_copying(cow: CopyOnWriteProvider) -> None:
    handle = await cow.open("/README.md", OpenMode(read=True, write=True, truncate=True))
    assert (await handle.getattr()).size == 0
    await handle.release()
    assert cow.upper.used_bytes == 0


async def test_memory_quota_applies(host: Path) -> None:
    cow = CopyOnWriteProvider(host, max_bytes=4)
    try:
        assert await errno_of(write_file(cow, "/big", b"12345")) == E.ENOSPC
        assert await errno_of(cow.open("/README.md", RW)) == E.ENOSPC  # copy-up needs room
    finally:
        await cow.aclose()


async def test_cow_over_any_provider() -> None:
    base = MemoryProvider()
    await write_file(base, "/f", b"base")
    cow = CopyOnWriteProvider(base)
    await write_file(cow, "/f", b"changed")
    assert await read_file(base, "/f") == b"base"
    await cow.commit()
    assert await read_file(base, "/f") == b"changed"


# -- hostile names and links on the way out ------------------------------------------


@pytest.mark.parametrize(
    ("name", "quoted"),
    [
        ("plain/name.txt", "plain/name.txt"),
        ("x\n+++ evil\n@@ -1 +1 @@", '"x\\n+++ evil\\n@@ -1 +1 @@"'),
        ('q"b\\s\tt', '"q\\"b\\\\s\\tt"'),
        ("caf\u00e9", '"caf\\303\\251"'),
        ("bell\x07del\x7f", '"bell\\adel\\177"'),
    ],
)
def test_quote_path_matches_git(name: str, quoted: str) -> None:
    from gondolin.vfs.cow import quote_path

    assert quote_path(name) == quoted


async def test_diff_and_changes_quote_names_that_could_forge_headers(cow: CopyOnWriteProvider) -> None:
    evil = "x\n+++ evil\n@@ -1 +1 @@"
    await write_file(cow, "/" + evil, b"content\n")
    diff = await cow.diff()
    assert all(not line.startswith(("+++ evil", "@@ -1 +1 @@")) for line in diff.splitlines())
    assert 'diff --git "a/x\\n+++ evil\\n@@ -1 +1 @@" "b/x\\n+++ evil\\n@@ -1 +1 @@"\n' in diff
    assert '+++ "b/x\\n+++ evil\\n@@ -1 +1 @@"\n' in diff
    listing = str(await cow.changes())
    assert listing == 'A\t"x\\n+++ evil\\n@@ -1 +1 @@"\n'


@pytest.mark.parametrize(
    ("link", "target", "inside"),
    [
        ("/pkg/link", "../README.md", True),
        ("/link2", "src/main.py", True),
        ("/a/b/c", "../../x", True),
        ("/abs", "/etc/passwd", False),
        ("/up", "../outside", False),
        ("/pkg/up2", "../../outside", False),
        ("/mid", "src/../../outside", False),
        ("/mid2", "src/../README.md", False),  # '..' after a name: refused, whatever it resolves to
        ("/empty", "", False),
    ],
)
def test_link_stays_inside(link: str, target: str, inside: bool) -> None:
    from gondolin.vfs.cow import link_stays_inside

    assert link_stays_inside(link, target) is inside


async def test_commit_refuses_symlinks_pointing_outside(cow: CopyOnWriteProvider, host: Path) -> None:
    from gondolin.vfs.cow import ExternalSymlinks

    before = snapshot(host)
    await cow.symlink("/escape", "/etc/passwd")
    await cow.symlink("/fine", "README.md")
    await write_file(cow, "/new.txt", b"n")
    with pytest.raises(ExternalSymlinks) as info:
        await cow.commit()
    assert info.value.paths == ("/escape",) and info.value.errno == E.EPERM
    assert snapshot(host) == before  # nothing written
    await cow.commit(allow_external_symlinks=True)
    assert os.readlink(host / "escape") == "/etc/passwd"
