"""Reaching the guest from the host: the HTTP ingress gateway (``vm.expose_http``)."""

from .gateway import (
    Connector,
    IngressGateway,
    IngressLimits,
    ListenersSource,
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
    "IngressEvent",
    "IngressGateway",
    "IngressHooks",
    "IngressLimits",
    "ListenersError",
    "ListenersSource",
    "Route",
    "RouteTable",
    "deny",
    "parse_listeners",
    "serialize_listeners",
]
