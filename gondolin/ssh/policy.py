"""SSH egress policy: which hosts the guest may reach over SSH, and which commands it may run.

Plain data and pure functions (no asyncssh, no I/O): :class:`SshProxyOptions` is what a VM's
``ssh=`` option holds, :func:`parse_git_command` reads the command line ``git`` sends over SSH,
and :func:`git_policy` builds an ``exec_policy`` from repository patterns.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sniffio

from ..http.policy import HostPattern, normalize_host, parse_ip

DEFAULT_PORT = 22
MAX_UPSTREAM_PER_CONNECTION = 4  # upstream SSH connections one guest connection may hold at once
MAX_UPSTREAM_TOTAL = 64  # upstream SSH connections of one VM at once
CONNECT_TIMEOUT = 15.0  # seconds to connect to, and authenticate with, the upstream server
IDLE_TIMEOUT = 600.0  # seconds without traffic after which a connection (either side) is closed
KEEPALIVE_INTERVAL = 10.0  # seconds between keepalives on an upstream connection
MAX_COMMAND_LEN = 4096  # longest exec command the proxy accepts from the guest
GIT_SERVICES = ("git-upload-pack", "git-receive-pack", "git-upload-archive")
READ_SERVICES = frozenset({"git-upload-pack", "git-upload-archive"})
_REPO_RE = re.compile(r"[A-Za-z0-9._~/+@-]+\Z")


@dataclass(frozen=True, slots=True)
class SshAllow:
    """An ``exec_policy`` answer: run the command upstream."""


@dataclass(frozen=True, slots=True)
class SshDeny:
    """An ``exec_policy`` answer: refuse; the guest sees ``message`` on stderr and ``exit_code``."""

    message: str
    exit_code: int = 1


ALLOW = SshAllow()
SshDecision = SshAllow | SshDeny
ExecPolicy = Callable[[str, int, str, str], SshDecision | bool | Awaitable[SshDecision | bool]]
"""``exec_policy(host, port, user, command)``: ``host``/``port`` as the guest named them, ``user``
the guest's SSH user name, ``command`` the exact command line. Returns :data:`ALLOW`, an
:class:`SshDeny`, or a bool; may be ``async``."""
HostKeyVerifier = Callable[[str, int, str], bool]
"""``verifier(host, port, public_key)`` with the upstream's key in OpenSSH text form
(``"ssh-ed25519 AAAA..."``); True trusts it for this connection."""


@dataclass(frozen=True, slots=True)
class GitCommand:
    """What a ``git`` client asks an SSH server to run: ``service`` on ``repo``."""

    service: str  # one of GIT_SERVICES
    repo: str  # as the client named it, quotes and leading "/" or "~/" removed: "org/repo.git"

    @property
    def writes(self) -> bool:
        return self.service not in READ_SERVICES


def parse_git_command(command: str) -> GitCommand | None:
    """``git-upload-pack 'org/repo.git'`` (also ``git upload-pack``, double quotes, no quotes)
    -> :class:`GitCommand`; None for anything else: other programs, extra arguments, shell
    syntax, or paths with ``..``, control characters or characters a repository path never has."""
    if len(command) > MAX_COMMAND_LEN or any(ord(c) < 0x20 or c == "\x7f" for c in command):
        return None
    try:
        words = shlex.split(command, posix=True)
    except ValueError:
        return None
    if len(words) == 3 and words[0] == "git":
        words = [f"git-{words[1]}", words[2]]
    if len(words) != 2 or words[0] not in GIT_SERVICES:
        return None
    path = words[1]
    if path.startswith("~/"):
        path = path[2:]
    path = path.lstrip("/")
    if not path or not _REPO_RE.match(path) or path.startswith("-"):
        return None
    parts = path.split("/")
    if any(p in ("", ".", "..", "~") for p in parts):
        return None
    return GitCommand(words[0], path)


def _repo_key(repo: str) -> str:
    return repo.removesuffix(".git").removesuffix("/")


def _repo_matches(repo: str, patterns: Sequence[str]) -> bool:
    key = _repo_key(repo)
    return any(fnmatch.fnmatchcase(key, _repo_key(p.lstrip("/"))) for p in patterns)


def git_policy(read: Iterable[str] = ("*",), write: Iterable[str] = ()) -> ExecPolicy:
    """An ``exec_policy`` that allows only git over SSH: fetch/clone/archive of repositories
    matching ``read`` and push to those matching ``write`` (a push also implies read).

    Patterns are shell-style globs over ``org/repo`` (a ``.git`` suffix is ignored on both
    sides; ``*`` also matches ``/``): ``"*"``, ``"myorg/*"``, ``"myorg/tool"``. Any other command
    is denied with a message naming the rule."""
    read_patterns = tuple(read)
    write_patterns = tuple(write)

    def policy(host: str, port: int, user: str, command: str) -> SshDecision:
        git = parse_git_command(command)
        if git is None:
            return SshDeny(f"only git fetch/push commands are allowed over SSH to {host}, not {_summary(command)!r}")
        if git.writes:
            if _repo_matches(git.repo, write_patterns):
                return ALLOW
            return SshDeny(f"push to {git.repo} on {host} is not allowed by the VM's SSH policy "
                           "(git_policy(write=[...]) or --ssh-allow-push)")
        if _repo_matches(git.repo, read_patterns + write_patterns):
            return ALLOW
        return SshDeny(f"reading {git.repo} on {host} is not allowed by the VM's SSH policy")

    return policy


def _summary(command: str, limit: int = 120) -> str:
    """A loggable summary of a command line: printable, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in command[:limit])
    return text + ("..." if len(command) > limit else "")


def command_summary(command: str) -> str:
    git = parse_git_command(command)
    if git is not None:
        return f"{git.service} {git.repo}"
    return _summary(command)


@dataclass(frozen=True, slots=True)
class SshHostRule:
    """One allowed ``HOST[:PORT]`` (``*.example.com`` wildcards allowed; port 22 by default)."""

    pattern: HostPattern
    port: int

    @classmethod
    def parse(cls, text: str) -> SshHostRule:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"SSH allowed host must be 'HOST[:PORT]', not {text!r}")
        host, sep, port = text.strip().rpartition(":")
        if not sep or "]" in port:
            host, port = text.strip(), str(DEFAULT_PORT)
        if host.startswith("[") and host.endswith("]"):
            raise ValueError(f"SSH allowed host {text!r}: IPv6 is not supported (the guest network is IPv4)")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"SSH allowed host {text!r} has a bad port")
        try:
            pattern = HostPattern.parse(host)
        except ValueError:
            raise ValueError(f"SSH allowed host {text!r} is not a host name, IPv4 address or '*.domain' pattern") from None
        return cls(pattern, int(port))

    def matches(self, host: str, port: int) -> bool:
        return port == self.port and self.pattern.matches(host)


def _parse_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be 'HOST:PORT', not {text!r}")
    host = host.strip("[]")
    if normalize_host(host) is None:
        raise ValueError(f"{what} has a bad host: {text!r}")
    return host, int(port)


def _default_known_hosts() -> tuple[str, ...]:
    candidates = (os.path.expanduser("~/.ssh/known_hosts"), "/etc/ssh/ssh_known_hosts")
    return tuple(p for p in candidates if os.path.isfile(p))


@dataclass(frozen=True)
class SshProxyOptions:
    """SSH egress through the host: ``VMOptions(ssh=SshProxyOptions(...))``.

    The guest's SSH connections to ``allowed_hosts`` (``"HOST[:PORT]"``, port 22 by default,
    ``*.example.com`` allowed) end at an SSH server in the host process. For each command the
    guest runs, ``exec_policy`` decides (default: :func:`git_policy` read-only: clone and fetch
    of any repository, no push, no other command); an allowed command runs on the real server
    over a connection the host opens with ``credential`` (a private key file, with
    ``passphrase`` if it is encrypted) or ``use_agent`` (the host's ssh-agent: ``True`` for
    ``$SSH_AUTH_SOCK``, or a socket path), as ``username`` (default: the user the guest asked
    for). The private key never enters the guest.

    The upstream host key is checked against ``known_hosts`` (files; default
    ``~/.ssh/known_hosts`` and ``/etc/ssh/ssh_known_hosts``) or by ``host_key_verifier``; an
    unknown or changed key refuses the command. ``upstreams`` sends a guest ``HOST[:PORT]`` to
    another real ``HOST:PORT`` (a mirror, or a server on host loopback in tests); the host key
    is then checked for that address. Shells, subsystems (sftp), port and agent forwarding are
    refused. Limits: ``max_upstream_per_connection`` and ``max_upstream_total`` upstream
    connections at once, ``connect_timeout`` and ``idle_timeout`` seconds.
    """

    allowed_hosts: Sequence[str] = ()
    credential: str | os.PathLike[str] | None = None
    passphrase: str | None = field(default=None, repr=False)
    use_agent: bool | str = False
    username: str | None = None
    known_hosts: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None
    host_key_verifier: HostKeyVerifier | None = None
    exec_policy: ExecPolicy | None = None
    upstreams: Mapping[str, str] = field(default_factory=dict)
    max_upstream_per_connection: int = MAX_UPSTREAM_PER_CONNECTION
    max_upstream_total: int = MAX_UPSTREAM_TOTAL
    connect_timeout: float = CONNECT_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    keepalive_interval: float = KEEPALIVE_INTERVAL

    def rules(self) -> tuple[SshHostRule, ...]:
        return tuple(SshHostRule.parse(h) for h in self.allowed_hosts)

    @property
    def ports(self) -> frozenset[int]:
        """Guest destination ports whose flows are sniffed for an SSH banner."""
        return frozenset(r.port for r in self.rules())

    def allows(self, host: str | None, ip: str, port: int) -> bool:
        names = [n for n in (host, ip) if n]
        return any(r.matches(n, port) for r in self.rules() for n in names)

    def upstream_for(self, host: str, port: int) -> tuple[str, int]:
        """The real address to connect to for a guest ``host:port``."""
        for key, value in self.upstreams.items():
            rule = SshHostRule.parse(key)
            if rule.matches(host, port):
                return _parse_address(value, f"ssh upstreams[{key!r}]")
        return host, port

    def known_hosts_paths(self) -> tuple[str, ...]:
        if self.known_hosts is None:
            return _default_known_hosts()
        if isinstance(self.known_hosts, (str, os.PathLike)):
            return (os.fspath(self.known_hosts),)
        return tuple(os.fspath(p) for p in self.known_hosts)

    def agent_path(self) -> str | None:
        if self.use_agent is True:
            return os.environ.get("SSH_AUTH_SOCK") or None
        if isinstance(self.use_agent, str) and self.use_agent:
            return self.use_agent
        return None

    def checked(self, *, dns: str = "synthetic") -> SshProxyOptions:
        """Validate (``ValueError`` saying what to change); returns self."""
        try:
            backend = sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            backend = "asyncio"  # checked outside an event loop (the CLI): the VM's loop decides later
        if backend != "asyncio":
            raise ValueError(f"SSH egress (asyncssh) runs on asyncio only, not {backend}: start this VM from "
                             "an asyncio event loop, or leave out the ssh option")
        if isinstance(self.allowed_hosts, str):
            raise ValueError("ssh allowed_hosts must be a list of 'HOST[:PORT]', not one string")
        rules = self.rules()
        if not rules:
            raise ValueError("SSH egress needs at least one allowed host (allowed_hosts=['github.com'] or --ssh-allow-host)")
        names = [r for r in rules if parse_ip(r.pattern.text) is None]
        if names and dns != "synthetic":
            raise ValueError("SSH egress to host names needs dns='synthetic' (the proxy learns the name the guest "
                             "connected to from the host's synthetic DNS); use IPv4 addresses otherwise")
        if self.credential is None and not self.use_agent:
            raise ValueError("SSH egress needs a credential on the host: credential='~/.ssh/id_ed25519' "
                             "(--ssh-credential) or use_agent=True (--ssh-agent); the guest never holds a key")
        if self.credential is not None and self.use_agent:
            raise ValueError("give either an SSH credential key file or use_agent, not both")
        if self.credential is not None:
            path = Path(os.fspath(self.credential)).expanduser()
            if not path.is_file() or not os.access(path, os.R_OK):
                raise ValueError(f"SSH credential {str(path)!r} is not a readable private key file")
        if self.use_agent and self.agent_path() is None:
            raise ValueError("use_agent=True but SSH_AUTH_SOCK is not set: start ssh-agent, or pass its socket path")
        if self.host_key_verifier is None:
            paths = self.known_hosts_paths()
            if not paths:
                raise ValueError("SSH egress verifies upstream host keys: no ~/.ssh/known_hosts or "
                                 "/etc/ssh/ssh_known_hosts here; pass known_hosts=FILE (--ssh-known-hosts) "
                                 "or host_key_verifier=callable")
            for p in paths:
                if not os.path.isfile(os.path.expanduser(p)):
                    raise ValueError(f"SSH known_hosts file {p!r} does not exist")
        elif not callable(self.host_key_verifier):
            raise ValueError("host_key_verifier must be callable(host, port, public_key) -> bool")
        if self.exec_policy is not None and not callable(self.exec_policy):
            raise ValueError("exec_policy must be callable(host, port, user, command)")
        for key, value in self.upstreams.items():
            SshHostRule.parse(key)
            _parse_address(value, f"ssh upstreams[{key!r}]")
        for name in ("max_upstream_per_connection", "max_upstream_total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ssh {name} must be a positive integer, not {value!r}")
        for name in ("connect_timeout", "idle_timeout", "keepalive_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ssh {name} must be a positive number of seconds, not {value!r}")
        return self


__all__ = [
    "ALLOW",
    "GIT_SERVICES",
    "ExecPolicy",
    "GitCommand",
    "HostKeyVerifier",
    "SshAllow",
    "SshDecision",
    "SshDeny",
    "SshHostRule",
    "SshProxyOptions",
    "command_summary",
    "git_policy",
    "parse_git_command",
]
