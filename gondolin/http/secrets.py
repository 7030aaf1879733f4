"""Secrets the guest can use but never read.

The guest only ever sees a placeholder (``GONDOLIN_SECRET_<48 hex>``). On the way out the host
swaps placeholders for the real value in header values (``Authorization: Basic`` is decoded,
substituted and re-encoded) and, only when opted in, in the query string; never in the path or
the body, and only when the request goes to one of the secret's hosts. A placeholder, a real
value, or a value that has been rotated out or revoked, headed anywhere it may not go is refused
before any upstream connection exists.

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


@dataclass(frozen=True, slots=True)
class Secret:
    """A credential and the hosts (patterns, as in ``allowed_hosts``) it may be sent to."""

    value: str = field(repr=False)
    hosts: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.value, str) or not self.value:
            raise ValueError("a secret value must be a non-empty string")
        if _FORBIDDEN_VALUE_CHARS & set(self.value):
            raise ValueError("a secret value may not contain CR, LF or NUL")
        if isinstance(self.hosts, str):
            raise TypeError("Secret hosts must be a list of host patterns, not a single string")
        object.__setattr__(self, "hosts", tuple(self.hosts))
        for pattern in self.hosts:
            HostPattern.parse(pattern)  # fail early on a bad pattern


@dataclass(frozen=True, slots=True)
class SecretInfo:
    """What may be shown about a secret: never its value."""

    name: str
    placeholder: str
    hosts: tuple[str, ...]
    revoked: bool


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
    patterns: tuple[HostPattern, ...]

    def allows(self, host: str) -> bool:
        return any(p.matches(host) for p in self.patterns)


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
        entry = _Entry(name, new_placeholder(), secret.value, _patterns(secret.hosts))
        self._entries[name] = entry
        self._by_placeholder[entry.placeholder] = entry
        self._revoked.pop(secret.value, None)
        return entry.placeholder

    def rotate(self, name: str, value: str, *, hosts: Sequence[str] | None = None) -> None:
        """Give ``name`` a new value (and optionally new hosts); the old value stays blocked."""
        entry = self._live(name)
        new = Secret(value, hosts if hosts is not None else [p.text for p in entry.patterns])
        assert entry.value is not None
        if entry.value != new.value:
            self._remember_revoked(entry.value, name)
        self._revoked.pop(new.value, None)
        entry.value = new.value
        entry.patterns = _patterns(new.hosts)

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
            SecretInfo(e.name, e.placeholder, tuple(p.text for p in e.patterns), e.value is None)
            for e in self._entries.values()
        ]

    def hosts(self, name: str) -> tuple[str, ...]:
        return tuple(p.text for p in self._live(name).patterns)

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

    def apply(self, host: str, headers: Headers, target: str, *, in_query: bool) -> Substitution:
        """Substitute for a request to ``host``, or raise :class:`EgressBlocked` (reason has no values)."""
        normalized = normalize_host(host) or host.lower()
        used: dict[str, None] = {}
        out_headers = tuple(
            (name, self._apply_header(name, value, normalized, used)) for name, value in headers
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
            query = self._substitute(query, normalized, used, encode=True)
        self._check_real_values(normalized, [v for _, v in headers], target)
        return Substitution(out_headers, path + sep + query, tuple(used))

    def _apply_header(self, name: str, value: str, host: str, used: dict[str, None]) -> str:
        if name.lower() in _BASIC_HEADERS and value[: len(_BASIC_PREFIX)].lower() == _BASIC_PREFIX:
            decoded = _decode_basic(value[len(_BASIC_PREFIX) :])
            if decoded is not None and PLACEHOLDER_RE.search(decoded):
                replaced = self._substitute(decoded, host, used, encode=False)
                encoded = base64.b64encode(replaced.encode("utf-8")).decode("ascii")
                value = value[: len(_BASIC_PREFIX)] + encoded
        if PLACEHOLDER_RE.search(value):
            value = self._substitute(value, host, used, encode=False)
        return value

    def _substitute(self, text: str, host: str, used: dict[str, None], *, encode: bool) -> str:
        def replace(match: re.Match[str]) -> str:
            entry = self._by_placeholder.get(match.group(0))
            if entry is None:
                raise EgressBlocked("unknown secret placeholder")
            if entry.value is None:
                raise EgressBlocked(f"secret {entry.name} has been revoked")
            if not entry.allows(host):
                raise EgressBlocked(f"secret {entry.name} may not be sent to {host}")
            used[entry.name] = None
            return quote(entry.value, safe="") if encode else entry.value

        if encode:
            # Placeholders may arrive percent-encoded; decode only their own characters' spans.
            text = re.sub(r"%5[Ff]", "_", text)
        return PLACEHOLDER_RE.sub(replace, text)

    def _check_real_values(self, host: str, header_values: Iterable[str], target: str) -> None:
        """Defence in depth: a real value the guest somehow learnt may not leave for other hosts."""
        haystacks = [target, unquote(target)]
        for value in header_values:
            haystacks.append(value)
            if value[: len(_BASIC_PREFIX)].lower() == _BASIC_PREFIX:
                haystacks.append(_decode_basic(value[len(_BASIC_PREFIX) :]) or "")
        text = "\n".join(haystacks)
        for entry in self._entries.values():
            current = entry.value
            if current is None or len(current) < MIN_SCANNED_VALUE_LENGTH:
                continue
            if current in text and not entry.allows(host):
                raise EgressBlocked(f"value of secret {entry.name} may not be sent to {host}")
        for value, name in self._revoked.items():
            if len(value) >= MIN_SCANNED_VALUE_LENGTH and value in text:
                raise EgressBlocked(f"a revoked value of secret {name} was sent")

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


def _patterns(hosts: Iterable[str]) -> tuple[HostPattern, ...]:
    return tuple(HostPattern.parse(h) for h in hosts)


def _decode_basic(token: str) -> str | None:
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
