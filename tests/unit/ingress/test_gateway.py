"""The ingress gateway against real servers on host loopback (anyio TCP as the connector)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import websockets.asyncio.client

from gondolin import GondolinError
from gondolin.ingress import (
    IngressGateway,
    IngressHooks,
    IngressLimits,
    ListenersError,
    Route,
    deny,
)
from gondolin.ingress.routes import MAX_LISTENERS_BYTES

from ...support import BOTH_BACKENDS
from .servers import free_port, host_server, pattern_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the websockets client is asyncio-only


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[int, int]]:
    with host_server() as a, host_server() as b:
        yield a, b


async def tcp_connect(port: int) -> Any:
    return await anyio.connect_tcp("127.0.0.1", port)


@asynccontextmanager
async def gateway(**kwargs: Any) -> AsyncIterator[IngressGateway]:
    gw = IngressGateway(kwargs.pop("connector", tcp_connect), **kwargs)
    await gw.listen()
    async with anyio.create_task_group() as tg:
        await tg.start(gw.serve)
        try:
            yield gw
        finally:
            await gw.close()


def client(gw: IngressGateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gw.url, timeout=60, trust_env=False)


async def test_forwards_with_forwarded_headers_replacing_the_clients(servers):
    a, _ = servers
    async with gateway(routes={"/": a}) as gw, client(gw) as http:
        assert gw.url.startswith("http://127.0.0.1:")
        r = await http.get("/hello?x=1", headers={"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6",
                                                  "X-Forwarded-Proto": "https", "X-Custom": "kept"})
        assert r.status_code == 200
        body = r.json()
        headers = dict(body["headers"])
        assert body["path"] == "/hello?x=1" and body["port"] == a
        assert headers["x-forwarded-for"] == "127.0.0.1"
        assert headers["x-forwarded-proto"] == "http"
        assert headers["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
        assert headers["host"] == f"127.0.0.1:{gw.port}"
        assert headers["x-custom"] == "kept"
        assert "forwarded" not in headers
        assert [k for k, _ in body["headers"]].count("x-forwarded-for") == 1
    assert gw.events()[-1].reason == "forwarded" and gw.events()[-1].status == 200


async def test_routes_by_longest_prefix_with_and_without_stripping(servers):
    a, b = servers
    routes = [Route("/", a), Route("/api", b), Route("/raw", b, strip_prefix=False)]
    async with gateway(routes=routes) as gw, client(gw) as http:
        root, api, raw, apix = [(await http.get(p)).json() for p in ("/x", "/api/users?id=3", "/raw/y", "/apix")]
        assert (root["port"], root["path"]) == (a, "/x")
        assert (api["port"], api["path"]) == (b, "/users?id=3")
        assert dict(api["headers"])["x-forwarded-prefix"] == "/api"
        assert (raw["port"], raw["path"]) == (b, "/raw/y")
        assert (apix["port"], apix["path"]) == (a, "/apix")
        gw.set_routes({"/only": a})
        r = await http.get("/x")
        assert r.status_code == 404 and r.text == "404 Not Found: no route\n"
        assert (await http.get("/only/z")).json()["path"] == "/z"


@BOTH_BACKENDS
async def test_keep_alive_chunked_and_large_bodies_stream_both_ways(servers):
    a, _ = servers
    async with gateway(routes={"/": a}) as gw, client(gw) as http:
        for _ in range(3):  # one client connection, several requests
            assert (await http.get("/k")).status_code == 200
        r = await http.get("/chunked/500")
        assert r.text == "".join(f"piece-{i}\n" for i in range(500))
        size = 8 << 20
        async with http.stream("GET", f"/bytes/{size}") as resp:
            assert resp.headers["content-length"] == str(size)
            digest, total = hashlib.sha256(), 0
            async for chunk in resp.aiter_raw():
                digest.update(chunk)
                total += len(chunk)
        assert total == size and digest.hexdigest() == hashlib.sha256(pattern_bytes(size)).hexdigest()

        payload = bytes(range(256)) * (6 << 12)  # 6 MiB

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(payload), 1 << 20):
                yield payload[i:i + (1 << 20)]

        expected = {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        assert (await http.post("/upload", content=pieces())).json() == expected  # chunked
        assert (await http.post("/upload", content=payload)).json() == expected  # content-length


async def test_websocket_upgrade_relays_both_ways(servers):
    a, _ = servers
    async with gateway(routes={"/": a}) as gw:
        url = gw.url.replace("http://", "ws://") + "ws"
        async with websockets.asyncio.client.connect(url, max_size=None, compression=None) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            blob = bytes(range(256)) * 400
            await ws.send(blob)
            assert await ws.recv() == blob
            await ws.ping()


async def test_hooks_deny_and_edit_headers(servers):
    a, _ = servers
    seen: list[Any] = []

    def on_request(request, ctx):
        seen.append(ctx)
        if request.path.startswith("/admin"):
            return deny(403, "admin is off limits")
        if request.path.startswith("/teapot"):
            return deny(418, "short and stout")
        return request.with_header("x-user", "alice").with_header("x-forwarded-for", "10.9.9.9")

    async def on_response(response, request, ctx):
        return response.with_header("x-served-by", "gondolin")

    async with gateway(routes={"/": a}, hooks=IngressHooks(on_request, on_response)) as gw, client(gw) as http:
        r = await http.get("/admin/x")
        assert (r.status_code, r.text) == (403, "403 Forbidden: admin is off limits\n")
        assert (await http.get("/teapot")).status_code == 418
        r = await http.get("/ok")
        headers = dict(r.json()["headers"])
        assert headers["x-user"] == "alice" and headers["x-forwarded-for"] == "10.9.9.9"
        assert r.headers["x-served-by"] == "gondolin"
    assert seen[0].client == "127.0.0.1" and seen[0].route == Route("/", a)
    assert [e.reason for e in gw.events()][:2] == ["answered by on_request"] * 2


@BOTH_BACKENDS
async def test_a_dead_upstream_is_a_plain_502_without_detail():
    dead = free_port()
    async with gateway(routes={"/": dead}) as gw, client(gw) as http:
        r = await http.get("/x")
        assert r.status_code == 502
        assert r.text == "502 Bad Gateway: bad gateway\n"
        assert str(dead) not in r.text
        # the failure is in the host's events, not in what the client saw
        assert gw.events()[-1].reason.startswith("upstream failed")

    async def broken(port: int) -> Any:
        raise RuntimeError("secret internal detail")

    async with gateway(routes={"/": 1}, connector=broken) as gw, client(gw) as http:
        r = await http.get("/x")
        assert r.status_code == 502 and "secret" not in r.text


async def test_listeners_file_reload_keeps_the_last_good_table(servers):
    a, b = servers
    holder: dict[str, Any] = {"data": f"/ :{a}\n".encode()}

    async def source() -> bytes | None:
        if isinstance(holder["data"], Exception):
            raise holder["data"]
        return holder["data"]

    events: list[Any] = []
    limits = IngressLimits(listeners_interval=0.05)
    async with gateway(listeners=source, limits=limits, hooks=IngressHooks(on_event=events.append),
                       routes={"/host": b}) as gw, client(gw) as http:
        assert (await http.get("/x")).json()["port"] == a
        assert (await http.get("/host")).json()["port"] == b
        holder["data"] = f"/ :{b}\n/bad :99999\n".encode()
        await wait_for(lambda: any(e.kind == "reload_error" for e in events))
        assert (await http.get("/x")).json()["port"] == a  # the last good table stays
        error = next(e for e in events if e.kind == "reload_error")
        assert "line 2" in error.reason
        holder["data"] = f"/ :{b}\n/a :{a} strip_prefix=false\n".encode()
        await wait_for(lambda: gw.routes.match("/x") == Route("/", b))
        assert (await http.get("/a/q")).json()["path"] == "/a/q"
        holder["data"] = ListenersError(f"larger than {MAX_LISTENERS_BYTES} bytes")
        await wait_for(lambda: sum(e.kind == "reload_error" for e in events) == 2)
        holder["data"] = None  # the file is gone: no file routes, host routes stay
        await wait_for(lambda: gw.routes.match("/x") is None)
        assert (await http.get("/host")).json()["port"] == b


async def test_listens_on_loopback_unless_asked():
    gw = IngressGateway(tcp_connect)
    for address in ("0.0.0.0", "192.168.1.10", "::"):
        with pytest.raises(GondolinError, match="allow_remote=True") as info:
            await gw.listen(address)
        assert info.value.code == "remote_listen"


async def test_connections_and_header_sizes_are_bounded(servers):
    a, _ = servers
    async with gateway(routes={"/": a}, limits=IngressLimits(max_connections=1)) as gw:
        first = await anyio.connect_tcp("127.0.0.1", gw.port)
        await wait_for(lambda: gw.active_connections == 1)
        async with client(gw) as http:
            r = await http.get("/x")
            assert r.status_code == 503
        await first.aclose()
        await wait_for(lambda: gw.active_connections == 0)
        async with client(gw) as http:
            assert (await http.get("/x")).status_code == 200
            r = await http.get("/x", headers={"x-big": "a" * (100 << 10)})
            assert r.status_code == 431


@BOTH_BACKENDS
async def test_under_load_200_requests_20_at_a_time(servers):
    a, b = servers
    async with gateway(routes=[Route("/", a), Route("/b", b)]) as gw, client(gw) as http:
        results: dict[int, Any] = {}
        limiter = anyio.CapacityLimiter(20)

        async def one(i: int) -> None:
            async with limiter:
                path = f"/b/item/{i}" if i % 2 else f"/item/{i}"
                r = await http.get(path)
                results[i] = (r.status_code, r.json()["path"], r.json()["port"])

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        assert results == {i: (200, f"/item/{i}", b if i % 2 else a) for i in range(200)}


async def wait_for(predicate: Any, timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 (polls state the gateway owns)
            await anyio.sleep(0.02)


async def test_guest_connections_are_reused_and_a_stale_one_is_retried(servers):
    a, _ = servers
    opened: list[int] = []

    async def counting(port: int) -> Any:
        opened.append(port)
        return await anyio.connect_tcp("127.0.0.1", port)

    async with gateway(routes={"/": a}, connector=counting) as gw, client(gw) as http:
        for i in range(10):
            assert (await http.get(f"/n/{i}")).json()["path"] == f"/n/{i}"
        assert (await http.head("/n/h")).status_code == 200
        assert len(opened) == 1  # one guest connection carried all of them

    async def one_shot(stream: Any) -> None:
        # answers one request, then closes without saying so (an idle timeout on the server side)
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    opened.clear()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, one_shot)
        async with gateway(routes={"/": port}, connector=counting) as gw, client(gw) as http:
            for _ in range(3):
                r = await http.get("/x")
                assert (r.status_code, r.text) == (200, "ok")
        assert len(opened) == 3  # each reuse found the connection closed and retried on a new one
        tg.cancel_scope.cancel()


async def test_a_guest_response_head_over_the_limit_is_a_502():
    async def huge_head(stream: Any) -> None:
        async with stream:
            await stream.receive()
            await stream.send(b"HTTP/1.1 200 OK\r\nx-junk: " + b"a" * (200 << 10) + b"\r\n\r\n")

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, huge_head)
        async with gateway(routes={"/": port}) as gw, client(gw) as http:
            r = await http.get("/x")
            assert (r.status_code, r.text) == (502, "502 Bad Gateway: bad gateway\n")
        tg.cancel_scope.cancel()
