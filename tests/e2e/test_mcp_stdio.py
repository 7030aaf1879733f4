"""The MCP server as MCP clients run it: a subprocess speaking stdio, driving a real VM."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

pytestmark = [pytest.mark.anyio, pytest.mark.vm]
GONDOLIN = str(Path(sys.executable).parent / "gondolin")
LAUNCH = ("import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); "
          "from mcp_server.__main__ import main; main(sys.argv[2:])")


def children(pid):
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def run_dirs_of(pid):
    out = []
    for d in Path(tempfile.gettempdir()).glob("gondolin-vm-*"):
        try:
            if (d / "owner.pid").read_text().strip() == str(pid):
                out.append(d)
        except OSError:
            pass
    return out


async def wait_gone(pids, timeout=30):
    with anyio.fail_after(timeout):
        while any(alive(p) for p in pids):  # noqa: ASYNC110 - polling other processes
            await anyio.sleep(0.1)


def server(tmp_path, *flags):
    pidfile = tmp_path / "server.pid"
    params = StdioServerParameters(command=sys.executable, args=["-c", LAUNCH, str(pidfile), *flags],
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=str(Path(__file__).parents[2]))
    return params, pidfile


async def test_stdio_session_drives_a_sandbox_and_leaves_nothing_behind(tmp_path):
    params, pidfile = server(tmp_path, "--max-sandboxes", "1")
    async with Client(params, mode="legacy") as client:
        tools = [t.name for t in (await client.list_tools()).tools]
        assert "exec" in tools and "sandbox_create" in tools
        created = await client.call_tool("sandbox_create", {"name": "stdio"})
        assert created.is_error is False, created.content[0].text
        sid = created.structured_content["sandbox_id"]
        second = await client.call_tool("sandbox_create", {})
        assert second.is_error and "sandbox_limit" in second.content[0].text
        await client.call_tool("write_file", {"sandbox_id": sid, "path": "/workspace/in.txt", "content": "stdio\n"})
        ran = await client.call_tool("exec", {"sandbox_id": sid, "command": "tr a-z A-Z < /workspace/in.txt"})
        assert ran.structured_content["stdout"] == "STDIO\n"
        pid = int(pidfile.read_text())
        qemus = children(pid)
        assert qemus, "the sandbox VM should be a child of the server"
    # The client closed stdin: the server's lifespan closes the sandbox, then the server exits.
    await wait_gone([pid, *qemus])
    assert run_dirs_of(pid) == []


async def test_sigterm_closes_every_sandbox(tmp_path):
    params, pidfile = server(tmp_path)
    client = Client(params, mode="legacy")
    async with client:
        created = await client.call_tool("sandbox_create", {})
        assert created.is_error is False, created.content[0].text
        pid = int(pidfile.read_text())
        qemus = children(pid)
        os.kill(pid, signal.SIGTERM)
        await wait_gone([pid, *qemus])
    assert run_dirs_of(pid) == []


def test_gondolin_mcp_entry_points():
    p = subprocess.run([GONDOLIN, "mcp", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--transport" in p.stdout and "gondolin mcp" in p.stdout
    p = subprocess.run([sys.executable, "-m", "mcp_server", "--network-profile", "broken"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "NAME=HOST" in p.stderr


def test_streamable_http_server_process(tmp_path):
    """`gondolin-mcp --transport streamable-http` serves /mcp on loopback; tools/list works over HTTP."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "stdio-test-token-" + "y" * 20
    proc = subprocess.Popen([sys.executable, "-m", "mcp_server", "--transport", "streamable-http", "--port",
                             str(port), "--stateless"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "GONDOLIN_MCP_TOKEN": token})
    try:
        async def main():
            deadline = time.monotonic() + 30
            while True:
                try:
                    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
                    async with Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http)) as c:
                        return [t.name for t in (await c.list_tools()).tools]
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await anyio.sleep(0.3)

        names = anyio.run(main)
        assert "exec" in names
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert json.dumps(names)
