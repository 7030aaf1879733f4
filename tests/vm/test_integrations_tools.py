"""The tool registry and the MCP server against real VMs.

One manager and one sandbox (created through MCP, with a network profile, a secret and a
read-only mount) are shared by the module; only the TTL test boots a second VM.
"""

import http.server
import json
import threading
import time

import anyio
import pytest
from mcp import Client, MCPError

from integrations import (
    MountRoot,
    NetworkProfile,
    OperatorConfig,
    SandboxManager,
    SecretSpec,
    ToolRegistry,
)
from integrations.config import Limits
from mcp_server import build_server

from .conftest import qemu_pids

pytestmark = [pytest.mark.anyio, pytest.mark.vm]
SECRET = "sk-live-0123456789abcdef"


class EchoHandler(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        EchoHandler.seen.append(auth)
        body = json.dumps({"authorization": auth, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def echo_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


class Clock:
    def __init__(self):
        self.offset = 0.0

    def __call__(self):
        return time.time() + self.offset


@pytest.fixture(scope="module")
def clock():
    return Clock()


@pytest.fixture(scope="module")
def mount_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("approved")
    (root / "hello.txt").write_text("hello from the host\n")
    return root


@pytest.fixture(scope="module")
async def manager(echo_port, mount_root, clock):
    cfg = OperatorConfig(
        network_profiles={"echo": NetworkProfile(allowed_hosts=("localhost",), allowed_internal_hosts=("localhost",))},
        secrets={"API_TOKEN": SecretSpec(hosts=(f"localhost:{echo_port}",), schemes=("http",))},
        mounts=(MountRoot(host_path=str(mount_root), mode="ro"),),
        limits=Limits(max_sandboxes=3, reap_interval_s=3600, max_output_bytes=4096),
    )
    before = qemu_pids()
    async with SandboxManager(cfg, environ={"API_TOKEN": SECRET}, clock=clock) as mgr:
        yield mgr
    assert qemu_pids() <= before, "the manager left QEMU processes behind"


@pytest.fixture(scope="module")
async def sandbox_id(manager, mount_root):
    async with Client(build_server(manager=manager)) as c:
        result = await c.call_tool("sandbox_create", {
            "name": "shared", "network": "echo", "secrets": ["API_TOKEN"],
            "mounts": [{"host_path": str(mount_root), "guest_path": "/mnt/data", "mode": "ro"}]})
    assert result.is_error is False, result.content[0].text
    return result.structured_content["sandbox_id"]


@pytest.fixture(params=["auto", "legacy"])
async def client(request, manager, sandbox_id):
    async with Client(build_server(manager=manager), mode=request.param) as c:
        yield c


@pytest.fixture
async def legacy(manager, sandbox_id):
    async with Client(build_server(manager=manager), mode="legacy") as c:
        yield c


async def call(c, tool, sandbox_id=None, **arguments):
    if sandbox_id is not None:
        arguments["sandbox_id"] = sandbox_id
    result = await c.call_tool(tool, arguments)
    return result, result.content[0].text


# -- create / exec ---------------------------------------------------------------------------------
async def test_sandbox_is_listed_with_its_choices(client, sandbox_id, mount_root):
    result, _ = await call(client, "sandbox_list")
    info = next(s for s in result.structured_content["sandboxes"] if s["sandbox_id"] == sandbox_id)
    assert info["status"] == "running" and info["network"] == "echo" and info["secrets"] == ["API_TOKEN"]
    assert info["mounts"] == [{"guest_path": "/mnt/data", "host_path": str(mount_root), "mode": "ro"}]
    assert SECRET not in json.dumps(result.structured_content)


async def test_exec_results_and_exit_codes(client, sandbox_id):
    result, text = await call(client, "exec", sandbox_id, command="echo out; echo err >&2; exit 3")
    assert result.is_error is False  # a failing command is a result
    s = result.structured_content
    assert (s["status"], s["exit_code"], s["stdout"], s["stderr"]) == ("exited", 3, "out\n", "err\n")
    assert "exit_code: 3" in text and "out" in text
    result, _ = await call(client, "exec", sandbox_id, command="echo $FOO:$PWD:$(id -un)", cwd="/tmp",
                           env=[{"name": "FOO", "value": "bar"}], user="agent")
    assert result.structured_content["stdout"] == "bar:/tmp:agent\n"


async def test_default_cwd_is_the_workspace(legacy, sandbox_id):
    result, _ = await call(legacy, "exec", sandbox_id, command="pwd")
    assert result.structured_content["stdout"] == "/workspace\n"


async def test_huge_output_is_cut_to_head_and_tail(legacy, sandbox_id):
    result, text = await call(legacy, "exec", sandbox_id,
                              command="echo START; head -c 2000000 /dev/zero | tr '\\0' a; echo; echo END",
                              max_output_bytes=1000)
    s = result.structured_content
    assert s["truncated"] and s["stdout_bytes"] == 2000000 + len("START\n\nEND\n")
    assert s["stdout"].startswith("START\naaa") and s["stdout"].endswith("aaa\nEND\n")
    assert len(s["stdout"]) < 1100 and s["omitted_bytes"] == s["stdout_bytes"] - 1000
    assert "bytes omitted" in text and "read_file" in text


async def test_long_commands_yield_an_exec_id_and_can_be_polled(client, sandbox_id):
    result, text = await call(client, "exec", sandbox_id,
                              command="for i in 1 2 3; do echo tick $i; sleep 0.7; done; exit 7", yield_s=0.3)
    s = result.structured_content
    assert s["status"] == "running" and s["exit_code"] is None and "exec_poll" in text
    seen = s["stdout"]
    while True:
        polled, _ = await call(client, "exec_poll", sandbox_id, exec_id=s["exec_id"], wait_s=5)
        seen += polled.structured_content["stdout"]
        if polled.structured_content["status"] != "running":
            break
    assert polled.structured_content["exit_code"] == 7
    assert seen == "tick 1\ntick 2\ntick 3\n"  # every byte exactly once across exec + polls


async def test_interactive_stdin(legacy, sandbox_id):
    program = "import sys\nfor line in sys.stdin: print('got', line.strip(), flush=True)\nprint('bye')"
    result, _ = await call(legacy, "exec", sandbox_id, command=f"python3 -u -c \"{program}\"", stdin_open=True,
                           stdin="one\n", yield_s=1)
    exec_id = result.structured_content["exec_id"]
    written, _ = await call(legacy, "exec_write", sandbox_id, exec_id=exec_id, stdin="two\n", close_stdin=True)
    assert written.structured_content["written_bytes"] == 4 and written.structured_content["stdin_closed"]
    polled, _ = await call(legacy, "exec_poll", sandbox_id, exec_id=exec_id, wait_s=10)
    out = result.structured_content["stdout"] + polled.structured_content["stdout"]
    assert out == "got one\ngot two\nbye\n" and polled.structured_content["exit_code"] == 0
    closed, text = await call(legacy, "exec_write", sandbox_id, exec_id=exec_id, stdin="more")
    assert closed.is_error and "stdin is closed" in text


async def test_kill_and_timeout(legacy, sandbox_id):
    started, _ = await call(legacy, "exec", sandbox_id, command="sleep 300", yield_s=0)
    killed, _ = await call(legacy, "exec_kill", sandbox_id, exec_id=started.structured_content["exec_id"])
    assert killed.structured_content["status"] == "killed" and killed.structured_content["signal"] == 9
    timed, _ = await call(legacy, "exec", sandbox_id, command="sleep 300", timeout_s=1)
    assert timed.structured_content["status"] == "timed_out"
    missing, text = await call(legacy, "exec_poll", sandbox_id, exec_id="ex_999")
    assert missing.is_error and "exec_not_found" in text


async def test_client_cancellation_kills_the_guest_process(client, sandbox_id, manager):
    with pytest.raises(MCPError):
        await client.call_tool("exec", {"sandbox_id": sandbox_id, "command": "sleep 333", "yield_s": 60},
                               read_timeout_seconds=1.5)
    with anyio.fail_after(15):
        while True:
            check, _ = await call(client, "exec", sandbox_id, command="pgrep -fx 'sleep 333' || echo gone")
            if check.structured_content["stdout"] == "gone\n":
                break
            await anyio.sleep(0.2)
    assert all(not s.running or "sleep 333" not in s.command for s in manager.get(sandbox_id).execs.values())


async def test_long_execs_report_progress(legacy, sandbox_id):
    updates = []

    async def on_progress(progress, total, message):
        updates.append((progress, message))

    result = await legacy.call_tool("exec", {"sandbox_id": sandbox_id, "command": "sleep 2.5; echo done"},
                                    progress_callback=on_progress)
    assert result.structured_content["stdout"] == "done\n"
    assert updates and all("running for" in message for _, message in updates)


# -- files -----------------------------------------------------------------------------------------
async def test_file_round_trip_text_and_binary(client, sandbox_id):
    text = "line 1\nline 2\nline 3\nünïcödé 4\n"
    written, _ = await call(client, "write_file", sandbox_id, path="/workspace/dir/a.txt", content=text)
    assert written.structured_content["size_bytes"] == len(text.encode())
    read, rendered = await call(client, "read_file", sandbox_id, path="/workspace/dir/a.txt")
    assert read.structured_content["content"] == text and read.structured_content["total_lines"] == 4
    assert rendered.startswith("/workspace/dir/a.txt: lines 1-4 of 4")
    part, _ = await call(client, "read_file", sandbox_id, path="/workspace/dir/a.txt", offset=2, limit=2)
    assert part.structured_content["content"] == "line 2\nline 3\n" and part.structured_content["truncated"]
    import base64
    blob = bytes(range(256)) * 4
    await call(client, "write_file", sandbox_id, path="/workspace/blob.bin",
               content=base64.b64encode(blob).decode(), encoding="base64")
    back, _ = await call(client, "read_file", sandbox_id, path="/workspace/blob.bin")
    assert back.structured_content["encoding"] == "base64"
    assert base64.b64decode(back.structured_content["content"]) == blob
    window, _ = await call(client, "read_file", sandbox_id, path="/workspace/blob.bin", byte_offset=250,
                           byte_length=10, encoding="base64")
    assert base64.b64decode(window.structured_content["content"]) == blob[250:260]
    appended, _ = await call(client, "write_file", sandbox_id, path="/workspace/dir/a.txt", content="5\n",
                             append=True)
    assert appended.structured_content["created"] is False
    script, _ = await call(client, "write_file", sandbox_id, path="/workspace/run.sh",
                           content="#!/bin/sh\necho ran\n", mode="0755")
    ran, _ = await call(client, "exec", sandbox_id, command="/workspace/run.sh")
    assert ran.structured_content["stdout"] == "ran\n"


@pytest.mark.parametrize(
    ("tool", "arguments", "code"),
    [
        ("read_file", {"path": "/workspace/nope.txt"}, "path_not_found"),
        ("read_file", {"path": "/workspace"}, "is_a_directory"),
        ("read_file", {"path": "workspace/a.txt"}, "invalid_argument"),
        ("write_file", {"path": "/mnt/data/new.txt", "content": "x"}, "permission_denied"),
        ("write_file", {"path": "/workspace/x", "content": "!!", "encoding": "base64"}, "invalid_argument"),
        ("list_files", {"path": "/nonexistent"}, "path_not_found"),
        ("edit_file", {"path": "/workspace/nope.txt", "old_string": "a", "new_string": "b"}, "path_not_found"),
    ],
)
async def test_file_errors_are_clear(legacy, sandbox_id, tool, arguments, code):
    result, text = await call(legacy, tool, sandbox_id, **arguments)
    assert result.is_error and f"error [{code}]" in text, text


async def test_edit_file(client, sandbox_id):
    await call(client, "write_file", sandbox_id, path="/workspace/e.py", content="a = 1\nb = 1\nc = 2\n")
    ok, _ = await call(client, "edit_file", sandbox_id, path="/workspace/e.py", old_string="c = 2", new_string="c = 3")
    assert ok.structured_content["replacements"] == 1
    for old, code in (("b = 2", "no_match"), ("= 1", "ambiguous_match")):
        failed, text = await call(client, "edit_file", sandbox_id, path="/workspace/e.py", old_string=old,
                                  new_string="x")
        assert failed.is_error and code in text
    every, _ = await call(client, "edit_file", sandbox_id, path="/workspace/e.py", old_string="= 1",
                          new_string="= 9", replace_all=True)
    assert every.structured_content["replacements"] == 2
    final, _ = await call(client, "read_file", sandbox_id, path="/workspace/e.py")
    assert final.structured_content["content"] == "a = 9\nb = 9\nc = 3\n"


async def test_list_files(legacy, sandbox_id):
    await call(legacy, "exec", sandbox_id, command="mkdir -p /workspace/tree/src/pkg /workspace/tree/.git && "
               "touch /workspace/tree/src/pkg/m.py /workspace/tree/src/a.py /workspace/tree/README.md "
               "/workspace/tree/.git/config /workspace/tree/src/.hidden.py")
    flat, _ = await call(legacy, "list_files", sandbox_id, path="/workspace/tree")
    assert [(e["path"], e["type"]) for e in flat.structured_content["entries"]] == [
        ("/workspace/tree/README.md", "file"), ("/workspace/tree/src", "dir")]
    assert (flat.structured_content["visited"], flat.structured_content["truncated"]) == (2, False)
    deep, _ = await call(legacy, "list_files", sandbox_id, path="/workspace/tree", recursive=True, glob="*.py")
    assert [e["path"] for e in deep.structured_content["entries"]] == [
        "/workspace/tree/src/a.py", "/workspace/tree/src/pkg/m.py"]  # breadth-first, sorted by name
    assert (deep.structured_content["visited"], deep.structured_content["truncated"]) == (5, False)
    hidden, _ = await call(legacy, "list_files", sandbox_id, path="/workspace/tree", recursive=True,
                           include_hidden=True)
    assert [e["path"] for e in hidden.structured_content["entries"]] == [
        "/workspace/tree/.git", "/workspace/tree/README.md", "/workspace/tree/src", "/workspace/tree/.git/config",
        "/workspace/tree/src/.hidden.py", "/workspace/tree/src/a.py", "/workspace/tree/src/pkg",
        "/workspace/tree/src/pkg/m.py"]
    capped, _ = await call(legacy, "list_files", sandbox_id, path="/workspace/tree", recursive=True, max_entries=2)
    assert len(capped.structured_content["entries"]) == 2 and capped.structured_content["truncated"]
    one, _ = await call(legacy, "list_files", sandbox_id, path="/workspace/tree/README.md")
    assert [e["path"] for e in one.structured_content["entries"]] == ["/workspace/tree/README.md"]
    missing, text = await call(legacy, "list_files", sandbox_id, path="/workspace/no-such-dir")
    assert missing.is_error and "path_not_found" in text
    entry = flat.structured_content["entries"][0]
    assert entry["size_bytes"] == 0 and entry["mode"] == "0644" and entry["mtime"].endswith("Z")


async def test_resource_template_reads_sandbox_files(legacy, sandbox_id):
    await call(legacy, "write_file", sandbox_id, path="/workspace/res.txt", content="via resource\n")
    result = await legacy.read_resource(f"sandbox://{sandbox_id}/files/workspace/res.txt")
    assert result.contents[0].text == "via resource\n"
    with pytest.raises(MCPError):
        await legacy.read_resource("sandbox://sb_nope/files/etc/hostname")


async def test_mounts_are_read_only_when_approved_read_only(legacy, sandbox_id):
    result, _ = await call(legacy, "exec", sandbox_id, command="cat /mnt/data/hello.txt; touch /mnt/data/new")
    assert result.structured_content["stdout"] == "hello from the host\n"
    assert result.structured_content["exit_code"] != 0
    outside, text = await call(legacy, "sandbox_create", mounts=[{"host_path": "/etc"}])
    assert outside.is_error and "not_allowed" in text


# -- secrets and network ---------------------------------------------------------------------------
async def test_secrets_are_substituted_on_the_way_out_and_redacted_on_the_way_back(client, sandbox_id, echo_port):
    env, _ = await call(client, "exec", sandbox_id, command="echo $API_TOKEN")
    assert env.structured_content["stdout"].startswith("GONDOLIN_SECRET_")
    EchoHandler.seen.clear()
    result, text = await call(client, "exec", sandbox_id, command=(
        f"curl -sS -m 10 --resolve localhost:{echo_port}:192.0.2.1 -H \"Authorization: Bearer $API_TOKEN\" "
        f"http://localhost:{echo_port}/v1/me"))
    assert EchoHandler.seen == [f"Bearer {SECRET}"]  # the upstream got the real value ...
    assert SECRET not in text and SECRET not in json.dumps(result.structured_content)  # ... the model never does
    assert "[REDACTED:API_TOKEN]" in result.structured_content["stdout"]
    blocked, _ = await call(client, "exec", sandbox_id, command="curl -sS -m 10 -o /dev/null -w '%{http_code}' "
                                                               "http://example.com/")
    assert blocked.structured_content["stdout"] == "403"
    events, _ = await call(client, "network_events", sandbox_id)
    by_host = {e["url"].split("/")[2]: e for e in events.structured_content["events"]}
    assert by_host[f"localhost:{echo_port}"]["decision"] == "allowed"
    assert by_host[f"localhost:{echo_port}"]["secrets"] == ["API_TOKEN"]
    assert by_host["example.com"]["decision"] == "blocked" and by_host["example.com"]["reason"]
    only_blocked, _ = await call(client, "network_events", sandbox_id, decision="blocked")
    assert {e["decision"] for e in only_blocked.structured_content["events"]} == {"blocked"}


async def test_secret_split_across_polls_is_never_shown(legacy, sandbox_id):
    half = len(SECRET) // 2
    command = (f"printf 'key=%s' '{SECRET[:half]}'; sleep 1.5; printf '%s done\\n' '{SECRET[half:]}'")
    first, _ = await call(legacy, "exec", sandbox_id, command=command, yield_s=0.7)
    polled, _ = await call(legacy, "exec_poll", sandbox_id, exec_id=first.structured_content["exec_id"], wait_s=10)
    shown = first.structured_content["stdout"] + polled.structured_content["stdout"]
    assert shown == "key=[REDACTED:API_TOKEN] done\n"


# -- checkpoints -----------------------------------------------------------------------------------
async def test_checkpoint_restore_and_roll_back(legacy, sandbox_id, manager):
    await call(legacy, "write_file", sandbox_id, path="/workspace/state.txt", content="before\n")
    created, text = await call(legacy, "checkpoint_create", sandbox_id, name="before")
    assert created.is_error is False, text
    checkpoint_id = created.structured_content["checkpoint_id"]
    listed, _ = await call(legacy, "checkpoint_list", sandbox_id=None)
    assert checkpoint_id in [c["checkpoint_id"] for c in listed.structured_content["checkpoints"]]
    await call(legacy, "write_file", sandbox_id, path="/workspace/state.txt", content="after\n")
    restored, text = await call(legacy, "checkpoint_restore", checkpoint_id=checkpoint_id, sandbox_id=sandbox_id)
    assert restored.is_error is False, text
    back, _ = await call(legacy, "read_file", sandbox_id, path="/workspace/state.txt")
    assert back.structured_content["content"] == "before\n"
    forked, text = await call(legacy, "sandbox_create", from_checkpoint=checkpoint_id, name="fork")
    assert forked.is_error is False, text
    fork_id = forked.structured_content["sandbox_id"]
    assert fork_id != sandbox_id and forked.structured_content["from_checkpoint"] == checkpoint_id
    same, _ = await call(legacy, "exec", fork_id, command="cat /workspace/state.txt; echo $API_TOKEN | cut -c1-16")
    assert same.structured_content["stdout"] == "before\nGONDOLIN_SECRET_\n"
    assert (await call(legacy, "sandbox_destroy", fork_id))[0].structured_content["destroyed"]


# -- lifetime --------------------------------------------------------------------------------------
async def test_idle_sandboxes_are_reaped(legacy, manager, clock):
    created, text = await call(legacy, "sandbox_create", name="short", ttl_s=10)
    assert created.is_error is False, text
    short_id = created.structured_content["sandbox_id"]
    vm = manager.get(short_id).vm
    clock.offset += 11
    try:
        assert short_id in await manager.reap_expired()
    finally:
        clock.offset -= 11
    assert not vm.running
    gone, text = await call(legacy, "exec", short_id, command="true")
    assert gone.is_error and "sandbox_not_found" in text


async def test_registry_and_mcp_share_one_manager(manager, sandbox_id):
    outcome = await ToolRegistry(manager).call("exec", {"sandbox_id": sandbox_id, "command": "echo direct"})
    assert outcome.data()["stdout"] == "direct\n" and not outcome.is_error
