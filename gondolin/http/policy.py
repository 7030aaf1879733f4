"""Egress policy: which host names the guest may reach, and which addresses they may resolve to.

Pure functions and small immutable objects; nothing here resolves names or opens sockets. The
upstream client asks :meth:`EgressPolicy.check_host` before anything else and
:meth:`EgressPolicy.check_address` for every address a name resolved to, right before connecting.

Host patterns are label-aware:

* ``"*"`` matches any DNS name (never an IP literal: those must be listed as themselves);
* ``"*.github.com"`` matches ``api.github.com`` and ``a.b.github.com``, not ``github.com``, and
  never ``evilgithub.com``;
* anything else matches exactly (case-insensitive, trailing dot ignored), IP literals included.

``*`` anywhere other than as a whole leftmost label is rejected when the policy is built.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_HOST_LENGTH = 253  # RFC 1035 section 2.3.4, without the trailing dot
MAX_LABEL_LENGTH = 63  # RFC 1035 section 2.3.4
# Letters, digits, hyphen; underscore too because real services use it (SRV-style names).
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL_RE = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")

# Never-public IPv4 space (RFC 6890 special-purpose registry and friends).
INTERNAL_IPV4_NETWORKS: tuple[ipaddress.IPv4Network, ...] = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network", RFC 791; 0.0.0.0 reaches the local host on Linux
        "10.0.0.0/8",  # private, RFC 1918
        "100.64.0.0/10",  # carrier-grade NAT, RFC 6598
        "127.0.0.0/8",  # loopback, RFC 1122
        "169.254.0.0/16",  # link-local, RFC 3927 (cloud metadata at 169.254.169.254)
        "172.16.0.0/12",  # private, RFC 1918
        "192.0.0.0/24",  # IETF protocol assignments, RFC 6890
        "192.0.2.0/24",  # TEST-NET-1, RFC 5737
        "192.88.99.0/24",  # 6to4 relay anycast, RFC 7526
        "192.168.0.0/16",  # private, RFC 1918
        "198.18.0.0/15",  # benchmarking, RFC 2544 (also the guest's synthetic DNS range)
        "198.51.100.0/24",  # TEST-NET-2, RFC 5737
        "203.0.113.0/24",  # TEST-NET-3, RFC 5737
        "224.0.0.0/4",  # multicast, RFC 5771
        "240.0.0.0/4",  # reserved, RFC 1112, including broadcast 255.255.255.255
    )
)

INTERNAL_IPV6_NETWORKS: tuple[ipaddress.IPv6Network, ...] = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/96",  # unspecified, loopback and deprecated IPv4-compatible, RFC 4291
        "::ffff:0:0:0/96",  # IPv4-translated, RFC 2765
        "64:ff9b:1::/48",  # local-use NAT64, RFC 8215
        "100::/64",  # discard-only, RFC 6666
        "2001::/23",  # IETF protocol assignments incl. Teredo, RFC 2928 / 4380
        "2001:db8::/32",  # documentation, RFC 3849
        "3fff::/20",  # documentation, RFC 9637
        "fc00::/7",  # unique local, RFC 4193
        "fe80::/10",  # link-local, RFC 4291
        "fec0::/10",  # site-local (deprecated), RFC 3879
        "ff00::/8",  # multicast, RFC 4291
    )
)

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # well-known NAT64 prefix, RFC 6052


class PolicyCode(enum.Enum):
    ALLOWED = "allowed"
    INVALID_HOST = "invalid-host"
    HOST_NOT_ALLOWED = "host-not-allowed"
    INTERNAL_ADDRESS = "internal-address"


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    code: PolicyCode
    reason: str

    @property
    def allowed(self) -> bool:
        return self.code is PolicyCode.ALLOWED


ALLOW = PolicyDecision(PolicyCode.ALLOWED, "allowed")


def parse_ip(text: str) -> IPAddress | None:
    """Return the address when ``text`` is a canonical IP literal (IPv6 may be bracketed)."""
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    candidate = candidate.split("%", 1)[0]  # zone index: fe80::1%eth0
    try:
        return ipaddress.ip_address(candidate)
    except ValueError:
        return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def is_internal_address(address: str | IPAddress) -> bool:
    """True for any address that is not plainly public unicast; unparseable text counts as internal."""
    ip = parse_ip(address) if isinstance(address, str) else address
    if ip is None:
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            return True
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return is_internal_address(embedded)
        return any(ip in net for net in INTERNAL_IPV6_NETWORKS)
    return any(ip in net for net in INTERNAL_IPV4_NETWORKS)


def normalize_host(host: str) -> str | None:
    """Canonical lower-case form of a host name or IP literal, or ``None`` when it is not one.

    IPv6 literals come back without brackets in compressed form. Names whose last label is
    numeric ("127.1", "0x7f.1", "2130706433") are refused: resolvers would read them as IPv4.
    """
    host = host.strip().lower()
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    if not host or len(host) > MAX_HOST_LENGTH or not host.isascii():
        return None
    ip = parse_ip(host)
    if ip is not None:
        if "%" in host:
            return None
        if isinstance(ip, ipaddress.IPv4Address) and str(ip) != host:
            return None  # "010.0.0.1" and similar ambiguous spellings
        return str(ip)
    labels = host.split(".")
    if not all(_LABEL_RE.match(label) for label in labels):
        return None
    if _NUMERIC_LABEL_RE.match(labels[-1]):
        return None
    return host


@dataclass(frozen=True, slots=True)
class HostPattern:
    """One allow-list entry; build with :meth:`parse`."""

    text: str
    _kind: str  # "any" | "suffix" | "exact"
    _value: str

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        raw = text.strip().lower()
        if raw == "*":
            return cls(raw, "any", "")
        if raw.startswith("*."):
            suffix = normalize_host(raw[2:])
            if suffix is None or "*" in raw[2:] or parse_ip(suffix) is not None:
                raise ValueError(f"invalid host pattern {text!r}")
            return cls(raw, "suffix", "." + suffix)
        if "*" in raw:
            raise ValueError(
                f"invalid host pattern {text!r}: '*' may only be a whole leftmost label ('*.example.com') or the whole pattern"
            )
        exact = normalize_host(raw)
        if exact is None:
            raise ValueError(f"invalid host pattern {text!r}")
        return cls(raw, "exact", exact)

    def matches(self, host: str) -> bool:
        """``host`` must already be normalised (see :func:`normalize_host`)."""
        if self._kind == "exact":
            return host == self._value
        if parse_ip(host) is not None:
            return False
        if self._kind == "any":
            return True
        return host.endswith(self._value) and len(host) > len(self._value)


def _parse_patterns(patterns: Iterable[str]) -> tuple[HostPattern, ...]:
    seen: dict[str, HostPattern] = {}
    for text in patterns:
        pattern = HostPattern.parse(text)
        seen.setdefault(pattern.text, pattern)
    return tuple(seen.values())


@dataclass(frozen=True, slots=True)
class PolicyHints:
    """How a refusal tells the reader what would allow the request: the option names of the API
    they used (the Python SDK by default; the CLI names its flags). ``{host}`` is filled in."""

    no_hosts: str = "no hosts are allowed by default (pass allowed_hosts=[...] to create_http_hooks)"
    not_allowed: str = "host is not in allowed_hosts"
    internal: str = "add the host to allowed_internal_hosts to allow"


CLI_HINTS = PolicyHints(
    no_hosts="no hosts are allowed by default (add --allow-host {host} to the gondolin command)",
    not_allowed="host is not allowed (add --allow-host {host} to the gondolin command)",
    internal="add --allow-internal-host {host} to the gondolin command to allow",
)


class EgressPolicy:
    """Host allow-list plus internal-range protection. The default instance denies everything."""

    def __init__(
        self,
        allowed_hosts: Iterable[str] = (),
        allowed_internal_hosts: Iterable[str] = (),
        *,
        block_internal_ranges: bool = True,
        hints: PolicyHints = PolicyHints(),  # noqa: B008 (frozen, shared default)
    ) -> None:
        self.hints = hints
        if isinstance(allowed_hosts, str) or isinstance(allowed_internal_hosts, str):
            raise TypeError("host patterns must be a list of strings, not a single string")
        self._internal = _parse_patterns(allowed_internal_hosts)
        # Names allowed to reach internal addresses are implicitly allowed egress too.
        self._allowed = _parse_patterns([*allowed_hosts, *(p.text for p in self._internal)])
        self.block_internal_ranges = block_internal_ranges

    @property
    def allowed_hosts(self) -> tuple[str, ...]:
        return tuple(p.text for p in self._allowed)

    @property
    def allowed_internal_hosts(self) -> tuple[str, ...]:
        return tuple(p.text for p in self._internal)

    def host_allowed(self, host: str) -> bool:
        normalized = normalize_host(host)
        return normalized is not None and any(p.matches(normalized) for p in self._allowed)

    def check_host(self, host: str) -> PolicyDecision:
        """May a request be addressed to ``host`` at all? Checked before any DNS or connect."""
        normalized = normalize_host(host)
        if normalized is None:
            return PolicyDecision(PolicyCode.INVALID_HOST, "invalid host name")
        if not self._allowed:
            return PolicyDecision(
                PolicyCode.HOST_NOT_ALLOWED,
                f"egress to {normalized} is denied: {self.hints.no_hosts.format(host=normalized)}",
            )
        if not any(p.matches(normalized) for p in self._allowed):
            return PolicyDecision(
                PolicyCode.HOST_NOT_ALLOWED,
                f"egress to {normalized} is denied: {self.hints.not_allowed.format(host=normalized)}",
            )
        literal = parse_ip(normalized)
        if literal is not None:
            return self.check_address(normalized, str(literal))
        return ALLOW

    def check_address(self, host: str, address: str) -> PolicyDecision:
        """May ``host``, already allowed by :meth:`check_host`, connect to resolved ``address``?"""
        normalized = normalize_host(host)
        if normalized is None:
            return PolicyDecision(PolicyCode.INVALID_HOST, "invalid host name")
        if not self.block_internal_ranges or not is_internal_address(address):
            return ALLOW
        if any(p.matches(normalized) for p in self._internal):
            return ALLOW
        return PolicyDecision(
            PolicyCode.INTERNAL_ADDRESS,
            f"egress to {normalized} is denied: it resolves to internal address {address} "
            f"({self.hints.internal.format(host=normalized)})",
        )


DENY_ALL = EgressPolicy()
