"""The ingress gateway (vm.expose_http) against real HTTP and WebSocket servers in the guest."""

import hashlib

import anyio
import httpx
import pytest
import websockets.asyncio.client

from gondolin import VM
from gondolin.ingress import IngressHooks, IngressLimits, Route, deny
from integrations import OperatorConfig, SandboxManager, ToolRegistry

from ..unit.ingress.servers import SERVER_SCRIPT, pattern_bytes

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

A, B = 8081, 8082  # two instances of the test server in the guest


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"  # the websockets client is asyncio-only


@pytest.fixture(scope="module")
async def vm(vm):
    await vm.fs.write("/tmp/ingress_server.py", SERVER_SCRIPT)
    for port in (A, B):
        cmd = (f"nohup python3 /tmp/ingress_server.py {port} >/tmp/srv{port}.log 2>&1 & "
               f"for i in $(seq 300); do grep -q ready /tmp/srv{port}.log 2>/dev/null && exit 0; sleep 0.1; done; "
               f"cat /tmp/srv{port}.log; exit 1")
        r = await vm.exec(cmd, timeout=90)
        assert r.ok, r.stdout + r.stderr
    yield vm


def client(gw):
    return httpx.AsyncClient(base_url=gw.url, timeout=120, trust_env=False)


async def test_http_keep_alive_streaming_and_forwarded_headers(vm):
    gw = await vm.expose_http(A, listeners_file=False)
    try:
        assert gw.url.startswith("http://127.0.0.1:")
        async with client(gw) as http:
            r = await http.get("/hi?x=1", headers={"X-Forwarded-For": "6.6.6.6"})
            body = r.json()
            headers = dict(body["headers"])
            assert (r.status_code, body["port"], body["path"]) == (200, A, "/hi?x=1")
            assert headers["x-forwarded-for"] == "127.0.0.1"
            assert headers["x-forwarded-proto"] == "http"
            assert headers["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
            assert (await http.get("/chunked/300")).text == "".join(f"piece-{i}\n" for i in range(300))
            size = 8 << 20
            r = await http.get(f"/bytes/{size}")
            assert len(r.content) == size and r.content == pattern_bytes(size)
            payload = hashlib.sha256(b"x").digest() * (4 << 15)  # 4 MiB

            async def pieces():
                for i in range(0, len(payload), 256 << 10):
                    yield payload[i:i + (256 << 10)]

            r = await http.post("/upload", content=pieces())
            assert r.json() == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    finally:
        await gw.close()
    with pytest.raises(OSError):
        await anyio.connect_tcp("127.0.0.1", gw.port)


async def test_websocket_echo_through_the_gateway(vm):
    gw = await vm.expose_http(routes={"/app": A}, listeners_file=False)
    try:
        url = gw.url.replace("http://", "ws://") + "app/ws"
        async with websockets.asyncio.client.connect(url, max_size=None, compression=None,
                                                     open_timeout=60) as ws:
            await ws.send("hello guest")
            assert await ws.recv() == "hello guest"
            blob = bytes(range(256)) * 1024
            await ws.send(blob)
            assert await ws.recv() == blob
    finally:
        await gw.close()


async def test_routes_hooks_and_a_dead_upstream(vm):
    def on_request(request, ctx):
        if request.path.startswith("/private"):
            return deny(403, "not for you")
        return request.with_header("x-user", "alice")

    def on_response(response, request, ctx):
        return response.with_header("x-via", "gondolin-ingress")

    routes = [Route("/", A), Route("/b", B), Route("/dead", 8099)]
    gw = await vm.expose_http(routes=routes, hooks=IngressHooks(on_request, on_response), listeners_file=False)
    try:
        async with client(gw) as http:
            r = await http.get("/b/thing")
            assert (r.json()["port"], r.json()["path"]) == (B, "/thing")
            assert dict(r.json()["headers"])["x-user"] == "alice" and r.headers["x-via"] == "gondolin-ingress"
            r = await http.get("/private/x")
            assert (r.status_code, r.text) == (403, "403 Forbidden: not for you\n")
            r = await http.get("/dead/x")
            assert (r.status_code, r.text) == (502, "502 Bad Gateway: bad gateway\n")
            gw.set_routes({"/only": A})
            assert (await http.get("/b/thing")).status_code == 404
    finally:
        await gw.close()


async def test_listeners_file_reload_keeps_the_last_good_table(vm):
    await vm.exec("mkdir -p /etc/gondolin && rm -f /etc/gondolin/listeners")
    gw = await vm.expose_http(limits=IngressLimits(listeners_interval=0.2))
    try:
        async with client(gw) as http:
            assert (await http.get("/x")).status_code == 404
            await vm.fs.write("/etc/gondolin/listeners", f"/ :{A}\n/api :{B}\n")
            await wait_for(lambda: len(gw.routes) == 2)
            assert (await http.get("/api/v1")).json()["path"] == "/v1"
            r = await vm.exec(f"printf '/ :{B}\\n/api :nope\\n' > /etc/gondolin/listeners")
            assert r.ok
            await wait_for(lambda: any(e.kind == "reload_error" for e in gw.events()))
            assert "line 2" in next(e.reason for e in gw.events() if e.kind == "reload_error")
            assert (await http.get("/x")).json()["port"] == A  # the last good table
            await vm.fs.write("/etc/gondolin/listeners", f"/ :{B}\n")
            await wait_for(lambda: gw.routes.match("/x") == Route("/", B))
            assert (await http.get("/x")).json()["port"] == B
    finally:
        await gw.close()
        await vm.exec("rm -f /etc/gondolin/listeners")


async def test_200_requests_20_at_a_time(vm):
    gw = await vm.expose_http(routes=[Route("/", A), Route("/b", B)], listeners_file=False)
    try:
        results = {}
        limiter = anyio.CapacityLimiter(20)
        async with client(gw) as http:

            async def one(i):
                async with limiter:
                    r = await http.get(f"/b/n/{i}" if i % 2 else f"/n/{i}")
                    results[i] = (r.status_code, r.json()["port"], r.json()["path"])

            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(one, i)
        assert results == {i: (200, B if i % 2 else A, f"/n/{i}") for i in range(200)}
    finally:
        await gw.close()


async def test_the_gateway_closes_with_its_vm(no_leaks):
    async with await VM.create(memory="256M") as other:
        gw = await other.expose_http(9000, listeners_file=False)
        async with client(gw) as http:
            assert (await http.get("/")).status_code == 502  # nothing listens on 9000
    with pytest.raises(OSError):
        await anyio.connect_tcp("127.0.0.1", gw.port)


async def test_expose_port_tool_returns_a_working_url_closed_with_the_sandbox(no_leaks):
    async with SandboxManager(OperatorConfig(), reap=False) as manager:
        tools = ToolRegistry(manager)
        created = await tools.call("sandbox_create", {})
        sandbox_id = created.data()["sandbox_id"]
        early = await tools.call("expose_port", {"sandbox_id": sandbox_id, "port": 8000})
        assert not early.is_error and early.data()["listening"] is False
        await tools.call("exec", {"sandbox_id": sandbox_id, "command":
                                  "mkdir -p /tmp/site && echo hello from the sandbox > /tmp/site/index.html && "
                                  "cd /tmp/site && (python3 -m http.server 8000 >/dev/null 2>&1 &)"})
        outcome = await tools.call("expose_port", {"sandbox_id": sandbox_id, "port": 8000})
        data = outcome.data()
        assert data["url"] == early.data()["url"] and data["url"] in outcome.text
        async with httpx.AsyncClient(timeout=120, trust_env=False) as http:
            await wait_for_status(http, data["url"], 200)
            assert (await http.get(data["url"] + "index.html")).text == "hello from the sandbox\n"
        await tools.call("sandbox_destroy", {"sandbox_id": sandbox_id})
        port = int(data["url"].rsplit(":", 1)[1].strip("/"))
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", port)


async def wait_for_status(http, url, status, timeout=60):
    with anyio.fail_after(timeout):
        while (await http.get(url)).status_code != status:  # noqa: ASYNC110 (waits for the guest server)
            await anyio.sleep(0.2)


async def wait_for(predicate, timeout=60):
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 (polls state the gateway owns)
            await anyio.sleep(0.05)
