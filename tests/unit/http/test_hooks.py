from __future__ import annotations

import pytest

import gondolin.http as http_pkg
from gondolin.http import AuditEvent, Decision, EventLog, Secret, create_http_hooks, deny_all_hooks
from gondolin.http.hooks import maybe_await
from tests.support import assert_exports


def event(path: str) -> AuditEvent:
    return AuditEvent(0.0, "GET", "https", "a.test", 443, path, 200, 0, Decision.ALLOWED, "allowed")


def test_create_http_hooks_returns_placeholders_as_env() -> None:
    hooks, env = create_http_hooks(
        allowed_hosts=["api.github.com"],
        secrets={"GITHUB_TOKEN": Secret("ghp_TESTVALUE_x", hosts=["api.github.com"])},
    )
    assert list(env) == ["GITHUB_TOKEN"]
    assert env["GITHUB_TOKEN"].startswith("GONDOLIN_SECRET_")
    assert "ghp_TESTVALUE_x" not in repr(hooks)
    assert hooks.policy.allowed_hosts == ("api.github.com",)
    assert hooks.env() == env


def test_secret_hosts_do_not_widen_egress() -> None:
    hooks, _ = create_http_hooks(secrets={"T": Secret("value-xyz1", hosts=["api.test"])})
    assert not hooks.policy.check_host("api.test").allowed


def test_deny_all_is_the_default() -> None:
    assert not deny_all_hooks().policy.check_host("example.com").allowed
    hooks, env = create_http_hooks()
    assert env == {} and not hooks.policy.check_host("example.com").allowed


def test_invalid_options_fail_fast() -> None:
    with pytest.raises(ValueError):
        create_http_hooks(allowed_hosts=["*evil.com"])
    with pytest.raises(TypeError):
        create_http_hooks(secrets={"T": "plain string"})  # type: ignore[dict-item]


def test_event_log_is_bounded_and_observers_are_isolated() -> None:
    seen: list[str] = []

    def observer(e: AuditEvent) -> None:
        seen.append(e.path)
        if e.path == "/2":
            raise RuntimeError("observer bug")

    log = EventLog(observer, max_events=2)
    for i in range(4):
        log.record(event(f"/{i}"))
    assert [e.path for e in log.events()] == ["/2", "/3"]
    assert seen == ["/0", "/1", "/2", "/3"]
    assert log.dropped_callback_errors == 1


@pytest.mark.anyio
async def test_maybe_await_accepts_both() -> None:
    async def coro() -> int:
        return 2

    assert await maybe_await(1) == 1
    assert await maybe_await(coro()) == 2


def test_public_exports_are_pinned() -> None:
    assert_exports(http_pkg, [
        "AuditEvent", "Body", "BodyTooLarge", "CertificateAuthority", "Decision", "EgressBlocked",
        "EgressPolicy", "EventLog", "HOST_PRESETS", "HostPattern", "HttpHooks", "HttpMediationError", "HttpMediator",
        "HttpRequest", "HttpResponse", "Limits", "Secret", "SecretStore", "Timeouts", "UpstreamClient",
        "UpstreamError", "create_http_hooks", "default_ca_dir", "deny_all_hooks", "expand_presets",
        "is_internal_address",
    ])


def test_presets_expand_to_host_patterns() -> None:
    hooks, _ = create_http_hooks(allowed_hosts=["example.com"], allow=["pypi", "npm", "pypi"])
    assert hooks.policy.allowed_hosts == ("example.com", "pypi.org", "files.pythonhosted.org", "registry.npmjs.org")
    assert hooks.policy.host_allowed("files.pythonhosted.org")
    with pytest.raises(ValueError, match="unknown host preset 'cargo'; known presets: github, npm, pypi"):
        create_http_hooks(allow=["cargo"])


def test_an_async_on_event_is_refused_at_once() -> None:
    async def on_event(event: object) -> None:
        pass

    with pytest.raises(TypeError, match="plain function"):
        create_http_hooks(on_event=on_event)
