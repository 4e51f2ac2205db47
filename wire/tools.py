"""Wire models and validation for tools, tool_choice and response_format.

Validation happens once, at the edge (gateway and worker share it): a tool without a name,
a `parameters` object that is not JSON Schema, a `tool_choice` naming an unknown tool, or a
schema keyword no backend can enforce is a 400 naming the parameter. "Cannot enforce" is
decided here, for both backends, so an answer is never silently less constrained than the
client asked for (`ENFORCEABLE` lists what the grammar builders honour).
"""

from __future__ import annotations

from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field

from wire.errors import bad_request


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class FunctionDef(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class CallFunction(_Lenient):
    name: str
    arguments: str = ""  # a JSON string, as OpenAI sends it


class ToolCall(_Lenient):
    id: str = ""
    type: Literal["function"] = "function"
    function: CallFunction


class JsonSchemaFormat(_Lenient):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


#: Keywords the grammar builders enforce (llama.cpp's JSON-Schema-to-GBNF and OpenVINO's
#: xgrammar both honour these), plus annotations that constrain nothing.
ENFORCEABLE = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "enum", "const", "anyOf", "$ref", "$defs", "definitions", "pattern", "minLength",
    "maxLength", "minItems", "maxItems", "format",
    # annotations
    "title", "description", "default", "examples", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly",
})
FORMATS = frozenset({"date", "time", "date-time", "uuid"})
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "prefixItems")


def check_schema(schema: Any, param: str) -> None:
    """A 400 unless `schema` is JSON Schema (draft 2020-12) made only of enforceable parts."""
    if not isinstance(schema, dict):
        raise bad_request("The schema must be a JSON object.", param=param)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise bad_request(
            f"Invalid JSON Schema{f' at {where}' if where else ''}: {exc.message}", param=param
        ) from None
    _check_enforceable(schema, param)


def _check_enforceable(node: Any, path: str) -> None:
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        return
    for key in node:
        if key not in ENFORCEABLE:
            raise bad_request(
                f"The schema keyword {key!r} (at {path}) cannot be enforced by this server; "
                "remove it or describe the constraint in the prompt.",
                param=path, code="unsupported_schema_keyword",
            )
    if "format" in node and node["format"] not in FORMATS:
        raise bad_request(
            f"The string format {node['format']!r} (at {path}) cannot be enforced; "
            f"supported: {', '.join(sorted(FORMATS))}.",
            param=path, code="unsupported_schema_keyword",
        )
    if "pattern" in node and ("minLength" in node or "maxLength" in node):
        raise bad_request(
            f"'pattern' together with 'minLength'/'maxLength' (at {path}) cannot be enforced.",
            param=path, code="unsupported_schema_keyword",
        )
    for key in _SUBSCHEMA_MAPS:
        for name, sub in (node.get(key) or {}).items():
            _check_enforceable(sub, f"{path}.{key}.{name}")
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(node.get(key) or []):
            _check_enforceable(sub, f"{path}.{key}[{i}]")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _check_enforceable(node[key], f"{path}.{key}")


def tool_choice_of(choice: Any, tools: list[Tool] | None) -> str | None:
    """Normalises `tool_choice` to "none" | "auto" | "required" | a tool's name; 400 if bad."""
    names = [t.function.name for t in tools or []]
    if choice is None:
        return "auto" if names else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(
                f"Invalid tool_choice {choice!r}: use 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": ...}}.', param="tool_choice")
        if choice != "none" and not names:
            raise bad_request(f"tool_choice {choice!r} needs 'tools'.", param="tool_choice")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise bad_request("tool_choice.function.name is required.",
                              param="tool_choice.function.name")
        if name not in names:
            raise bad_request(f"tool_choice names the function {name!r}, which is not in "
                              "'tools'.", param="tool_choice.function.name")
        return name
    raise bad_request("Invalid tool_choice.", param="tool_choice")


def validate(tools: list[Tool] | None, tool_choice: Any,
             response_format: ResponseFormat | None) -> str | None:
    """Checks the tool and response_format fields together; returns the normalised choice."""
    seen: set[str] = set()
    for i, tool in enumerate(tools or []):
        name = tool.function.name
        if name in seen:
            raise bad_request(f"Two tools are named {name!r}.", param=f"tools[{i}].function.name")
        seen.add(name)
        if tool.function.parameters is not None:
            check_schema(tool.function.parameters, f"tools[{i}].function.parameters")
    choice = tool_choice_of(tool_choice, tools)
    if response_format is not None and response_format.type == "json_schema":
        js = response_format.json_schema
        if js is None or js.schema_ is None:
            raise bad_request("response_format json_schema needs json_schema.schema.",
                              param="response_format.json_schema.schema")
        check_schema(js.schema_, "response_format.json_schema.schema")
    if choice not in (None, "none") and response_format is not None \
            and response_format.type != "text":
        raise bad_request("Use either tools (with tool_choice other than 'none') or a JSON "
                          "response_format, not both.", param="response_format")
    return choice

