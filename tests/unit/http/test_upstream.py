"""The guarded upstream client: connect-time address checks, redirects, HTTP/2 upstreams."""

from __future__ import annotations

from typing import Any

import anyio
import httpcore2
import pytest
from anyio.streams.tls import TLSListener
from hypothesis import given
from hypothesis import strategies as st

from gondolin.http import (
    Body,
    CertificateAuthority,
    EgressBlocked,
    EgressPolicy,
    HttpMediator,
    HttpRequest,
    HttpResponse,
    UpstreamError,
    create_http_hooks,
)
from gondolin.http.server_h2 import H2Server
from gondolin.http.upstream import GuardedBackend, redirect_request, tcp_connector

from .support import guest_connection, h1_roundtrip, http_flow, static_resolver, upstream_server

pytestmark = pytest.mark.anyio

PUBLIC_IP = "93.184.215.14"


class Recorder:
    """Connector that records which address was dialled and always reaches the loopback server."""

    def __init__(self) -> None:
        self.dialled: list[str] = []

    async def __call__(self, ip: str, port: int, timeout: float | None) -> httpcore2.AsyncNetworkStream:  # noqa: ASYNC109
        self.dialled.append(ip)
        return await tcp_connector("127.0.0.1", port, timeout)


async def test_dns_rebinding_is_refused_at_connect_time() -> None:
    answers = iter([[PUBLIC_IP], ["127.0.0.1"]])

    async def resolver(host: str, port: int) -> list[str]:
        return next(answers)

    recorder = Recorder()
    hooks, _ = create_http_hooks(allowed_hosts=["rebind.test"])
    async with upstream_server() as server, HttpMediator(hooks, resolver=resolver, connector=recorder) as mediator:
        server.routes["/close"] = lambda seen: (200, [("connection", "close")], [b"first"])
        raw = f"GET /close HTTP/1.1\r\nHost: rebind.test:{server.port}\r\n\r\n".encode()
        async with guest_connection(mediator, http_flow()) as guest:
            assert (await h1_roundtrip(guest, raw)).body == b"first"
            second = await h1_roundtrip(guest, raw)
    assert recorder.dialled == [PUBLIC_IP]
    assert second.status == 403 and b"internal address 127.0.0.1" in second.body


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        ([PUBLIC_IP, "10.0.0.1"], [PUBLIC_IP]),
        (["::ffff:127.0.0.1", "2606:4700:4700::1111"], ["2606:4700:4700::1111"]),
        (["169.254.169.254"], None),
        (["fd00::1", "::1"], None),
        ([], None),
    ],
)
async def test_only_checked_addresses_are_dialled(addresses: list[str], expected: list[str] | None) -> None:
    backend = GuardedBackend(EgressPolicy(["*"]), static_resolver({"svc.test": addresses}), tcp_connector)
    if expected is None:
        with pytest.raises(EgressBlocked):
            await backend.resolve_checked("svc.test", 443)
    else:
        assert await backend.resolve_checked("svc.test", 443) == expected


async def test_host_policy_applies_before_resolving() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        raise AssertionError("must not resolve a denied host")

    backend = GuardedBackend(EgressPolicy(["a.test"]), resolver, tcp_connector)
    with pytest.raises(EgressBlocked):
        await backend.connect_tcp("b.test", 80)
    with pytest.raises(EgressBlocked):
        await backend.connect_tcp("127.0.0.1", 80)


async def test_unresolvable_host_is_502() -> None:
    hooks, _ = create_http_hooks(allowed_hosts=["*"])
    async with HttpMediator(hooks, resolver=static_resolver({})) as mediator, guest_connection(mediator, http_flow()) as guest:
        resp = await h1_roundtrip(guest, b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
    assert resp.status == 502 and b"resolve" in resp.body


async def test_connection_refused_is_502() -> None:
    hooks, _ = create_http_hooks(allowed_internal_hosts=["127.0.0.1"])
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now
    async with HttpMediator(hooks) as mediator, guest_connection(mediator, http_flow()) as guest:
        resp = await h1_roundtrip(guest, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert resp.status == 502


def hop(method: str = "GET", url: str = "https://a.test/start", headers: tuple[tuple[str, str], ...] = (), body: bytes = b"") -> HttpRequest:
    return HttpRequest.from_url(method, url, headers, body)


def redirect(status: int, location: str) -> HttpResponse:
    return HttpResponse(status, (("location", location),))


@pytest.mark.parametrize(
    ("method", "status", "location", "url", "next_method"),
    [
        ("GET", 301, "/next", "https://a.test/next", "GET"),
        ("POST", 301, "/next", "https://a.test/next", "GET"),
        ("POST", 302, "next?x=1", "https://a.test/next?x=1", "GET"),
        ("PUT", 302, "//b.test/p", "https://b.test/p", "PUT"),
        ("POST", 303, "http://b.test:8080/p#frag", "http://b.test:8080/p", "GET"),
        ("HEAD", 303, "/h", "https://a.test/h", "HEAD"),
        ("POST", 307, "/keep", "https://a.test/keep", "POST"),
        ("POST", 308, "https://c.test/ws", "https://c.test/ws", "POST"),
    ],
)
def test_redirect_request_rules(method: str, status: int, location: str, url: str, next_method: str) -> None:
    nxt = redirect_request(hop(method, body=b"abc" if method in ("POST", "PUT") else b""), redirect(status, location))
    assert nxt is not None
    assert (nxt.url, nxt.method) == (url, next_method)


def test_redirect_drops_credentials_only_across_origins() -> None:
    headers = (("authorization", "Bearer x"), ("cookie", "a=b"), ("x-other", "1"))
    same = redirect_request(hop(headers=headers), redirect(302, "/p"))
    other = redirect_request(hop(headers=headers), redirect(302, "https://a.test:444/p"))
    assert same is not None and other is not None
    assert same.headers == headers
    assert other.headers == (("x-other", "1"),)


@pytest.mark.parametrize("location", ["ftp://a.test/x", "wss://a.test/", "https://user@a.test/", "https://a.test:99999/", "https://127.1/", "http://[::1/"])
def test_bad_redirect_locations(location: str) -> None:
    with pytest.raises(UpstreamError):
        redirect_request(hop(), redirect(302, location))


def test_non_redirects_are_left_alone() -> None:
    assert redirect_request(hop(), HttpResponse(200)) is None
    assert redirect_request(hop(), HttpResponse(304, (("location", "/x"),))) is None
    assert redirect_request(hop(), HttpResponse(302)) is None


async def test_streamed_body_that_was_not_kept_cannot_be_resent() -> None:
    async def chunks() -> Any:
        yield b"x" * (2 << 20)

    body = Body(chunks())
    async for _ in body:
        pass
    request = hop("POST").replace(body=body)
    with pytest.raises(UpstreamError):
        redirect_request(request, redirect(307, "/again"))


class _H2Upstream:
    async def handle(self, request: HttpRequest) -> HttpResponse:
        data = await request.body.read()
        text = f"h2 {request.method} {request.target} {request.header('x-a')} {len(data)}"
        return HttpResponse(200, (("content-type", "text/plain"),), Body(text.encode()))

    def reject(self, status: int, reason: str, request: HttpRequest | None = None) -> HttpResponse:
        return HttpResponse.text(status, reason)


async def test_http2_upstream_is_used_when_offered(upstream_ca: CertificateAuthority) -> None:
    name = "h2up.test"
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    tls_listener = TLSListener(listener, upstream_ca.server_context(name), standard_compatible=False)

    async def serve(stream: Any) -> None:
        await H2Server(stream, _H2Upstream(), scheme="https").run()

    hooks, _ = create_http_hooks(allowed_internal_hosts=[name])
    async with HttpMediator(hooks, resolver=static_resolver({name: ["127.0.0.1"]}), upstream_ca_pem=upstream_ca.cert_pem) as mediator:
        async with anyio.create_task_group() as tg:
            tg.start_soon(tls_listener.serve, serve)
            async with guest_connection(mediator, http_flow()) as guest:
                raw = f"POST https://{name}:{port}/x?y HTTP/1.1\r\nHost: {name}\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                resp = await h1_roundtrip(guest, raw.encode(), "POST")
            tg.cancel_scope.cancel()
    await listener.aclose()
    assert resp.body == b"h2 POST /x?y 1 3"


@given(st.text(max_size=120), st.sampled_from([301, 302, 303, 307, 308]))
def test_any_location_yields_a_hop_or_upstream_error(location: str, status: int) -> None:
    try:
        nxt = redirect_request(hop(), redirect(status, location))
    except UpstreamError:
        return
    assert nxt is None or nxt.scheme in ("http", "https")
