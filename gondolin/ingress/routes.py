"""Ingress routes and the guest-writable ``/etc/gondolin/listeners`` file (sans-IO).

A route sends requests whose path starts with ``prefix`` (on a segment boundary: ``/api``
matches ``/api`` and ``/api/x``, not ``/apix``; ``/`` matches everything) to a guest loopback
port. The longest matching prefix wins.

The listeners file has one route per line::

    # comments and blank lines are ignored
    /        :8080
    /api     :9000   strip_prefix=false

``<prefix> :<port> [key=value ...]``: the prefix starts with ``/`` (a trailing ``/`` is
dropped), the port is 1-65535 in decimal digits, ``strip_prefix`` is ``true`` (the default:
the guest server sees ``/x`` for ``/api/x``) or ``false``; unknown keys are ignored so newer
files still load. One bad line rejects the whole file: the gateway keeps the table it had.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

LISTENERS_PATH = "/etc/gondolin/listeners"
MAX_LISTENERS_BYTES = 64 << 10  # a bigger file is refused, not read
MAX_ROUTES = 1024
MAX_PREFIX_CHARS = 1024


class ListenersError(ValueError):
    """A route or listeners file that cannot be used; the message names the line."""


@dataclass(frozen=True, slots=True)
class Route:
    """Requests under ``prefix`` go to guest loopback ``port``."""

    prefix: str
    port: int
    strip_prefix: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", normalize_prefix(self.prefix))
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ListenersError(f"route {self.prefix!r}: port must be an integer in 1-65535, got {self.port!r}")

    def matches(self, path: str) -> bool:
        if self.prefix == "/":
            return True
        return path == self.prefix or path.startswith(self.prefix + "/")

    def upstream_target(self, target: str) -> str:
        """The origin-form target the guest server sees for a client ``target``."""
        if not self.strip_prefix or self.prefix == "/":
            return target
        rest = target[len(self.prefix):]
        return rest if rest.startswith("/") else "/" + rest


def normalize_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise ListenersError(f"route prefix must start with '/', got {prefix!r}")
    if len(prefix) > MAX_PREFIX_CHARS or any(c.isspace() or c in "?#" or ord(c) < 0x20 for c in prefix):
        raise ListenersError(f"route prefix {prefix[:64]!r} is not a plain path")
    trimmed = prefix.rstrip("/")
    return trimmed or "/"


class RouteTable:
    """An immutable set of routes, looked up by longest prefix."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        by_prefix: dict[str, Route] = {}
        for route in routes:
            by_prefix[route.prefix] = route
        if len(by_prefix) > MAX_ROUTES:
            raise ListenersError(f"at most {MAX_ROUTES} routes")
        self._routes = tuple(sorted(by_prefix.values(), key=lambda r: (-len(r.prefix), r.prefix)))

    @classmethod
    def of(cls, routes: RouteTable | Mapping[str, int] | Iterable[Route] | None) -> RouteTable:
        """A table from a table, ``{prefix: port}`` or routes."""
        if routes is None:
            return cls()
        if isinstance(routes, RouteTable):
            return routes
        if isinstance(routes, Mapping):
            return cls(Route(prefix, port) for prefix, port in routes.items())
        return cls(routes)

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes

    def match(self, path: str) -> Route | None:
        for route in self._routes:  # longest prefix first
            if route.matches(path):
                return route
        return None

    def merged(self, over: RouteTable) -> RouteTable:
        """This table with ``over``'s routes added; ``over`` wins on an equal prefix."""
        return RouteTable((*self._routes, *over._routes))

    def __len__(self) -> int:
        return len(self._routes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RouteTable) and set(self._routes) == set(other._routes)

    def __hash__(self) -> int:
        return hash(frozenset(self._routes))

    def __repr__(self) -> str:
        return f"RouteTable({list(self._routes)!r})"


def parse_listeners(data: bytes | str) -> RouteTable:
    """Parse a listeners file; :class:`ListenersError` naming the first bad line."""
    if isinstance(data, bytes):
        if len(data) > MAX_LISTENERS_BYTES:
            raise ListenersError(f"{LISTENERS_PATH} is larger than {MAX_LISTENERS_BYTES} bytes")
        text = data.decode("utf-8", "replace")
    else:
        text = data
    routes: list[Route] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.replace("\0", "").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            route = _parse_line(line)
        except ListenersError as exc:
            raise ListenersError(f"{LISTENERS_PATH} line {number}: {exc}") from None
        if route.prefix in seen:
            raise ListenersError(f"{LISTENERS_PATH} line {number}: prefix {route.prefix} is listed twice")
        seen.add(route.prefix)
        routes.append(route)
    return RouteTable(routes)


def _parse_line(line: str) -> Route:
    fields = line.split()
    if len(fields) < 2:
        raise ListenersError("expected '<prefix> :<port> [strip_prefix=true|false]'")
    prefix, port_text, *options = fields
    if not port_text.startswith(":") or not port_text[1:].isdigit() or len(port_text) > 6:
        raise ListenersError(f"port must look like ':8080', got {port_text[:16]!r}")
    strip = True
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise ListenersError(f"option {option[:32]!r} is not key=value")
        if key == "strip_prefix":
            if value not in ("true", "false"):
                raise ListenersError(f"strip_prefix must be true or false, got {value[:16]!r}")
            strip = value == "true"
    return Route(prefix, int(port_text[1:]), strip)


def serialize_listeners(table: RouteTable | Iterable[Route]) -> str:
    """The canonical listeners file for ``table`` (what :func:`parse_listeners` reads back)."""
    routes = table.routes if isinstance(table, RouteTable) else tuple(table)
    lines = []
    for route in sorted(routes, key=lambda r: r.prefix):
        extra = "" if route.strip_prefix else "\tstrip_prefix=false"
        lines.append(f"{route.prefix}\t:{route.port}{extra}\n")
    return "".join(lines)
