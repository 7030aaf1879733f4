"""Issue 11 at the mediator level: framing, one audit event per request, secret scope, value scans.

Every test here compares what the (real, loopback) upstream received with the audit log.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import anyio.lowlevel
import h2.errors
import pytest

from gondolin.http import CertificateAuthority, Decision, Secret
from gondolin.http.secrets import BodyScanner, Redactor, SecretStore
from gondolin.http.server_h2 import MAX_EARLY_RESETS
from gondolin.http.websocket import FrameReader, unmask

from .support import (
    UPSTREAM_NAME,
    guest_connection,
    h1_roundtrip,
    h2_guest,
    http_flow,
    read_all,
    tls_guest,
    tls_setup,
    upstream_server,
)
from .test_server_h1 import setup as plain_setup

pytestmark = pytest.mark.anyio

VALUE = "tok_TESTONLY_" + "9f3b" * 6  # fake credential


def allowed_events(mediator: Any) -> list[Any]:
    return [e for e in mediator.hooks.events.events() if e.decision is Decision.ALLOWED]


# -- item 1: framing and the audit invariant ---------------------------------------------------


async def test_content_length_with_transfer_encoding_is_400_and_never_forwarded() -> None:
    async with plain_setup() as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        head = (f"POST /echo HTTP/1.1\r\nHost: {server.authority}\r\nContent-Length: 10\r\n"
                "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        await guest.send(head.encode())
        data = await read_all(guest)
    assert data.startswith(b"HTTP/1.1 400 ") and b"Transfer-Encoding" in data
    assert server.connections == 0
    (event,) = mediator.hooks.events.events()
    assert (event.decision, event.status) == (Decision.REJECTED, 400)


async def test_hook_body_shorter_than_its_length_is_one_allowed_502() -> None:
    """A raw h11 error from the upstream client is translated, and audited once."""
    from gondolin.http import Body

    def lying(request: Any) -> Any:
        return request.replace(body=Body(_chunks(b"abc"), length=10))

    async with plain_setup(on_request=lying) as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        resp = await h1_roundtrip(guest, f"POST /echo HTTP/1.1\r\nHost: {server.authority}\r\n"
                                         "Content-Length: 3\r\n\r\nabc".encode(), "POST")
    assert resp.status == 502
    (event,) = mediator.hooks.events.events()
    assert (event.decision, event.status) == (Decision.ALLOWED, 502)
    assert "Content-Length" in event.reason


async def _chunks(data: bytes) -> Any:
    yield data


async def test_guest_body_breaking_off_after_forwarding_is_one_allowed_event() -> None:
    async with plain_setup() as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        head = f"POST /echo HTTP/1.1\r\nHost: {server.authority}\r\nTransfer-Encoding: chunked\r\n\r\n"
        await guest.send(head.encode() + b"5\r\nhello\r\nzz\r\n")
        data = await read_all(guest)
    assert data.startswith(b"HTTP/1.1 400 ")
    (event,) = mediator.hooks.events.events()
    assert (event.decision, event.status) == (Decision.ALLOWED, 400)


async def test_every_forwarded_request_has_exactly_one_allowed_event(
    mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority
) -> None:
    async with tls_setup(mitm_ca, upstream_ca) as (mediator, server):
        server.routes["/hang-up"] = lambda seen: (200, [("content-length", "100")], [b"short"])
        async with tls_guest(mediator, mitm_ca) as guest:
            for path in ("/echo/a", "/redirect?to=/echo/b", "/status/500"):
                await h1_roundtrip(guest, f"GET {path} HTTP/1.1\r\nHost: {UPSTREAM_NAME}\r\n\r\n".encode())
        async with h2_guest(mediator, mitm_ca) as client:
            sid = await client.request("GET", f"{UPSTREAM_NAME}:{server.port}", "/echo/h2")
            await client.response(sid)
            sid = await client.request("GET", f"{UPSTREAM_NAME}:{server.port}", "/hang-up")
            await client.response(sid)
        await anyio.sleep(0.1)
    received = [s.target for s in server.requests]
    audited = [e.path for e in allowed_events(mediator)]
    assert sorted(audited) == sorted(t.split("?")[0] for t in received)


# -- item 2: scheme and port scope ------------------------------------------------------------


def test_secret_scope_defaults_to_https_on_the_default_port() -> None:
    s = SecretStore({"T": Secret(VALUE, hosts=["api.test"])})
    ph = s.placeholders()["T"]
    assert s.apply("api.test", (("x", ph),), "/", in_query=False).headers == (("x", VALUE),)
    for scheme, port in (("http", 80), ("https", 8443), ("http", 443)):
        with pytest.raises(Exception) as info:
            s.apply("api.test", (("x", ph),), "/", in_query=False, scheme=scheme, port=port)
        assert "over" in str(info.value) and VALUE not in str(info.value)


@pytest.mark.parametrize(
    ("secret", "ok", "refused"),
    [
        (Secret(VALUE, hosts=["api.test:8443"]), [("https", 8443)], [("https", 443), ("http", 8443)]),
        (Secret(VALUE, hosts=["api.test"], schemes=("http",)), [("http", 80)], [("https", 443), ("http", 81)]),
        (Secret(VALUE, hosts=["api.test"], ports=(443, 8443)), [("https", 443), ("https", 8443)], [("http", 80)]),
        (Secret(VALUE, hosts=["[::1]:9000"]), [("https", 9000)], [("https", 443)]),
    ],
)
def test_secret_scope_options(secret: Secret, ok: list[tuple[str, int]], refused: list[tuple[str, int]]) -> None:
    s = SecretStore({"T": secret})
    ph = s.placeholders()["T"]
    host = "::1" if "::1" in secret.hosts[0] else "api.test"
    for scheme, port in ok:
        assert s.apply(host, (("x", ph),), "/", in_query=False, scheme=scheme, port=port).used == ("T",)
    for scheme, port in refused:
        with pytest.raises(Exception, match="may not be sent"):
            s.apply(host, (("x", ph),), "/", in_query=False, scheme=scheme, port=port)


def test_bad_scopes_are_refused_early() -> None:
    for kwargs in ({"schemes": ("ftp",)}, {"schemes": ()}, {"ports": (0,)}, {"hosts": ["a.test:x"]}):
        with pytest.raises(ValueError):
            Secret(VALUE, **{"hosts": ["a.test"], **kwargs})


async def test_redirect_to_another_origin_is_never_substituted_again() -> None:
    """https -> http on the same host: the cleartext hop must not get the value."""
    async with upstream_server() as plain:
        hooks: dict[str, Any] = {
            "allowed_internal_hosts": ["127.0.0.1"],
            "secrets": {"T": Secret(VALUE, hosts=["127.0.0.1"], schemes=("http",), ports=(plain.port,))},
        }
        async with plain_setup(**hooks) as (mediator, _), guest_connection(mediator, http_flow()) as guest:
            ph = mediator.hooks.env()["T"]
            # Same origin: substituted on both hops.
            to = f"http://127.0.0.1:{plain.port}/echo/same"
            resp = await h1_roundtrip(guest, f"GET /redirect?to={to} HTTP/1.1\r\nHost: 127.0.0.1:{plain.port}\r\n"
                                             f"X-Key: {ph}\r\n\r\n".encode())
            assert resp.status == 200 and VALUE in resp.body.decode()
            async with upstream_server() as other:
                to = f"http://127.0.0.1:{other.port}/echo/moved"
                resp = await h1_roundtrip(guest, f"GET /redirect?to={to} HTTP/1.1\r\nHost: 127.0.0.1:{plain.port}\r\n"
                                                 f"X-Key: {ph}\r\n\r\n".encode())
                assert resp.status == 403 and b"redirect" in resp.body
                assert other.connections == 0


# -- item 3: bodies, WebSocket frames, responses ---------------------------------------------------


def test_body_scanner_finds_values_across_chunk_boundaries_and_holds_back_a_window() -> None:
    s = SecretStore({"T": Secret(VALUE, hosts=["api.test"])})
    scanner = s.scanner("https", "other.test", 443)
    assert scanner is not None and s.scanner("https", "api.test", 443) is None
    data = b"x" * 100 + VALUE.encode() + b"y" * 10
    for step in (1, 5, len(VALUE) - 1, 64):
        scanner = s.scanner("https", "other.test", 443)
        assert scanner is not None
        sent = bytearray()
        with pytest.raises(Exception, match="may not be sent"):
            for i in range(0, len(data), step):
                sent += scanner.feed(data[i : i + step])
        assert VALUE[:3].encode() not in sent  # not even the start of the value went out
    clean = BodyScanner([(VALUE.encode(), "r")])
    out = b"".join(clean.feed(bytes([c])) for c in b"harmless data") + clean.finish()
    assert out == b"harmless data"


def test_redactor_replaces_values_split_across_chunks() -> None:
    r = Redactor([(VALUE.encode(), b"PLACEHOLDER")])
    data = b"a" + VALUE.encode() + b"b" + VALUE.encode()
    for step in (1, 7, 100):
        r = Redactor([(VALUE.encode(), b"PLACEHOLDER")])
        out = b"".join(r.feed(data[i : i + step]) for i in range(0, len(data), step)) + r.finish()
        assert out == b"aPLACEHOLDERbPLACEHOLDER"


def ws_frame(payload: bytes, *, op: int = 1, fin: bool = True) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 * fin | op])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + key + unmask(payload, key, 0)


@pytest.mark.parametrize("step", [1, 3, 1000, 1 << 20])
def test_frame_reader_unmasks_payloads_in_any_split(step: int) -> None:
    data = ws_frame(b"hello") + ws_frame(b"x" * 300, fin=False) + ws_frame(b"y" * 70000, op=0)
    reader = FrameReader()
    out = [p for i in range(0, len(data), step) for p in reader.feed(data[i : i + step])]
    assert b"".join(out) == b"hello" + b"x" * 300 + b"y" * 70000


async def test_real_value_in_a_body_to_another_host_is_blocked_before_connecting(
    mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority
) -> None:
    secrets = {"T": Secret(VALUE, hosts=["api.test"])}
    async with tls_setup(mitm_ca, upstream_ca, secrets=secrets) as (mediator, server), tls_guest(mediator, mitm_ca) as guest:
        for body in (f"token={VALUE}".encode(), b"z" * (1 << 20) + VALUE.encode() + b"z" * 5000):
            resp = await h1_roundtrip(guest, f"POST /echo HTTP/1.1\r\nHost: {UPSTREAM_NAME}:{server.port}\r\n"
                                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body, "POST")
            assert resp.status == 403 and VALUE.encode() not in resp.body
    assert all(VALUE.encode() not in s.body for s in server.requests)
    assert not any(s.target == "/echo" and len(s.body) < 100 for s in server.requests)  # small: never sent
    blocked = [e for e in mediator.hooks.events.events() if e.decision is Decision.BLOCKED]
    assert len(blocked) == 2 and all("value of secret T" in e.reason for e in blocked)


async def test_real_value_in_a_websocket_frame_closes_the_tunnel() -> None:
    secrets = {"T": Secret(VALUE, hosts=["api.test"])}
    async with plain_setup(secrets=secrets) as (mediator, server), guest_connection(mediator, http_flow()) as guest:
        await guest.send(f"GET /ws HTTP/1.1\r\nHost: {server.authority}\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n".encode())
        await guest.send(ws_frame(b"fine"))
        half = len(VALUE) // 2
        await guest.send(ws_frame(VALUE[:half].encode(), fin=False))
        await guest.send(ws_frame(VALUE[half:].encode(), op=0))
        data = await read_all(guest)
    assert b" 101 " in data.split(b"\r\n", 1)[0]
    assert VALUE[half:].encode() not in data  # the completing frame never reached the upstream
    (seen,) = server.requests
    assert not any(n.lower() == "sec-websocket-extensions" for n, _ in seen.headers)
    events = mediator.hooks.events.events()
    assert [e.decision for e in events] == [Decision.ALLOWED, Decision.BLOCKED]
    assert "WebSocket" in events[-1].reason


async def test_redact_responses_replaces_reflected_values(
    mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority
) -> None:
    secrets = {"T": Secret(VALUE, hosts=[UPSTREAM_NAME])}
    async with tls_setup(mitm_ca, upstream_ca, secrets=secrets, redact_responses=True) as (mediator, server):
        mediator.hooks.secrets.rotate("T", VALUE, hosts=[f"{UPSTREAM_NAME}:{server.port}"])
        ph = mediator.hooks.env()["T"]
        async with tls_guest(mediator, mitm_ca) as guest:
            resp = await h1_roundtrip(guest, f"GET /echo HTTP/1.1\r\nHost: {UPSTREAM_NAME}:{server.port}\r\n"
                                             f"X-Key: {ph}\r\n\r\n".encode())
    assert resp.status == 200
    assert VALUE.encode() not in resp.body and ph.encode() in resp.body
    (seen,) = server.requests
    assert ("x-key", VALUE) in [(n.lower(), v) for n, v in seen.headers]  # substituted upstream


# -- item 4: HTTP/2 ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a\x01b", "a\x7fb", "a\x1bb"])
async def test_h2_header_values_with_control_characters_are_400(
    mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority, value: str
) -> None:
    async with tls_setup(mitm_ca, upstream_ca) as (mediator, server), h2_guest(mediator, mitm_ca) as client:
        client.conn.config.validate_outbound_headers = False
        client.conn.config.normalize_outbound_headers = False
        sid = await client.request("GET", f"{UPSTREAM_NAME}:{server.port}", "/echo", headers=[("x-bad", value)])
        result = await client.response(sid)
    assert result.status == 400
    assert server.requests == []


async def test_h2_rapid_reset_starts_no_upstream_requests_and_ends_the_connection(
    mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority
) -> None:
    async with tls_setup(mitm_ca, upstream_ca) as (mediator, server), h2_guest(mediator, mitm_ca) as client:
        auth = f"{UPSTREAM_NAME}:{server.port}"
        for _ in range(MAX_EARLY_RESETS + 50):
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", auth.encode()),
                                           (b":path", b"/echo")], end_stream=True)
            client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            await client.flush()
            if client.terminated is not None:
                break
            await anyio.lowlevel.checkpoint()
        with anyio.fail_after(5):
            while client.terminated is None:  # noqa: ASYNC110 (the test client has no event for it)
                await anyio.sleep(0.01)
    assert client.terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert server.connections <= 1 and len(server.requests) <= 1


# -- item 7: the VM's buffered request bytes --------------------------------------------------------


async def test_h2_request_buffers_share_one_budget_per_vm(
    mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority
) -> None:
    from gondolin.http import Limits

    async def slow(request: Any) -> bool:
        await anyio.sleep(0.5)  # the upstream side does not take the body yet: it waits in buffers
        return True

    limits = Limits(max_buffered_bytes=200_000)
    async with tls_setup(mitm_ca, upstream_ca, limits=limits, is_request_allowed=slow) as (mediator, server), \
            h2_guest(mediator, mitm_ca) as client:
        auth = f"{UPSTREAM_NAME}:{server.port}"
        sids = [await client.request("POST", auth, f"/count?i={i}", body=b"u" * 150_000) for i in range(3)]
        results = [await client.response(sid, limit=20) for sid in sids]
        assert any(r.reset == h2.errors.ErrorCodes.REFUSED_STREAM for r in results)
        assert any(r.status == 200 for r in results), [(r.status, r.reset, bytes(r.body[:80])) for r in results]
        assert mediator.budget.used == 0 and mediator.budget.refused > 0
        later = await client.request("GET", auth, "/echo/after")
        assert (await client.response(later)).status == 200 and client.terminated is None
