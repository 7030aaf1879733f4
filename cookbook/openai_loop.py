"""An OpenAI Chat Completions tool-calling loop against a Gondolin sandbox.

    python cookbook/openai_loop.py               # offline, scripted model
    OPENAI_API_KEY=... python cookbook/openai_loop.py    # real model (OPENAI_MODEL to choose)

The tools are strict-mode function definitions generated from the registry; the dispatcher
answers each ``tool_calls`` entry with a ``role: tool`` message. Here the model also manages
the sandbox's lifecycle itself (create, use, destroy).
"""

from __future__ import annotations

import json
import os
import re

import anyio
from _offline import banner, last_tool_text, openai_client, tool_call

from integrations import SandboxManager, ToolRegistry
from integrations.openai_tools import OpenAIDispatcher

MODEL = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")
TASK = ("Create a sandbox, find out which Linux kernel and Python version it runs, then destroy the sandbox "
        "and report both versions.")


def _sid(body: dict) -> str:
    match = re.search(r'"sandbox_id":"(sb_[0-9a-f]+)"', last_tool_text(body))
    assert match, "the scripted model expected a sandbox_create result"
    return match.group(1)


def script() -> list:
    state: dict = {}

    def run(body: dict) -> dict:
        state["sid"] = _sid(body)
        return {"tool_calls": [tool_call("exec", {"sandbox_id": state["sid"],
                                                  "command": "uname -r; python3 --version"})]}

    def destroy(body: dict) -> dict:
        state["versions"] = last_tool_text(body).split("---\n", 1)[1].strip()
        return {"tool_calls": [tool_call("sandbox_destroy", {"sandbox_id": state["sid"]})]}

    return [
        {"tool_calls": [tool_call("sandbox_create", {"name": "openai-loop"})]},
        run,
        destroy,
        lambda body: {"content": "Kernel and Python: " + state["versions"].replace("\n", ", ")},
    ]


async def main() -> None:
    client, real = openai_client(script())
    banner("OpenAI tool-calling loop", real, "OPENAI")
    async with SandboxManager() as manager:
        dispatcher = OpenAIDispatcher(ToolRegistry(manager))
        messages: list = [{"role": "user", "content": TASK}]
        for _ in range(12):
            response = await client.chat.completions.create(model=MODEL, messages=messages,
                                                            tools=dispatcher.chat_tools())
            message = response.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if message.content:
                print(f"model: {message.content}")
            if not message.tool_calls:
                break
            for call in message.tool_calls:
                print(f"  -> {call.function.name}({json.loads(call.function.arguments)})")
                answer = await dispatcher.chat_tool_message(call)
                print(f"  <- {answer['content'].splitlines()[0]}")
                messages.append(answer)
        left = len(manager.sandboxes())
        print(f"sandboxes left running: {left}")


if __name__ == "__main__":
    anyio.run(main)
