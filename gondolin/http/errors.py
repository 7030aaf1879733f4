"""The few exceptions the HTTP mediation layer raises, each mapped to one guest-visible status."""

from __future__ import annotations


class HttpMediationError(Exception):
    """Base class: ``status`` is what the guest sees, ``reason`` is safe to log (no secrets)."""

    status: int = 502

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EgressBlocked(HttpMediationError):
    """Policy refused the request (host, address, secret scope or a user callback)."""

    status = 403


class UpstreamError(HttpMediationError):
    """The upstream could not be reached or answered with something unusable."""

    status = 502


class BodyTooLarge(HttpMediationError):
    """A request or hook-materialised body exceeded its cap."""

    status = 413


class GuestProtocolError(HttpMediationError):
    """The guest broke HTTP framing mid-request (truncated or malformed body, reset stream)."""

    status = 400
