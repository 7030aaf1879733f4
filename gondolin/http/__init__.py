"""HTTP/1.1 and HTTP/2 mediation for guest egress: TLS interception, policy, secrets, audit."""

from .ca import CertificateAuthority, default_ca_dir
from .errors import BodyTooLarge, EgressBlocked, HttpMediationError, UpstreamError
from .exchange import Limits
from .hooks import AuditEvent, Decision, EventLog, HttpHooks, create_http_hooks, deny_all_hooks
from .mediator import HttpMediator
from .messages import Body, HttpRequest, HttpResponse
from .policy import EgressPolicy, HostPattern, is_internal_address
from .presets import HOST_PRESETS, expand_presets
from .secrets import Secret, SecretStore
from .upstream import Timeouts, UpstreamClient

__all__ = [
    "HOST_PRESETS",
    "AuditEvent",
    "Body",
    "BodyTooLarge",
    "CertificateAuthority",
    "Decision",
    "EgressBlocked",
    "EgressPolicy",
    "EventLog",
    "HostPattern",
    "HttpHooks",
    "HttpMediationError",
    "HttpMediator",
    "HttpRequest",
    "HttpResponse",
    "Limits",
    "Secret",
    "SecretStore",
    "Timeouts",
    "UpstreamClient",
    "UpstreamError",
    "create_http_hooks",
    "default_ca_dir",
    "deny_all_hooks",
    "expand_presets",
    "is_internal_address",
]
