"""Secrets the guest can use but never read.

The guest only ever sees a placeholder (``GONDOLIN_SECRET_<48 hex>``). On the way out the host
swaps placeholders for the real value in header values (``Authorization: Basic`` is decoded,
substituted and re-encoded) and, only when opted in, in the query string; never in the path or
the body, and only when the request is in the secret's scope: one of its hosts, one of its
schemes (``https`` unless the secret says otherwise) and one of its ports (the scheme's default
port unless the secret, or a ``host:port`` pattern, says otherwise). A placeholder, a real
value, or a value that has been rotated out or revoked, headed anywhere it may not go is refused
before any upstream connection exists; :class:`BodyScanner` looks for real values in request
bodies and WebSocket payloads, :class:`Redactor` takes them out of responses.

Real values stay inside this module: :class:`Secret` hides its value from ``repr``, and
:meth:`SecretStore.redact` scrubs any text (exception messages, log lines) before it leaves.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets as _random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from .errors import EgressBlocked
from .policy import HostPattern, normalize_host

PLACEHOLDER_PREFIX = "GONDOLIN_SECRET_"
PLACEHOLDER_RANDOM_BYTES = 24  # 48 hex characters: unguessable, and never a plausible real value
PLACEHOLDER_RE = re.compile(f"{PLACEHOLDER_PREFIX}[0-9a-f]{{{2 * PLACEHOLDER_RANDOM_BYTES}}}")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FORBIDDEN_VALUE_CHARS = frozenset("\r\n\0")
MIN_SCANNED_VALUE_LENGTH = 8  # shorter values would block innocent requests by coincidence
MAX_REVOKED_VALUES = 1024  # old values kept to block their reuse; oldest forgotten first
_BASIC_PREFIX = "basic "
_BASIC_HEADERS = frozenset({"authorization", "proxy-authorization"})

Headers = tuple[tuple[str, str], ...]
SCHEME_DEFAULT_PORTS = {"http": 80, "https": 443}  # the schemes a secret may be scoped to


def _split_port(text: str) -> tuple[str, int | None]:
    """``"host:8443"`` -> ``("host", 8443)``; a bare host or an unbracketed IPv6 literal has no port."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end] if end > 0 else text, text[end + 1 :] if end > 0 else ""
    elif text.count(":") == 1:
        host, rest = text.split(":")
        rest = ":" + rest
    else:
        return text, None
    if not rest:
        return host, None
    if not rest.startswith(":") or not rest[1:].isdigit() or not 0 < int(rest[1:]) < 65536:
        raise ValueError(f"invalid port in host pattern {text!r}")
    return host, int(rest[1:])


def parse_scope(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The command-line form of a secret's scope -> ``(hosts, schemes)``.

    ``"api.example.com"`` (https, port 443), ``"api.example.com:8443"``, ``"http://localhost:8080"``;
    several comma-separated. A ``scheme://`` prefix sets the scheme; all hosts of one secret share
    one scheme, so a cleartext host never widens the scope of an https one.
    """
    hosts: list[str] = []
    schemes: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        scheme, sep, rest = item.partition("://")
        if sep:
            if scheme.lower() not in SCHEME_DEFAULT_PORTS:
                raise ValueError(f"{item!r}: a secret's scheme is http:// or https://")
            schemes.add(scheme.lower())
            item = rest.rstrip("/")
        if not item or "/" in item:
            raise ValueError(f"{item!r} is not HOST or HOST:PORT")
        hosts.append(item)
    if not hosts:
        raise ValueError("give at least one host")
    if len(schemes) > 1:
        raise ValueError("all hosts of one secret take the same scheme (define two secrets otherwise)")
    return tuple(hosts), tuple(schemes) or ("https",)


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a secret may go: a host pattern, the schemes, and the ports (None: the default port)."""

    pattern: HostPattern
    port: int | None  # from a "host:port" pattern; wins over the secret's ports
    schemes: frozenset[str]
    ports: frozenset[int] | None  # None: the default port of the request's scheme

    def allows(self, scheme: str, host: str, port: int) -> bool:
        if scheme not in self.schemes or not self.pattern.matches(host):
            return False
        if self.port is not None:
            return port == self.port
        if self.ports is not None:
            return port in self.ports
        return port == SCHEME_DEFAULT_PORTS[scheme]


@dataclass(frozen=True, slots=True)
class Secret:
    """A credential and where it may be sent.

    ``hosts`` are patterns as in ``allowed_hosts``, optionally with a port (``"api.example.com:8443"``,
    ``"[2001:db8::1]:8443"``). ``schemes`` defaults to ``("https",)``: a secret never travels in
    cleartext unless its definition says so. ``ports`` defaults to the default port of each
    scheme (443 for https); a pattern's own port wins over it.
    """

    value: str = field(repr=False)
    hosts: Sequence[str] = ()
    schemes: Sequence[str] = ("https",)
    ports: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.value, str) or not self.value:
            raise ValueError("a secret value must be a non-empty string")
        if _FORBIDDEN_VALUE_CHARS & set(self.value):
            raise ValueError("a secret value may not contain CR, LF or NUL")
        for name in ("hosts", "schemes"):
            if isinstance(getattr(self, name), str):
                raise TypeError(f"Secret {name} must be a list, not a single string")
        object.__setattr__(self, "hosts", tuple(self.hosts))
        object.__setattr__(self, "schemes", tuple(s.lower() for s in self.schemes))
        if not self.schemes or not set(self.schemes) <= SCHEME_DEFAULT_PORTS.keys():
            raise ValueError("Secret schemes must be a non-empty subset of ('http', 'https')")
        if self.ports is not None:
            object.__setattr__(self, "ports", tuple(self.ports))
            if not self.ports or not all(isinstance(p, int) and 0 < p < 65536 for p in self.ports):
                raise ValueError("Secret ports must be a non-empty list of TCP ports")
        self.scopes()  # fail early on a bad pattern

    def scopes(self) -> tuple[Scope, ...]:
        schemes = frozenset(self.schemes)
        ports = frozenset(self.ports) if self.ports is not None else None
        out = []
        for text in self.hosts:
            host, port = _split_port(text)
            out.append(Scope(HostPattern.parse(host), port, schemes, ports))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class SecretInfo:
    """What may be shown about a secret: never its value."""

    name: str
    placeholder: str
    hosts: tuple[str, ...]
    revoked: bool
    schemes: tuple[str, ...] = ("https",)
    ports: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Substitution:
    """Result of :meth:`SecretStore.apply`: new headers/target and the secret names used."""

    headers: Headers
    target: str
    used: tuple[str, ...]


@dataclass(slots=True)
class _Entry:
    name: str
    placeholder: str
    value: str | None  # None once revoked
    secret: Secret  # the definition: hosts, schemes, ports (its value may be stale after rotate)
    scopes: tuple[Scope, ...]

    def allows(self, scheme: str, host: str, port: int) -> bool:
        return any(s.allows(scheme, host, port) for s in self.scopes)

    def allows_host(self, host: str) -> bool:
        return any(s.pattern.matches(host) for s in self.scopes)


def new_placeholder() -> str:
    return PLACEHOLDER_PREFIX + _random.token_hex(PLACEHOLDER_RANDOM_BYTES)


class SecretStore:
    """Named secrets with placeholders; add, rotate and revoke at runtime."""

    def __init__(self, secrets: Mapping[str, Secret] | None = None) -> None:
        self._entries: dict[str, _Entry] = {}
        self._by_placeholder: dict[str, _Entry] = {}
        self._revoked: dict[str, str] = {}  # old real value -> secret name (insertion ordered)
        for name, secret in (secrets or {}).items():
            self.add(name, secret)

    def __repr__(self) -> str:
        return f"SecretStore(names={sorted(self._entries)!r})"

    # -- management ---------------------------------------------------------------------

    def add(self, name: str, secret: Secret) -> str:
        """Register a new secret; returns its placeholder for the guest environment."""
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid secret name {name!r}: use letters, digits and underscores")
        if name in self._entries:
            raise ValueError(f"secret {name!r} already exists; use rotate() to change it")
        if not isinstance(secret, Secret):
            raise TypeError("secrets must be gondolin Secret(value, hosts=[...]) objects")
        entry = _Entry(name, new_placeholder(), secret.value, secret, secret.scopes())
        self._entries[name] = entry
        self._by_placeholder[entry.placeholder] = entry
        self._revoked.pop(secret.value, None)
        return entry.placeholder

    def rotate(self, name: str, value: str, *, hosts: Sequence[str] | None = None) -> None:
        """Give ``name`` a new value (and optionally new hosts); the old value stays blocked."""
        entry = self._live(name)
        old = entry.secret
        new = Secret(value, hosts if hosts is not None else old.hosts, old.schemes, old.ports)
        assert entry.value is not None
        if entry.value != new.value:
            self._remember_revoked(entry.value, name)
        self._revoked.pop(new.value, None)
        entry.value = new.value
        entry.secret = new
        entry.scopes = new.scopes()

    def revoke(self, name: str) -> None:
        """Stop substituting ``name``; its placeholder and its old value are refused from now on."""
        entry = self._live(name)
        assert entry.value is not None
        self._remember_revoked(entry.value, name)
        entry.value = None

    def placeholders(self) -> dict[str, str]:
        """``{name: placeholder}`` for secrets that are not revoked: the guest's environment."""
        return {n: e.placeholder for n, e in self._entries.items() if e.value is not None}

    def describe(self) -> list[SecretInfo]:
        return [
            SecretInfo(e.name, e.placeholder, tuple(e.secret.hosts), e.value is None,
                       tuple(e.secret.schemes), None if e.secret.ports is None else tuple(e.secret.ports))
            for e in self._entries.values()
        ]

    def hosts(self, name: str) -> tuple[str, ...]:
        return tuple(self._live(name).secret.hosts)

    def redact(self, text: str) -> str:
        """Replace every real value (current or revoked) in ``text`` with ``[secret:NAME]``."""
        pairs = [(e.value, e.name) for e in self._entries.values() if e.value is not None]
        pairs += list(self._revoked.items())
        for value, name in sorted(pairs, key=lambda p: len(p[0]), reverse=True):
            for form in {value, quote(value, safe="")}:
                if form in text:
                    text = text.replace(form, f"[secret:{name}]")
        return text

    # -- request rewriting ----------------------------------------------------------------

    def apply(
        self,
        host: str,
        headers: Headers,
        target: str,
        *,
        in_query: bool,
        scheme: str = "https",
        port: int | None = None,
        substitute: bool = True,
    ) -> Substitution:
        """Substitute for a request to ``scheme://host:port``, or raise :class:`EgressBlocked`.

        ``port`` defaults to the scheme's default port. With ``substitute=False`` (a redirect
        hop that left the guest's origin) any placeholder is refused instead of replaced. The
        reason of the exception never holds a value.
        """
        dest = _Destination(scheme, normalize_host(host) or host.lower(),
                            SCHEME_DEFAULT_PORTS.get(scheme, 0) if port is None else port)
        used: dict[str, None] = {}
        out_headers = tuple(
            (name, self._apply_header(name, value, dest, used, substitute)) for name, value in headers
        )
        path, sep, query = target.partition("?")
        if PLACEHOLDER_RE.search(unquote(path)):
            raise EgressBlocked("secret placeholders are never substituted in the URL path")
        if query and PLACEHOLDER_RE.search(unquote(query)):
            if not in_query:
                raise EgressBlocked(
                    "secret placeholder in the query string "
                    "(pass replace_secrets_in_query=True to create_http_hooks to allow)"
                )
            query = self._substitute(query, dest, used, encode=True, substitute=substitute)
        self._check_real_values(dest, [v for _, v in headers], target)
        return Substitution(out_headers, path + sep + query, tuple(used))

    def _apply_header(
        self, name: str, value: str, dest: _Destination, used: dict[str, None], substitute: bool
    ) -> str:
        if name.lower() in _BASIC_HEADERS and value[: len(_BASIC_PREFIX)].lower() == _BASIC_PREFIX:
            decoded = _decode_basic(value[len(_BASIC_PREFIX) :])
            if decoded is not None and PLACEHOLDER_RE.search(decoded):
                replaced = self._substitute(decoded, dest, used, encode=False, substitute=substitute)
                encoded = base64.b64encode(replaced.encode("utf-8")).decode("ascii")
                value = value[: len(_BASIC_PREFIX)] + encoded
        if PLACEHOLDER_RE.search(value):
            value = self._substitute(value, dest, used, encode=False, substitute=substitute)
        return value

    def _substitute(
        self, text: str, dest: _Destination, used: dict[str, None], *, encode: bool, substitute: bool
    ) -> str:
        def replace(match: re.Match[str]) -> str:
            entry = self._by_placeholder.get(match.group(0))
            if entry is None:
                raise EgressBlocked("unknown secret placeholder")
            if entry.value is None:
                raise EgressBlocked(f"secret {entry.name} has been revoked")
            if not substitute:
                raise EgressBlocked(
                    f"secret {entry.name} is not substituted after a redirect to another "
                    "scheme, host or port"
                )
            if not entry.allows(dest.scheme, dest.host, dest.port):
                raise EgressBlocked(self._out_of_scope(entry, dest))
            used[entry.name] = None
            return quote(entry.value, safe="") if encode else entry.value

        if encode:
            # Placeholders may arrive percent-encoded; decode only their own characters' spans.
            text = re.sub(r"%5[Ff]", "_", text)
        return PLACEHOLDER_RE.sub(replace, text)

    @staticmethod
    def _out_of_scope(entry: _Entry, dest: _Destination) -> str:
        if not entry.allows_host(dest.host):
            return f"secret {entry.name} may not be sent to {dest.host}"
        return (
            f"secret {entry.name} may not be sent to {dest.host} over {dest.scheme} on port "
            f"{dest.port} (its scope: {', '.join(entry.secret.schemes)}"
            + (f"; ports {', '.join(map(str, entry.secret.ports))})" if entry.secret.ports else ")")
        )

    def _check_real_values(self, dest: _Destination, header_values: Iterable[str], target: str) -> None:
        """Defence in depth: a real value the guest somehow learnt may not leave for other hosts."""
        haystacks = [target, unquote(target)]
        for value in header_values:
            haystacks.append(value)
            if value[: len(_BASIC_PREFIX)].lower() == _BASIC_PREFIX:
                haystacks.append(_decode_basic(value[len(_BASIC_PREFIX) :]) or "")
        found = _first_needle("\n".join(haystacks).encode("utf-8", "surrogateescape"),
                              self._forbidden(dest))
        if found is not None:
            raise EgressBlocked(found)

    def _forbidden(self, dest: _Destination) -> tuple[tuple[bytes, str], ...]:
        """Byte forms of every real value that may not go to ``dest``, each with its refusal reason."""
        out: list[tuple[bytes, str]] = []
        for entry in self._entries.values():
            current = entry.value
            if current is None or len(current) < MIN_SCANNED_VALUE_LENGTH:
                continue
            if not entry.allows(dest.scheme, dest.host, dest.port):
                reason = "value of " + self._out_of_scope(entry, dest)
                out += [(form, reason) for form in _forms(current)]
        for value, name in self._revoked.items():
            if len(value) >= MIN_SCANNED_VALUE_LENGTH:
                out += [(form, f"a revoked value of secret {name} was sent") for form in _forms(value)]
        return tuple(out)

    def scanner(self, scheme: str, host: str, port: int) -> BodyScanner | None:
        """A scanner for data headed to ``scheme://host:port`` (None when nothing is forbidden there)."""
        needles = self._forbidden(_Destination(scheme, normalize_host(host) or host.lower(), port))
        return BodyScanner(needles) if needles else None

    def redactor(self) -> Redactor | None:
        """Replaces every real value (current or revoked) with its placeholder; None without secrets."""
        pairs: list[tuple[bytes, bytes]] = []
        for entry in self._entries.values():
            if entry.value is not None and len(entry.value) >= MIN_SCANNED_VALUE_LENGTH:
                pairs += [(form, entry.placeholder.encode()) for form in _forms(entry.value)]
        for value, name in self._revoked.items():
            if len(value) >= MIN_SCANNED_VALUE_LENGTH:
                pairs += [(form, self._entries[name].placeholder.encode()) for form in _forms(value)]
        return Redactor(pairs) if pairs else None

    # -- helpers ------------------------------------------------------------------------

    def _live(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise KeyError(f"no secret named {name!r}")
        if entry.value is None:
            raise ValueError(f"secret {name!r} has been revoked")
        return entry

    def _remember_revoked(self, value: str, name: str) -> None:
        self._revoked.pop(value, None)
        self._revoked[value] = name
        while len(self._revoked) > MAX_REVOKED_VALUES:
            del self._revoked[next(iter(self._revoked))]


@dataclass(frozen=True, slots=True)
class _Destination:
    scheme: str
    host: str  # normalised
    port: int


def _forms(value: str) -> set[bytes]:
    """The spellings of a value that are looked for: as it is, and percent-encoded (forms, URLs)."""
    return {value.encode("utf-8"), quote(value, safe="").encode("ascii")}


def _first_needle(data: bytes, needles: Sequence[tuple[bytes, str]]) -> str | None:
    return next((reason for needle, reason in needles if needle in data), None)


class _Window:
    """A byte stream that arrives in pieces, processed whole across piece boundaries (sans-IO).

    :meth:`feed` processes what it holds plus the new piece and returns all but the last
    ``longest value - 1`` bytes: those wait for the next piece (or :meth:`finish`), so a value
    split across pieces is seen whole before any byte of it is passed on.
    """

    def __init__(self, longest: int) -> None:
        self._keep = longest - 1
        self._tail = b""

    def _process(self, data: bytes) -> bytes:
        raise NotImplementedError

    def feed(self, data: bytes) -> bytes:
        buf = self._process(self._tail + data)
        cut = max(0, len(buf) - self._keep)
        self._tail = buf[cut:]
        return buf[:cut]

    def finish(self) -> bytes:
        out, self._tail = self._tail, b""
        return out


class BodyScanner(_Window):
    """Raises :class:`EgressBlocked` once a forbidden value is complete in what it has seen.

    :meth:`check` scans without holding anything back (WebSocket frames must go out whole),
    still across piece boundaries.
    """

    def __init__(self, needles: Sequence[tuple[bytes, str]]) -> None:
        self._needles = tuple(needles)
        super().__init__(max(len(n) for n, _ in self._needles))

    def _process(self, data: bytes) -> bytes:
        reason = _first_needle(data, self._needles)
        if reason is not None:
            raise EgressBlocked(reason)
        return data

    def check(self, data: bytes) -> None:
        buf = self._process(self._tail + data)
        self._tail = buf[len(buf) - self._keep :] if self._keep and len(buf) > self._keep else buf


class Redactor(_Window):
    """Replaces real values with their placeholders."""

    def __init__(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        self._pairs = sorted(pairs, key=lambda p: len(p[0]), reverse=True)
        super().__init__(len(self._pairs[0][0]))
        self.replaced = 0

    def _process(self, data: bytes) -> bytes:
        for value, placeholder in self._pairs:
            if value in data:
                self.replaced += data.count(value)
                data = data.replace(value, placeholder)
        return data

    def text(self, value: str) -> str:
        """A header value (latin-1 text, as every header here) with values replaced."""
        return self._process(value.encode("latin-1", "replace")).decode("latin-1")


def _decode_basic(token: str) -> str | None:
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
