"""End-to-end mediation: TLS interception, secrets, redirects, hooks and the audit trail."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute

from gondolin.http import (
    AuditEvent,
    Body,
    CertificateAuthority,
    Decision,
    HttpMediator,
    HttpRequest,
    HttpResponse,
    Secret,
)

from .support import (
    UPSTREAM_NAME,
    UpstreamServer,
    client_context,
    h1_roundtrip,
    read_all,
    read_h1_responses,
    tls_flow,
    tls_guest,
    tls_setup,
    upstream_server,
)

pytestmark = pytest.mark.anyio

TOKEN = "tok_TESTONLY_5d1e2a9c"  # fake credential for these tests


def request(server: UpstreamServer, path: str, headers: str = "", method: str = "GET", host: str = UPSTREAM_NAME) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}:{server.port}\r\n{headers}\r\n".encode()


def header(echo: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in echo["headers"] if n == name]


# -- TLS interception ----------------------------------------------------------------------


async def test_https_through_interception_to_a_tls_upstream(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with tls_setup(mitm_ca, upstream_ca) as (mediator, server), tls_guest(mediator, mitm_ca) as guest:
        resp = await h1_roundtrip(guest, request(server, "/echo?q=1"))
        assert resp.status == 200
        echo = resp.json()
        assert echo["target"] == "/echo?q=1"
        assert header(echo, "host") == [f"{UPSTREAM_NAME}:{server.port}"]
        resp = await h1_roundtrip(guest, request(server, "/bytes/70000"))
        assert len(resp.body) == 70000
    (first, second) = mediator.hooks.events.events()
    assert (first.scheme, first.host, first.path, first.protocol) == ("https", UPSTREAM_NAME, "/echo", "HTTP/1.1")
    assert second.response_bytes == 70000


async def test_untrusted_upstream_certificate_is_502(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with tls_setup(mitm_ca, upstream_ca, trust_upstream=False) as (mediator, server), tls_guest(mediator, mitm_ca) as guest:
        resp = await h1_roundtrip(guest, request(server, "/echo"))
        assert resp.status == 502
        assert b"certificate" in resp.body.lower()
    assert mediator.hooks.events.events()[-1].decision is Decision.ERROR


async def test_host_must_match_sni(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with tls_setup(mitm_ca, upstream_ca, allowed_hosts=["*"]) as (mediator, server), tls_guest(mediator, mitm_ca) as guest:
        resp = await h1_roundtrip(guest, request(server, "/echo", host="other.test"))
        assert resp.status == 421
        absolute = f"GET http://{UPSTREAM_NAME}:{server.port}/echo HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        assert (await h1_roundtrip(guest, absolute)).status == 421  # plain http inside TLS
        assert server.connections == 0


async def test_without_sni_the_resolved_name_is_used(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with tls_setup(mitm_ca, upstream_ca) as (mediator, server):
        async with tls_guest(mediator, mitm_ca, None, flow_hostname=UPSTREAM_NAME) as guest:
            assert (await h1_roundtrip(guest, request(server, "/echo"))).status == 200


async def test_handshake_garbage_is_contained(mitm_ca: CertificateAuthority) -> None:
    from .support import guest_connection

    async with HttpMediator(ca=mitm_ca) as mediator:
        async with guest_connection(mediator, tls_flow("a.test")) as guest:
            await guest.send(b"\x16\x03\x01\x00\x05hello-not-tls")
            await guest.send_eof()
            await read_all(guest)
    assert mediator.stats.tls_handshake_failures == 1 and mediator.stats.flow_errors == 0


async def test_stdlib_http_client_over_a_real_socket(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    """Python's own http.client + ssl (strict verification) against the mediator on loopback."""
    async with tls_setup(mitm_ca, upstream_ca) as (mediator, server):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(SocketAttribute.local_port)

        async def accept(stream: Any) -> None:
            await mediator(tls_flow(UPSTREAM_NAME, dst_port=port), stream)

        def client() -> tuple[int, bytes]:
            ctx = client_context(mitm_ca)
            conn = http.client.HTTPSConnection(UPSTREAM_NAME, server.port, context=ctx, timeout=10)
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            conn.sock = ctx.wrap_socket(sock, server_hostname=UPSTREAM_NAME)
            conn.request("POST", "/echo", body=b"from-stdlib", headers={"X-Test": "1"})
            resp = conn.getresponse()
            body = resp.read()
            conn.request("GET", "/bytes/5")
            second = conn.getresponse().read()
            conn.close()
            return resp.status, body + second

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, accept)
            status, body = await anyio.to_thread.run_sync(client)
            tg.cancel_scope.cancel()
        await listener.aclose()
    assert status == 200
    assert b'"body": "from-stdlib"' in body and body.endswith(bytes(range(5)))


# -- secrets -------------------------------------------------------------------------------


@asynccontextmanager
async def secret_setup(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority, **kwargs: Any) -> AsyncIterator[tuple[HttpMediator, UpstreamServer, str]]:
    secrets = {"API_TOKEN": Secret(TOKEN, hosts=[UPSTREAM_NAME])}
    async with tls_setup(mitm_ca, upstream_ca, secrets=secrets, **kwargs) as (mediator, server):
        # Scoped to https on the default port; the test upstream listens on an ephemeral one.
        mediator.hooks.secrets.rotate("API_TOKEN", TOKEN, hosts=[f"{UPSTREAM_NAME}:{server.port}"])
        yield mediator, server, mediator.hooks.env()["API_TOKEN"]


async def test_secret_reaches_its_host_and_the_guest_sees_only_the_placeholder(
    mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with secret_setup(mitm_ca, upstream_ca) as (mediator, server, ph), tls_guest(mediator, mitm_ca) as guest:
        basic = base64.b64encode(f"user:{ph}".encode()).decode()
        resp = await h1_roundtrip(guest, request(server, "/echo", f"Authorization: Bearer {ph}\r\nX-Basic: x\r\n"))
        assert header(resp.json(), "authorization") == [f"Bearer {TOKEN}"]
        resp = await h1_roundtrip(guest, request(server, "/echo", f"Authorization: Basic {basic}\r\n"))
        sent = header(resp.json(), "authorization")[0].split(" ")[1]
        assert base64.b64decode(sent).decode() == f"user:{TOKEN}"
        resp = await h1_roundtrip(guest, request(server, "/echo", method="POST", headers=f"Content-Length: {len(ph)}\r\n") + ph.encode(), "POST")
        assert resp.json()["body"] == ph  # bodies are never substituted
    events = mediator.hooks.events.events()
    assert [e.secrets for e in events] == [("API_TOKEN",), ("API_TOKEN",), ()]
    assert TOKEN not in repr(events) and TOKEN not in caplog.text


async def test_placeholder_to_another_host_is_blocked_before_connecting(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with secret_setup(mitm_ca, upstream_ca, allowed_internal_hosts=[UPSTREAM_NAME, "other.test"]) as (mediator, server, ph):
        async with tls_guest(mediator, mitm_ca, "other.test") as guest:
            resp = await h1_roundtrip(guest, request(server, "/echo", f"X-Token: {ph}\r\n", host="other.test"))
        assert resp.status == 403 and b"API_TOKEN" in resp.body
        assert server.connections == 0
        event = mediator.hooks.events.events()[-1]
        assert event.decision is Decision.BLOCKED and event.host == "other.test"


async def test_query_substitution_needs_opt_in(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with secret_setup(mitm_ca, upstream_ca) as (mediator, server, ph), tls_guest(mediator, mitm_ca) as guest:
        assert (await h1_roundtrip(guest, request(server, f"/echo?key={ph}"))).status == 403
    async with secret_setup(mitm_ca, upstream_ca, replace_secrets_in_query=True) as (mediator, server, ph), tls_guest(mediator, mitm_ca) as guest:
        resp = await h1_roundtrip(guest, request(server, f"/echo?key={ph}"))
        assert resp.json()["target"] == f"/echo?key={TOKEN}"
        assert TOKEN not in repr(mediator.hooks.events.events())


async def test_runtime_rotation_and_revocation(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with secret_setup(mitm_ca, upstream_ca) as (mediator, server, ph), tls_guest(mediator, mitm_ca) as guest:
        mediator.hooks.secrets.rotate("API_TOKEN", "tok_TESTONLY_rotated")
        resp = await h1_roundtrip(guest, request(server, "/echo", f"X-Token: {ph}\r\n"))
        assert header(resp.json(), "x-token") == ["tok_TESTONLY_rotated"]
        resp = await h1_roundtrip(guest, request(server, "/echo", f"X-Token: {TOKEN}\r\n"))
        assert resp.status == 403 and b"revoked" in resp.body
        mediator.hooks.secrets.revoke("API_TOKEN")
        resp = await h1_roundtrip(guest, request(server, "/echo", f"X-Token: {ph}\r\n"))
        assert resp.status == 403
        assert len(server.requests) == 1


# -- redirects -------------------------------------------------------------------------------


async def test_redirects_are_followed_and_rechecked(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with tls_setup(mitm_ca, upstream_ca) as (mediator, server), tls_guest(mediator, mitm_ca) as guest:
        to = f"https://{UPSTREAM_NAME}:{server.port}/echo/final"
        resp = await h1_roundtrip(guest, request(server, f"/redirect?status=302&to={to}"))
        assert resp.status == 200 and resp.json()["target"] == "/echo/final"
        resp = await h1_roundtrip(guest, request(server, "/redirect?status=301&to=https://evil.test/steal"))
        assert resp.status == 403 and b"evil.test" in resp.body
        resp = await h1_roundtrip(guest, request(server, "/redirect?status=302&to=/redirect%3Fstatus%3D302%26to%3D/echo/rel"))
        assert resp.json()["target"] == "/echo/rel"
    decisions = [(e.decision, e.status, e.path) for e in mediator.hooks.events.events()]
    assert decisions[:3] == [
        (Decision.ALLOWED, 302, "/redirect"),
        (Decision.ALLOWED, 200, "/echo/final"),
        (Decision.ALLOWED, 301, "/redirect"),
    ]
    assert decisions[3][0] is Decision.BLOCKED


async def test_too_many_redirects_is_508(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with tls_setup(mitm_ca, upstream_ca) as (mediator, server), tls_guest(mediator, mitm_ca) as guest:
        server.routes["/loop"] = lambda seen: (302, [("location", "/loop")], [b""])
        resp = await h1_roundtrip(guest, request(server, "/loop"))
        assert resp.status == 508
        assert len(server.requests) == 11  # the guest's request and 10 redirects


async def test_cross_origin_redirect_drops_credentials(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with tls_setup(mitm_ca, upstream_ca, allowed_internal_hosts=[UPSTREAM_NAME, "127.0.0.1"]) as (mediator, server):
        async with upstream_server() as plain, tls_guest(mediator, mitm_ca) as guest:
            creds = "Authorization: Bearer abc\r\nCookie: sid=1\r\nX-Keep: 1\r\n"
            same = f"https://{UPSTREAM_NAME}:{server.port}/echo/same"
            resp = await h1_roundtrip(guest, request(server, f"/redirect?status=302&to={same}", creds))
            assert header(resp.json(), "authorization") == ["Bearer abc"]
            other = f"http://127.0.0.1:{plain.port}/echo/other"
            resp = await h1_roundtrip(guest, request(server, f"/redirect?status=302&to={other}", creds))
            echo = resp.json()
            assert echo["target"] == "/echo/other"
            assert header(echo, "authorization") == [] and header(echo, "cookie") == []
            assert header(echo, "x-keep") == ["1"]


async def test_redirect_method_rules(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with tls_setup(mitm_ca, upstream_ca) as (mediator, server), tls_guest(mediator, mitm_ca) as guest:
        body_headers = "Content-Length: 4\r\nContent-Type: text/plain\r\n"
        resp = await h1_roundtrip(guest, request(server, "/redirect?status=307&to=/echo/307", body_headers, "POST") + b"data", "POST")
        assert (resp.json()["method"], resp.json()["body"]) == ("POST", "data")
        resp = await h1_roundtrip(guest, request(server, "/redirect?status=303&to=/echo/303", body_headers, "POST") + b"data", "POST")
        assert (resp.json()["method"], resp.json()["body"]) == ("GET", "")
        assert header(resp.json(), "content-type") == []


async def test_secret_on_a_redirect_hop_to_another_host_is_blocked(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with secret_setup(mitm_ca, upstream_ca, allowed_internal_hosts=[UPSTREAM_NAME, "127.0.0.1"]) as (mediator, server, ph):
        async with upstream_server() as plain, tls_guest(mediator, mitm_ca) as guest:
            to = f"http://127.0.0.1:{plain.port}/echo"
            resp = await h1_roundtrip(guest, request(server, f"/redirect?status=302&to={to}", f"X-Api-Key: {ph}\r\n"))
            assert resp.status == 403 and b"API_TOKEN" in resp.body
            assert plain.connections == 0


# -- hooks and events ---------------------------------------------------------------------------


async def test_on_request_can_rewrite_or_answer(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async def on_request(req: HttpRequest) -> HttpRequest | HttpResponse | None:
        if req.path == "/answer":
            return HttpResponse(200, (("content-type", "text/plain"),), Body(b"from hook"))
        if req.path == "/rewrite":
            return req.with_header("x-added", "yes").replace(target="/echo/rewritten")
        return None

    def on_response(resp: HttpResponse, req: HttpRequest) -> HttpResponse | None:
        return resp.with_header("x-seen-by", "hook")

    async with tls_setup(mitm_ca, upstream_ca, on_request=on_request, on_response=on_response) as (mediator, server), tls_guest(mediator, mitm_ca) as guest:
        resp = await h1_roundtrip(guest, request(server, "/answer"))
        assert resp.body == b"from hook" and "x-seen-by" not in resp.headers
        resp = await h1_roundtrip(guest, request(server, "/rewrite"))
        assert resp.json()["target"] == "/echo/rewritten" and header(resp.json(), "x-added") == ["yes"]
        assert resp.headers["x-seen-by"] == "hook"
    assert [e.decision for e in mediator.hooks.events.events()] == [Decision.ANSWERED, Decision.ALLOWED]
    assert len(server.requests) == 1


async def test_hook_that_reads_the_body(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async def on_request(req: HttpRequest) -> HttpRequest:
        data = await req.body.read()
        return req.replace(body=Body(data.upper()))

    async def on_response(resp: HttpResponse, req: HttpRequest) -> HttpResponse:
        data = json.loads(await resp.body.read())
        return HttpResponse(201, (("content-type", "application/json"),), Body(json.dumps(data["body"]).encode()))

    async with tls_setup(mitm_ca, upstream_ca, on_request=on_request, on_response=on_response) as (mediator, server), tls_guest(mediator, mitm_ca) as guest:
        resp = await h1_roundtrip(guest, request(server, "/echo", "Content-Length: 5\r\n", "POST") + b"hello", "POST")
        assert resp.status == 201 and resp.json() == "HELLO"


async def test_failing_hooks_and_callbacks_are_contained(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    def boom(req: HttpRequest) -> None:
        raise RuntimeError(f"hook saw {TOKEN}")

    def bad_observer(event: AuditEvent) -> None:
        raise ValueError("observer")

    async with secret_setup(mitm_ca, upstream_ca, on_request=boom, on_event=bad_observer) as (mediator, server, _), tls_guest(mediator, mitm_ca) as guest:
        resp = await h1_roundtrip(guest, request(server, "/echo"))
        assert resp.status == 500 and TOKEN.encode() not in resp.body
        assert (await h1_roundtrip(guest, request(server, "/echo"))).status == 500
    assert mediator.hooks.events.dropped_callback_errors == 2


async def test_is_request_allowed_and_on_event(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    seen: list[AuditEvent] = []

    async def allowed(req: HttpRequest) -> bool:
        return req.method == "GET"

    async with tls_setup(mitm_ca, upstream_ca, is_request_allowed=allowed, on_event=seen.append, max_events=2) as (mediator, server), tls_guest(mediator, mitm_ca) as guest:
        await guest.send(request(server, "/echo/1") + request(server, "/echo/2", "Content-Length: 0\r\n", "DELETE") + request(server, "/echo/3"))
        responses = await read_h1_responses(guest, 3, ["GET", "DELETE", "GET"])
        assert [r.status for r in responses] == [200, 403, 200]
    assert [e.path for e in seen] == ["/echo/1", "/echo/2", "/echo/3"]
    assert [e.path for e in mediator.hooks.events.events()] == ["/echo/2", "/echo/3"]  # bounded buffer
    assert seen[1].decision is Decision.BLOCKED and seen[1].reason == "blocked by is_request_allowed"


async def test_plain_http_flow_to_tls_upstream_via_absolute_form(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    from .support import guest_connection, http_flow

    async with tls_setup(mitm_ca, upstream_ca) as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        raw = f"GET https://{UPSTREAM_NAME}:{server.port}/echo HTTP/1.1\r\nHost: {UPSTREAM_NAME}\r\n\r\n".encode()
        resp = await h1_roundtrip(guest, raw)
        assert resp.status == 200


def test_ssl_module_is_strict_here() -> None:
    assert ssl.HAS_SNI


@pytest.mark.parametrize("protocol", ["ssh", "mapped-tcp", "tls-without-ca"])
async def test_flows_it_does_not_serve_are_closed(protocol: str) -> None:
    from gondolin.net.flow import FlowInfo, FlowProtocol

    from .support import guest_connection

    kind = FlowProtocol.TLS if protocol == "tls-without-ca" else FlowProtocol(protocol)
    async with HttpMediator() as mediator:
        async with guest_connection(mediator, FlowInfo(kind, "192.168.127.3", 1, "192.0.2.1", 22, None)) as guest:
            assert await read_all(guest) == b""
    assert mediator.stats.refused_flows == 1


# -- upstream settings carried by the hooks (what VM.create passes on) ---------------------


async def test_resolver_and_upstream_ca_come_from_the_hooks(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    from gondolin.http import create_http_hooks

    from .support import static_resolver, upstream_tls_context

    async with upstream_server(upstream_tls_context(upstream_ca, UPSTREAM_NAME)) as server:
        for trusted, status in ((True, 200), (False, 502)):
            hooks, _ = create_http_hooks(
                allowed_internal_hosts=[UPSTREAM_NAME],
                resolver=static_resolver({UPSTREAM_NAME: ["127.0.0.1"]}),
                upstream_ca_pem=upstream_ca.cert_pem if trusted else None,
            )
            async with HttpMediator(hooks, mitm_ca) as mediator, tls_guest(mediator, mitm_ca) as guest:
                resp = await h1_roundtrip(guest, request(server, "/echo"))
                assert resp.status == status
    hooks, _ = create_http_hooks(allowed_hosts=["*.test"], resolver=static_resolver({}))
    async with HttpMediator(hooks, mitm_ca) as mediator, tls_guest(mediator, mitm_ca) as guest:
        resp = await h1_roundtrip(guest, request(server, "/echo"))
        assert resp.status == 502 and b"cannot resolve" in resp.body


async def test_a_sync_resolver_works_and_a_failing_one_is_a_502_with_an_event(
        mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    from gondolin.http import create_http_hooks

    from .support import upstream_tls_context

    def sync_resolver(host: str, port: int) -> list[str]:  # docs: hooks may be sync or async
        return ["127.0.0.1"]

    def broken_resolver(host: str, port: int) -> list[str]:
        raise RuntimeError("resolver bug")

    async with upstream_server(upstream_tls_context(upstream_ca, UPSTREAM_NAME)) as server:
        for resolver, status in ((sync_resolver, 200), (broken_resolver, 502)):
            hooks, _ = create_http_hooks(allowed_internal_hosts=[UPSTREAM_NAME], resolver=resolver,
                                         upstream_ca_pem=upstream_ca.cert_pem)
            async with HttpMediator(hooks, mitm_ca) as mediator, tls_guest(mediator, mitm_ca) as guest:
                resp = await h1_roundtrip(guest, request(server, "/echo"))
            assert resp.status == status, resp.body
            (event,) = hooks.events.events()
            if status == 502:
                assert b"resolver hook failed" in resp.body
                assert event.decision.value == "error" and "resolver hook failed" in event.reason
            else:
                assert event.decision.value == "allowed"
