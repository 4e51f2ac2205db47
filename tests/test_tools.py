"""Tools and structured outputs on both real backends, through the official openai SDK.

One shared worker per backend (`api`); several features proven per request. Content
quality of a 135M model is not judged; shape and validity are, strictly: every call's
arguments and every JSON answer are validated with jsonschema.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from conftest import MODEL, ApiTarget

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
        "required": ["timezone"], "additionalProperties": False}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30},
                   "age": {"type": "integer"},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                            "maxItems": 3}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                      "parameters": WEATHER, "strict": True}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                      "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def _check_calls(calls, allowed=SCHEMAS) -> None:
    assert calls, "no tool call"
    for c in calls:
        assert c.id.startswith("call_") and c.type == "function"
        assert c.function.name in allowed
        jsonschema.validate(json.loads(c.function.arguments), allowed[c.function.name])


def test_forced_and_named_calls_validate(api: ApiTarget) -> None:
    r = api.client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
        max_tokens=120, parallel_tool_calls=False)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.content is None and len(ch.message.tool_calls) == 1
    _check_calls(ch.message.tool_calls)

    # Named: the call is to that tool, whatever the question asked.
    r = api.client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert [c.function.name for c in ch.message.tool_calls] == ["get_time"]
    _check_calls(ch.message.tool_calls, {"get_time": TIME})
    assert r.usage.completion_tokens > 0


def test_streamed_call_arrives_name_first_then_argument_increments(api: ApiTarget) -> None:
    stream = api.client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True,
        stream_options={"include_usage": True})
    parts: list = []
    finish = None
    for chunk in stream:
        for ch in chunk.choices:
            parts.extend(ch.delta.tool_calls or [])
            assert not ch.delta.content, "a forced call streams no content"
            finish = ch.finish_reason or finish
    assert finish == "tool_calls"
    head, rest = parts[0], parts[1:]
    assert head.index == 0 and head.id.startswith("call_") and head.type == "function"
    assert head.function.name == "get_weather" and not head.function.arguments
    assert len(rest) >= 3, "arguments must stream in increments, not one late chunk"
    assert all(p.index == 0 and p.id is None and p.function.name is None for p in rest)
    args = "".join(p.function.arguments for p in rest)
    jsonschema.validate(json.loads(args), WEATHER)


def test_open_webui_style_auto_with_tool_history(api: ApiTarget) -> None:
    """Several tools with tool_choice auto (Open WebUI sends its built-ins with every chat),
    and a history holding an assistant tool call and its result: text or a valid call."""
    history = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What time is it in Tokyo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_time", "arguments": '{"timezone": "Asia/Tokyo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "09:41"},
        {"role": "user", "content": "Thanks! Say hello in one short sentence."},
    ]
    for stream in (False, True):
        kw = dict(model=MODEL, messages=history, tools=TOOLS, tool_choice="auto",
                  temperature=0, max_tokens=48)
        if stream:
            text, calls, finish = "", {}, None
            for chunk in api.client.chat.completions.create(stream=True, **kw):
                for ch in chunk.choices:
                    text += ch.delta.content or ""
                    for p in ch.delta.tool_calls or []:
                        c = calls.setdefault(p.index, {"name": "", "args": ""})
                        c["name"] += p.function.name or ""
                        c["args"] += p.function.arguments or ""
                    finish = ch.finish_reason or finish
            for c in calls.values():
                jsonschema.validate(json.loads(c["args"]), SCHEMAS[c["name"]])
            assert finish == ("tool_calls" if calls else finish) and finish is not None
            assert text.strip() or calls
        else:
            ch = api.client.chat.completions.create(**kw).choices[0]
            if ch.message.tool_calls:
                assert ch.finish_reason == "tool_calls"
                _check_calls(ch.message.tool_calls)
            else:
                assert ch.finish_reason in ("stop", "length") and ch.message.content.strip()


def test_response_formats_validate(api: ApiTarget) -> None:
    msgs = [{"role": "user", "content": "Describe a fictional person as JSON."}]
    text, finish = "", None
    for chunk in api.client.chat.completions.create(
            model=MODEL, messages=msgs, temperature=0, max_tokens=120, stream=True,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": PERSON,
                                             "strict": True}}):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)

    # With a penalty the chain remembers what it accepted, so the llama backend samples
    # the whole row itself and never lets a refused pick reach it (the stateful path).
    r = api.client.chat.completions.create(
        model=MODEL, messages=msgs, temperature=0, max_tokens=120,
        extra_body={"repeat_penalty": 1.3},
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)

    r = api.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Invent a person."}],
        temperature=0, max_tokens=120, response_format={"type": "json_object"})
    # A 135M model may ramble inside the object until max_tokens; what it writes is JSON.
    ch = r.choices[0]
    assert ch.message.content.startswith("{"), ch.message.content
    if ch.finish_reason == "stop":
        assert isinstance(json.loads(ch.message.content), dict)
    else:
        assert ch.finish_reason == "length" and r.usage.completion_tokens == 120


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "function": {"parameters": WEATHER}}]},
     "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f",
                                                  "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "integer", "minimum": 3}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object", "properties": {
            "e": {"type": "string", "format": "email"}}}}}},
     "response_format.json_schema.schema.properties.e"),
])
def test_bad_tools_and_schemas_are_400s_naming_the_parameter(api: ApiTarget, extra: dict,
                                                             param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        api.client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **extra)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param, e.value.body


def test_continuation_advances_the_constraint(api: ApiTarget) -> None:
    """A continued answer (what the gateway sends after a break) is constrained from where
    it stopped: the whole validates. OpenVINO cannot replay a grammar: a clear 400."""
    part = '{"name": "Ada'
    msgs = [{"role": "user", "content": "Describe a fictional person as JSON."},
            {"role": "assistant", "content": part}]
    kw = dict(model=MODEL, messages=msgs, temperature=0, max_tokens=120,
              extra_body={"continue_final_message": True},
              response_format={"type": "json_schema",
                               "json_schema": {"name": "person", "schema": PERSON}})
    if api.caps.name == "openvino":
        with pytest.raises(openai.BadRequestError) as e:
            api.client.chat.completions.create(**kw)
        assert e.value.body["code"] == "unsupported_continuation"
        return
    r = api.client.chat.completions.create(**kw)
    jsonschema.validate(json.loads(part + r.choices[0].message.content), PERSON)

    # A partial tool call: only the rest of its arguments come, under the same index.
    msgs = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_x", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Par'}}]}]
    args = '{"city": "Par'
    for chunk in api.client.chat.completions.create(
            model=MODEL, messages=msgs, tools=TOOLS, tool_choice="required", temperature=0,
            max_tokens=60, parallel_tool_calls=False, stream=True,
            extra_body={"continue_final_message": True}):
        for ch in chunk.choices:
            for p in ch.delta.tool_calls or []:
                assert p.index == 0 and p.id is None, "the call continues, it does not restart"
                args += p.function.arguments or ""
    jsonschema.validate(json.loads(args), WEATHER)

    # Text that cannot be a start of the schema's output is refused, not ignored.
    msgs[-1] = {"role": "assistant", "content": "[1,"}
    with pytest.raises(openai.BadRequestError):
        api.client.chat.completions.create(**{**kw, "messages": msgs})
