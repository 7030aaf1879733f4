"""Debug logging per area, switched on by ``GONDOLIN_DEBUG=exec,protocol,...`` (or ``all``).

Areas log to the stdlib logger ``gondolin.<area>``. When an area is enabled through the
environment and the application configured no handler, a stderr handler is attached.
"""

from __future__ import annotations

import logging
import os

AREAS = ("vm", "qemu", "exec", "fs", "protocol", "net", "http", "vfs", "image")


def enabled_areas() -> set[str]:
    raw = os.environ.get("GONDOLIN_DEBUG", "")
    parts = {p.strip().lower() for p in raw.split(",") if p.strip()}
    if parts & {"1", "all", "true", "yes"}:
        return set(AREAS)
    return parts & set(AREAS)


def get_logger(area: str) -> logging.Logger:
    logger = logging.getLogger(f"gondolin.{area}")
    if area in enabled_areas():
        logger.setLevel(logging.DEBUG)
        root = logging.getLogger("gondolin")
        if not root.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
            root.addHandler(handler)
            root.propagate = False
    return logger
