"""A LangChain Deep Agent whose files and shell are a Gondolin VM.

    python cookbook/deepagents_sandbox.py                            # offline: a scripted chat model
    ANTHROPIC_API_KEY=... python cookbook/deepagents_sandbox.py      # a real model (ANTHROPIC_MODEL)

``GondolinSandbox`` is a Deep Agents sandbox backend: the agent's ``write_file``, ``edit_file``,
``read_file``, ``ls``, ``glob``, ``grep`` and ``execute`` tools all act on one VM, which has no
network access here (no egress policy given) and is closed when the ``with`` block ends.
"""

from __future__ import annotations

import os
from typing import Any

from deepagents import create_deep_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, ToolMessage

from integrations.deepagents_backend import GondolinSandbox

TASK = ("Write /workspace/stats.py that prints the mean of the numbers in /workspace/data.txt, "
        "run it, and tell me the result.")
SCRIPT = "nums = [float(x) for x in open('/workspace/data.txt').read().split()]\nprint(sum(nums) / len(nums))\n"


class ScriptedChatModel(GenericFakeChatModel):
    """Replays scripted replies; accepts tools like a real chat model."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedChatModel:
        return self


def call(name: str, args: dict[str, Any], n: int) -> AIMessage:
    return AIMessage(content="", tool_calls=[{"id": f"call_{n}", "name": name, "args": args}])


def chat_model() -> tuple[Any, str]:
    if os.environ.get("ANTHROPIC_API_KEY"):
        return f"anthropic:{os.environ.get('ANTHROPIC_MODEL', 'claude-sonnet-4-5')}", "real Anthropic API"
    return ScriptedChatModel(messages=iter([
        call("ls", {"path": "/workspace"}, 1),
        call("write_file", {"file_path": "/workspace/stats.py", "content": SCRIPT.replace("sum(nums)", "sum(num)")}, 2),
        call("execute", {"command": "python3 /workspace/stats.py"}, 3),
        call("edit_file", {"file_path": "/workspace/stats.py", "old_string": "sum(num)", "new_string": "sum(nums)"}, 4),
        call("execute", {"command": "python3 /workspace/stats.py"}, 5),
        AIMessage(content="The mean of the numbers in data.txt is 4.5."),
    ])), "scripted offline model (set ANTHROPIC_API_KEY for a real one)"


def main() -> None:
    model, mode = chat_model()
    print(f"== Deep Agents on a Gondolin sandbox [{mode}]", flush=True)
    with GondolinSandbox(memory="512M") as backend:
        backend.upload_files([("/workspace/data.txt", b"3 4 5 6\n")])
        agent = create_deep_agent(model=model, backend=backend,
                                  system_prompt="You work in a Linux sandbox; use its tools.")
        result = agent.invoke({"messages": [{"role": "user", "content": TASK}]})
        for message in result["messages"]:
            if isinstance(message, AIMessage):
                for tc in message.tool_calls:
                    print(f"  -> {tc['name']}({', '.join(f'{k}={str(v)[:40]!r}' for k, v in tc['args'].items())})")
                if message.content:
                    print(f"model: {message.content}")
            elif isinstance(message, ToolMessage):
                artifact = message.artifact if isinstance(message.artifact, dict) else {}
                lines = [line for line in str(message.content).strip().splitlines() if line] or [""]
                shown = lines[-2] if len(lines) > 1 and lines[-1].startswith("[Command") else lines[-1]
                detail = f" [exit_code={artifact['exit_code']}]" if "exit_code" in artifact else ""
                print(f"     {shown[:100]}{detail}")
        check = backend.execute("python3 /workspace/stats.py")
        print("sandbox says:", check.output.strip(), f"(exit_code {check.exit_code})")


if __name__ == "__main__":
    main()
