"""Reaching the guest from the host: the HTTP ingress gateway (``vm.expose_http``)."""

from .gateway import (
    Connector,
    IngressError,
    IngressGateway,
    IngressLimits,
    ListenersSource,
    is_loopback,
)
from .hooks import IngressContext, IngressEvent, IngressHooks, deny
from .routes import (
    LISTENERS_PATH,
    ListenersError,
    Route,
    RouteTable,
    parse_listeners,
    serialize_listeners,
)

__all__ = [
    "LISTENERS_PATH",
    "Connector",
    "IngressContext",
    "IngressError",
    "IngressEvent",
    "IngressGateway",
    "IngressHooks",
    "IngressLimits",
    "ListenersError",
    "ListenersSource",
    "Route",
    "RouteTable",
    "deny",
    "is_loopback",
    "parse_listeners",
    "serialize_listeners",
]
