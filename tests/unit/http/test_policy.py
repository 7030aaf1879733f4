from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gondolin.http.policy import (
    EgressPolicy,
    HostPattern,
    PolicyCode,
    is_internal_address,
    normalize_host,
)

PATTERN_CASES = [
    # pattern, host, matches
    ("*.github.com", "api.github.com", True),
    ("*.github.com", "a.b.github.com", True),
    ("*.github.com", "github.com", False),
    ("*.github.com", "evilgithub.com", False),
    ("*.github.com", "api.github.com.evil.com", False),
    ("*.GitHub.com", "API.github.COM.", True),
    ("github.com", "github.com", True),
    ("github.com", "api.github.com", False),
    ("github.com", "github.co", False),
    ("*", "example.com", True),
    ("*", "localhost", True),
    ("*", "93.184.215.14", False),  # IP literals must be listed as themselves
    ("*", "::1", False),
    ("127.0.0.1", "127.0.0.1", True),
    ("[::1]", "::1", True),
    ("::1", "0:0::1", True),
    ("*.example.com", "xexample.com", False),
]


@pytest.mark.parametrize(("pattern", "host", "expected"), PATTERN_CASES)
def test_host_patterns_are_label_aware(pattern: str, host: str, expected: bool) -> None:
    normalized = normalize_host(host)
    assert normalized is not None
    assert HostPattern.parse(pattern).matches(normalized) is expected


@pytest.mark.parametrize(
    "pattern", ["*github.com", "api.*.com", "a*.b.com", "*.*.com", "**", "", "exa mple.com", "host:80", "*.1.2.3.4"]
)
def test_bad_patterns_are_rejected_when_the_policy_is_built(pattern: str) -> None:
    with pytest.raises(ValueError):
        EgressPolicy([pattern])


def test_a_single_string_is_not_mistaken_for_a_list() -> None:
    with pytest.raises(TypeError):
        EgressPolicy("example.com")  # type: ignore[arg-type]


INTERNAL = [
    "127.0.0.1", "127.255.255.254", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "169.254.169.254", "169.254.0.1", "100.64.0.1", "100.127.255.255", "0.0.0.0", "0.1.2.3",
    "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1", "198.18.0.1", "198.19.3.4",
    "192.0.2.1", "198.51.100.7", "203.0.113.9", "192.0.0.8",
    "::", "::1", "fc00::1", "fd12:3456::1", "fe80::1", "fe80::1%eth0", "fec0::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:7f00:1",
    "::127.0.0.1", "::10.0.0.1", "::8.8.8.8",  # IPv4-compatible: deprecated, never public
    "2002:7f00:0001::1", "2002:a00:1::",  # 6to4 around private IPv4
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",  # NAT64 around loopback / metadata
    "64:ff9b:1::1", "2001:db8::1", "2001::1", "100::1", "::ffff:0:7f00:1",
    "not an address",
]
PUBLIC = [
    "8.8.8.8", "1.1.1.1", "93.184.215.14", "100.63.255.255", "100.128.0.1", "172.15.255.255",
    "172.32.0.1", "192.169.0.1", "169.253.255.255", "223.255.255.255",
    "2606:4700:4700::1111", "2a00:1450:4001:81c::200e", "::ffff:8.8.8.8", "64:ff9b::808:808",
    "2002:808:808::1",
]


@pytest.mark.parametrize("address", INTERNAL)
def test_internal_addresses(address: str) -> None:
    assert is_internal_address(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses(address: str) -> None:
    assert not is_internal_address(address)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Example.COM.", "example.com"),
        ("[::1]", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", None),  # resolvers read these as IPv4: refuse the ambiguity
        ("2130706433", None),
        ("0x7f.0.0.1", None),
        ("a.0x10", None),
        ("exa_mple.com", "exa_mple.com"),
        ("-bad.com", None),
        ("a..b", None),
        ("", None),
        ("a" * 64 + ".com", None),
        ("bücher.de", None),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("fe80::1%eth0", None),
        ("evil.com/x", None),
        ("user@host", None),
    ],
)
def test_normalize_host(text: str, expected: str | None) -> None:
    assert normalize_host(text) == expected


def test_default_policy_denies_everything_and_names_the_option() -> None:
    decision = EgressPolicy().check_host("example.com")
    assert not decision.allowed
    assert decision.code is PolicyCode.HOST_NOT_ALLOWED
    assert "allowed_hosts" in decision.reason


def test_unlisted_host_is_denied_with_reason() -> None:
    decision = EgressPolicy(["api.github.com"]).check_host("evil.com")
    assert decision.code is PolicyCode.HOST_NOT_ALLOWED
    assert "evil.com" in decision.reason


@pytest.mark.parametrize(
    ("allowed", "internal", "host", "address", "expected"),
    [
        (["*"], [], "example.com", "93.184.215.14", PolicyCode.ALLOWED),
        (["*"], [], "example.com", "127.0.0.1", PolicyCode.INTERNAL_ADDRESS),
        (["*"], [], "metadata.google.internal", "169.254.169.254", PolicyCode.INTERNAL_ADDRESS),
        (["*"], [], "example.com", "::ffff:10.0.0.1", PolicyCode.INTERNAL_ADDRESS),
        ([], ["svc.local.test"], "svc.local.test", "10.0.0.5", PolicyCode.ALLOWED),
        ([], ["*.corp.test"], "a.corp.test", "192.168.0.9", PolicyCode.ALLOWED),
        (["*"], ["*.corp.test"], "corp.test", "192.168.0.9", PolicyCode.INTERNAL_ADDRESS),
    ],
)
def test_address_checks(allowed: list[str], internal: list[str], host: str, address: str, expected: PolicyCode) -> None:
    policy = EgressPolicy(allowed, internal)
    assert policy.check_host(host).allowed
    assert policy.check_address(host, address).code is expected


def test_internal_hosts_are_implicitly_allowed() -> None:
    policy = EgressPolicy([], ["127.0.0.1"])
    assert policy.check_host("127.0.0.1").allowed
    assert not policy.check_host("example.com").allowed


def test_internal_ip_literal_is_refused_before_any_resolution() -> None:
    policy = EgressPolicy(["127.0.0.1"])  # listed, but not as internal
    decision = policy.check_host("127.0.0.1")
    assert decision.code is PolicyCode.INTERNAL_ADDRESS
    assert "allowed_internal_hosts" in decision.reason


def test_block_internal_ranges_can_be_switched_off() -> None:
    policy = EgressPolicy(["*"], block_internal_ranges=False)
    assert policy.check_address("example.com", "10.0.0.1").allowed


@given(st.text(max_size=300))
def test_normalize_host_never_raises(text: str) -> None:
    result = normalize_host(text)
    if result is not None:
        assert normalize_host(result) == result


@given(st.text(max_size=100), st.text(max_size=60))
def test_policy_checks_never_raise(host: str, address: str) -> None:
    policy = EgressPolicy(["*", "*.example.com"], ["*.internal.test"])
    policy.check_host(host)
    policy.check_address(host, address)
