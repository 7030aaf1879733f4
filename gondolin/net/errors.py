"""The one error type the packet parsers raise.

Every parser of guest bytes raises :class:`PacketError` (and nothing else) for bad input; the
stack catches it, counts ``reason`` in its stats and drops the packet.
"""

from __future__ import annotations


class PacketError(ValueError):
    """A packet from the guest is malformed or unsupported; ``reason`` is a stable short code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
