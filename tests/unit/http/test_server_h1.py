"""HTTP/1.x guest-side behaviour, driven with raw bytes over in-memory streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gondolin.http import HttpMediator, HttpResponse, Limits, create_http_hooks
from gondolin.http.hooks import Decision

from .support import (
    UpstreamServer,
    guest_connection,
    h1_roundtrip,
    http_flow,
    read_all,
    read_h1_responses,
    upstream_server,
)

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def setup(limits: Limits | None = None, **hooks: Any) -> AsyncIterator[tuple[HttpMediator, UpstreamServer]]:
    hooks.setdefault("allowed_internal_hosts", ["127.0.0.1"])
    http_hooks, _ = create_http_hooks(**hooks)
    async with upstream_server() as server, HttpMediator(http_hooks, limits=limits) as mediator:
        yield mediator, server


def get(server: UpstreamServer, path: str, extra: str = "", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {server.authority}\r\n{extra}\r\n".encode()


async def test_keep_alive_reuses_guest_and_upstream_connections() -> None:
    async with setup() as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        for i in range(3):
            resp = await h1_roundtrip(guest, get(server, f"/echo/{i}"))
            assert resp.status == 200
            assert resp.json()["target"] == f"/echo/{i}"
        assert server.connections == 1


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with setup() as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        await guest.send(b"".join(get(server, f"/echo/{i}") for i in range(4)))
        responses = await read_h1_responses(guest, 4)
        assert [r.json()["target"] for r in responses] == [f"/echo/{i}" for i in range(4)]


async def test_chunked_request_body_is_forwarded() -> None:
    async with setup() as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        head = f"POST /echo HTTP/1.1\r\nHost: {server.authority}\r\nTransfer-Encoding: chunked\r\n\r\n"
        await guest.send(head.encode() + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        (resp,) = await read_h1_responses(guest, 1, ["POST"])
        echoed = resp.json()
        assert echoed["body"] == "hello world"
        assert ["transfer-encoding", "chunked"] in echoed["headers"]


async def test_content_length_body_and_hop_by_hop_headers() -> None:
    async with setup() as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        head = (
            f"PUT /echo HTTP/1.1\r\nHost: {server.authority}\r\nContent-Length: 3\r\n"
            "Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nProxy-Authorization: Basic eA==\r\nX-Keep: 2\r\n\r\nabc"
        )
        resp = await h1_roundtrip(guest, head.encode(), "PUT")
        names = [n for n, _ in resp.json()["headers"]]
        assert resp.json()["body"] == "abc"
        assert "x-keep" in names
        assert not {"x-hop", "proxy-authorization", "connection"} & set(names)


async def test_expect_100_continue_is_sent_once_policy_passed() -> None:
    async with setup() as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        head = f"POST /echo HTTP/1.1\r\nHost: {server.authority}\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        await guest.send(head.encode())
        with anyio.fail_after(5):
            interim = await guest.receive()
        assert interim.startswith(b"HTTP/1.1 100 ")
        await guest.send(b"data")
        (resp,) = await read_h1_responses(guest, 1, ["POST"])
        assert resp.status == 200 and resp.json()["body"] == "data"
        assert all(n != "expect" for n, _ in resp.json()["headers"])


async def test_expect_100_continue_never_sent_when_blocked() -> None:
    async with setup(allowed_internal_hosts=[]) as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        head = f"POST /echo HTTP/1.1\r\nHost: {server.authority}\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        await guest.send(head.encode())
        data = await read_all(guest)
        assert data.startswith(b"HTTP/1.1 403 ")
        assert b"100 Continue" not in data
        assert server.connections == 0


async def test_other_expectations_are_refused() -> None:
    async with setup() as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        resp = await h1_roundtrip(guest, get(server, "/echo", "Expect: teapot\r\n"))
        assert resp.status == 417


async def test_absolute_form_target_wins_over_host_header() -> None:
    async with setup() as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        raw = f"GET http://{server.authority}/echo?x=1 HTTP/1.1\r\nHost: ignored.test\r\n\r\n".encode()
        resp = await h1_roundtrip(guest, raw)
        assert resp.status == 200
        assert resp.json()["target"] == "/echo?x=1"
        assert ["host", server.authority] in resp.json()["headers"]


async def test_default_deny_without_hooks() -> None:
    events = []
    async with upstream_server() as server, HttpMediator() as mediator:
        async with guest_connection(mediator, http_flow()) as guest:
            resp = await h1_roundtrip(guest, get(server, "/echo"))
        events = mediator.hooks.events.events()
    assert resp.status == 403
    assert b"allowed_hosts" in resp.body
    assert resp.headers["content-type"].startswith("text/plain")
    assert server.connections == 0
    assert events[-1].decision is Decision.BLOCKED


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: a.test\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\nX: " + b"a" * 70000, 431),  # never-ending head
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: user@a.test\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: 127.1\r\n\r\n", 400),
        (b"GET nope HTTP/1.1\r\nHost: a.test\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\nContent-Length: x\r\n\r\n", 400),
        (b"BAD LINE\r\n\r\n", 400),
        (b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n", 405),
        (b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2000\r\n\r\n", 413),
    ],
)
async def test_bad_requests_get_a_short_plain_text_error(raw: bytes, status: int) -> None:
    async with setup(Limits(max_body_bytes=1000)) as (mediator, _server):
        async with guest_connection(mediator, http_flow()) as guest:
            await guest.send(raw)
            data = await read_all(guest)
        assert data.startswith(f"HTTP/1.1 {status} ".encode()), data[:80]
        assert b"connection: close" in data.lower()
        assert data.endswith(b"\n") and len(data) < 600
        assert mediator.stats.flow_errors == 0
        assert mediator.hooks.events.events()[-1].status == status


async def test_chunked_body_over_the_cap_is_413() -> None:
    async with setup(Limits(max_body_bytes=10)) as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        head = f"POST /echo HTTP/1.1\r\nHost: {server.authority}\r\nTransfer-Encoding: chunked\r\n\r\n"
        await guest.send(head.encode() + b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")
        data = await read_all(guest)
        assert data.startswith(b"HTTP/1.1 413 ")


async def test_malformed_chunk_is_400() -> None:
    async with setup() as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        head = f"POST /echo HTTP/1.1\r\nHost: {server.authority}\r\nTransfer-Encoding: chunked\r\n\r\n"
        await guest.send(head.encode() + b"zz\r\nhello\r\n")
        data = await read_all(guest)
        assert data.startswith(b"HTTP/1.1 400 ")


async def test_http_1_0_and_head() -> None:
    async with setup() as (mediator, server):
        async with guest_connection(mediator, http_flow()) as guest:
            resp = await h1_roundtrip(guest, get(server, "/bytes/10", method="HEAD"), "HEAD")
            assert resp.status == 200 and resp.body == b"" and resp.headers["content-length"] == "10"
        assert mediator.hooks.events.events()[-1].reason == "allowed"
        async with guest_connection(mediator, http_flow()) as guest:
            await guest.send(f"GET /stream/5000 HTTP/1.0\r\nHost: {server.authority}\r\n\r\n".encode())
            data = await read_all(guest)
            assert data.startswith(b"HTTP/1.1 200 ")
            assert data.endswith(b"z" * 5000)


async def test_large_download_streams_intact() -> None:
    size = 3 * 1024 * 1024 + 17
    async with setup() as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        resp = await h1_roundtrip(guest, get(server, f"/bytes/{size}"))
        assert len(resp.body) == size
        block = bytes(range(256)) * 64
        assert resp.body == (block * (size // len(block) + 1))[:size]
        resp = await h1_roundtrip(guest, get(server, "/stream/100000"))
        assert resp.body == b"z" * 100000
    event = mediator.hooks.events.events()[-1]
    assert event.response_bytes == 100000 and event.status == 200


async def test_websocket_upgrade_becomes_a_tunnel() -> None:
    async with setup() as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        raw = get(server, "/ws", "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGVzdA==\r\nSec-WebSocket-Version: 13\r\n")
        await guest.send(raw + b"early")
        buf = b""
        with anyio.fail_after(5):
            while b"echo:early" not in buf:
                buf += await guest.receive()
        assert buf.startswith(b"HTTP/1.1 101 ")
        assert b"sec-websocket-accept: test" in buf.lower()
        await guest.send(b"ping")
        with anyio.fail_after(5):
            assert await guest.receive() == b"echo:ping"


async def test_websocket_to_blocked_host_is_refused() -> None:
    async with setup(allowed_internal_hosts=[]) as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        raw = get(server, "/ws", "Upgrade: websocket\r\nConnection: Upgrade\r\n")
        resp = await h1_roundtrip(guest, raw)
        assert resp.status == 403 and server.connections == 0


async def test_unread_small_body_keeps_connection_alive() -> None:
    async with setup(on_request=lambda r: HttpResponse.text(200, "hooked")) as (mediator, server):
        async with guest_connection(mediator, http_flow()) as guest:
            head = f"POST /echo HTTP/1.1\r\nHost: {server.authority}\r\nContent-Length: 5\r\n\r\nhello"
            await guest.send(head.encode() + get(server, "/x"))
            responses = await read_h1_responses(guest, 2, ["POST", "GET"])
            assert [r.status for r in responses] == [200, 200]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400), st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"POST / HTTP/1.1\r\nHost: a.test\r\n"]))
def test_fuzzed_guest_bytes_never_escape(payload: bytes, prefix: bytes) -> None:
    async def main() -> None:
        async with HttpMediator() as mediator:
            async with guest_connection(mediator, http_flow()) as guest:
                await guest.send(prefix + payload)
                await guest.send_eof()
                await read_all(guest)
            assert mediator.stats.flow_errors == 0

    anyio.run(main)


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("93.184.215.14", b"not in allowed_hosts"),  # "*" never matches IP literals
        ("169.254.169.254", b"not in allowed_hosts"),
        ("[::ffff:127.0.0.1]:8080", b"not in allowed_hosts"),
        ("localhost:1", b"internal address"),
    ],
)
async def test_ip_literal_and_internal_hosts_are_blocked(host: str, reason: bytes) -> None:
    async with setup(allowed_hosts=["*"], allowed_internal_hosts=[]) as (mediator, server):
        async with guest_connection(mediator, http_flow()) as guest:
            resp = await h1_roundtrip(guest, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert resp.status == 403 and reason in resp.body
        assert server.connections == 0
