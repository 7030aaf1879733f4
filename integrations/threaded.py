"""Run a sandbox manager on its own event loop thread, for synchronous callers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from anyio.from_thread import start_blocking_portal

from .config import OperatorConfig
from .manager import SandboxManager
from .tools import ToolRegistry


@contextlib.contextmanager
def start_in_thread(config: OperatorConfig | None = None, *, tools: Iterable[str] | None = None,
                    **manager_options: Any) -> Iterator[ToolRegistry]:
    """A :class:`ToolRegistry` whose manager runs in a background thread.

    ``registry.call_sync(...)`` works from any thread, ``await registry.call(...)`` from any event
    loop; every sandbox is closed when the block ends::

        with start_in_thread() as registry:
            sandbox = registry.call_sync("sandbox_create", {}).data()
    """
    with start_blocking_portal() as portal:
        manager = SandboxManager(config, **manager_options)
        with portal.wrap_async_context_manager(manager):
            yield ToolRegistry(manager, tools=tools, portal=portal)
