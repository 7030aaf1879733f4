"""What the host decides per ingress request, and what the gateway reports (values only).

``on_request(request, ctx)`` sees the client's request (``X-Forwarded-*`` already set by the
gateway) and returns ``None`` (forward it), an edited :class:`~gondolin.http.HttpRequest`
(``request.with_header(...)``) or an :class:`~gondolin.http.HttpResponse` to answer without
contacting the guest (:func:`deny` builds one). ``on_response(response, request, ctx)`` may
return an edited response. Both may be sync or async.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias, TypeVar

from ..http.messages import HttpRequest, HttpResponse
from .routes import Route

logger = logging.getLogger(__name__)

MAX_RECENT_EVENTS = 1000

T = TypeVar("T")
MaybeAwaitable: TypeAlias = T | Awaitable[T]


@dataclass(frozen=True, slots=True)
class IngressContext:
    """Where a request came from and which route it matched."""

    client: str  # the client's IP address as the gateway saw it
    route: Route


OnRequest = Callable[[HttpRequest, IngressContext], MaybeAwaitable[HttpRequest | HttpResponse | None]]
OnResponse = Callable[[HttpResponse, HttpRequest, IngressContext], MaybeAwaitable[HttpResponse | None]]

EventKind = Literal["request", "reload", "reload_error"]


@dataclass(frozen=True, slots=True)
class IngressEvent:
    """One request through the gateway, or one reload of the listeners file.

    ``status`` is what the client got (None if it went away first); ``reason`` says why a
    request was refused or failed (``"forwarded"`` otherwise), or what was wrong with the file.
    ``path`` has no query string.
    """

    time: float
    kind: EventKind
    reason: str
    method: str = ""
    path: str = ""
    status: int | None = None
    client: str = ""
    route: str | None = None  # the matched prefix


@dataclass(frozen=True)
class IngressHooks:
    """Host callbacks for the gateway (all optional)."""

    on_request: OnRequest | None = None
    on_response: OnResponse | None = None
    on_event: Callable[[IngressEvent], None] | None = None


def deny(status: int = 403, message: str = "forbidden") -> HttpResponse:
    """A plain-text refusal for ``on_request`` to return."""
    if not 400 <= status <= 599:
        raise ValueError(f"a refusal needs a 4xx or 5xx status, got {status}")
    return HttpResponse.text(status, message)


class IngressEventLog:
    """The last ``MAX_RECENT_EVENTS`` events plus the user's ``on_event`` callback."""

    def __init__(self, on_event: Callable[[IngressEvent], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._events: deque[IngressEvent] = deque(maxlen=MAX_RECENT_EVENTS)
        self._on_event = on_event
        self.clock = clock

    def record(self, kind: EventKind, reason: str, **fields: object) -> None:
        event = IngressEvent(self.clock(), kind, reason, **fields)  # type: ignore[arg-type]
        self._events.append(event)
        if kind == "reload_error":
            logger.warning("ingress: %s (keeping the previous routes)", reason)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a broken observer must not break the gateway
                logger.exception("ingress on_event callback failed")

    def events(self) -> list[IngressEvent]:
        return list(self._events)
