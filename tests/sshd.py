"""A real OpenSSH server on host loopback for SSH egress tests and the SSH benchmark.

``with LoopbackSshd(tmp_path) as sshd:`` starts ``sshd -D -e`` as a child process on
127.0.0.1 with its own config, host key, a throwaway client key pair (``sshd.client_key``) in
``authorized_keys``, ``sshd.known_hosts`` naming its host key, and ``sshd.bare_repo(name)`` to
make a bare git repository with one commit. The server is killed and waited for on exit.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def find_sshd() -> str | None:
    for path in SSHD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("sshd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)


class LoopbackSshd:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.user = getpass.getuser()
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.client_key = self.root / "client_ed25519"
        self.host_key = self.root / "host_ed25519"
        self.known_hosts = self.root / "known_hosts"
        self.log = self.root / "sshd.log"

    def __enter__(self) -> LoopbackSshd:
        sshd = find_sshd()
        if sshd is None:
            raise RuntimeError("sshd is not installed (apt-get install openssh-server)")
        self.root.mkdir(parents=True, exist_ok=True)
        _keygen(self.host_key, "test-sshd-host")
        _keygen(self.client_key, "test-client")
        (self.root / "authorized_keys").write_text((self.root / "client_ed25519.pub").read_text())
        os.makedirs("/run/sshd", exist_ok=True) if os.geteuid() == 0 else None
        self.port = _free_port()
        config = self.root / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\nPidFile none\nUsePAM no\nStrictModes no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            f"AllowUsers {self.user}\nPermitRootLogin prohibit-password\nAllowTcpForwarding no\n"
            "X11Forwarding no\nAllowAgentForwarding no\nPermitTunnel no\nMaxStartups 100\nMaxSessions 20\n"
            f"Subsystem sftp internal-sftp\nLogLevel VERBOSE\n")
        host_pub = (self.root / "host_ed25519.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=self._log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__(None, None, None)
                raise RuntimeError(f"sshd exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(4) == b"SSH-":
                        return self
            except OSError:
                time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError("sshd did not start listening within 20 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if getattr(self, "_log_file", None) is not None:
            self._log_file.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wrong_known_hosts(self) -> Path:
        """A known_hosts that names another key for this server."""
        other = self.root / "other_ed25519"
        if not other.exists():
            _keygen(other, "not-the-server")
        pub = (self.root / "other_ed25519.pub").read_text().split()
        path = self.root / "wrong_known_hosts"
        path.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        return path

    def bare_repo(self, name: str, files: dict[str, bytes] | None = None) -> Path:
        """A bare repository ``root/repos/NAME.git`` with one commit of ``files``."""
        repos = self.root / "repos"
        bare = repos / f"{name}.git"
        work = self.root / "work" / name
        work.mkdir(parents=True)
        env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
        for rel, data in (files or {"README": b"hello from the host repo\n"}).items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(data)
        for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "init"]):
            subprocess.run(cmd, cwd=work, check=True, env=env, capture_output=True)
        subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True, env=env,
                       capture_output=True)
        return bare
