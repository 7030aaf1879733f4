"""An MCP client session driving a Gondolin sandbox through the `gondolin-mcp` server (stdio).

    python cookbook/mcp_client.py            # offline, scripted model
    ANTHROPIC_API_KEY=... python cookbook/mcp_client.py   # Claude drives the MCP tools

This is what Claude Desktop or Claude Code do: start the server as a subprocess, list its
tools, call them. Here a small bridge turns the MCP tool list into Anthropic tools and each
``tool_use`` block into an MCP ``tools/call``; progress notifications of long commands are
printed as they arrive, and the result file is fetched through the sandbox resource template.
"""

from __future__ import annotations

import os
import sys

import anyio
from _offline import anthropic_client, banner, last_tool_text, tool_use
from mcp import Client, StdioServerParameters

MODEL = os.environ.get("ANTHROPIC_MODEL", "claude-sonnet-4-5")
TASK = ("Create a sandbox, write /workspace/count.sh that prints 1 to 3 with a one-second pause between "
        "numbers, make it executable, run it, and report its output. Leave the sandbox running.")


def script() -> list:
    state: dict = {}

    def sid(body: dict) -> str:
        import json

        state.setdefault("sid", json.loads(last_tool_text(body))["sandbox_id"])
        return state["sid"]

    return [
        {"content": [tool_use("sandbox_create", {"name": "mcp-demo"})]},
        lambda b: {"content": [tool_use("write_file", {
            "sandbox_id": sid(b), "path": "/workspace/count.sh", "mode": "0755",
            "content": "#!/bin/sh\nfor i in 1 2 3; do echo $i; sleep 1; done\n"})]},
        lambda b: {"content": [tool_use("exec", {"sandbox_id": state["sid"], "command": "/workspace/count.sh"})]},
        {"content": [{"type": "text", "text": "The script printed 1, 2 and 3, one per second."}]},
    ]


async def main() -> None:
    server = StdioServerParameters(command=sys.executable, args=["-m", "mcp_server", "--max-sandboxes", "2"],
                                   env=dict(os.environ))
    client, real = anthropic_client(script())
    banner("MCP client session", real, "ANTHROPIC")

    async def progress(done: float, total: float | None, message: str | None) -> None:
        print(f"     progress: {message}")

    async with Client(server) as session:
        mcp_tools = (await session.list_tools()).tools
        print(f"server offers {len(mcp_tools)} tools: {', '.join(t.name for t in mcp_tools)}")
        tools = [{"name": t.name, "description": t.description or "", "input_schema": t.input_schema}
                 for t in mcp_tools]
        messages: list = [{"role": "user", "content": TASK}]
        sandbox_id = None
        for _ in range(12):
            reply = await client.messages.create(model=MODEL, max_tokens=1024, tools=tools, messages=messages)
            messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]})
            results = []
            for block in reply.content:
                if block.type == "text":
                    print(f"claude: {block.text}")
                elif block.type == "tool_use":
                    print(f"  -> {block.name}")
                    result = await session.call_tool(block.name, block.input, progress_callback=progress)
                    text = "".join(c.text for c in result.content if c.type == "text")
                    if block.name == "sandbox_create" and not result.is_error:
                        sandbox_id = result.structured_content["sandbox_id"]
                    print(f"  <- {text.splitlines()[0]}")
                    results.append({"type": "tool_result", "tool_use_id": block.id, "is_error": result.is_error,
                                    "content": [{"type": "text", "text": text}]})
            if reply.stop_reason != "tool_use":
                break
            messages.append({"role": "user", "content": results})
        if sandbox_id:
            resource = await session.read_resource(f"sandbox://{sandbox_id}/files/workspace/count.sh")
            print("count.sh via the resource template:", resource.contents[0].text.splitlines()[1])
    print("server stopped; its sandboxes are gone")


if __name__ == "__main__":
    anyio.run(main)
