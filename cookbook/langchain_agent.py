"""A LangChain agent that writes a script in a sandbox and runs it.

    python cookbook/langchain_agent.py       # offline: a scripted chat model
    ANTHROPIC_API_KEY=... python cookbook/langchain_agent.py   # needs `pip install langchain-anthropic`
    OPENAI_API_KEY=... python cookbook/langchain_agent.py      # needs `pip install langchain-openai`

The toolkit is bound to one sandbox, so the model never sees (or mixes up) sandbox ids. Each
tool returns ``(content, artifact)``: the model reads the text, the application gets the
structured result (exit code, byte counts, ...) as ``ToolMessage.artifact``.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from integrations import SandboxManager, ToolRegistry
from integrations.langchain_tools import GondolinToolkit

TASK = ("Write /workspace/primes.py that prints the primes below 50 separated by spaces, run it, and tell me "
        "how many there are.")
SCRIPT = "print(*[n for n in range(2, 50) if all(n % d for d in range(2, int(n ** 0.5) + 1))])\n"


class ScriptedChatModel(GenericFakeChatModel):
    """Replays scripted replies; accepts tools like a real chat model."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedChatModel:
        return self


def chat_model() -> tuple[Any, str]:
    if os.environ.get("ANTHROPIC_API_KEY"):
        try:
            from langchain_anthropic import ChatAnthropic

            return ChatAnthropic(model=os.environ.get("ANTHROPIC_MODEL", "claude-sonnet-4-5")), "real Anthropic API"
        except ImportError:
            print("(langchain-anthropic is not installed; using the scripted model)")
    if os.environ.get("OPENAI_API_KEY"):
        try:
            from langchain_openai import ChatOpenAI

            return ChatOpenAI(model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini")), "real OpenAI API"
        except ImportError:
            print("(langchain-openai is not installed; using the scripted model)")
    return ScriptedChatModel(messages=iter([
        AIMessage(content="", tool_calls=[{"id": "c1", "name": "write_file",
                                           "args": {"path": "/workspace/primes.py", "content": SCRIPT}}]),
        AIMessage(content="", tool_calls=[{"id": "c2", "name": "exec", "args": {"command": "python3 /workspace/primes.py"}}]),
        AIMessage(content="", tool_calls=[{"id": "c3", "name": "exec",
                                           "args": {"command": "python3 /workspace/primes.py | wc -w"}}]),
        AIMessage(content="There are 15 primes below 50: 2 3 5 7 11 13 17 19 23 29 31 37 41 43 47."),
    ])), "scripted offline model"


async def main() -> None:
    model, mode = chat_model()
    print(f"== LangChain agent [{mode}]")
    async with SandboxManager() as manager:
        registry = ToolRegistry(manager)
        sid = (await registry.call("sandbox_create", {"name": "langchain"})).data()["sandbox_id"]
        tools = {t.name: t for t in GondolinToolkit(registry=registry, sandbox_id=sid).get_tools()}
        agent = model.bind_tools(list(tools.values()))
        messages: list = [SystemMessage("You work in a Linux sandbox; use its tools."), HumanMessage(TASK)]
        for _ in range(10):
            reply = await agent.ainvoke(messages)
            messages.append(reply)
            if reply.content:
                print(f"model: {reply.content}")
            if not reply.tool_calls:
                break
            for call in reply.tool_calls:
                result: ToolMessage = await tools[call["name"]].ainvoke({**call, "type": "tool_call"})
                artifact = result.artifact or {}
                detail = f"exit_code={artifact['exit_code']}" if "exit_code" in artifact else result.status
                print(f"  -> {call['name']}({call['args']}) [{detail}]")
                messages.append(result)
        check = await registry.call("exec", {"sandbox_id": sid, "command": "python3 /workspace/primes.py"})
        print("sandbox says:", check.data()["stdout"].strip())


if __name__ == "__main__":
    anyio.run(main)
