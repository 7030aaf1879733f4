"""The MCP server over real streamable HTTP on loopback, driven by real `mcp` clients.

Without the `vm` marker: ownership, quotas, authentication, session ends and the protocol fixes,
over fake VMs (tests/unit/integrations/fakes.py) served by uvicorn in this process. With it: a
`gondolin-mcp` process and real sandboxes, for what needs a guest (a client that vanishes
mid-exec has its guest command killed; read_file's cap).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx2
import pytest
import uvicorn
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPDeprecationWarning

from integrations import OperatorConfig, SandboxManager
from integrations.config import ConfigError, HttpSettings, Limits
from mcp_server import build_server
from mcp_server.http import check_binding, http_app, resolve_token
from tests.unit.integrations.fakes import FakeBackend

pytestmark = pytest.mark.anyio
TOKEN = "test-token-" + "x" * 24
ROOT = Path(__file__).parents[2]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def serving(manager, *, token=TOKEN, stateless=False):
    """The server of `gondolin mcp --transport streamable-http`, on a free loopback port."""
    server = build_server(manager=manager)
    gate = http_app(server, manager, token=token, stateless=stateless)
    port = free_port()
    userver = uvicorn.Server(uvicorn.Config(gate, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    async with gate.running(), anyio.create_task_group() as tg:
        tg.start_soon(userver.serve)
        with anyio.fail_after(30):
            while not userver.started:  # noqa: ASYNC110 - uvicorn exposes a flag only
                await anyio.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}/mcp", gate
        finally:
            userver.should_exit = True


def client(url, *, token=TOKEN, mode="legacy", terminate_on_close=True):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(60, read=300))
    return Client(streamable_http_client(url, http_client=http, terminate_on_close=terminate_on_close),
                  mode=mode)


def fake_manager(backend=None, **http):
    limits = Limits(max_sandboxes=3, max_sandboxes_per_session=2, max_checkpoints_per_session=1)
    config = OperatorConfig(limits=limits, http=HttpSettings(**http))
    return SandboxManager(config, backend=backend or FakeBackend(), reap=False)


def text(result):
    return result.content[0].text


async def wait_until(predicate, timeout=30):
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - polling the server's state
            await anyio.sleep(0.05)


async def test_a_session_sees_and_touches_only_its_own_sandboxes():
    async with fake_manager() as manager, serving(manager) as (url, gate):
        async with client(url) as a, client(url, mode="auto") as b:  # auto falls back to a session
            assert len(gate.sessions) == 2
            made = await a.call_tool("sandbox_create", {"name": "mine"})
            assert made.is_error is False, text(made)
            sid = made.structured_content["sandbox_id"]
            checkpoint = await a.call_tool("checkpoint_create", {"sandbox_id": sid})
            assert checkpoint.is_error is False, text(checkpoint)
            cid = checkpoint.structured_content["checkpoint_id"]
            second = await a.call_tool("checkpoint_create", {"sandbox_id": sid})
            assert second.is_error and "at most 1 checkpoints per session" in text(second)

            assert (await b.call_tool("sandbox_list", {})).structured_content["sandboxes"] == []
            assert (await b.call_tool("checkpoint_list", {})).structured_content["checkpoints"] == []
            for name, arguments in [("exec", {"sandbox_id": sid, "command": "id"}),
                                    ("read_file", {"sandbox_id": sid, "path": "/etc/hostname"}),
                                    ("write_file", {"sandbox_id": sid, "path": "/tmp/x", "content": "x"}),
                                    ("checkpoint_create", {"sandbox_id": sid}),
                                    ("network_events", {"sandbox_id": sid})]:
                refused = await b.call_tool(name, arguments)
                assert refused.is_error and text(refused).startswith("error [sandbox_not_found]"), name
                assert sid not in text(refused).split("live sandboxes:")[-1], "another session's id leaked"
            restored = await b.call_tool("checkpoint_restore", {"checkpoint_id": cid})
            assert restored.is_error and "checkpoint_not_found" in text(restored)
            with pytest.raises(MCPError):
                await b.read_resource(f"sandbox://{sid}/info")
            gone = await b.call_tool("sandbox_destroy", {"sandbox_id": sid})
            assert gone.structured_content["destroyed"] is False

            mine = (await a.call_tool("sandbox_list", {})).structured_content["sandboxes"]
            assert [s["sandbox_id"] for s in mine] == [sid]
            assert json.loads((await a.read_resource(f"sandbox://{sid}/info")).contents[0].text)["name"] == "mine"

            # Quotas: two per session, three in all.
            assert (await a.call_tool("sandbox_create", {})).is_error is False
            over = await a.call_tool("sandbox_create", {})
            assert over.is_error and "at most 2 live sandboxes per session" in text(over)
            assert (await b.call_tool("sandbox_create", {})).is_error is False
            full = await b.call_tool("sandbox_create", {})
            assert full.is_error and "at most 3 live sandboxes" in text(full)


async def test_sharing_is_an_operator_choice():
    async with fake_manager(share_sandboxes=True) as manager, serving(manager) as (url, _gate):
        async with client(url) as a, client(url) as b:
            sid = (await a.call_tool("sandbox_create", {})).structured_content["sandbox_id"]
            listed = (await b.call_tool("sandbox_list", {})).structured_content["sandboxes"]
            assert [s["sandbox_id"] for s in listed] == [sid]
            assert (await b.call_tool("sandbox_destroy", {"sandbox_id": sid})).structured_content["destroyed"]


async def test_a_session_that_ends_closes_its_sandboxes():
    backend = FakeBackend()
    async with fake_manager(backend, session_grace_s=1) as manager, serving(manager) as (url, gate):
        async with client(url) as a:  # leaves with DELETE
            await a.call_tool("sandbox_create", {})
        await wait_until(lambda: backend.booted[0].closed == 1)

        sessions_before = set(gate.sessions)
        async with client(url, terminate_on_close=False) as b:  # vanishes: no DELETE
            await b.call_tool("sandbox_create", {})
            await b.call_tool("checkpoint_create", {"sandbox_id": manager.sandboxes()[0].id})
            session = (set(gate.sessions) - sessions_before).pop()
        assert backend.booted[1].closed == 0  # the grace for a reconnect
        await wait_until(lambda: backend.booted[1].closed == 1)
        assert manager.sandboxes() == [] and manager.list_checkpoints() == []
        async with httpx2.AsyncClient() as http:  # the ended session is gone for good
            r = await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                headers={"Authorization": f"Bearer {TOKEN}", "Mcp-Session-Id": session,
                                         "Accept": "application/json, text/event-stream",
                                         "MCP-Protocol-Version": "2025-11-25"})
            assert r.status_code == 404


async def test_every_request_needs_the_token():
    async with fake_manager() as manager, serving(manager) as (url, _gate):
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "1"}}}
        accept = {"Accept": "application/json, text/event-stream"}
        async with httpx2.AsyncClient() as http:
            for auth in [None, "Bearer wrong-token-xxxxxxxxxxxxxxxxx", f"Basic {TOKEN}", f"Bearer {TOKEN}x"]:
                headers = accept if auth is None else {**accept, "Authorization": auth}
                r = await http.post(url, json=init, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
                assert TOKEN not in r.text
            r = await http.get(url, headers=accept)
            assert r.status_code == 401
            r = await http.post(url, json=init, headers={**accept, "Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200 and r.headers["mcp-session-id"]
        with pytest.raises(Exception):  # noqa: B017 - the client reports 401 its own way
            async with client(url, token=None) as c:
                await c.list_tools()
        async with client(url) as c:
            assert (await c.call_tool("sandbox_list", {})).is_error is False


def test_token_sources_and_binding_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("GONDOLIN_MCP_TOKEN", raising=False)
    generated, fresh = resolve_token(HttpSettings())
    assert fresh and len(generated) >= 32
    assert resolve_token(HttpSettings(), {"GONDOLIN_MCP_TOKEN": TOKEN}) == (TOKEN, False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert resolve_token(HttpSettings(token_file=str(token_file))) == (TOKEN, False)
    with pytest.raises(ConfigError, match="at least 16"):
        resolve_token(HttpSettings(), {"GONDOLIN_MCP_TOKEN": "short"})
    assert resolve_token(HttpSettings(auth=False), {"GONDOLIN_MCP_TOKEN": TOKEN}) == (None, False)
    check_binding("127.0.0.1", None)
    check_binding("::1", None)
    check_binding("0.0.0.0", TOKEN)
    with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0 without authentication"):
        check_binding("0.0.0.0", None)
    p = subprocess.run([sys.executable, "-m", "mcp_server", "--transport", "streamable-http", "--host", "0.0.0.0",
                        "--no-auth"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and "refusing to listen on 0.0.0.0 without authentication" in p.stderr


def test_a_generated_token_is_printed_once_and_required():
    env = {k: v for k, v in os.environ.items() if k != "GONDOLIN_MCP_TOKEN"}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mcp_server", "--transport", "streamable-http", "--port",
                             str(port), "--log-level", "DEBUG"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        token = first.split("Bearer ")[1].split("'")[0]
        url = f"http://127.0.0.1:{port}/mcp"

        async def main():
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with client(url, token=token) as c:
                        listed = await c.call_tool("sandbox_list", {})
                        # SIGTERM while a client holds its GET stream open: the server still stops.
                        proc.send_signal(signal.SIGTERM)
                        with anyio.fail_after(30):
                            while proc.poll() is None:  # noqa: ASYNC110 - polling another process
                                await anyio.sleep(0.1)
                        return listed
                except Exception:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    await anyio.sleep(0.3)

        assert anyio.run(main).is_error is False
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    assert token not in rest, "the token must not reach the log"


async def test_protocol_errors_are_proper_replies():
    async with fake_manager() as manager, serving(manager) as (url, _gate):
        messages = []

        async def on_log(params):
            messages.append(params)

        async with Client(streamable_http_client(url, http_client=httpx2.AsyncClient(
                headers={"Authorization": f"Bearer {TOKEN}"})), mode="legacy", logging_callback=on_log) as c:
            with pytest.raises(MCPError) as caught:
                await c.get_prompt("nope")
            assert caught.value.error.code == -32602
            assert c.server_capabilities.logging is not None
            bad = await c.call_tool("exec", {"sandbox_id": 3, "bogus": True})
            assert bad.is_error
            assert text(bad).startswith("error [invalid_argument]: invalid arguments for exec: sandbox_id:")
            assert "\nhint: " in text(bad) and "exec_arguments" not in text(bad) and "pydantic" not in text(bad)
            await c.call_tool("sandbox_list", {})
            assert messages == []  # nothing is sent before the client sets a level
            with warnings.catch_warnings():  # logging is deprecated in the 2026 era, still served for 2025 clients
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                await c.set_logging_level("warning")
            await c.call_tool("sandbox_list", {})
            await c.call_tool("exec", {"sandbox_id": "sb_nope", "command": "id"})
            assert [m.level for m in messages] == ["warning"] and "sandbox_not_found" in messages[0].data


def test_malformed_json_on_stdio_gets_a_parse_error():
    lines = [{"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t",
                                                                                            "version": "1"}}}]
    stdin = json.dumps(lines[0]) + "\n{not json\n" + json.dumps({"jsonrpc": "2.0", "x": 1}) + "\n"
    p = subprocess.run([sys.executable, "-m", "mcp_server"], input=stdin, capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    replies = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r for r in replies if r["id"] == 1 and "result" in r]  # the errors may come before it
    errors = [r for r in replies if r["id"] is None]
    assert errors[0] == {"jsonrpc": "2.0", "id": None,
                         "error": {"code": -32700, "message": "Parse error: the line is not valid JSON"}}
    assert errors[1]["error"]["code"] == -32600 and len(replies) == 3


# -- with real sandboxes ---------------------------------------------------------------------------
LAUNCH = ("import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); "
          "from mcp_server.__main__ import main; main(sys.argv[2:])")


@asynccontextmanager
async def server_process(tmp_path, *flags):
    """`gondolin-mcp --transport streamable-http` as a process; yields (url, pid)."""
    port = free_port()
    pidfile = tmp_path / f"server-{port}.pid"
    proc = await anyio.open_process([sys.executable, "-c", LAUNCH, str(pidfile), "--transport", "streamable-http",
                                     "--port", str(port), *flags], cwd=ROOT,
                                    env={**os.environ, "GONDOLIN_MCP_TOKEN": TOKEN}, stdout=None, stderr=None)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        with anyio.fail_after(60):
            while True:
                try:
                    async with httpx2.AsyncClient() as http:
                        await http.get(url)
                    break
                except httpx2.TransportError:
                    await anyio.sleep(0.2)
        yield url, int(pidfile.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(60):
            await proc.wait()


async def rpc(url, session, method, params, *, id=1):
    """One JSON-RPC request in an existing session, as a client reconnecting would send it."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2025-11-25"}
    if session:
        headers["Mcp-Session-Id"] = session
    async with httpx2.AsyncClient(timeout=120) as http:
        r = await http.post(url, headers=headers, json={"jsonrpc": "2.0", "id": id, "method": method,
                                                          "params": params})
    if r.status_code >= 400:
        return {"status": r.status_code}
    if r.headers["content-type"].startswith("application/json"):
        return r.json()
    for line in r.text.splitlines():
        if line.startswith("data:") and '"id"' in line:
            return json.loads(line[5:])
    raise AssertionError(f"no response in {r.text!r}")


async def guest_running(url, session, sandbox_id, pattern):
    """Whether a process matching `pattern` runs in the sandbox (asked in `session`)."""
    reply = await rpc(url, session, "tools/call", {"name": "exec", "arguments": {
        "sandbox_id": sandbox_id, "command": f"pgrep -f '{pattern}' >/dev/null && echo yes || echo no"}})
    return reply["result"]["structuredContent"]["stdout"].strip() == "yes"


def children(pid):
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.vm
async def test_a_client_gone_mid_exec_kills_the_command_and_its_session_closes_the_sandbox(tmp_path):
    # --pool-size 0: every QEMU child of the server is then a sandbox's (a spare outlives the session)
    async with server_process(tmp_path, "--session-grace", "8", "--pool-size", "0", "--log-level", "INFO") as (
            url, pid):
        sessions = []

        async def remember(response):
            if "mcp-session-id" in response.headers and not sessions:
                sessions.append(response.headers["mcp-session-id"])

        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=httpx2.Timeout(60, read=600),
                                  event_hooks={"response": [remember]})
        a = Client(streamable_http_client(url, http_client=http, terminate_on_close=False), mode="legacy")
        async with anyio.create_task_group() as tg:
            async def first_client():
                async with a:
                    made = await a.call_tool("sandbox_create", {})
                    assert made.is_error is False, text(made)
                    sid = made.structured_content["sandbox_id"]
                    # read_file's cap: ~32 KB of a 100 KB file, then on from next_offset.
                    body = "".join(f"line {i:05d} " + "x" * 90 + "\n" for i in range(1000))
                    await a.call_tool("write_file", {"sandbox_id": sid, "path": "/workspace/big.txt", "content": body})
                    part = await a.call_tool("read_file", {"sandbox_id": sid, "path": "/workspace/big.txt"})
                    s = part.structured_content
                    assert s["truncated"] and len(s["content"]) <= 32 * 1024 and s["content"].endswith("\n")
                    assert text(part).endswith(f"[truncated: the file continues; continue with "
                                               f"offset={s['next_offset']}]")
                    rest = await a.call_tool("read_file", {"sandbox_id": sid, "path": "/workspace/big.txt",
                                                           "offset": s["next_offset"], "limit": 3})
                    assert rest.structured_content["content"].startswith(f"line {s['next_offset'] - 1:05d} ")
                    async with client(url) as b:  # another session sees none of it
                        assert (await b.call_tool("sandbox_list", {})).structured_content["sandboxes"] == []
                    ran.append(sid)
                    await a.call_tool("exec", {"sandbox_id": sid, "command": "exec sleep 777", "yield_s": 500})

            ran = []
            tg.start_soon(first_client)
            with anyio.fail_after(120):
                while not ran or not await guest_running(url, sessions[0], ran[0], "sleep 77[7]"):  # noqa: ASYNC110
                    await anyio.sleep(0.5)
            qemus = children(pid)
            assert qemus, "the sandbox VM should be a child of the server"
            tg.cancel_scope.cancel()  # the client vanishes mid-call: no cancellation, no DELETE
        await http.aclose()
        # Reconnecting within the grace, in the same session: the guest command is gone.
        with anyio.fail_after(60):
            while await guest_running(url, sessions[0], ran[0], "sleep 77[7]"):  # noqa: ASYNC110
                await anyio.sleep(0.5)
        # Then nothing: after the grace the session ends and its sandbox's VM with it.
        with anyio.fail_after(90):
            while any(p in children(pid) for p in qemus):  # noqa: ASYNC110 - polling other processes
                await anyio.sleep(0.5)
        assert await rpc(url, sessions[0], "tools/list", {}) == {"status": 404}  # the session ended


@pytest.mark.vm
async def test_stateless_http_cancellation_kills_the_command(tmp_path):
    async with server_process(tmp_path, "--stateless", "--log-level", "INFO") as (url, _pid):
        async with client(url) as c:
            made = await c.call_tool("sandbox_create", {})
            assert made.is_error is False, text(made)
            sid = made.structured_content["sandbox_id"]
            for pattern, how in [("sleep 88[8]", "timeout"), ("sleep 99[9]", "disconnect")]:
                command = "exec " + pattern.replace("[", "").replace("]", "")
                async with anyio.create_task_group() as tg:
                    async def call(how=how, command=command):
                        async with client(url) as gone:
                            if how == "timeout":  # the client gives up: notifications/cancelled
                                with pytest.raises(MCPError):
                                    await gone.call_tool("exec", {"sandbox_id": sid, "command": command,
                                                                  "yield_s": 500}, read_timeout_seconds=8)
                            else:
                                await gone.call_tool("exec", {"sandbox_id": sid, "command": command,
                                                              "yield_s": 500})

                    tg.start_soon(call)
                    with anyio.fail_after(60):
                        while not await guest_running(url, None, sid, pattern):  # noqa: ASYNC110
                            await anyio.sleep(0.3)
                    if how == "disconnect":
                        tg.cancel_scope.cancel()
                with anyio.fail_after(60):
                    while await guest_running(url, None, sid, pattern):  # noqa: ASYNC110
                        await anyio.sleep(0.5)


class FilesFS:
    """A guest file system holding a few files, for read_file without a VM."""

    def __init__(self, files):
        self.files = files

    async def stat(self, path, follow_symlinks=True):
        from gondolin import FileStat

        return FileStat(mode=0o100644, size=len(self.files[path]), uid=0, gid=0, mtime_ns=0, atime_ns=0,
                        ctime_ns=0, nlink=1, ino=1)

    async def open_read(self, path, *, offset=0, length=None):
        data = self.files[path][offset:None if length is None else offset + length]

        async def chunks():
            yield data

        return chunks()


async def test_read_file_returns_at_most_32_kb_and_where_to_go_on():
    from integrations import ToolRegistry

    lines = "".join(f"{i:04d} " + "y" * 95 + "\n" for i in range(1, 1001)).encode()  # 100 KB, 1000 lines
    long_line = b"z" * 50_000 + b"\nend\n"
    async with fake_manager() as manager:
        registry = ToolRegistry(manager)
        sid = (await registry.call("sandbox_create", {})).output.sandbox_id
        manager.get(sid).vm.fs = FilesFS({"/w/lines.txt": lines, "/w/long.txt": long_line})

        first = await registry.call("read_file", {"sandbox_id": sid, "path": "/w/lines.txt"})
        out = first.output
        assert out.truncated and out.next_offset == out.end_line + 1 and out.next_byte_offset is None
        assert len(out.content.encode()) <= 32 * 1024 and out.content.endswith("\n")
        assert first.text.endswith(f"\n[truncated: the file continues; continue with offset={out.next_offset}]")
        seen, offset = out.content, out.next_offset
        while offset is not None:
            out = (await registry.call("read_file", {"sandbox_id": sid, "path": "/w/lines.txt",
                                                     "offset": offset})).output
            seen, offset = seen + out.content, out.next_offset
        assert seen.encode() == lines and not out.truncated

        long = (await registry.call("read_file", {"sandbox_id": sid, "path": "/w/long.txt"})).output
        assert long.truncated and long.next_offset is None and long.next_byte_offset == len(long.content)
        rest = (await registry.call("read_file", {"sandbox_id": sid, "path": "/w/long.txt",
                                                  "byte_offset": long.next_byte_offset})).output
        assert long.content.encode() + rest.content.encode() == long_line and not rest.truncated

        window = (await registry.call("read_file", {"sandbox_id": sid, "path": "/w/lines.txt", "byte_offset": 0,
                                                    "encoding": "text"})).output
        assert window.bytes_returned == 32 * 1024 and window.next_byte_offset == 32 * 1024


async def test_a_sandbox_that_finishes_booting_after_its_session_ended_is_closed():
    from integrations import ToolError
    from integrations.models import SandboxCreateInput

    class SlowBackend(FakeBackend):
        def __init__(self):
            super().__init__()
            self.release = anyio.Event()

        async def create(self, options):
            await self.release.wait()
            return await super().create(options)

    backend = SlowBackend()
    async with fake_manager(backend) as manager, anyio.create_task_group() as tg:
        failures = []

        async def create():
            with manager.acting_as("session-1"):
                try:
                    await manager.create(SandboxCreateInput())
                except ToolError as exc:
                    failures.append(exc.code)

        tg.start_soon(create)
        await anyio.sleep(0.1)
        assert await manager.close_owner("session-1") == []  # nothing live yet: it is still booting
        backend.release.set()
        await wait_until(lambda: failures)
        assert failures == ["sandbox_not_found"] and backend.booted[0].closed == 1 and manager.sandboxes() == []
