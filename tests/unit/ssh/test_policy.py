"""SSH egress policy: the git command parser, git_policy, host rules and option validation."""

from __future__ import annotations

import pytest

from gondolin import VMOptions
from gondolin.ssh import (
    ALLOW,
    GitCommand,
    SshDeny,
    SshHostRule,
    SshProxyOptions,
    command_summary,
    git_policy,
    parse_git_command,
)


@pytest.mark.parametrize("command,expected", [
    ("git-upload-pack 'org/repo.git'", GitCommand("git-upload-pack", "org/repo.git")),
    ("git-receive-pack 'org/repo.git'", GitCommand("git-receive-pack", "org/repo.git")),
    ("git-upload-archive 'org/repo.git'", GitCommand("git-upload-archive", "org/repo.git")),
    ('git-upload-pack "org/repo"', GitCommand("git-upload-pack", "org/repo")),
    ("git-upload-pack '/org/repo.git'", GitCommand("git-upload-pack", "org/repo.git")),
    ("git-upload-pack '~/repo.git'", GitCommand("git-upload-pack", "repo.git")),
    ("git upload-pack 'org/repo.git'", GitCommand("git-upload-pack", "org/repo.git")),
    ("git-upload-pack org/repo.git", GitCommand("git-upload-pack", "org/repo.git")),
    ("git-upload-pack '/srv/git/a/b/c.git'", GitCommand("git-upload-pack", "srv/git/a/b/c.git")),
])
def test_git_commands_parse(command, expected):
    assert parse_git_command(command) == expected


@pytest.mark.parametrize("command", [
    "", "ls", "git-upload-pack", "git-upload-pack 'a' 'b'", "git-upload-pack 'org/repo.git'; rm -rf /",
    "git-upload-pack 'org/repo.git' && id", "git-upload-pack '../etc/passwd'", "git-upload-pack 'org/../x.git'",
    "git-upload-pack 'org//x.git'", "git-upload-pack '$(id)'", "git-upload-pack '`id`'", "git-upload-pack 'a\nb'",
    "git-upload-pack 'unterminated", "git-upload-pack '-oProxyCommand=x'", "git-shell -c x", "git-lfs-authenticate x",
    "git-upload-pack '" + "a" * 5000 + "'", "git-upload-pack 'org/repo.git\x00'", "git-upload-pack './x'",
    "git-upload-pack '~'", "bash -c 'git-upload-pack x'",
])
def test_other_commands_do_not_parse(command):
    assert parse_git_command(command) is None


def test_git_policy_read_and_write_patterns():
    policy = git_policy(read=["org/*"], write=["org/tool"])
    assert policy("h", 22, "git", "git-upload-pack 'org/anything.git'") is ALLOW
    assert policy("h", 22, "git", "git-upload-archive 'org/x'") is ALLOW
    assert policy("h", 22, "git", "git-receive-pack 'org/tool.git'") is ALLOW
    assert policy("h", 22, "git", "git-upload-pack 'org/tool'") is ALLOW  # push implies read
    denied = policy("h", 22, "git", "git-receive-pack 'org/other.git'")
    assert isinstance(denied, SshDeny) and "push to org/other.git" in denied.message and denied.exit_code == 1
    denied = policy("h", 22, "git", "git-upload-pack 'elsewhere/x.git'")
    assert isinstance(denied, SshDeny) and "reading elsewhere/x.git" in denied.message
    denied = policy("h", 22, "git", "cat /etc/passwd")
    assert isinstance(denied, SshDeny) and "only git fetch/push" in denied.message


def test_default_git_policy_is_read_only():
    policy = git_policy()
    assert policy("h", 22, "git", "git-upload-pack 'a/b.git'") is ALLOW
    assert isinstance(policy("h", 22, "git", "git-receive-pack 'a/b.git'"), SshDeny)


def test_command_summary_is_bounded_and_printable():
    assert command_summary("git-upload-pack 'org/r.git'") == "git-upload-pack org/r.git"
    summary = command_summary("echo \x1b[31m" + "x" * 500)
    assert "\x1b" not in summary and len(summary) <= 130


@pytest.mark.parametrize("text,host,port,ok", [
    ("github.com", "github.com", 22, True),
    ("github.com", "github.com", 2222, False),
    ("github.com:2222", "github.com", 2222, True),
    ("*.example.com", "git.example.com", 22, True),
    ("*.example.com", "evilexample.com", 22, False),
    ("*.example.com", "example.com", 22, False),
    ("10.1.2.3:7999", "10.1.2.3", 7999, True),
    ("GitHub.com.", "github.com", 22, True),
])
def test_host_rules(text, host, port, ok):
    assert SshHostRule.parse(text).matches(host, port) is ok


@pytest.mark.parametrize("bad", ["", "host:0", "host:99999", "host:x", "a*b.com", "[::1]:22", "exa mple.com"])
def test_bad_host_rules(bad):
    with pytest.raises(ValueError):
        SshHostRule.parse(bad)


def test_options_validation(tmp_path):
    key = tmp_path / "id"
    key.write_text("k")
    kh = tmp_path / "kh"
    kh.write_text("")
    ok = SshProxyOptions(allowed_hosts=["git.test"], credential=str(key), known_hosts=str(kh))
    assert ok.checked() is ok
    assert ok.ports == frozenset({22})
    assert ok.allows("git.test", "198.19.0.1", 22) and not ok.allows("x.test", "198.19.0.1", 22)
    assert ok.upstream_for("git.test", 22) == ("git.test", 22)
    mapped = SshProxyOptions(allowed_hosts=["git.test"], credential=str(key), known_hosts=str(kh),
                             upstreams={"git.test": "127.0.0.1:2222"})
    assert mapped.checked().upstream_for("git.test", 22) == ("127.0.0.1", 2222)

    cases = [
        (dict(allowed_hosts=[]), "at least one allowed host"),
        (dict(allowed_hosts="git.test"), "list"),
        (dict(credential=None), "needs a credential"),
        (dict(credential=str(tmp_path / "missing")), "not a readable private key"),
        (dict(use_agent="/tmp/agent.sock"), "not both"),
        (dict(known_hosts=str(tmp_path / "nope")), "does not exist"),
        (dict(host_key_verifier="yes"), "callable"),
        (dict(exec_policy=3), "callable"),
        (dict(upstreams={"git.test": "nowhere"}), "HOST:PORT"),
        (dict(max_upstream_total=0), "positive integer"),
        (dict(idle_timeout=-1), "positive number"),
    ]
    for changes, message in cases:
        bad = SshProxyOptions(**{**dict(allowed_hosts=["git.test"], credential=str(key), known_hosts=str(kh)),
                                 **changes})
        with pytest.raises(ValueError, match=message):
            bad.checked()

    with pytest.raises(ValueError, match="dns='synthetic'"):
        VMOptions(dns="trusted", ssh=ok).checked()
    with pytest.raises(ValueError, match="network=True"):
        VMOptions(network=False, ssh=ok).checked()
    assert VMOptions(ssh=ok).checked().ssh is ok


def test_agent_needs_a_socket(monkeypatch, tmp_path):
    kh = tmp_path / "kh"
    kh.write_text("")
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with pytest.raises(ValueError, match="SSH_AUTH_SOCK"):
        SshProxyOptions(allowed_hosts=["h"], use_agent=True, known_hosts=str(kh)).checked()
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/agent")
    assert SshProxyOptions(allowed_hosts=["h"], use_agent=True, known_hosts=str(kh)).checked().agent_path() == "/tmp/agent"


def test_passphrase_is_not_in_repr(tmp_path):
    options = SshProxyOptions(allowed_hosts=["h"], credential="k", passphrase="hunter2")
    assert "hunter2" not in repr(options)
