"""An OpenAI Agents SDK ``SandboxAgent`` whose shell runs in a Gondolin VM, resumed from a checkpoint.

    python cookbook/openai_agents_sandbox.py                     # offline: a scripted model
    OPENAI_API_KEY=... python cookbook/openai_agents_sandbox.py  # a real model (OPENAI_MODEL)

``GondolinSandboxClient`` is an Agents SDK sandbox client: each sandbox session is a VM made
from the client's ``VMOptions`` (here: the guest may reach pypi.org and nothing else, and holds
only a placeholder for a token). When the first run ends, the SDK persists the session's
workspace: for this client, a checkpoint of the whole VM. The second run resumes the session
from its serialized state, so the VM comes back with its files and its running processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from typing import Any

from agents import Runner, set_tracing_disabled
from agents.run import RunConfig
from agents.sandbox import LocalSnapshotSpec, Manifest, SandboxAgent, SandboxRunConfig
from agents.testing import ScriptedModel, assistant_message, function_call

from gondolin import VMOptions
from gondolin.http import Secret, create_http_hooks
from integrations.openai_agents_sandbox import GondolinSandboxClient

SERVER = ("import http.server, socketserver\n"
          "class H(http.server.BaseHTTPRequestHandler):\n"
          "    def do_GET(self):\n"
          "        self.send_response(200); self.end_headers(); self.wfile.write(b'hits=%d' % H.hits); H.hits += 1\n"
          "    def log_message(self, *a): pass\n"
          "H.hits = 1\n"
          "socketserver.TCPServer(('127.0.0.1', 8000), H).serve_forever()\n")


def shell(cmd: str, n: int) -> list[Any]:
    return [function_call("exec_command", {"cmd": cmd, "yield_time_ms": 30_000}, call_id=f"call_{n}")]


def say(text: str) -> list[Any]:
    return [assistant_message(text)]


def model(turns: list[list[Any]]) -> ScriptedModel | str:
    """The real model with an API key; otherwise the SDK's scripted test model replays ``turns``."""
    return os.environ.get("OPENAI_MODEL", "gpt-4.1") if os.environ.get("OPENAI_API_KEY") else ScriptedModel(turns)


def show(result: Any) -> None:
    for item in result.new_items:
        kind = type(item).__name__
        if kind == "ToolCallItem":
            print(f"  -> {item.raw_item.name}({json.loads(item.raw_item.arguments).get('cmd', '')[:70]!r})")
        elif kind == "ToolCallOutputItem":
            lines = str(item.output).split("Output:\n", 1)[-1].strip().splitlines()
            print(f"     {' | '.join(lines[-3:])[:120]}")
    print(f"model: {result.final_output}")


async def main() -> None:
    real = bool(os.environ.get("OPENAI_API_KEY"))
    if not real:
        set_tracing_disabled(True)
    mode = "real OpenAI API" if real else "scripted offline model (set OPENAI_API_KEY for a real one)"
    print(f"== OpenAI Agents SDK sandbox on Gondolin [{mode}]", flush=True)
    hooks, secret_env = create_http_hooks(allowed_hosts=["pypi.org", "files.pythonhosted.org"],
                                          secrets={"PYPI_TOKEN": Secret("pypi-real-token", hosts=["pypi.org"])})
    with tempfile.TemporaryDirectory(prefix="gondolin-agents-") as work:  # checkpoints and snapshots
        await run_twice(work, secret_env, hooks)


async def run_twice(work: str, secret_env: Any, hooks: Any) -> None:
    client = GondolinSandboxClient(VMOptions(env=dict(secret_env), http_hooks=hooks),
                                   checkpoint_dir=os.path.join(work, "checkpoints"))
    snapshots = LocalSnapshotSpec(base_path=os.path.join(work, "snapshots"))
    instructions = "You work in a Linux sandbox; use exec_command. Keep answers short."

    # Run 1: the agent starts a small web server in the background and queries it.
    session = await client.create(manifest=Manifest(), snapshot=snapshots)
    async with session:  # leaving the block persists the workspace (a VM checkpoint) and closes the VM
        agent = SandboxAgent(name="ops", instructions=instructions, model=model([
            shell(f"cat > server.py <<'EOF'\n{SERVER}EOF\n(setsid python3 server.py > /dev/null 2>&1 &); "
                  "for i in $(seq 100); do curl -sf http://127.0.0.1:8000/ && break; sleep 0.2; done; echo; echo token seen by the guest: $PYPI_TOKEN", 1),
            say("The server answered hits=1; it keeps running in the background."),
        ]))
        result = await Runner.run(agent, "Start server.py in the background and query it once.",
                                  run_config=RunConfig(sandbox=SandboxRunConfig(session=session)))
        show(result)
        saved = json.dumps(client.serialize_session_state(session.state))  # what you would store
    await client.delete(session)
    print(f"checkpoints: {sorted(os.listdir(client.checkpoint_dir))}")

    # Run 2: resume the session from its serialized state; the server is still running.
    state = client.deserialize_session_state(json.loads(saved))
    agent = SandboxAgent(name="ops", instructions=instructions, model=model([
        shell("curl -s http://127.0.0.1:8000/; echo; ls", 1),
        say("Resumed: the same server answered hits=2."),
    ]))
    result = await Runner.run(agent, "Query the server again.", run_config=RunConfig(
        sandbox=SandboxRunConfig(client=client, session_state=state)))
    show(result)


if __name__ == "__main__":
    asyncio.run(main())
