"""CLI network flags: --allow-host, --secret NAME=ENVVAR@host[,host], and the refused-request report."""

from __future__ import annotations

import io

import pytest

from gondolin.cli import RefusedRequests, _egress_options, _parse_secret, build_parser
from gondolin.http import AuditEvent, Decision


@pytest.mark.parametrize(("text", "expected"), [
    ("GH=GITHUB_TOKEN@api.github.com", ("GH", "GITHUB_TOKEN", ["api.github.com"])),
    ("K=V@a.com,*.b.com", ("K", "V", ["a.com", "*.b.com"])),
    ("K=V@a.com, b.com ,", ("K", "V", ["a.com", "b.com"])),
])
def test_parse_secret(text, expected):
    assert _parse_secret(text) == expected


@pytest.mark.parametrize("text", ["GH", "GH=TOKEN", "GH=@api.github.com", "=T@h", "GH=T@", "GH=T@,"])
def test_parse_secret_rejects_malformed(text):
    with pytest.raises(SystemExit, match="NAME=ENVVAR@host"):
        _parse_secret(text)


def _args(*argv: str):
    return build_parser().parse_args(["exec", *argv, "--", "true"])


def test_egress_options_build_hooks_and_placeholders(monkeypatch, capsys):
    monkeypatch.setenv("FAKE_TOKEN_FOR_TEST", "tok_cli_test_0123456789")
    args = _args("--allow-host", "api.example.com", "--allow-host", "*.cdn.example",
                 "--secret", "TOKEN=FAKE_TOKEN_FOR_TEST@api.example.com,other.example",
                 "--vm-env", "A=1")
    opts = _egress_options(args, RefusedRequests())
    hooks = opts["http_hooks"]
    assert hooks.policy.allowed_hosts == ("api.example.com", "*.cdn.example")
    assert opts["env"]["A"] == "1"
    assert opts["env"]["TOKEN"].startswith("GONDOLIN_SECRET_")
    assert "tok_cli_test_0123456789" not in repr(opts)
    assert "other.example" in capsys.readouterr().err  # a secret host no --allow-host covers


def test_no_flags_means_deny_all():
    hooks = _egress_options(_args(), RefusedRequests())["http_hooks"]
    assert not hooks.policy.host_allowed("example.com")


@pytest.mark.parametrize(("argv", "message"), [
    (["--secret", "T=UNSET_VAR_FOR_GONDOLIN_TEST@a.com"], "UNSET_VAR_FOR_GONDOLIN_TEST is not set"),
    (["--allow-host", "evil*.com"], "invalid host pattern"),
    (["--secret", "T=HOME@a.com", "--vm-env", "T=x"], "both as --secret and --vm-env"),
])
def test_egress_option_errors(monkeypatch, argv, message):
    monkeypatch.delenv("UNSET_VAR_FOR_GONDOLIN_TEST", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    with pytest.raises(SystemExit, match=message):
        _egress_options(_args(*argv), RefusedRequests())


def _event(decision: Decision, host: str = "evil.com", port: int = 443, reason: str = "denied") -> AuditEvent:
    return AuditEvent(time=0.0, method="GET", scheme="https", host=host, port=port, path="/x", status=403,
                      response_bytes=0, decision=decision, reason=reason)


def test_refused_requests_report_only_refusals_capped():
    refused = RefusedRequests(limit=2)
    for event in (_event(Decision.ALLOWED), _event(Decision.ANSWERED), _event(Decision.BLOCKED),
                  _event(Decision.ERROR, host="up.example", port=8443, reason="upstream failed"),
                  _event(Decision.REJECTED), _event(Decision.BLOCKED)):
        refused(event)
    out = io.StringIO()
    refused.report(out)
    assert out.getvalue().splitlines() == [
        "gondolin: blocked GET https://evil.com/x: denied",
        "gondolin: error GET https://up.example:8443/x: upstream failed",
        "gondolin: ... and 2 more refused requests",
    ]
