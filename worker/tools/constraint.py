"""What constrained decoding must enforce for one request, independent of the backend.

The API builds a `Constraint` from `response_format` or from `tools` + `tool_choice`;
each backend compiles it (llama.cpp: GBNF for its grammar sampler; OpenVINO: a
StructuredOutputConfig). `prefix` is text already generated for this answer elsewhere (a
continued stream): the backend advances the constraint over it and constrains the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from wire import openai as oa
from worker.tools.format import ToolFormat

#: Arguments of a tool declared without `parameters`: any JSON object.
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Constraint:
    kind: str  # "json_object" | "json_schema" | "tools"
    schema: dict[str, Any] | None = None  # json_schema
    #: kind "tools": (name, parameters schema) of the callable tools
    tools: tuple[tuple[str, dict[str, Any]], ...] = ()
    fmt: ToolFormat | None = None
    #: "auto": free text until the model opens a call (a lazy grammar); "required": a call
    #: now (one of `tools`, which holds only the named one when tool_choice names one).
    mode: str = "required"
    parallel: bool = True
    prefix: str = field(default="", compare=False)

    def with_prefix(self, prefix: str) -> Constraint:
        return replace(self, prefix=prefix)


def build(req: oa.ChatCompletionRequest, fmt: ToolFormat) -> Constraint | None:
    """The request's constraint, or None for free text."""
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        return Constraint("json_object")
    if rf is not None and rf.type == "json_schema":
        assert rf.json_schema is not None and rf.json_schema.schema_ is not None
        return Constraint("json_schema", schema=rf.json_schema.schema_)
    choice = req.choice
    if not req.tools or choice in (None, "none"):
        return None
    tools = [(t.function.name, t.function.parameters or ANY_OBJECT) for t in req.tools]
    if choice not in ("auto", "required"):
        tools = [t for t in tools if t[0] == choice]
    return Constraint("tools", tools=tuple(tools), fmt=fmt,
                      mode="auto" if choice == "auto" else "required",
                      parallel=req.parallel_tool_calls and choice in ("auto", "required"))
