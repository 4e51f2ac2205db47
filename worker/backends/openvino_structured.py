"""Constrained decoding for the OpenVINO backend: a `Constraint` as a StructuredOutputConfig.

OpenVINO GenAI (xgrammar underneath) takes one StructuredOutputConfig per request in the
continuous-batching pipeline's GenerationConfig, so a constrained request costs only its
own steps. JSON outputs use `json_schema`; tool calls use structural tags: the model's
call wrapper (`<tool_call>` ... `</tool_call>`) around a JSON Schema of
`{"name": <const>, "arguments": <the tool's parameters>}`, eager for `required` / a named
tool, triggered by the opening tag for `auto`.

A continuation (text already generated elsewhere) cannot be replayed into the pipeline's
grammar from Python, so a constrained continuation is a 400: the gateway then continues on
a worker that can (llama), or ends the stream with an error event, never unconstrained.
"""

from __future__ import annotations

import json
from typing import Any

import openvino_genai as ovg

from wire.errors import bad_request
from worker.tools.constraint import Constraint

SOC = ovg.StructuredOutputConfig

#: Any JSON object, with at most two whitespace characters between tokens: xgrammar's JSON
#: Schema mode allows unbounded whitespace, which a small model fills until max_tokens.
JSON_OBJECT_EBNF = r"""
root ::= "{" ws ( pair ( "," ws pair )* )? "}"
pair ::= string ws ":" ws value ws
value ::= root | array | string | number | "true" | "false" | "null"
array ::= "[" ws ( value ws ( "," ws value ws )* )? "]"
string ::= "\"" char* "\""
char ::= [^"\\\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" hex hex hex hex )
hex ::= [0-9a-fA-F]
number ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?
ws ::= [ \n]? [ \n]?
"""


def calls_schema(tools: tuple[tuple[str, dict[str, Any]], ...], args_key: str
                 ) -> dict[str, Any]:
    """The JSON of one call to any of `tools`, name first (xgrammar keeps property order).

    Each tool's `$defs` move to the document root, where its local `$ref`s resolve."""
    defs: dict[str, Any] = {}
    alts = []
    for name, params in tools:
        params = dict(params)
        defs.update(params.pop("$defs", None) or {})
        alts.append({
            "type": "object",
            "properties": {"name": {"const": name}, args_key: params},
            "required": ["name", args_key],
            "additionalProperties": False,
        })
    body: dict[str, Any] = alts[0] if len(alts) == 1 else {"anyOf": alts}
    if defs:
        body = {**body, "$defs": defs}
    return body


def compile_config(c: Constraint) -> Any:
    param = "tools" if c.kind == "tools" else "response_format"
    if c.prefix:
        raise bad_request(
            "The openvino backend cannot continue a constrained answer from text generated "
            "elsewhere.", param="messages", code="unsupported_continuation")
    try:
        if c.kind == "json_object":
            return SOC(grammar=JSON_OBJECT_EBNF)
        if c.kind == "json_schema":
            return SOC(json_schema=json.dumps(c.schema))
        return _tools(c)
    except Exception as exc:  # xgrammar refuses a schema it cannot compile
        raise bad_request(f"The constraint cannot be enforced: {exc}", param=param) from None


def _tools(c: Constraint) -> Any:
    assert c.fmt is not None
    fmt = c.fmt
    body = calls_schema(c.tools, fmt.args_key)
    content = SOC.JSONSchema(json.dumps(body))
    if not fmt.begin:  # the whole answer is the call (Llama 3 JSON)
        if c.mode == "auto":
            raise bad_request(
                "tool_choice 'auto' with this model's call format (a bare JSON answer) "
                "cannot be enforced on the openvino backend; use 'required' or the llama "
                "backend.", param="tool_choice", code="unsupported_parameter")
        return SOC(json_schema=json.dumps(body))
    tag = SOC.Tag(begin=fmt.begin + "\n", content=content, end="\n" + fmt.end)
    if c.mode == "auto":
        cfg = SOC.TriggeredTags(triggers=[fmt.begin], tags=[tag], at_least_one=False,
                                stop_after_first=not c.parallel)
    elif c.parallel:
        cfg = SOC.TagsWithSeparator(tags=[tag], separator="\n", at_least_one=True,
                                    stop_after_first=False)
    else:
        cfg = tag
    return SOC(structural_tags_config=cfg)
