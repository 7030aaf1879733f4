"""JSON Schemas for function-calling APIs, and a checker for OpenAI's strict mode.

Strict mode (OpenAI structured outputs) accepts a subset of JSON Schema: every object closed
(``additionalProperties: false``) with every property required, optional values as nullable
types, no ``allOf``/``not``/conditionals/``patternProperties``. :func:`strict_schema` turns an
input model's pydantic schema into that form (inlining ``$ref``; dropping ``title``, ``default``
and the string-length keywords strict mode rejects: pydantic still enforces them), and
:func:`strict_problems` lists every rule a schema breaks.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from pydantic import BaseModel

TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_DESCRIPTION = 1024  # OpenAI's limit on a function description
MAX_DEPTH = 10  # strict mode: nesting levels of objects
MAX_PROPERTIES = 5000  # strict mode: properties in one schema
MAX_ENUM_VALUES = 500

DROPPED = frozenset({"title", "default", "minLength", "maxLength", "examples"})
ALLOWED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf",
    "description", "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "minItems", "maxItems", "$defs", "$ref",
})
FORBIDDEN = frozenset({"allOf", "oneOf", "not", "if", "then", "else", "patternProperties", "dependentSchemas",
                       "unevaluatedProperties", "propertyNames"})


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            merged = {**copy.deepcopy(defs[name]), **{k: v for k, v in node.items() if k != "$ref"}}
            return _inline(merged, defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _strictify(node: Any) -> Any:
    if isinstance(node, list):
        return [_strictify(v) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROPPED:
            continue
        if key == "properties":
            out[key] = {name: _strictify(sub) for name, sub in value.items()}
        elif key in ("items", "anyOf"):
            out[key] = _strictify(value)
        else:
            out[key] = value
    if out.get("type") == "object" or "properties" in out:
        out["type"] = "object"
        out.setdefault("properties", {})
        out["required"] = list(out["properties"])
        out["additionalProperties"] = False
    return out


def strict_schema(model: type[BaseModel], *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The strict-mode JSON Schema of an input model (optionally without some fields)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    schema = _inline(schema, defs)
    for name in exclude:
        schema.get("properties", {}).pop(name, None)
    return _strictify(schema)  # type: ignore[no-any-return]


def strict_problems(schema: dict[str, Any], *, name: str | None = None, description: str | None = None) -> list[str]:
    """Every strict-mode rule ``schema`` (a function's parameters) breaks; empty when valid."""
    problems: list[str] = []
    if name is not None and not TOOL_NAME_RE.match(name):
        problems.append(f"tool name {name!r} does not match {TOOL_NAME_RE.pattern}")
    if description is not None and len(description) > MAX_DESCRIPTION:
        problems.append(f"description has {len(description)} characters (max {MAX_DESCRIPTION})")
    if schema.get("type") != "object":
        problems.append("the root must be an object schema")
    if "anyOf" in schema:
        problems.append("the root may not be anyOf")
    count = [0]

    def walk(node: Any, path: str, depth: int) -> None:
        if not isinstance(node, dict):
            problems.append(f"{path}: a schema must be an object")
            return
        for key in node:
            if key in FORBIDDEN:
                problems.append(f"{path}: '{key}' is not supported in strict mode")
            elif key not in ALLOWED:
                problems.append(f"{path}: unexpected keyword '{key}'")
        types = node.get("type")
        type_list = types if isinstance(types, list) else [types]
        if "type" not in node and "anyOf" not in node and "enum" not in node and "const" not in node \
                and "$ref" not in node:
            problems.append(f"{path}: no type")
        if "object" in type_list:
            if depth > MAX_DEPTH:
                problems.append(f"{path}: objects nested deeper than {MAX_DEPTH}")
            props = node.get("properties")
            if not isinstance(props, dict):
                problems.append(f"{path}: object without properties (free-form maps are not allowed)")
                props = {}
            if node.get("additionalProperties") is not False:
                problems.append(f"{path}: additionalProperties must be false")
            required = node.get("required", [])
            missing = [p for p in props if p not in required]
            if missing:
                problems.append(f"{path}: every property must be required (missing: {', '.join(missing)})")
            extra = [p for p in required if p not in props]
            if extra:
                problems.append(f"{path}: required names unknown properties: {', '.join(extra)}")
            count[0] += len(props)
            for prop, sub in props.items():
                walk(sub, f"{path}.{prop}", depth + 1)
        if "array" in type_list:
            if "items" not in node:
                problems.append(f"{path}: array without items")
            else:
                walk(node["items"], f"{path}[]", depth)
        for i, sub in enumerate(node.get("anyOf", [])):
            walk(sub, f"{path}|{i}", depth)
        if "enum" in node and len(node["enum"]) > MAX_ENUM_VALUES:
            problems.append(f"{path}: enum with more than {MAX_ENUM_VALUES} values")
        if "$ref" in node and not str(node["$ref"]).startswith("#/$defs/"):
            problems.append(f"{path}: only local $defs references are allowed")
        for def_name, sub in node.get("$defs", {}).items():
            walk(sub, f"$defs.{def_name}", depth)

    walk(schema, "$", 1)
    if count[0] > MAX_PROPERTIES:
        problems.append(f"{count[0]} properties in total (max {MAX_PROPERTIES})")
    return problems
