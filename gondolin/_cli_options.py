"""The flags `gondolin exec` and `gondolin bash` share, checked before any VM starts.

Every usage or setup error is a :class:`UsageError`: one line saying what to fix, exit status
:data:`EXIT_USAGE` (125, like ``docker run``), so it is never mistaken for the guest command's
own status. Values are checked by the argument parser's converters and by
:meth:`gondolin.VMOptions.checked`, the library's one set of checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import posixpath
import sys
from collections.abc import Callable
from typing import IO, Any

import anyio

from .options import DNS_MODES, FS_TRANSPORTS, MAX_CPUS, ROOTFS_MODES, VMOptions, parse_memory

EXIT_USAGE = 125
MAX_REPORTED_REQUESTS = 100  # refused requests kept for the report after the command


class UsageError(Exception):
    """A bad flag, value or host setting: the message says what to fix."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit 125."""

    def error(self, message: str) -> Any:  # argparse's hook; never returns
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _converter(check: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = check.__name__.lstrip("_")
    return convert


@_converter
def memory(text: str) -> str:
    parse_memory(text)
    return text


@_converter
def cpus(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_CPUS:
        raise ValueError(f"give a whole number of vCPUs from 1 to {MAX_CPUS}, not {text!r}")
    return int(text)


@_converter
def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"give a positive number of seconds, not {text!r}")
    return value


@_converter
def guest_dir(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f"give an absolute guest path such as /workspace, not {text!r}")
    return posixpath.normpath(text)


@_converter
def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or "\0" in text:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key, value


@_converter
def tcp_map(text: str) -> tuple[str, str]:
    guest, sep, target = text.partition("=")
    host, colon, port = target.rpartition(":")
    if not sep or not guest or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected GUEST[:PORT]=HOST:PORT (e.g. db.internal:5432=127.0.0.1:5432), got {text!r}")
    return guest, target


@_converter
def listen_address(text: str) -> tuple[str, int]:
    """``PORT``, ``:PORT``, ``HOST:PORT`` or ``[V6]:PORT``; the host defaults to 127.0.0.1."""
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = "", text
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not port.isdigit() or int(port) > 65535 or (":" in host and not bracketed):
        raise ValueError(f"expected [HOST:]PORT (8080, 127.0.0.1:8080, [::1]:8080; port 0 picks a free one), "
                         f"got {text!r}")
    return host or "127.0.0.1", int(port)


@_converter
def forward_spec(text: str) -> tuple[int, int]:
    """``GUEST_PORT[:HOST_PORT]`` of ``--forward``; the host port defaults to 0 (a free one)."""
    guest, colon, host = text.partition(":")
    if (not guest.isdigit() or not 0 < int(guest) < 65536 or (colon and not host.isdigit())
            or (host and int(host) > 65535)):
        raise ValueError(f"expected GUEST_PORT[:HOST_PORT] (8000, 8000:18000), got {text!r}")
    return int(guest), int(host or 0)


def add_vm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", type=memory, default="512M", help="guest memory, e.g. 512M or 2G (default 512M)")
    p.add_argument("--cpus", type=cpus, default=1, help=f"virtual CPUs, 1-{MAX_CPUS} (default 1)")
    p.add_argument("--rootfs", choices=ROOTFS_MODES, default="cow",
                   help="root filesystem mode (default cow: writes are discarded with the VM)")
    p.add_argument("--image", default="default", help="image ref, build id or directory")
    p.add_argument("--disk-size", metavar="SIZE", help="grow the guest's root disk to SIZE, e.g. 4G (rootfs cow)")
    p.add_argument("--vm-env", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="environment for every command in the VM (repeatable)")


def add_net_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                   help="let HTTP(S) requests reach HOST (pattern such as *.github.com; repeatable; "
                        "default: no egress at all)")
    p.add_argument("--allow", action="append", default=[], metavar="PRESET",
                   help="let a package registry's hosts through: pypi, npm or github (repeatable)")
    p.add_argument("--allow-internal-host", action="append", default=[], metavar="HOST",
                   help="HOST may resolve to an internal address such as 127.0.0.1 (implies --allow-host HOST)")
    p.add_argument("--secret", action="append", default=[], metavar="NAME=ENVVAR@HOST[,HOST]",
                   help="the guest sees a placeholder in $NAME; requests to HOST carry the value of the "
                        "host environment variable ENVVAR instead. HOST may be HOST:PORT and may start with "
                        "http:// (default https on its default port); repeatable")
    p.add_argument("--tcp-map", action="append", type=tcp_map, default=[], metavar="GUEST=HOST:PORT",
                   help="raw TCP: guest connections to GUEST (name or IPv4, optional :PORT) go to HOST:PORT on "
                        "the host, uninspected (repeatable)")
    p.add_argument("--dns", choices=DNS_MODES, default="synthetic",
                   help="guest DNS: synthetic (default, nothing leaves the host), trusted (host resolvers), open")
    p.add_argument("--network-log", metavar="FILE|-",
                   help="write every HTTP(S) request decision as a JSON line to FILE (- for stderr)")
    p.add_argument("--ssh-allow-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="SSH egress: the guest's ssh/git may reach HOST (port 22 by default; *.domain allowed) "
                        "through the host's SSH proxy, which connects with --ssh-credential or --ssh-agent; "
                        "git fetch/clone only unless --ssh-allow-push (repeatable)")
    p.add_argument("--ssh-credential", metavar="KEYFILE",
                   help="private key the host's SSH proxy uses upstream (it never enters the guest)")
    p.add_argument("--ssh-agent", action="store_true",
                   help="the host's SSH proxy authenticates with the host's ssh-agent ($SSH_AUTH_SOCK)")
    p.add_argument("--ssh-known-hosts", action="append", default=[], metavar="FILE",
                   help="known_hosts file to verify upstream SSH host keys against (repeatable; default "
                        "~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts)")
    p.add_argument("--ssh-allow-push", action="append", default=[], metavar="REPO",
                   help="allow git push over SSH to repositories matching REPO (glob over org/repo; repeatable)")


def add_mount_args(p: argparse.ArgumentParser, *, cow: bool = True) -> None:
    p.add_argument("--mount", action="append", default=[], metavar="HOST:GUEST[:ro|:cow]",
                   help="show host directory HOST at GUEST: read-write, read-only (:ro), or copy-on-write "
                        "(:cow: the guest's changes stay in memory and are listed at exit); repeatable. "
                        "Without --cwd, commands start in the first mount")
    p.add_argument("--fs-transport", choices=FS_TRANSPORTS, default="port",
                   help="how mounts reach the guest: port (default; a guest FUSE daemon) or virtiofs "
                        "(opt-in, faster metadata; boots cold, host-side changes seen after 1 s)")
    if cow:
        p.add_argument("--cow-diff", metavar="FILE|-",
                       help="after the command, write a unified diff of every :cow mount's changes to FILE")
        p.add_argument("--cow-commit", action="store_true",
                       help="after the command, apply the :cow mounts' changes to the host (asks first)")
        p.add_argument("--yes", "-y", action="store_true", help="do not ask before --cow-commit")


# -- network policy ----------------------------------------------------------------
def parse_secret(item: str) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    """``NAME=ENVVAR@[http://]host[:port][,...]`` -> (NAME, ENVVAR, hosts, schemes)."""
    from .http.secrets import parse_scope

    name, sep, rest = item.partition("=")
    envvar, at, scope = rest.rpartition("@")
    if not sep or not name or not at or not envvar:
        raise UsageError(f"gondolin: --secret expects NAME=ENVVAR@HOST[,HOST], got {item!r}")
    try:
        hosts, schemes = parse_scope(scope)
    except ValueError as exc:
        raise UsageError(f"gondolin: --secret {name}: {exc}") from None
    return name, envvar, hosts, schemes


class NetworkReport:
    """Audit-event observer: refused requests for the summary after the command, and every
    decision as a JSON line when ``--network-log`` is given."""

    def __init__(self, log: IO[str] | None = None, limit: int = MAX_REPORTED_REQUESTS) -> None:
        self.events: list[Any] = []
        self.more = 0
        self._limit = limit
        self._log = log

    def __call__(self, event: Any) -> None:
        if self._log is not None:
            record = dataclasses.asdict(event)
            record["decision"] = event.decision.value
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()
        if event.decision.value in ("allowed", "answered"):
            return
        if len(self.events) < self._limit:
            self.events.append(event)
        else:
            self.more += 1

    def report(self, out: IO[str]) -> None:
        for e in self.events:
            default = {"http": 80, "https": 443}.get(e.scheme)
            where = e.host if e.port in (0, default) else f"{e.host}:{e.port}"
            path = f" {e.path}" if e.scheme == "ssh" and e.path else e.path
            print(f"gondolin: {e.decision.value} {e.method or '?'} {e.scheme}://{where}{path}: {e.reason}", file=out)
        if self.more:
            print(f"gondolin: ... and {self.more} more refused requests", file=out)

    def close(self) -> None:
        if self._log is not None and self._log is not sys.stderr:
            self._log.close()


def open_network_log(target: str | None) -> IO[str] | None:
    if target is None:
        return None
    if target == "-":
        return sys.stderr
    try:
        return open(target, "a", encoding="utf-8")  # noqa: SIM115 (closed by NetworkReport.close)
    except OSError as exc:
        raise UsageError(f"gondolin: --network-log {target}: {exc.strerror}") from None


def vm_options(args: argparse.Namespace, report: NetworkReport | None) -> VMOptions:
    """The VM the flags describe, checked; :class:`UsageError` says what to fix."""
    from .http import Secret, create_http_hooks
    from .http.policy import CLI_HINTS
    from .vfs.mountspec import mounts_from_specs

    env = dict(getattr(args, "vm_env", []) or [])
    changes: dict[str, Any] = {"memory": args.memory, "cpus": args.cpus, "rootfs": args.rootfs, "image": args.image}
    if getattr(args, "disk_size", None):
        changes["disk_size"] = args.disk_size
    if getattr(args, "mount", None):
        try:
            changes["mounts"] = mounts_from_specs(args.mount)
        except (ValueError, OSError) as exc:
            raise UsageError(f"gondolin: {exc}") from None
    if getattr(args, "fs_transport", None):
        changes["fs_transport"] = args.fs_transport
    if report is not None:
        secrets: dict[str, Secret] = {}
        for item in args.secret:
            name, envvar, hosts, schemes = parse_secret(item)
            value = os.environ.get(envvar)
            if not value:
                raise UsageError(f"gondolin: --secret {name}: the host environment variable {envvar} is not set")
            try:
                secrets[name] = Secret(value, hosts=hosts, schemes=schemes)
            except ValueError as exc:
                raise UsageError(f"gondolin: --secret {name}: {exc}") from None
        try:
            hooks, placeholders = create_http_hooks(
                allowed_hosts=args.allow_host, allow=args.allow, allowed_internal_hosts=args.allow_internal_host,
                secrets=secrets, on_event=report, hints=CLI_HINTS)
        except ValueError as exc:
            raise UsageError(f"gondolin: {exc}") from None
        for name, secret in secrets.items():
            for scope in secret.scopes():
                host = scope.pattern.text
                if "*" not in host and not hooks.policy.host_allowed(host):
                    print(f"gondolin: note: secret {name} may go to {host}, but no --allow-host lets requests "
                          f"reach it", file=sys.stderr)
        clash = sorted(set(env) & set(placeholders))
        if clash:
            raise UsageError(f"gondolin: {', '.join(clash)} given both as --secret and --vm-env")
        env.update(placeholders)
        changes.update(http_hooks=hooks, tcp_hosts=dict(args.tcp_map), dns=args.dns)
        changes["ssh"] = ssh_options(args)
    changes["env"] = env
    try:
        return VMOptions(**changes).checked()
    except ValueError as exc:
        raise UsageError(f"gondolin: {exc}") from None


def ssh_options(args: argparse.Namespace) -> Any:
    """The SSH egress proxy the ``--ssh-*`` egress flags describe, or None."""
    hosts = getattr(args, "ssh_allow_host", None) or []
    others = [flag for flag, value in (("--ssh-credential", getattr(args, "ssh_credential", None)),
                                       ("--ssh-agent", getattr(args, "ssh_agent", False)),
                                       ("--ssh-known-hosts", getattr(args, "ssh_known_hosts", None)),
                                       ("--ssh-allow-push", getattr(args, "ssh_allow_push", None))) if value]
    if not hosts:
        if others:
            raise UsageError(f"gondolin: {others[0]} needs --ssh-allow-host HOST (the hosts the guest may reach over SSH)")
        return None
    from .ssh import SshProxyOptions, git_policy

    return SshProxyOptions(
        allowed_hosts=list(hosts), credential=os.path.expanduser(args.ssh_credential) if args.ssh_credential else None,
        use_agent=bool(args.ssh_agent), known_hosts=list(args.ssh_known_hosts) or None,
        exec_policy=git_policy(read=["*"], write=list(args.ssh_allow_push)))


def first_mount(args: argparse.Namespace) -> str | None:
    """The guest path of the first ``--mount``: where commands start when no ``--cwd`` is given."""
    from .vfs.mountspec import MountSpec

    return MountSpec.parse(args.mount[0]).guest if getattr(args, "mount", None) else None


def check_cow_flags(args: argparse.Namespace) -> None:
    """``--cow-diff``/``--cow-commit`` need a ``:cow`` mount; a commit needs a terminal or ``--yes``."""
    from .vfs.mountspec import MountSpec

    if not (getattr(args, "cow_diff", None) or getattr(args, "cow_commit", False)):
        return
    if not any(MountSpec.parse(m).mode == "cow" for m in args.mount):
        raise UsageError("gondolin: --cow-diff and --cow-commit need a --mount HOST:GUEST:cow")
    if args.cow_commit and not args.yes and not _can_ask():
        raise UsageError("gondolin: --cow-commit asks before writing to the host and there is no terminal to "
                         "ask on; add --yes")


def _can_ask() -> bool:
    try:
        with open("/dev/tty", "r+b", buffering=0):
            return True
    except OSError:
        return False


def confirm(question: str) -> bool:
    """Ask on the controlling terminal (stdin may have been the command's input)."""
    with open("/dev/tty", "r+", encoding="utf-8") as tty:
        tty.write(f"{question} [y/N] ")
        tty.flush()
        return tty.readline().strip().lower() in ("y", "yes")


async def finish_cow(vm: Any, args: argparse.Namespace) -> bool:
    """After the command: list each copy-on-write mount's changes by name, write ``--cow-diff``,
    apply ``--cow-commit``. False when a commit was refused or failed."""
    from .vfs import CopyOnWriteProvider, VfsError
    from .vfs.mountspec import MountSpec

    hosts = {spec.guest: spec.host for spec in map(MountSpec.parse, getattr(args, "mount", []))}
    diffs: list[str] = []
    ok = True
    for point, provider in sorted(vm.mounts.items()):
        if not isinstance(provider, CopyOnWriteProvider):
            continue
        changes = await provider.changes()
        if not changes:
            continue
        commit = getattr(args, "cow_commit", False)
        fate = "to commit" if commit else "discarded" if not getattr(args, "cow_diff", None) else "discarded, diff written"
        print(f"gondolin: {point} (copy-on-write, {fate}): {len(changes.added)} added, "
              f"{len(changes.modified)} modified, {len(changes.deleted)} deleted", file=sys.stderr)
        for line in str(changes).splitlines():
            print(f"gondolin:   {line}", file=sys.stderr)
        if getattr(args, "cow_diff", None):
            diffs.append(await provider.diff())
        if commit:
            if not args.yes and not confirm(f"gondolin: write these changes to {hosts.get(point, point)}?"):
                print(f"gondolin: {point}: not committed", file=sys.stderr)
                ok = False
                continue
            try:
                await provider.commit()
            except VfsError as exc:
                print(f"gondolin: {point}: not committed: {exc}", file=sys.stderr)
                ok = False
            else:
                print(f"gondolin: {point}: committed", file=sys.stderr)
    target = getattr(args, "cow_diff", None)
    if target:
        text = "".join(diffs)
        if target == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            await anyio.Path(target).write_text(text, encoding="utf-8")
    return ok
