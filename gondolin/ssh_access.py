"""SSH into the guest: ``access = await vm.enable_ssh()``.

Each call makes everything afresh for this VM, so nothing is shared with the template or
checkpoint it came from:

- host keys generated in the guest at that moment (the image has none), under
  ``/run/gondolin/ssh`` (a tmpfs);
- ``sshd`` (re)started bound to guest loopback only: public-key login for one user, no
  passwords, no TCP / X11 / agent forwarding, no tunnels;
- a new ed25519 key pair on the host, in the VM's run directory (removed with the VM);
- a host loopback listener relaying to guest port 22 (a :class:`~gondolin.streams.TcpForward`);
- a ``known_hosts`` file holding the guest's new host key under an alias naming the VM, so the
  ``ssh`` command verifies it (``StrictHostKeyChecking=yes``).
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import GondolinError, GuestConnectionError
from .exec import ExecResult
from .streams import TcpForward

GUEST_DIR = "/run/gondolin/ssh"
SSHD = "/usr/sbin/sshd"
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
BANNER_TIMEOUT = 30.0  # seconds sshd has to answer with its banner after it was started


class SshError(GondolinError):
    """SSH into the guest could not be set up (no sshd in the image, unknown user, sshd failed)."""

    code = "ssh_setup_failed"


@dataclass(frozen=True)
class SshAccess:
    """How to log into a VM over SSH. ``command`` is the ``ssh`` argv; ``str(access)`` the same
    as one shell line. The listener is closed with the VM (or with :meth:`close`)."""

    host: str
    port: int
    user: str
    key_path: Path
    known_hosts_path: Path
    host_key: str  # the guest's public host key (``ssh-ed25519 AAAA...``)
    host_key_alias: str
    _forward: TcpForward = field(repr=False, compare=False)

    @property
    def command(self) -> list[str]:
        return ["ssh", "-i", str(self.key_path), "-p", str(self.port),
                "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts_path}",
                "-o", "StrictHostKeyChecking=yes",
                "-o", f"HostKeyAlias={self.host_key_alias}",
                f"{self.user}@{self.host}"]

    def __str__(self) -> str:
        return shlex.join(self.command)

    async def close(self) -> None:
        """Stop the host listener (sshd in the guest keeps running until the VM closes)."""
        await self._forward.close()


class SshHost(Protocol):
    """What enable_ssh needs from a VM (its facade)."""

    @property
    def id(self) -> str: ...

    async def exec(self, command: str, *, timeout: float | None = None) -> ExecResult: ...

    async def open_tcp(self, port: int, host: str = "127.0.0.1") -> Any: ...

    async def forward_tcp(self, guest_port: int, host: str = "127.0.0.1", host_port: int = 0, *,
                          allow_remote: bool = False) -> TcpForward: ...


def sshd_config(user: str, guest_port: int) -> str:
    """sshd's whole configuration (no Include of the image's own)."""
    return "\n".join([
        f"ListenAddress 127.0.0.1:{guest_port}",
        f"HostKey {GUEST_DIR}/ssh_host_ed25519_key",
        f"PidFile {GUEST_DIR}/sshd.pid",
        f"AuthorizedKeysFile {GUEST_DIR}/authorized_keys/%u",
        f"AllowUsers {user}",
        "PermitRootLogin " + ("prohibit-password" if user == "root" else "no"),
        "PubkeyAuthentication yes",
        "AuthenticationMethods publickey",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "HostbasedAuthentication no",
        "PermitEmptyPasswords no",
        # PAM runs the account and session stacks only (no password can be asked: see above);
        # without it sshd refuses accounts that have no password set, as the image's are.
        "UsePAM yes",
        "AllowTcpForwarding no",
        "AllowStreamLocalForwarding no",
        "AllowAgentForwarding no",
        "X11Forwarding no",
        "PermitTunnel no",
        "GatewayPorts no",
        "PermitUserEnvironment no",
        "PermitListen none",
        "PermitOpen none",
        "PrintMotd no",
        "Subsystem sftp internal-sftp",
        "",
    ])


def _setup_script(user: str, public_key: str, config: str, alias: str) -> str:
    q = shlex.quote
    d = GUEST_DIR
    return f"""set -e
[ -x {SSHD} ] || {{ echo "this image has no sshd ({SSHD}); rebuild it with openssh-server" >&2; exit 3; }}
id -u {q(user)} >/dev/null 2>&1 || {{ echo "no user {user} in the guest" >&2; exit 4; }}
mkdir -p {d}/authorized_keys /run/sshd
chmod 0755 /run/gondolin {d} {d}/authorized_keys
if [ -s {d}/sshd.pid ]; then
  old=$(cat {d}/sshd.pid); kill "$old" 2>/dev/null || true
  i=0; while kill -0 "$old" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
fi
rm -f {d}/ssh_host_ed25519_key {d}/ssh_host_ed25519_key.pub {d}/sshd.pid {d}/authorized_keys/*
ssh-keygen -q -t ed25519 -N '' -C {q(alias)} -f {d}/ssh_host_ed25519_key
printf '%s\\n' {q(config)} > {d}/sshd_config
printf '%s\\n' {q(public_key)} > {d}/authorized_keys/{user}
chmod 0644 {d}/authorized_keys/{user} {d}/sshd_config
{SSHD} -f {d}/sshd_config -E {d}/sshd.log || {{ tail -n 5 {d}/sshd.log >&2; exit 5; }}
cat {d}/ssh_host_ed25519_key.pub
"""


def _host_key_pair(directory: Path) -> tuple[Path, str]:
    """A fresh ed25519 key pair in ``directory`` (private key 0600); its path and public line."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / "id_ed25519"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    (directory / "id_ed25519.pub").write_text(public + "\n")
    return path, public


async def _wait_banner(vm: SshHost, guest_port: int, timeout: float) -> None:
    """Wait until sshd answers on its port with an SSH banner."""
    with anyio.move_on_after(timeout):
        while True:
            try:
                async with await vm.open_tcp(guest_port) as stream:
                    with anyio.move_on_after(5):
                        if (await stream.receive(256)).startswith(b"SSH-"):
                            return
            except (GuestConnectionError, anyio.EndOfStream):
                pass
            await anyio.sleep(0.1)
    raise SshError(f"sshd in the guest did not answer on port {guest_port} within {timeout:g}s "
                   f"(see {GUEST_DIR}/sshd.log in the guest)")


async def enable_ssh(vm: SshHost, run_dir: Path, user: str = "agent", *, guest_port: int = 22,
                     host: str = "127.0.0.1", host_port: int = 0, previous: SshAccess | None = None) -> SshAccess:
    """Set up SSH access to ``vm`` (see the module docstring); ``previous`` is closed first."""
    if not isinstance(user, str) or not USER_NAME.fullmatch(user):
        raise ValueError(f"user must be a plain user name (like 'agent' or 'root'), not {user!r}")
    if previous is not None:
        await previous.close()
    ssh_dir = run_dir / "ssh"
    key_path, public_key = await anyio.to_thread.run_sync(_host_key_pair, ssh_dir)
    alias = f"gondolin-{vm.id}"
    result = await vm.exec(_setup_script(user, public_key, sshd_config(user, guest_port), alias), timeout=60)
    if result.exit_code != 0:
        raise SshError(f"could not start sshd in the guest: {result.stderr.strip()[-500:] or result.exit_code}")
    host_key = " ".join(result.stdout.split()[:2])
    if not host_key.startswith("ssh-ed25519 "):
        raise SshError(f"the guest's host key could not be read: {result.stdout[:200]!r}")
    known_hosts = ssh_dir / "known_hosts"
    known_hosts.write_text(f"{alias} {host_key}\n")
    await _wait_banner(vm, guest_port, BANNER_TIMEOUT)
    forward = await vm.forward_tcp(guest_port, host, host_port)
    return SshAccess(forward.host, forward.port, user, key_path, known_hosts, host_key, alias, forward)


__all__ = ["SshAccess", "SshError", "enable_ssh", "sshd_config"]
