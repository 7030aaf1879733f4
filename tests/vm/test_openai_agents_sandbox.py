"""The OpenAI Agents SDK sandbox client on real VMs: a ``SandboxAgent`` driven by a scripted
``Model`` runs its shell tool in a VM that has the client's secrets (placeholders) and egress
policy; the session's serialized state resumes in a second run from the checkpoint
its first run persisted (files and a background process survive); commands that outlive a
tool call (polled with write_stdin) and terminal input; the session API (read, write, exec,
timeouts, users, errors); tar persistence. Three VM boots and one resume."""

import io
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("agents")

from agents import Runner, set_tracing_disabled  # noqa: E402
from agents.run import RunConfig  # noqa: E402
from agents.sandbox import LocalSnapshotSpec, Manifest, SandboxAgent, SandboxRunConfig  # noqa: E402
from agents.sandbox.errors import (  # noqa: E402
    ExecTimeoutError,
    WorkspaceReadNotFoundError,
)
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call  # noqa: E402
from openai.types.responses import ResponseCustomToolCall  # noqa: E402

from gondolin import VMOptions  # noqa: E402
from gondolin.http import Secret, create_http_hooks  # noqa: E402
from integrations.openai_agents_sandbox import (  # noqa: E402
    GondolinSandboxClient,
    GondolinSandboxClientOptions,
    GondolinSandboxSessionState,
)

from .conftest import qemu_pids  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.anyio]
TOKEN = "sk-live-value-never-in-the-guest"


def shell(cmd, n, **args):
    return [function_call("exec_command", {"cmd": cmd, "yield_time_ms": 30_000, **args}, call_id=f"call_{n}")]


def patch(operation, n):
    """The SDK offers the sandbox apply_patch tool as a custom tool; its input may be JSON."""
    return [ResponseCustomToolCall(type="custom_tool_call", call_id=f"call_{n}", id=f"ct_{n}", name="apply_patch",
                                   input=json.dumps({"operation": operation}))]


def write_stdin(chars, n):
    """A step that answers the session id the previous tool output named."""
    def respond(call):
        last = [i for i in call.input if isinstance(i, dict) and i.get("type") == "function_call_output"][-1]
        session_id = int(re.search(r"session ID (\d+)", str(last["output"])).group(1))
        return [function_call("write_stdin", {"session_id": session_id, "chars": chars, "yield_time_ms": 10_000},
                              call_id=f"call_{n}")]
    return ModelStep.respond(respond)


def say(text):
    return [assistant_message(text)]


def tool_outputs(result):
    return [str(item.output) for item in result.new_items if type(item).__name__ == "ToolCallOutputItem"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    set_tracing_disabled(True)
    hooks, secret_env = create_http_hooks(allowed_hosts=["api.example.com"],
                                          secrets={"API_TOKEN": Secret(TOKEN, hosts=["api.example.com"])})
    # (no mounts here: a VM with a mount starts in 15-30 s under TCG, and they pass through as is)
    options = VMOptions(env=dict(secret_env), http_hooks=hooks)
    before = qemu_pids()
    yield {"client": GondolinSandboxClient(options, checkpoint_dir=tmp_path_factory.mktemp("ckpt")),
           "snapshots": tmp_path_factory.mktemp("snapshots")}
    assert qemu_pids() <= before, "a session left its QEMU process behind"


async def check_session_api(session):
    """What the SDK's tools and capabilities call on a session, on the same VM."""
    vm_id = session.state.vm_id
    await session.write(Path("sub/bytes.bin"), io.BytesIO(bytes(range(256)) * 100))
    assert (await session.read(Path("/workspace/sub/bytes.bin"))).read() == bytes(range(256)) * 100
    assert await session.read_bounded(Path("sub/bytes.bin"), max_bytes=10) == bytes(range(10))
    with pytest.raises(WorkspaceReadNotFoundError):
        await session.read(Path("missing.txt"))
    r = await session.exec("echo out; echo err >&2; exit 4")
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 4)
    assert (await session.exec("id -un", user="nobody")).stdout == b"nobody\n"
    with pytest.raises(ExecTimeoutError):
        await session.exec("sleep 60", timeout=1)
    await session.mkdir("made/deep", parents=True)
    assert [e.path for e in await session.ls(".") if e.path.endswith("made")]
    assert session.state.vm_id == vm_id and await session.running()


async def test_sandbox_agent_runs_in_vm_and_resumes_from_serialized_state(env):
    client, snapshots = env["client"], env["snapshots"]
    session = await client.create(manifest=Manifest(), snapshot=LocalSnapshotSpec(base_path=snapshots))
    async with session:  # stop() persists the workspace (a checkpoint), shutdown() closes the VM
        model = ScriptedModel([
            shell("printf 'print(6 * 7)\\n' > answer.py && python3 answer.py && pwd", 1),
            shell("printenv API_TOKEN; curl -s -o /dev/null -w 'egress %{http_code}\\n' http://example.com/", 2),
            shell("setsid sh -c 'echo $$ > bg.pid; exec sleep 10000' >/dev/null 2>&1 < /dev/null & sleep 1; "
                  "cat bg.pid", 3),
            shell("sleep 3; echo late", 4, yield_time_ms=250),  # outlives the call: polled below
            write_stdin("", 5),
            shell("read line; echo got:$line", 6, tty=True, yield_time_ms=250),  # a terminal, fed below
            write_stdin("abc\n", 7),
            patch({"type": "create_file", "path": "notes/plan.md", "diff": "+step one\n+step two\n"}, 8),
            patch({"type": "update_file", "path": "answer.py", "diff": "@@\n-print(6 * 7)\n+print(6 * 7 + 1)\n"}, 9),
            say("6 * 7 = 42"),
        ])
        agent = SandboxAgent(name="coder", instructions="Work in the sandbox.", model=model)
        result = await Runner.run(agent, "compute 6*7", run_config=RunConfig(sandbox=SandboxRunConfig(session=session)))
        assert result.final_output == "6 * 7 = 42" and model.remaining_steps == 0
        assert {"exec_command", "write_stdin", "apply_patch", "view_image"} <= {t.name for t in model.last_call.tools}
        assert (await session.read(Path("notes/plan.md"))).read() == b"step one\nstep two"  # V4A: no final newline
        assert (await session.exec("python3 answer.py")).stdout == b"43\n"
        first, second, third, started, polled, prompt, answered, *patches = tool_outputs(result)
        assert "Process running with session ID" in started and "late" not in started
        assert "late" in polled and "Process exited with code 0" in polled
        assert "Process running with session ID" in prompt
        assert "got:abc" in answered and "Process exited with code 0" in answered
        assert "Process exited with code 0" in first and "42\n/workspace" in first
        assert "GONDOLIN_SECRET_" in second and TOKEN not in second  # the guest sees a placeholder
        assert "egress 403" in second  # example.com is not an allowed host
        bg_pid = third.strip().splitlines()[-1]
        assert bg_pid.isdigit()
        await check_session_api(session)
        payload = json.loads(json.dumps(client.serialize_session_state(session.state)))
        assert payload["type"] == "gondolin" and payload["vm_id"] == session.state.vm_id
    await client.delete(session)
    assert session.state.vm_id is not None
    assert list(client.checkpoint_dir.glob("openai-agents-*.ckpt"))

    state = client.deserialize_session_state(payload)
    assert isinstance(state, GondolinSandboxSessionState)
    model = ScriptedModel([shell(f"python3 answer.py && kill -0 {bg_pid} && echo still running && ls sub made notes", 1),
                           say("resumed")])
    agent = SandboxAgent(name="coder", instructions="Work in the sandbox.", model=model)
    result = await Runner.run(agent, "again", run_config=RunConfig(
        sandbox=SandboxRunConfig(client=client, session_state=state)))
    [out] = tool_outputs(result)
    assert "43" in out and "still running" in out and "bytes.bin" in out and "plan.md" in out, out  # resumed, processes and all
    assert result.final_output == "resumed"


async def test_resume_takes_over_a_live_vm_and_tar_persistence_restores_into_a_fresh_one(env):
    client, snapshots = env["client"], env["snapshots"]
    session = await client.create(manifest=Manifest(), snapshot=LocalSnapshotSpec(base_path=snapshots),
                                  options=GondolinSandboxClientOptions(workspace_persistence="tar"))
    await session.start()
    await session.exec("mkdir -p src && echo 'kept' > src/note.txt && ln -s src/note.txt link")
    first_vm = session.state.vm_id

    # Resumed while its VM still runs in this process: the resumed session takes that VM over.
    taken = await client.resume(client.deserialize_session_state(client.serialize_session_state(session.state)))
    async with taken:  # stopping it persists a tar of the workspace
        assert taken.state.vm_id == first_vm
        assert (await taken.exec("cat link")).stdout == b"kept\n"
        assert not await session.running()
    await client.delete(taken)
    assert (snapshots / f"{taken.state.snapshot.id}.tar").is_file()

    resumed = await client.resume(client.deserialize_session_state(client.serialize_session_state(taken.state)))
    async with resumed:
        assert resumed.state.vm_id != first_vm  # a new VM, hydrated from the tar
        assert (await resumed.exec("cat link")).stdout == b"kept\n"
    await client.delete(resumed)
