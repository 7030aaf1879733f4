"""HTTP/2 guest-side behaviour through TLS interception, with the h2 library as the guest client."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gondolin.http import CertificateAuthority, HttpRequest, HttpResponse, Limits
from gondolin.http.server_h2 import H2Server

from .support import UPSTREAM_NAME, H2Result, byte_stream_pair, h2_guest, read_all, tls_setup

pytestmark = pytest.mark.anyio


def authority(port: int) -> str:
    return f"{UPSTREAM_NAME}:{port}"


async def test_many_concurrent_streams(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with tls_setup(mitm_ca, upstream_ca) as (mediator, server), h2_guest(mediator, mitm_ca) as client:
        sids = [await client.request("GET", authority(server.port), f"/echo/{i}") for i in range(30)]
        results = [await client.response(sid) for sid in sids]
        assert [r.status for r in results] == [200] * 30
        assert [r.body.count(f"/echo/{i}".encode()) for i, r in enumerate(results)] == [1] * 30
        assert server.connections <= 30


async def test_blocked_stream_does_not_disturb_its_neighbours(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    def allowed(request: HttpRequest) -> bool:
        return not request.path.startswith("/blocked")

    async with tls_setup(mitm_ca, upstream_ca, is_request_allowed=allowed) as (mediator, server), h2_guest(mediator, mitm_ca) as client:
        a = await client.request("GET", authority(server.port), "/echo/a")
        b = await client.request("POST", authority(server.port), "/blocked", body=b"x" * 100, end=False)
        c = await client.request("GET", authority(server.port), "/echo/c")
        rb = await client.response(b)
        assert rb.status == 403 and b"is_request_allowed" in rb.body
        assert (await client.response(a)).status == 200
        assert (await client.response(c)).status == 200
        await anyio.sleep(0.05)
        assert rb.reset == 0  # RST_STREAM(NO_ERROR): we answered before the guest finished sending
        d = await client.request("GET", authority(server.port), "/echo/d")
        assert (await client.response(d)).status == 200
        assert client.terminated is None


async def test_flow_controlled_upload_and_download(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    size = 3 * 1024 * 1024 + 5
    async with tls_setup(mitm_ca, upstream_ca) as (mediator, server), h2_guest(mediator, mitm_ca) as client:
        up = await client.request("POST", authority(server.port), "/count", body=b"u" * size)
        down = await client.request("GET", authority(server.port), f"/bytes/{size}")
        assert (await client.response(up, limit=30)).body == str(size).encode()
        result = await client.response(down, limit=30)
        assert len(result.body) == size and result.headers["content-length"] == str(size)


async def test_guest_reset_mid_download_keeps_connection(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with tls_setup(mitm_ca, upstream_ca) as (mediator, server), h2_guest(mediator, mitm_ca) as client:
        client.auto_ack = False  # stall the download on flow control
        big = await client.request("GET", authority(server.port), f"/bytes/{8 * 1024 * 1024}")
        with anyio.fail_after(5):
            while len(client.results[big].body) < 60000:  # noqa: ASYNC110 (polling a test client)
                await anyio.sleep(0.01)
        client.conn.reset_stream(big, 8)  # CANCEL
        await client.flush()
        client.auto_ack = True
        nxt = await client.request("GET", authority(server.port), "/echo/after")
        assert (await client.response(nxt)).status == 200
        assert client.terminated is None
    assert mediator.stats.flow_errors == 0


@pytest.mark.parametrize(
    ("path", "headers", "extra_authority", "status"),
    [
        ("/echo", [], "other.test", 421),
        ("/echo", [("x-big", "a" * 70000)], None, 431),
        ("/echo", [("content-length", "5000")], None, 413),
    ],
)
async def test_stream_level_errors(
    mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority, path: str,
    headers: list[tuple[str, str]], extra_authority: str | None, status: int,
) -> None:
    async with tls_setup(mitm_ca, upstream_ca, limits=Limits(max_body_bytes=1000)) as (mediator, server), h2_guest(mediator, mitm_ca) as client:
        target = f"{extra_authority}:{server.port}" if extra_authority else authority(server.port)
        sid = await client.request("POST", target, path, headers=headers, body=b"x" * 10 if status == 413 else b"", end=status != 413)
        result = await client.response(sid)
        assert result.status == status
        assert result.headers["content-type"].startswith("text/plain")
        ok = await client.request("GET", authority(server.port), "/echo")
        assert (await client.response(ok)).status == 200
    assert server.requests == [r for r in server.requests if r.target == "/echo" and r.method == "GET"]


async def test_chunked_upload_over_cap_is_refused_on_the_stream(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with tls_setup(mitm_ca, upstream_ca, limits=Limits(max_body_bytes=1000)) as (mediator, server), h2_guest(mediator, mitm_ca) as client:
        sid = await client.request("POST", authority(server.port), "/count", body=b"x" * 5000)
        result = await client.response(sid)
        assert result.status == 413 or result.reset is not None
        ok = await client.request("GET", authority(server.port), "/echo")
        assert (await client.response(ok)).status == 200


async def test_connect_is_refused(mitm_ca: CertificateAuthority, upstream_ca: CertificateAuthority) -> None:
    async with tls_setup(mitm_ca, upstream_ca) as (mediator, server), h2_guest(mediator, mitm_ca) as client:
        sid = client.conn.get_next_available_stream_id()
        client.results[sid] = H2Result()
        client.conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", f"{UPSTREAM_NAME}:443".encode())], end_stream=True)
        await client.flush()
        assert (await client.response(sid)).status == 405


class _Echo:
    async def handle(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse.text(200, request.target)

    def reject(self, status: int, reason: str, request: HttpRequest | None = None) -> HttpResponse:
        return HttpResponse.text(status, reason)


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS_FRAME = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([b"", PREFACE, PREFACE + SETTINGS_FRAME]))
def test_fuzzed_frames_end_the_connection_cleanly(payload: bytes, prefix: bytes) -> None:
    async def main() -> None:
        guest, host = byte_stream_pair()

        async def serve() -> None:
            try:
                await H2Server(host, _Echo(), scheme="https").run()
            finally:
                await host.aclose()

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            await guest.send(prefix + payload)
            await guest.send_eof()
            await read_all(guest, limit=2)

    anyio.run(main)
