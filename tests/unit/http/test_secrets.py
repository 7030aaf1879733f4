from __future__ import annotations

import base64
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gondolin.http.errors import EgressBlocked
from gondolin.http.secrets import PLACEHOLDER_RE, Secret, SecretStore

VALUE = "ghp_TESTVALUE_0123456789abcdef"  # a fake credential: tests only


def store() -> tuple[SecretStore, str]:
    s = SecretStore({"GITHUB_TOKEN": Secret(VALUE, hosts=["api.github.com", "*.githubusercontent.com"])})
    return s, s.placeholders()["GITHUB_TOKEN"]


def test_placeholder_shape_and_uniqueness() -> None:
    s = SecretStore({"A": Secret("aaaa1111", hosts=["x.test"]), "B": Secret("bbbb2222", hosts=["x.test"])})
    a, b = s.placeholders()["A"], s.placeholders()["B"]
    assert PLACEHOLDER_RE.fullmatch(a) and PLACEHOLDER_RE.fullmatch(b)
    assert a != b
    assert a.startswith("GONDOLIN_SECRET_") and len(a) == len("GONDOLIN_SECRET_") + 48


def test_value_never_in_repr() -> None:
    s, _ = store()
    assert VALUE not in repr(Secret(VALUE, hosts=["a.test"]))
    assert VALUE not in repr(s)
    assert all(VALUE not in repr(info) for info in s.describe())


@pytest.mark.parametrize("value", ["", "a\r\nb", "nul\0"])
def test_bad_values_refused(value: str) -> None:
    with pytest.raises(ValueError):
        Secret(value, hosts=["a.test"])


def test_header_substitution_for_allowed_host() -> None:
    s, ph = store()
    out = s.apply("api.github.com", (("authorization", f"Bearer {ph}"), ("x-other", "keep")), "/user", in_query=False)
    assert out.headers == (("authorization", f"Bearer {VALUE}"), ("x-other", "keep"))
    assert out.used == ("GITHUB_TOKEN",)
    assert out.target == "/user"


def test_wildcard_secret_host() -> None:
    s, ph = store()
    out = s.apply("raw.githubusercontent.com", (("x-token", ph),), "/", in_query=False)
    assert out.headers == (("x-token", VALUE),)


@pytest.mark.parametrize("host", ["evil.com", "github.com", "evilapi.github.com.evil.com", "githubusercontent.com"])
def test_placeholder_to_other_host_is_blocked(host: str) -> None:
    s, ph = store()
    with pytest.raises(EgressBlocked) as info:
        s.apply(host, (("authorization", f"token {ph}"),), "/", in_query=False)
    assert "GITHUB_TOKEN" in info.value.reason
    assert VALUE not in info.value.reason


def test_basic_auth_is_decoded_substituted_and_reencoded() -> None:
    s, ph = store()
    token = base64.b64encode(f"x-access-token:{ph}".encode()).decode()
    out = s.apply("api.github.com", (("authorization", f"Basic {token}"),), "/", in_query=False)
    scheme, encoded = out.headers[0][1].split(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == f"x-access-token:{VALUE}"


def test_basic_auth_to_wrong_host_is_blocked() -> None:
    s, ph = store()
    token = base64.b64encode(f"user:{ph}".encode()).decode()
    with pytest.raises(EgressBlocked):
        s.apply("evil.com", (("authorization", f"basic {token}"),), "/", in_query=False)


def test_query_needs_opt_in() -> None:
    s, ph = store()
    with pytest.raises(EgressBlocked) as info:
        s.apply("api.github.com", (), f"/x?token={ph}", in_query=False)
    assert "replace_secrets_in_query" in info.value.reason
    out = s.apply("api.github.com", (), f"/x?token={ph}&a=1", in_query=True)
    assert out.target == f"/x?token={quote(VALUE, safe='')}&a=1"
    assert out.used == ("GITHUB_TOKEN",)


def test_query_value_is_percent_encoded() -> None:
    s = SecretStore({"K": Secret("a&b=c d", hosts=["h.test"])})
    ph = s.placeholders()["K"]
    out = s.apply("h.test", (), f"/?k={ph}", in_query=True)
    assert out.target == "/?k=a%26b%3Dc%20d"


def test_percent_encoded_placeholder_in_query_is_found() -> None:
    s, ph = store()
    encoded = ph.replace("_", "%5F")
    with pytest.raises(EgressBlocked):
        s.apply("evil.com", (), f"/?t={encoded}", in_query=True)
    out = s.apply("api.github.com", (), f"/?t={encoded}", in_query=True)
    assert VALUE in out.target


def test_placeholder_in_path_is_never_substituted() -> None:
    s, ph = store()
    with pytest.raises(EgressBlocked) as info:
        s.apply("api.github.com", (), f"/repos/{ph}", in_query=True)
    assert "path" in info.value.reason


@pytest.mark.parametrize(
    ("headers", "target"),
    [
        ((("authorization", f"Bearer {VALUE}"),), "/"),
        ((("x-leak", f"prefix{VALUE}suffix"),), "/"),
        ((("authorization", "Basic " + base64.b64encode(f"u:{VALUE}".encode()).decode()),), "/"),
        ((), f"/steal?d={VALUE}"),
        ((), f"/steal/{quote(VALUE)}"),
    ],
)
def test_real_value_headed_elsewhere_is_blocked(headers: tuple[tuple[str, str], ...], target: str) -> None:
    s, _ = store()
    with pytest.raises(EgressBlocked) as info:
        s.apply("evil.com", headers, target, in_query=False)
    assert VALUE not in info.value.reason


def test_unknown_placeholder_is_blocked() -> None:
    s, _ = store()
    with pytest.raises(EgressBlocked):
        s.apply("api.github.com", (("x", "GONDOLIN_SECRET_" + "0" * 48),), "/", in_query=False)


def test_rotate_keeps_placeholder_and_blocks_old_value() -> None:
    s, ph = store()
    s.rotate("GITHUB_TOKEN", "ghp_NEWVALUE_9876543210")
    assert s.placeholders()["GITHUB_TOKEN"] == ph
    out = s.apply("api.github.com", (("authorization", ph),), "/", in_query=False)
    assert out.headers == (("authorization", "ghp_NEWVALUE_9876543210"),)
    with pytest.raises(EgressBlocked) as info:
        s.apply("api.github.com", (("authorization", VALUE),), "/", in_query=False)
    assert "revoked" in info.value.reason


def test_rotate_can_change_hosts() -> None:
    s, ph = store()
    s.rotate("GITHUB_TOKEN", "ghp_OTHER_VALUE_x", hosts=["gitlab.test"])
    assert s.hosts("GITHUB_TOKEN") == ("gitlab.test",)
    with pytest.raises(EgressBlocked):
        s.apply("api.github.com", (("a", ph),), "/", in_query=False)
    s.apply("gitlab.test", (("a", ph),), "/", in_query=False)


def test_revoke_blocks_placeholder_and_value_everywhere() -> None:
    s, ph = store()
    s.revoke("GITHUB_TOKEN")
    assert "GITHUB_TOKEN" not in s.placeholders()
    for headers in ((("a", ph),), (("a", VALUE),)):
        with pytest.raises(EgressBlocked) as info:
            s.apply("api.github.com", headers, "/", in_query=False)
        assert "revoked" in info.value.reason
    with pytest.raises(ValueError):
        s.rotate("GITHUB_TOKEN", "x-new-value")


def test_add_at_runtime_and_duplicates() -> None:
    s, _ = store()
    ph = s.add("NPM_TOKEN", Secret("npm_TESTVALUE_abc", hosts=["registry.npmjs.org"]))
    assert s.placeholders()["NPM_TOKEN"] == ph
    with pytest.raises(ValueError):
        s.add("NPM_TOKEN", Secret("other-value", hosts=["x.test"]))
    with pytest.raises(ValueError):
        s.add("bad name", Secret("other-value", hosts=["x.test"]))


def test_several_secrets_in_one_request() -> None:
    s = SecretStore({"A": Secret("value-aaaa", hosts=["h.test"]), "B": Secret("value-bbbb", hosts=["h.test"])})
    pa, pb = s.placeholders()["A"], s.placeholders()["B"]
    out = s.apply("h.test", (("x", f"{pa}:{pb}"),), "/", in_query=False)
    assert out.headers == (("x", "value-aaaa:value-bbbb"),)
    assert set(out.used) == {"A", "B"}


def test_redact_scrubs_current_revoked_and_encoded_values() -> None:
    s, _ = store()
    s.rotate("GITHUB_TOKEN", "ghp_SECOND_value_1")
    text = f"failed with {VALUE} and ghp_SECOND_value_1 and {quote('ghp_SECOND_value_1', safe='')}"
    red = s.redact(text)
    assert VALUE not in red and "ghp_SECOND_value_1" not in red
    assert red.count("[secret:GITHUB_TOKEN]") == 3


headers_strategy = st.lists(
    st.tuples(st.sampled_from(["authorization", "x-a", "cookie"]), st.text(max_size=80)), max_size=4
)


@given(headers_strategy, st.text(max_size=80), st.sampled_from(["api.github.com", "evil.com", "", "???"]))
def test_apply_only_ever_raises_egress_blocked(headers: list[tuple[str, str]], target: str, host: str) -> None:
    s, ph = store()
    headers = [(n, v.replace("PH", ph)) for n, v in headers]
    try:
        out = s.apply(host, tuple(headers), "/" + target, in_query=True)
    except EgressBlocked as exc:
        assert VALUE not in exc.reason
    else:
        if host != "api.github.com":
            assert all(VALUE not in v for _, v in out.headers)


def test_short_values_are_substituted_but_not_scanned_for() -> None:
    s = SecretStore({"PIN": Secret("1234", hosts=["bank.test"])})
    ph = s.placeholders()["PIN"]
    assert s.apply("bank.test", (("x-pin", ph),), "/", in_query=False).headers == (("x-pin", "1234"),)
    s.apply("other.test", (("x-n", "1234"),), "/?page=1234", in_query=False)  # coincidence, not a leak
    with pytest.raises(EgressBlocked):
        s.apply("other.test", (("x-pin", ph),), "/", in_query=False)
