"""Generated tool schemas: strict-mode validity, agreement with the SDKs, golden files.

Regenerate the golden files after an intended change with
``GONDOLIN_UPDATE_GOLDEN=1 pytest tests/unit/integrations/test_schema.py``.
"""

import json
import os
from pathlib import Path

import openai
import pytest
from mcp import Client

from integrations import OperatorConfig, SandboxManager, ToolRegistry
from integrations.anthropic_tools import anthropic_tools
from integrations.langchain_tools import GondolinToolkit
from integrations.openai_tools import chat_tools, responses_tools
from integrations.schema import _inline, _strictify, strict_problems, strict_schema
from integrations.tools import TOOLS
from mcp_server import build_server

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("GONDOLIN_UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="module")
def registry():
    return ToolRegistry(SandboxManager(reap=False))


def check_golden(name, data):
    path = GOLDEN / name
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if UPDATE or not path.exists():
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
        if not UPDATE:
            pytest.fail(f"golden file {name} was missing and has been written; check it in")
    assert json.loads(path.read_text()) == json.loads(text), f"{name} changed; see the module docstring"


@pytest.mark.parametrize("spec", TOOLS, ids=lambda s: s.name)
def test_every_tool_is_strict_mode_valid(spec):
    assert strict_problems(strict_schema(spec.input_model), name=spec.name, description=spec.description) == []


@pytest.mark.parametrize("spec", TOOLS, ids=lambda s: s.name)
def test_every_tool_has_a_description_and_closed_models(spec):
    assert len(spec.description) > 60 and spec.title
    assert spec.input_model.model_config.get("extra") == "forbid"
    assert not (spec.read_only and spec.destructive)


@pytest.mark.parametrize("spec", TOOLS, ids=lambda s: s.name)
def test_schema_agrees_with_the_openai_sdk(spec):
    theirs = openai.pydantic_function_tool(spec.input_model, name=spec.name)["function"]["parameters"]
    defs = theirs.pop("$defs", {})
    assert _strictify(_inline(theirs, defs)) == strict_schema(spec.input_model)


def test_all_generated_tool_lists_pass_the_validator(registry):
    for tool in chat_tools(registry.specs):
        assert tool["function"]["strict"] is True
        assert strict_problems(tool["function"]["parameters"], name=tool["function"]["name"]) == []
    for tool in responses_tools(registry.specs):
        assert tool["type"] == "function" and tool["strict"] is True
        assert strict_problems(tool["parameters"], name=tool["name"]) == []
    for tool in anthropic_tools(registry.specs):
        assert set(tool) == {"name", "description", "input_schema"}
        assert strict_problems(tool["input_schema"], name=tool["name"]) == []


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ({"type": "array", "items": {"type": "string"}}, "root must be an object"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}, "additionalProperties"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": [],
          "additionalProperties": False}, "must be required"),
        ({"type": "object", "properties": {"m": {"type": "object", "additionalProperties": {"type": "string"}}},
          "required": ["m"], "additionalProperties": False}, "free-form"),
        ({"type": "object", "properties": {"a": {"allOf": [{"type": "string"}]}}, "required": ["a"],
          "additionalProperties": False}, "allOf"),
        ({"type": "object", "properties": {"a": {"type": "string", "minLength": 1}}, "required": ["a"],
          "additionalProperties": False}, "minLength"),
        ({"type": "object", "properties": {"a": {"type": "array"}}, "required": ["a"],
          "additionalProperties": False}, "array without items"),
        ({"type": "object", "properties": {}, "required": ["x"], "additionalProperties": False}, "unknown properties"),
        ({"type": "object", "properties": {"a": {"description": "no type"}}, "required": ["a"],
          "additionalProperties": False}, "no type"),
    ],
)
def test_validator_catches_violations(schema, needle):
    problems = strict_problems(schema)
    assert any(needle in p for p in problems), problems


def test_validator_checks_names_and_description_length():
    ok = {"type": "object", "properties": {}, "required": [], "additionalProperties": False}
    assert strict_problems(ok, name="sandbox.exec")
    assert strict_problems(ok, name="x" * 65)
    assert strict_problems(ok, description="d" * 1025)
    assert strict_problems(ok, name="exec", description="runs") == []


def test_deeply_nested_objects_are_flagged():
    node = {"type": "string"}
    for _ in range(12):
        node = {"type": "object", "properties": {"n": node}, "required": ["n"], "additionalProperties": False}
    assert any("deeper" in p for p in strict_problems(node))


def test_golden_openai(registry):
    check_golden("openai_chat_tools.json", chat_tools(registry.specs))
    check_golden("openai_responses_tools.json", responses_tools(registry.specs))


def test_golden_anthropic(registry):
    check_golden("anthropic_tools.json", anthropic_tools(registry.specs))


def test_golden_langchain(registry):
    tools = GondolinToolkit(registry=registry).get_tools()
    check_golden("langchain_tools.json", [
        {"name": t.name, "description": t.description, "args": t.tool_call_schema.model_json_schema()}
        for t in tools])


@pytest.mark.anyio
async def test_golden_mcp():
    async with Client(build_server(OperatorConfig(limits={"pool_size": 0})), mode="legacy") as client:  # no spare VM
        tools = (await client.list_tools()).tools
    check_golden("mcp_tools.json", [
        t.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"meta"}) for t in tools])
