"""Scripted stand-ins for model APIs, so every recipe runs offline.

The recipes always use the official SDK clients. Without an API key, the client's HTTP transport
is replaced by one that answers each request with the next scripted model turn; everything
else (tool schemas, dispatch into a real sandbox, tool results sent back) is the real thing.
A scripted turn is either a fixed reply or a function of the request the client sent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import httpx2

Turn = dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]]


def _transport(reply: Callable[[dict[str, Any], int], dict[str, Any]]) -> httpx2.MockTransport:
    count = 0

    def handler(request: httpx2.Request) -> httpx2.Response:
        nonlocal count
        body = json.loads(request.content)
        count += 1
        return httpx2.Response(200, json=reply(body, count))

    return httpx2.MockTransport(handler)


def _next(turns: list[Turn], body: dict[str, Any], n: int) -> dict[str, Any]:
    if n > len(turns):
        raise RuntimeError("the scripted model has no more turns")
    turn = turns[n - 1]
    return turn(body) if callable(turn) else turn


def anthropic_client(turns: list[Turn]) -> tuple[Any, bool]:
    """``(AsyncAnthropic client, real?)``. A turn is a list of content blocks under ``content``."""
    import anthropic

    if os.environ.get("ANTHROPIC_API_KEY"):
        return anthropic.AsyncAnthropic(), True

    def reply(body: dict[str, Any], n: int) -> dict[str, Any]:
        content = _next(turns, body, n)["content"]
        stop = "tool_use" if any(b["type"] == "tool_use" for b in content) else "end_turn"
        return {"id": f"msg_scripted_{n}", "type": "message", "role": "assistant", "model": body["model"],
                "content": content, "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0}}

    client = anthropic.AsyncAnthropic(api_key="offline", base_url="http://scripted.invalid",
                                      http_client=httpx2.AsyncClient(transport=_transport(reply)))
    return client, False


def openai_client(turns: list[Turn]) -> tuple[Any, bool]:
    """``(AsyncOpenAI client, real?)`` for Chat Completions. A turn is an assistant message."""
    import openai

    if os.environ.get("OPENAI_API_KEY"):
        return openai.AsyncOpenAI(), True

    def reply(body: dict[str, Any], n: int) -> dict[str, Any]:
        message = {"role": "assistant", "content": None, **_next(turns, body, n)}
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        return {"id": f"chatcmpl-scripted-{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": finish}]}

    client = openai.AsyncOpenAI(api_key="offline", base_url="http://scripted.invalid/v1",
                                http_client=httpx2.AsyncClient(transport=_transport(reply)))
    return client, False


def tool_use(name: str, arguments: dict[str, Any], n: int = 1) -> dict[str, Any]:
    """An Anthropic ``tool_use`` block."""
    return {"type": "tool_use", "id": f"toolu_{name}_{n}", "name": name, "input": arguments}


def tool_call(name: str, arguments: dict[str, Any], n: int = 1) -> dict[str, Any]:
    """An OpenAI Chat Completions ``tool_calls`` entry."""
    return {"id": f"call_{name}_{n}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def last_tool_text(body: dict[str, Any]) -> str:
    """The text of the most recent tool result in a request (either API's format)."""
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "tool":
            return str(message["content"])
        content = message.get("content")
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    parts = block.get("content")
                    if isinstance(parts, list):
                        return "".join(p.get("text", "") for p in parts)
                    return str(parts)
    return ""


def banner(title: str, real: bool, provider: str) -> None:
    mode = f"real {provider} API" if real else f"scripted offline model (set the {provider} API key for the real one)"
    print(f"== {title} [{mode}]", flush=True)
