from __future__ import annotations

import errno as E
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gondolin.vfs import OpenMode, RealFSProvider, SetAttr, ShadowProvider

from .support import NEW, RO, RW, errno_of, names, read_file, write_file

pytestmark = pytest.mark.anyio


@pytest.fixture
def host(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    (root / ".env").write_text("TOKEN=real")
    (root / "app").mkdir()
    (root / "app" / ".env").write_text("NESTED=real")
    (root / "app" / "main.py").write_text("code")
    (root / "certs").mkdir()
    (root / "certs" / "key.pem").write_text("PRIVATE")
    (root / "config").mkdir()
    (root / "config" / "settings.toml").write_text("locked")
    (root / "node_modules").mkdir()
    (root / "node_modules" / "dep.js").write_text("dep")
    return root


@pytest.fixture
async def real(host: Path) -> AsyncIterator[RealFSProvider]:
    provider = RealFSProvider(host)
    yield provider
    await provider.aclose()


async def test_hide(real: RealFSProvider, host: Path) -> None:
    fs = ShadowProvider(real, hide=[".env", "*.pem"])
    assert await names(fs, "/") == ["app", "certs", "config", "node_modules"]
    assert await names(fs, "/app") == ["main.py"]
    assert await names(fs, "/certs") == []
    for path in ("/.env", "/app/.env", "/certs/key.pem"):
        assert await errno_of(fs.getattr(path)) == E.ENOENT
        assert await errno_of(fs.open(path, RO)) == E.ENOENT
        assert await errno_of(fs.unlink(path)) == E.ENOENT
        assert await errno_of(fs.setattr(path, SetAttr(mode=0o777))) == E.ENOENT
        assert await errno_of(fs.rename(path, "/stolen")) == E.ENOENT
        assert await errno_of(fs.link(path, "/stolen")) == E.ENOENT
        # ... and cannot be created either (which would clobber the hidden file).
        assert await errno_of(fs.create(path, 0o644, NEW)) == E.EACCES
        assert await errno_of(fs.rename("/app/main.py", path)) == E.EACCES
        assert await errno_of(fs.symlink(path, "x")) == E.EACCES
    # Renaming a directory would move hidden files out from under the rule.
    assert await errno_of(fs.rename("/app", "/renamed")) == E.EACCES
    # A symlink is only a name: the guest resolves it to a hidden path and finds nothing.
    await fs.symlink("/peek", ".env")
    assert await fs.readlink("/peek") == ".env"
    assert await errno_of(fs.getattr("/.env")) == E.ENOENT
    assert (host / ".env").read_text() == "TOKEN=real"
    # Everything else works.
    await write_file(fs, "/app/new.py", b"x")
    assert (host / "app" / "new.py").read_bytes() == b"x"


async def test_deny_writes(real: RealFSProvider, host: Path) -> None:
    fs = ShadowProvider(real, deny_writes="/config")
    assert await read_file(fs, "/config/settings.toml") == b"locked"
    p = "/config/settings.toml"
    for op in (
        fs.open(p, RW),
        fs.open(p, OpenMode(read=False, write=True, truncate=True)),
        fs.create(p, 0o644, OpenMode(read=True, write=True)),
        fs.create("/config/new", 0o644, NEW),
        fs.setattr(p, SetAttr(size=0)),
        fs.unlink(p),
        fs.rename(p, "/moved"),
        fs.rename("/app/main.py", p),
        fs.link(p, "/second-name"),  # a writable second name would bypass the rule
        fs.mkdir("/config/sub", 0o755),
        fs.rmdir("/config"),
        fs.rename("/config", "/cfg"),
    ):
        assert await errno_of(op) == E.EACCES
    assert (host / "config" / "settings.toml").read_text() == "locked"
    await fs.mkdir("/outer", 0o755)
    await fs.rename("/app", "/outer/app")  # contains nothing protected


async def test_deny_errno(real: RealFSProvider) -> None:
    fs = ShadowProvider(real, deny_writes=["*.toml"], deny_errno=E.EROFS)
    assert await errno_of(fs.unlink("/config/settings.toml")) == E.EROFS
    # Moving a directory that holds a protected file: the rule matches by name anywhere,
    # but the scan refuses anyway.
    assert await errno_of(fs.rename("/config", "/c2")) == E.EROFS


async def test_redirect_writes_to_memory(real: RealFSProvider, host: Path) -> None:
    fs = ShadowProvider(real, redirect_writes_to_memory="/node_modules/**")
    await write_file(fs, "/node_modules/dep.js", b"patched")
    await write_file(fs, "/node_modules/new.js", b"new")
    await fs.unlink("/node_modules/new.js")
    await fs.mkdir("/node_modules/pkg", 0o755)
    assert await read_file(fs, "/node_modules/dep.js") == b"patched"
    assert (host / "node_modules" / "dep.js").read_text() == "dep"
    assert sorted(p.name for p in (host / "node_modules").iterdir()) == ["dep.js"]
    # Outside the rule, writes reach the host.
    await write_file(fs, "/app/main.py", b"edited")
    assert (host / "app" / "main.py").read_text() == "edited"
    # Across the boundary a rename cannot keep both promises.
    assert await errno_of(fs.rename("/app/main.py", "/node_modules/main.py")) == E.EXDEV
    assert fs.overlay is not None and fs.overlay.upper.used_bytes == len(b"patched")


async def test_hidden_but_redirected_gets_its_own_copy(real: RealFSProvider, host: Path) -> None:
    fs = ShadowProvider(real, hide=".env", redirect_writes_to_memory=".env")
    assert await errno_of(fs.getattr("/.env")) == E.ENOENT
    await write_file(fs, "/.env", b"TOKEN=placeholder")
    assert await read_file(fs, "/.env") == b"TOKEN=placeholder"
    assert ".env" in await names(fs, "/")
    assert (host / ".env").read_text() == "TOKEN=real"


async def test_deny_wins_over_redirect(real: RealFSProvider) -> None:
    fs = ShadowProvider(real, deny_writes="config", redirect_writes_to_memory="**")
    assert await errno_of(fs.unlink("/config/settings.toml")) == E.EACCES
    await fs.unlink("/app/main.py")  # in memory
    assert "main.py" not in await names(fs, "/app")


async def test_callable_rules(real: RealFSProvider) -> None:
    fs = ShadowProvider(real, hide=lambda p: p.endswith(".py"))
    assert await names(fs, "/app") == [".env"]
