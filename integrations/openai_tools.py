"""OpenAI function tools (Chat Completions and Responses) generated from the registry.

No OpenAI SDK is needed at run time: definitions are plain dicts, and the dispatcher accepts
either dicts or the SDK's objects. Schemas are strict-mode valid, so ``strict: true`` is set.

    dispatcher = OpenAIDispatcher(registry)
    response = client.chat.completions.create(model=..., messages=messages, tools=dispatcher.chat_tools())
    for call in response.choices[0].message.tool_calls or []:
        messages.append(await dispatcher.chat_tool_message(call))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .schema import strict_schema
from .tools import ToolOutcome, ToolRegistry, ToolSpec


def _plain(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "model_dump"):
        return obj.model_dump()  # type: ignore[no-any-return]
    raise TypeError(f"expected a dict or an SDK object, got {type(obj).__name__}")


def function_definition(spec: ToolSpec) -> dict[str, Any]:
    return {"name": spec.name, "description": spec.description, "parameters": strict_schema(spec.input_model),
            "strict": True}


def chat_tools(specs: Iterable[ToolSpec]) -> list[dict[str, Any]]:
    """``tools=`` for ``client.chat.completions.create``."""
    return [{"type": "function", "function": function_definition(spec)} for spec in specs]


def responses_tools(specs: Iterable[ToolSpec]) -> list[dict[str, Any]]:
    """``tools=`` for ``client.responses.create`` (flat function tools)."""
    return [{"type": "function", **function_definition(spec)} for spec in specs]


class OpenAIDispatcher:
    """Runs the tool calls an OpenAI model makes and builds the messages that answer them."""

    def __init__(self, registry: ToolRegistry) -> None:
        self.registry = registry

    def chat_tools(self) -> list[dict[str, Any]]:
        return chat_tools(self.registry.specs)

    def responses_tools(self) -> list[dict[str, Any]]:
        return responses_tools(self.registry.specs)

    # -- Chat Completions ------------------------------------------------------------------
    async def run_chat_call(self, tool_call: Any) -> ToolOutcome:
        call = _plain(tool_call)
        function = call.get("function") or {}
        return await self.registry.call(str(function.get("name", "")), function.get("arguments") or "{}")

    async def chat_tool_message(self, tool_call: Any) -> dict[str, Any]:
        """The ``{"role": "tool", ...}`` message answering one ``message.tool_calls`` entry.
        Chat Completions has no error flag: an error reads ``error [code]: ...`` in the content."""
        outcome = await self.run_chat_call(tool_call)
        return {"role": "tool", "tool_call_id": _plain(tool_call)["id"], "content": outcome.text}

    async def chat_tool_messages(self, message: Any) -> list[dict[str, Any]]:
        """Answers for every tool call of an assistant message, in order."""
        calls = _plain(message).get("tool_calls") or []
        return [await self.chat_tool_message(call) for call in calls]

    def chat_tool_message_sync(self, tool_call: Any) -> dict[str, Any]:
        call = _plain(tool_call)
        function = call.get("function") or {}
        outcome = self.registry.call_sync(str(function.get("name", "")), function.get("arguments") or "{}")
        return {"role": "tool", "tool_call_id": call["id"], "content": outcome.text}

    # -- Responses -------------------------------------------------------------------------
    async def run_function_call(self, item: Any) -> ToolOutcome:
        call = _plain(item)
        return await self.registry.call(str(call.get("name", "")), call.get("arguments") or "{}")

    async def function_call_output(self, item: Any) -> dict[str, Any]:
        """The ``function_call_output`` input item answering one ``function_call`` output item."""
        outcome = await self.run_function_call(item)
        return {"type": "function_call_output", "call_id": _plain(item)["call_id"], "output": outcome.text}

    async def function_call_outputs(self, output: Iterable[Any]) -> list[dict[str, Any]]:
        """Answers for every ``function_call`` item of a response's ``output``."""
        items = [_plain(item) for item in output]
        return [await self.function_call_output(item) for item in items if item.get("type") == "function_call"]
