"""CLI flags, checked before any VM starts: values, network policy, exit status 125, the report."""

from __future__ import annotations

import io
import json

import pytest

from gondolin._cli_options import EXIT_USAGE, NetworkReport, UsageError, parse_secret, vm_options
from gondolin.cli import build_parser, main
from gondolin.http import AuditEvent, Decision


@pytest.mark.parametrize(("text", "expected"), [
    ("GH=GITHUB_TOKEN@api.github.com", ("GH", "GITHUB_TOKEN", ("api.github.com",), ("https",))),
    ("K=V@a.com,*.b.com", ("K", "V", ("a.com", "*.b.com"), ("https",))),
    ("K=V@a.com, b.com ,", ("K", "V", ("a.com", "b.com"), ("https",))),
    ("K=V@http://localhost:8080", ("K", "V", ("localhost:8080",), ("http",))),
    ("K=V@https://api.example.com:8443/", ("K", "V", ("api.example.com:8443",), ("https",))),
])
def test_parse_secret(text, expected):
    assert parse_secret(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("GH", "NAME=ENVVAR@HOST"), ("GH=TOKEN", "NAME=ENVVAR@HOST"), ("GH=@api.github.com", "NAME=ENVVAR@HOST"),
    ("=T@h", "NAME=ENVVAR@HOST"), ("GH=T@", "at least one host"), ("GH=T@,", "at least one host"),
    ("GH=T@ftp://h", "http:// or https://"), ("GH=T@http://a,https://b", "same scheme"),
    ("GH=T@https://h/path", "HOST or HOST:PORT"),
])
def test_parse_secret_rejects_malformed(text, message):
    with pytest.raises(UsageError, match=message):
        parse_secret(text)


def _args(*argv: str):
    return build_parser().parse_args(["exec", *argv, "--", "true"])


def test_vm_options_build_hooks_and_placeholders(monkeypatch, capsys):
    monkeypatch.setenv("FAKE_TOKEN_FOR_TEST", "tok_cli_test_0123456789")
    args = _args("--allow-host", "api.example.com", "--allow-host", "*.cdn.example", "--allow", "pypi",
                 "--allow-internal-host", "registry.internal", "--tcp-map", "db.internal:5432=127.0.0.1:5432",
                 "--dns", "trusted", "--secret", "TOKEN=FAKE_TOKEN_FOR_TEST@api.example.com,other.example",
                 "--vm-env", "A=1", "--memory", "1G", "--cpus", "2")
    opts = vm_options(args, NetworkReport())
    hooks = opts.http_hooks
    assert hooks.policy.allowed_hosts == ("api.example.com", "*.cdn.example", "pypi.org", "files.pythonhosted.org",
                                          "registry.internal")
    assert hooks.policy.allowed_internal_hosts == ("registry.internal",)
    assert opts.tcp_hosts == {"db.internal:5432": "127.0.0.1:5432"} and opts.dns == "trusted"
    assert opts.memory == 1024 and opts.cpus == 2
    assert opts.env["A"] == "1"
    assert opts.env["TOKEN"].startswith("GONDOLIN_SECRET_")
    assert "tok_cli_test_0123456789" not in repr(opts)
    assert "other.example" in capsys.readouterr().err  # a secret host no --allow-host covers


def test_secret_scope_from_the_command_line(monkeypatch):
    monkeypatch.setenv("FAKE_TOKEN_FOR_TEST", "tok_cli_test_0123456789")
    opts = vm_options(_args("--allow-internal-host", "localhost", "--secret",
                            "T=FAKE_TOKEN_FOR_TEST@http://localhost:8080"), NetworkReport())
    (info,) = opts.http_hooks.secrets.describe()
    assert info.schemes == ("http",) and info.hosts == ("localhost:8080",)


def test_no_flags_means_deny_all_and_refusals_name_the_flag():
    hooks = vm_options(_args(), NetworkReport()).http_hooks
    assert not hooks.policy.host_allowed("example.com")
    reason = hooks.policy.check_host("example.com").reason
    assert "--allow-host example.com" in reason and "allowed_hosts" not in reason
    hooks = vm_options(_args("--allow-host", "a.example"), NetworkReport()).http_hooks
    assert "--allow-host evil.example" in hooks.policy.check_host("evil.example").reason
    internal = hooks.policy.check_address("a.example", "127.0.0.1").reason
    assert "--allow-internal-host a.example" in internal


@pytest.mark.parametrize(("argv", "message"), [
    (["--secret", "T=UNSET_VAR_FOR_GONDOLIN_TEST@a.com"], "UNSET_VAR_FOR_GONDOLIN_TEST is not set"),
    (["--allow-host", "evil*.com"], "invalid host pattern"),
    (["--allow", "cargo"], "unknown host preset 'cargo'; known presets: github, npm, pypi"),
    (["--secret", "T=HOME@a.com", "--vm-env", "T=x"], "both as --secret and --vm-env"),
    (["--mount", "/nonexistent-gondolin-dir:/w"], "is not a directory"),
    (["--mount", ".:/proc"], "cannot mount over /proc"),
    (["--cow-diff", "x.diff"], "need a --mount HOST:GUEST:cow"),
])
def test_setup_errors_are_usage_errors(monkeypatch, argv, message):
    monkeypatch.delenv("UNSET_VAR_FOR_GONDOLIN_TEST", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    with pytest.raises(UsageError, match=message):
        args = _args(*argv)
        from gondolin._cli_options import check_cow_flags

        check_cow_flags(args)
        vm_options(args, NetworkReport())


@pytest.mark.parametrize(("argv", "message"), [
    (["exec", "--memory", "10X", "true"], "invalid memory size '10X'"),
    (["exec", "--memory", "64M", "true"], "too small"),
    (["exec", "--cpus", "0", "true"], "whole number of vCPUs from 1 to 64"),
    (["exec", "--cpus", "two", "true"], "whole number of vCPUs"),
    (["exec", "--cwd", "relative/dir", "true"], "absolute guest path"),
    (["exec", "--timeout", "-1", "true"], "positive number of seconds"),
    (["exec", "--env", "NOEQUALS", "true"], "KEY=VALUE"),
    (["exec", "--tcp-map", "db=localhost", "true"], "GUEST\\[:PORT\\]=HOST:PORT"),
    (["exec", "--dns", "magic", "true"], "invalid choice"),
    (["exec", "--secret", "X=Y", "true"], "NAME=ENVVAR@HOST"),
    (["exec", "--mount", "/nonexistent-gondolin-dir:/w", "true"], "is not a directory"),
    (["exec"], "give a command"),
    (["no-such-command"], "invalid choice"),
])
def test_usage_errors_print_one_line_and_exit_125(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback, no usage block
    assert err.startswith("gondolin") and __import__("re").search(message, err), err


def _event(decision: Decision, host: str = "evil.com", port: int = 443, reason: str = "denied") -> AuditEvent:
    return AuditEvent(time=0.0, method="GET", scheme="https", host=host, port=port, path="/x", status=403,
                      response_bytes=0, decision=decision, reason=reason)


def test_report_lists_only_refusals_capped_and_logs_every_decision():
    log = io.StringIO()
    report = NetworkReport(log, limit=2)
    events = (_event(Decision.ALLOWED), _event(Decision.ANSWERED), _event(Decision.BLOCKED),
              _event(Decision.ERROR, host="up.example", port=8443, reason="upstream failed"),
              _event(Decision.REJECTED), _event(Decision.BLOCKED))
    for event in events:
        report(event)
    out = io.StringIO()
    report.report(out)
    assert out.getvalue().splitlines() == [
        "gondolin: blocked GET https://evil.com/x: denied",
        "gondolin: error GET https://up.example:8443/x: upstream failed",
        "gondolin: ... and 2 more refused requests",
    ]
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    assert [line["decision"] for line in lines] == [e.decision.value for e in events]
    assert lines[3] == {"time": 0.0, "method": "GET", "scheme": "https", "host": "up.example", "port": 8443,
                        "path": "/x", "status": 403, "response_bytes": 0, "decision": "error",
                        "reason": "upstream failed", "secrets": [], "protocol": ""}
