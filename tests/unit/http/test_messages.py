from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gondolin.http.errors import BodyTooLarge
from gondolin.http.messages import (
    REPLAY_LIMIT,
    Body,
    HttpRequest,
    HttpResponse,
    Target,
    parse_authority,
    parse_target,
    strip_hop_by_hop,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/", Target("/")),
        ("/a/b?c=d&e", Target("/a/b?c=d&e")),
        ("http://example.com", Target("/", "http", "example.com")),
        ("https://example.com:8443/x?y", Target("/x?y", "https", "example.com:8443")),
        ("ws://h.test/chat", Target("/chat", "http", "h.test")),
        ("WSS://h.test/", Target("/", "https", "h.test")),
    ],
)
def test_parse_target(text: str, expected: Target) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", ["", "*", "example.com:443", "ftp://x/", "/a b", "/a#frag", "http:///x", "/\x00", "gopher://h/"])
def test_parse_target_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_target(text)


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("example.com", 80, ("example.com", 80)),
        ("Example.COM:8080", 80, ("example.com", 8080)),
        ("[::1]:443", 80, ("::1", 443)),
        ("[::1]", 443, ("::1", 443)),
        ("127.0.0.1:1", 80, ("127.0.0.1", 1)),
        ("example.com.", 443, ("example.com", 443)),
    ],
)
def test_parse_authority(text: str, default: int, expected: tuple[str, int]) -> None:
    assert parse_authority(text, default) == expected


@pytest.mark.parametrize(
    "text",
    ["", "user@host", "host:", "host:0", "host:65536", "host:+1", "host:1:2", "::1", "[::1", "[::1]x",
     "a b", "host/path", "127.1", "[fe80::1%25eth0]", "host:99999999"],
)
def test_parse_authority_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_authority(text, 80)


@given(st.text(max_size=200))
def test_parsers_only_raise_value_error(text: str) -> None:
    for parse in (parse_target, lambda t: parse_authority(t, 80)):
        try:
            parse(text)
        except ValueError:
            pass


def test_strip_hop_by_hop_removes_nominated_headers() -> None:
    headers = [
        ("Connection", "keep-alive, X-Private"),
        ("X-Private", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic xyz"),
        ("Transfer-Encoding", "chunked"),
        ("Host", "a.test"),
        ("TE", "trailers"),
        ("Accept", "*/*"),
    ]
    assert strip_hop_by_hop(headers) == (("accept", "*/*"),)


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@pytest.mark.anyio
async def test_stream_body_is_recorded_for_replay() -> None:
    body = Body(chunks(b"ab", b"", b"cd"))
    assert [c async for c in body] == [b"ab", b"cd"]
    assert body.finished and body.replayable and body.bytes_read == 4
    assert b"".join([c async for c in body]) == b"abcd"


@pytest.mark.anyio
async def test_large_stream_body_is_not_replayable() -> None:
    body = Body(chunks(b"x" * REPLAY_LIMIT, b"y"))
    async for _ in body:
        pass
    assert not body.replayable
    with pytest.raises(RuntimeError):
        async for _ in body:
            pass


@pytest.mark.anyio
async def test_read_enforces_limit_and_close_runs_callback_once() -> None:
    calls: list[int] = []
    body = Body(chunks(b"12345", b"678"), on_close=lambda b: calls.append(b.bytes_read))
    with pytest.raises(BodyTooLarge):
        await body.read(limit=6)
    await body.aclose()
    await body.aclose()
    assert calls == [8]
    assert await Body(b"abc").read() == b"abc"


def test_request_helpers() -> None:
    req = HttpRequest.from_url("post", "https://API.test:8443/p?q=1", [("X-A", "1"), ("Connection", "close")], b"hi")
    assert (req.method, req.scheme, req.host, req.port, req.target) == ("POST", "https", "api.test", 8443, "/p?q=1")
    assert req.url == "https://api.test:8443/p?q=1"
    assert req.headers == (("x-a", "1"),)
    assert req.with_header("X-A", "2").header("x-a") == "2"
    assert req.with_header("x-a", None).headers == ()
    assert HttpRequest.from_url("GET", "http://[::1]:80/").authority == "[::1]"


@pytest.mark.anyio
async def test_text_response_is_short_and_plain() -> None:
    resp = HttpResponse.text(403, "egress to x is denied")
    assert resp.header("content-type") == "text/plain; charset=utf-8"
    assert await resp.body.read() == b"403 Forbidden: egress to x is denied\n"
