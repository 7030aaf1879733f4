from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gondolin.vfs import (
    CopyOnWriteProvider,
    HookedProvider,
    MemoryProvider,
    MountRouter,
    OverlayProvider,
    Provider,
    RealFSProvider,
    ShadowProvider,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _root(tmp: Path) -> Path:
    root = tmp / "root"
    root.mkdir()
    return root


# Every provider that claims full POSIX-ish semantics over an initially empty tree.
FACTORIES: dict[str, Callable[[Path], Provider]] = {
    "memory": lambda tmp: MemoryProvider(),
    "realfs-openat2": lambda tmp: RealFSProvider(_root(tmp)),
    "realfs-walk": lambda tmp: RealFSProvider(_root(tmp), use_openat2=False),
    "realfs-inline": lambda tmp: RealFSProvider(_root(tmp), inline_metadata=True),
    "cow": lambda tmp: CopyOnWriteProvider(_root(tmp)),
    "overlay-memory": lambda tmp: OverlayProvider(MemoryProvider()),
    "router": lambda tmp: MountRouter({"/": MemoryProvider()}),
    "hooked": lambda tmp: HookedProvider(MemoryProvider(), before=lambda e: None),
    "shadow-redirect": lambda tmp: ShadowProvider(
        RealFSProvider(_root(tmp)), redirect_writes_to_memory="**"
    ),
}


@pytest.fixture(params=sorted(FACTORIES))
async def fs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Provider]:
    if request.param == "realfs-openat2":
        probe = RealFSProvider(tmp_path)
        await probe.aclose()
        if not probe.uses_openat2:
            pytest.skip("openat2 not available on this kernel")
    provider = FACTORIES[request.param](tmp_path)
    yield provider
    await provider.aclose()
