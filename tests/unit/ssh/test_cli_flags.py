"""The --ssh-* egress flags of `gondolin exec`/`bash` build the SSH proxy options (no VM)."""

from __future__ import annotations

import pytest

from gondolin._cli_options import NetworkReport, UsageError, vm_options
from gondolin.cli import build_parser
from gondolin.ssh import ALLOW, SshDeny


def _args(*argv: str):
    return build_parser().parse_args(["exec", *argv, "--", "true"])


def test_ssh_flags_build_the_proxy_options(tmp_path):
    key = tmp_path / "id"
    key.write_text("k")
    kh = tmp_path / "kh"
    kh.write_text("")
    opts = vm_options(_args("--ssh-allow-host", "git.example.com", "--ssh-allow-host", "*.corp.test:2222",
                            "--ssh-credential", str(key), "--ssh-known-hosts", str(kh),
                            "--ssh-allow-push", "me/scratch"), NetworkReport())
    ssh = opts.ssh
    assert ssh is not None and ssh.ports == frozenset({22, 2222})
    assert ssh.allows("git.example.com", "198.19.0.1", 22) and ssh.allows("a.corp.test", "198.19.0.2", 2222)
    assert ssh.exec_policy("h", 22, "git", "git-upload-pack 'any/repo.git'") is ALLOW
    assert ssh.exec_policy("h", 22, "git", "git-receive-pack 'me/scratch.git'") is ALLOW
    assert isinstance(ssh.exec_policy("h", 22, "git", "git-receive-pack 'me/other.git'"), SshDeny)
    assert vm_options(_args(), NetworkReport()).ssh is None


@pytest.mark.parametrize("argv,message", [
    (["--ssh-credential", "/nonexistent"], "needs --ssh-allow-host"),
    (["--ssh-agent"], "needs --ssh-allow-host"),
    (["--ssh-allow-host", "h"], "needs a credential"),
    (["--ssh-allow-host", "h", "--ssh-credential", "/nonexistent/key"], "not a readable private key"),
    (["--ssh-allow-host", "h:notaport", "--ssh-agent"], "bad port"),
])
def test_ssh_flag_errors_are_usage_errors(argv, message, monkeypatch):
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/agent.sock")
    with pytest.raises(UsageError, match=message):
        vm_options(_args(*argv), NetworkReport())
