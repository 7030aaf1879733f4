"""Mapped TCP rules (``tcp_hosts``): guest ``HOST[:PORT]`` -> host ``HOST:PORT`` raw relays.

A key names what the guest connects to: a hostname it resolved through synthetic DNS, or an
IPv4 literal, with an optional port (``HOST:PORT`` wins over a bare ``HOST``). A value is the
exact target the host connects to. No wildcards: each rule opens exactly one door.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

_HOST_RE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\Z")


@dataclass(frozen=True, slots=True)
class MappedTarget:
    host: str  # hostname or IP literal (IPv6 without brackets)
    port: int


def _parse_port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in tcp_hosts {what}: {text!r}")
    return int(text)


def _normalize_host(host: str, what: str) -> str:
    host = host.strip().lower().rstrip(".")
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _HOST_RE.match(host):
        raise ValueError(f"bad host in tcp_hosts {what}: {host!r}")
    return host


def _parse_key(key: str) -> tuple[str, int | None]:
    host, sep, port = key.rpartition(":")
    if not sep:
        return _normalize_host(key, "key"), None
    return _normalize_host(host, "key"), _parse_port(port, "key")


def _parse_target(value: str) -> MappedTarget:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"tcp_hosts target must be HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError as exc:
            raise ValueError(f"bad IPv6 target in tcp_hosts: {value!r}") from exc
    else:
        host = _normalize_host(host, "target")
    return MappedTarget(host, _parse_port(port, "target"))


class TcpHostRules:
    """Parsed, validated ``tcp_hosts`` rules."""

    def __init__(self, rules: Mapping[str, str] | None = None) -> None:
        self._rules: dict[tuple[str, int | None], MappedTarget] = {}
        for key, value in (rules or {}).items():
            parsed = _parse_key(key)
            if parsed in self._rules:
                raise ValueError(f"duplicate tcp_hosts key: {key!r}")
            self._rules[parsed] = _parse_target(value)

    def __bool__(self) -> bool:
        return bool(self._rules)

    @property
    def hostnames(self) -> frozenset[str]:
        """Keys that are names (not IP literals): these need synthetic DNS."""
        out = set()
        for host, _port in self._rules:
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                out.add(host)
        return frozenset(out)

    def match(self, hostname: str | None, ip: str, port: int) -> MappedTarget | None:
        for host in (hostname, ip):
            if host is None:
                continue
            target = self._rules.get((host, port)) or self._rules.get((host, None))
            if target is not None:
                return target
        return None
