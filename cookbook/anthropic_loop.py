"""An Anthropic tool-use loop: Claude writes a script into a sandbox, runs it, fixes it.

    python cookbook/anthropic_loop.py            # offline, scripted model
    ANTHROPIC_API_KEY=... python cookbook/anthropic_loop.py   # real Claude (ANTHROPIC_MODEL to choose)

The application creates the sandbox, hands Claude the Gondolin tools (generated from the same
registry as the MCP server) and answers every ``tool_use`` block with a ``tool_result`` block.
"""

from __future__ import annotations

import os

import anyio
from _offline import anthropic_client, banner, tool_use

from integrations import SandboxManager, ToolRegistry
from integrations.anthropic_tools import AnthropicDispatcher

MODEL = os.environ.get("ANTHROPIC_MODEL", "claude-sonnet-4-5")
TASK = ("Write /workspace/fizz.py that prints FizzBuzz for 1..15 on one line separated by spaces, run it with "
        "python3 and tell me the output.")


def script(sid: str) -> list:
    buggy = "print(' '.join('Fizz'*(i%3==0)+'Buzz'*(i%5==0) or i for i in range(1, 16)))\n"
    return [
        {"content": [{"type": "text", "text": "I'll write the script."},
                     tool_use("write_file", {"sandbox_id": sid, "path": "/workspace/fizz.py", "content": buggy})]},
        {"content": [tool_use("exec", {"sandbox_id": sid, "command": "python3 /workspace/fizz.py"})]},
        {"content": [{"type": "text", "text": "join() needs strings; fixing."},
                     tool_use("edit_file", {"sandbox_id": sid, "path": "/workspace/fizz.py",
                                            "old_string": "or i for", "new_string": "or str(i) for"})]},
        {"content": [tool_use("exec", {"sandbox_id": sid, "command": "python3 /workspace/fizz.py"}, 2)]},
        {"content": [{"type": "text", "text": "Output: 1 2 Fizz 4 Buzz Fizz 7 8 Fizz Buzz 11 Fizz 13 14 FizzBuzz"}]},
    ]


async def main() -> None:
    async with SandboxManager() as manager:
        registry = ToolRegistry(manager, tools=["exec", "read_file", "write_file", "edit_file", "list_files"])
        created = await ToolRegistry(manager).call("sandbox_create", {"name": "anthropic-loop"})
        sid = created.data()["sandbox_id"]
        client, real = anthropic_client(script(sid))
        banner("Anthropic tool-use loop", real, "ANTHROPIC")
        dispatcher = AnthropicDispatcher(registry)
        messages = [{"role": "user", "content": f"{TASK} Use sandbox_id {sid}."}]
        for _ in range(12):
            reply = await client.messages.create(model=MODEL, max_tokens=1024, tools=dispatcher.tools(),
                                                 messages=messages)
            messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]})
            for block in reply.content:
                if block.type == "text":
                    print(f"claude: {block.text}")
                elif block.type == "tool_use":
                    print(f"  -> {block.name}({', '.join(f'{k}={v!r}' for k, v in block.input.items() if k != 'sandbox_id')})")
            if reply.stop_reason != "tool_use":
                break
            results = await dispatcher.tool_results(reply.content)
            for result in results:
                first = result["content"][0]["text"].splitlines()[0]
                print(f"  <- {'ERROR ' if result['is_error'] else ''}{first}")
            messages.append({"role": "user", "content": results})
        check = await registry.call("exec", {"sandbox_id": sid, "command": "python3 /workspace/fizz.py"})
        print("sandbox says:", check.data()["stdout"].strip())


if __name__ == "__main__":
    anyio.run(main)
