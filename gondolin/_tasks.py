"""Start a task that belongs to no caller's task group (a VM created with ``VM.create``).

A VM made by ``await VM.create()`` outlives the call that made it, so its task group cannot
live in the caller's task tree. It lives in one service task per VM instead, started here with
the running backend's own primitive (an asyncio task, or a trio system task). The service
task never raises: it records its outcome on the object that owns it. When the event loop
shuts down it is cancelled, and its cleanup (bounded, shielded) still runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import sniffio

from .errors import GondolinError

_ASYNCIO_TASKS: set[asyncio.Task[Any]] = set()  # strong references: the loop only keeps weak ones


def spawn_service(fn: Callable[[], Awaitable[None]], name: str) -> None:
    """Run ``fn()`` as a new top-level task of the current event loop."""
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        raise GondolinError("gondolin's async API must be called from an asyncio or trio event loop") from None
    if library == "trio":
        import trio

        async def run() -> None:
            await fn()

        trio.lowlevel.spawn_system_task(run, name=name)
        return
    if library != "asyncio":
        raise GondolinError(f"gondolin runs on asyncio or trio, not {library}")

    async def main() -> None:
        await fn()

    task = asyncio.get_running_loop().create_task(main(), name=name)
    _ASYNCIO_TASKS.add(task)
    task.add_done_callback(_ASYNCIO_TASKS.discard)


__all__ = ["spawn_service"]
