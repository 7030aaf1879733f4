"""Route tables and the listeners file (sans-IO)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gondolin.ingress import ListenersError, Route, RouteTable, parse_listeners, serialize_listeners
from gondolin.ingress.routes import MAX_LISTENERS_BYTES


def test_parse_reads_routes_comments_and_options():
    table = parse_listeners(b"# my app\n/ :8080\n\n/api/  :9000 strip_prefix=false  # backend\n"
                            b"/docs :9001 colour=blue\x00\n")
    assert set(table.routes) == {Route("/", 8080), Route("/api", 9000, strip_prefix=False), Route("/docs", 9001)}


@pytest.mark.parametrize(("line", "message"), [
    ("/app", "expected"),
    ("app :80", "must start with '/'"),
    ("/app 80", "port must look like"),
    ("/app :0", "1-65535"),
    ("/app :70000", "1-65535"),
    ("/app :8o", "port must look like"),
    ("/app :80 strip_prefix=maybe", "strip_prefix must be true or false"),
    ("/app :80 strip_prefix", "is not key=value"),
])
def test_a_bad_line_names_its_number(line, message):
    with pytest.raises(ListenersError, match=message) as info:
        parse_listeners(f"/ :8080\n{line}\n")
    assert "line 2" in str(info.value)


def test_duplicate_prefix_and_oversized_file_are_refused():
    with pytest.raises(ListenersError, match="listed twice"):
        parse_listeners("/a :1\n/a/ :2\n")
    with pytest.raises(ListenersError, match="larger than"):
        parse_listeners(b"#" * (MAX_LISTENERS_BYTES + 1))


def test_longest_prefix_on_segment_boundaries():
    table = RouteTable([Route("/", 1), Route("/api", 2), Route("/api/v2", 3)])
    assert table.match("/").port == 1
    assert [table.match(p).port for p in ("/x", "/api", "/api/", "/api/x", "/apix", "/api/v2/y", "/api/v20")] == [
        1, 2, 2, 2, 1, 3, 2]
    assert RouteTable([Route("/api", 2)]).match("/other") is None


def test_strip_prefix_rewrites_the_target():
    assert Route("/api", 1).upstream_target("/api/x?q=1") == "/x?q=1"
    assert Route("/api", 1).upstream_target("/api") == "/"
    assert Route("/api", 1).upstream_target("/api?q=1") == "/?q=1"
    assert Route("/api", 1, strip_prefix=False).upstream_target("/api/x") == "/api/x"
    assert Route("/", 1).upstream_target("/x") == "/x"


def test_merge_lets_the_host_table_win_and_serialize_round_trips():
    file_table = parse_listeners("/ :1\n/api :2 strip_prefix=false\n")
    merged = file_table.merged(RouteTable.of({"/api": 5}))
    assert merged.match("/api/x") == Route("/api", 5)
    assert merged.match("/") == Route("/", 1)
    assert parse_listeners(serialize_listeners(file_table)) == file_table
    assert serialize_listeners(file_table) == "/\t:1\n/api\t:2\tstrip_prefix=false\n"


def test_route_arguments_are_checked():
    with pytest.raises(ListenersError):
        Route("/x", 0)
    with pytest.raises(ListenersError):
        Route("/x y", 80)
    with pytest.raises(ListenersError):
        Route("x", 80)


@given(st.binary(max_size=512))
def test_any_file_parses_or_fails_with_listeners_error(data):
    try:
        table = parse_listeners(data)
    except ListenersError:
        return
    for route in table.routes:
        assert route.prefix.startswith("/") and 0 < route.port < 65536
