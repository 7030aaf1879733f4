"""User-facing HTTP policy: ``hooks, env = create_http_hooks(...)`` and the audit trail.

:class:`HttpHooks` bundles everything the mediator consults per request: the egress policy, the
secret store, optional user callbacks (sync or async) and the event log. Without hooks the
mediator uses :func:`deny_all_hooks`: every egress request is refused with a 403 that names the
option to change.
"""

from __future__ import annotations

import enum
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

from .messages import HttpRequest, HttpResponse
from .policy import EgressPolicy, PolicyHints
from .presets import expand_presets
from .secrets import Secret, SecretStore
from .upstream import Resolver

logger = logging.getLogger(__name__)

MAX_RECENT_EVENTS = 1000  # events kept in memory for events(); older ones are dropped

T = TypeVar("T")
MaybeAwaitable: TypeAlias = T | Awaitable[T]
OnRequest = Callable[[HttpRequest], MaybeAwaitable[HttpRequest | HttpResponse | None]]
OnResponse = Callable[[HttpResponse, HttpRequest], MaybeAwaitable[HttpResponse | None]]
IsRequestAllowed = Callable[[HttpRequest], MaybeAwaitable[bool]]


async def maybe_await(value: Any) -> Any:
    """The result of a sync or async user callback."""
    if inspect.isawaitable(value):
        return await value
    return value


class Decision(enum.Enum):
    ALLOWED = "allowed"  # forwarded upstream (the status is the upstream's)
    BLOCKED = "blocked"  # refused by policy, secrets or is_request_allowed
    ANSWERED = "answered"  # on_request answered it without any upstream request
    REJECTED = "rejected"  # malformed, oversized or unsupported guest request
    ERROR = "error"  # upstream unreachable, TLS failure, hook raised


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One request decision. Never holds a secret value: ``path`` has no query string."""

    time: float
    method: str
    scheme: str
    host: str
    port: int
    path: str
    status: int | None
    response_bytes: int
    decision: Decision
    reason: str
    secrets: tuple[str, ...] = ()
    protocol: str = ""  # guest-side protocol: "HTTP/1.1", "HTTP/2"


class EventLog:
    """Bounded buffer of recent events plus an optional callback per event."""

    def __init__(
        self,
        on_event: Callable[[AuditEvent], None] | None = None,
        *,
        max_events: int = MAX_RECENT_EVENTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._events: deque[AuditEvent] = deque(maxlen=max_events)
        self._on_event = on_event
        self.clock = clock
        self.dropped_callback_errors = 0

    def record(self, event: AuditEvent) -> None:
        self._events.append(event)
        if event.decision is not Decision.ALLOWED:
            logger.info("http %s %s %s%s: %s", event.decision.value, event.method, event.host, event.path, event.reason)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a broken observer must not break mediation
                self.dropped_callback_errors += 1
                logger.exception("on_event callback failed")

    def events(self) -> list[AuditEvent]:
        return list(self._events)

    def clear(self) -> None:
        self._events.clear()


@dataclass(frozen=True)
class HttpHooks:
    """Everything the mediator asks per request. Build with :func:`create_http_hooks`."""

    policy: EgressPolicy
    secrets: SecretStore = field(default_factory=SecretStore)
    replace_secrets_in_query: bool = False
    redact_responses: bool = False  # real values in responses become their placeholders
    on_request: OnRequest | None = None
    on_response: OnResponse | None = None
    is_request_allowed: IsRequestAllowed | None = None
    events: EventLog = field(default_factory=EventLog)
    # Upstream side: how the host resolves names (None: the host's resolver) and one more CA
    # to trust besides the host store. The mediator uses these unless given its own.
    resolver: Resolver | None = None
    upstream_ca_pem: bytes | None = None

    def env(self) -> dict[str, str]:
        """``{SECRET_NAME: placeholder}`` to pass as guest environment."""
        return self.secrets.placeholders()


def create_http_hooks(
    *,
    allowed_hosts: Iterable[str] = (),
    allow: Iterable[str] = (),
    allowed_internal_hosts: Iterable[str] = (),
    secrets: Mapping[str, Secret] | None = None,
    replace_secrets_in_query: bool = False,
    redact_responses: bool = False,
    block_internal_ranges: bool = True,
    on_request: OnRequest | None = None,
    on_response: OnResponse | None = None,
    is_request_allowed: IsRequestAllowed | None = None,
    on_event: Callable[[AuditEvent], None] | None = None,
    max_events: int = MAX_RECENT_EVENTS,
    resolver: Resolver | None = None,
    upstream_ca_pem: bytes | None = None,
    hints: PolicyHints | None = None,
) -> tuple[HttpHooks, dict[str, str]]:
    """Build the HTTP policy for a VM; returns ``(hooks, env)``.

    ``allowed_hosts`` defaults to nothing (deny all); ``["*"]`` allows any public host name.
    ``allow`` names host presets (``"pypi"``, ``"npm"``, ``"github"``: see
    :data:`gondolin.http.presets.HOST_PRESETS`) whose hosts are added to ``allowed_hosts``.
    ``allowed_internal_hosts`` may resolve to internal addresses and are implicitly allowed.
    A secret's ``hosts``, ``schemes`` and ``ports`` scope where it may be sent; it does not add
    to ``allowed_hosts``. ``redact_responses=True`` replaces any real value in response headers
    and (uncompressed) bodies with its placeholder before the guest sees it.
    ``env`` maps each secret name to the placeholder the guest should see.
    ``resolver`` (``async (host, port) -> [ip, ...]``) replaces the host's resolver for upstream
    names (split-horizon setups, tests); every address it returns is still checked by policy.
    ``upstream_ca_pem`` adds one CA to the host trust store for upstream TLS verification.
    ``hints``: how refusals name the option that would allow a request (default: these parameters).
    """
    if on_event is not None and inspect.iscoroutinefunction(on_event):
        raise TypeError("on_event is called synchronously for every event; pass a plain function "
                        "(it may hand the event to a queue or a memory object stream)")
    hosts = (*allowed_hosts, *expand_presets(allow))
    hooks = HttpHooks(
        policy=EgressPolicy(
            hosts, allowed_internal_hosts, block_internal_ranges=block_internal_ranges,
            hints=hints if hints is not None else PolicyHints(),
        ),
        secrets=SecretStore(secrets),
        replace_secrets_in_query=replace_secrets_in_query,
        redact_responses=redact_responses,
        on_request=on_request,
        on_response=on_response,
        is_request_allowed=is_request_allowed,
        events=EventLog(on_event, max_events=max_events),
        resolver=resolver,
        upstream_ca_pem=upstream_ca_pem,
    )
    return hooks, hooks.env()


def deny_all_hooks() -> HttpHooks:
    """The safe default when no hooks are configured: no egress at all."""
    return HttpHooks(policy=EgressPolicy())
