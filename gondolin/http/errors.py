"""The few exceptions the HTTP mediation layer raises, each mapped to one guest-visible status."""

from __future__ import annotations


class HttpMediationError(Exception):
    """Base class: ``status`` is what the guest sees, ``reason`` is safe to log (no secrets)."""

    status: int = 502
    # Set once the exchange has recorded this failure's audit event, so the guest server that
    # answers it does not record a second one.
    audited: bool = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EgressBlocked(HttpMediationError):
    """Policy refused the request (host, address, secret scope or a user callback)."""

    status = 403


class UpstreamError(HttpMediationError):
    """The upstream could not be reached or answered with something unusable.

    ``request_sent`` is False only when no byte of the request can have left the host (no
    connection, a failed TLS handshake, a refused redirect): that decides whether the audit
    event is ``allowed`` (the upstream may have the request) or ``error``.
    """

    status = 502

    def __init__(self, reason: str, *, request_sent: bool = True) -> None:
        super().__init__(reason)
        self.request_sent = request_sent


class BodyTooLarge(HttpMediationError):
    """A request or hook-materialised body exceeded its cap."""

    status = 413


class GuestProtocolError(HttpMediationError):
    """The guest broke HTTP framing mid-request (truncated or malformed body, reset stream)."""

    status = 400
