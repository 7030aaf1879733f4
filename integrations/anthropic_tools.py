"""Anthropic tool definitions and a dispatcher returning ``tool_result`` blocks.

    dispatcher = AnthropicDispatcher(registry)
    message = client.messages.create(model=..., tools=dispatcher.tools(), messages=messages, max_tokens=1024)
    if message.stop_reason == "tool_use":
        messages.append({"role": "assistant", "content": message.content})
        messages.append({"role": "user", "content": await dispatcher.tool_results(message.content)})
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


def anthropic_tools(specs: Iterable[ToolSpec], *, strict: bool = False) -> list[dict[str, Any]]:
    """``tools=`` for ``client.messages.create``. The schemas are closed objects, so they also
    suit Anthropic's ``strict`` tool use (``strict=True`` sets the flag)."""
    tools = []
    for spec in specs:
        tool: dict[str, Any] = {"name": spec.name, "description": spec.description,
                                "input_schema": strict_schema(spec.input_model)}
        if strict:
            tool["strict"] = True
        tools.append(tool)
    return tools


def tool_result_block(tool_use_id: str, outcome: ToolOutcome) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tool_use_id,
            "content": [{"type": "text", "text": outcome.text}], "is_error": outcome.is_error}


class AnthropicDispatcher:
    """Runs ``tool_use`` blocks against the registry."""

    def __init__(self, registry: ToolRegistry, *, strict: bool = False) -> None:
        self.registry = registry
        self._strict = strict

    def tools(self) -> list[dict[str, Any]]:
        return anthropic_tools(self.registry.specs, strict=self._strict)

    async def run(self, block: Any) -> ToolOutcome:
        use = _plain(block)
        return await self.registry.call(str(use.get("name", "")), use.get("input") or {})

    async def tool_result(self, block: Any) -> dict[str, Any]:
        """The ``tool_result`` block (with ``is_error``) answering one ``tool_use`` block."""
        outcome = await self.run(block)
        return tool_result_block(_plain(block)["id"], outcome)

    async def tool_results(self, content: Iterable[Any]) -> list[dict[str, Any]]:
        """Answers for every ``tool_use`` block of an assistant message's content, in order."""
        blocks = [_plain(b) for b in content]
        return [await self.tool_result(b) for b in blocks if b.get("type") == "tool_use"]

    def tool_result_sync(self, block: Any) -> dict[str, Any]:
        use = _plain(block)
        outcome = self.registry.call_sync(str(use.get("name", "")), use.get("input") or {})
        return tool_result_block(use["id"], outcome)
