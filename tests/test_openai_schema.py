"""Every response object the worker and the gateway return, against OpenAI's OpenAPI spec.

The objects come from the session's real llama.cpp worker and a real gateway in front of
it, as raw JSON (the SDK's parsed models would hide a missing field), and are checked with
a JSON Schema validator against OpenAI's published document (tests/openai_schema.py).
The next field that drifts from the official shape fails here, in CI.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from conftest import COUNTING, MODEL, chat, client_for
from openai_schema import errors, schema
from procs import Gateway, start_gateway, wait_for

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed")

CHAT = "CreateChatCompletionResponse"
CHUNK = "CreateChatCompletionStreamResponse"
TEXT = "CreateCompletionResponse"  # OpenAI's spec: streamed chunks share this shape
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"], "additionalProperties": False}
TOOLS = {"tools": [{"type": "function", "function": {"name": "get_weather",
                                                     "parameters": CITY}}],
         "tool_choice": "required", "max_tokens": 60}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _text_chunk_schema() -> dict[str, Any]:
    """`CreateCompletionResponse` with `finish_reason` also null: a streamed legacy
    completion carries null until its last chunk, as the OpenAI API itself sends (the spec
    says chunks share the response's shape but lists no null). Only for non-final chunks."""
    s = schema(TEXT)
    fr = s["properties"]["choices"]["items"]["properties"]["finish_reason"]
    s["properties"]["choices"]["items"]["properties"]["finish_reason"] = {
        "anyOf": [fr, {"type": "null"}]}
    return s


@pytest.fixture
def gateway(llama_worker) -> Iterator[Gateway]:
    g = start_gateway("--worker", llama_worker.url)
    try:
        wait_for(lambda: httpx.get(f"{g.url}/readyz").status_code == 200, 60, 0.1, "ready")
        yield g
    finally:
        g.proc.stop()


def _events(r: httpx.Response) -> list[dict[str, Any]]:
    out, done = [], False
    for line in r.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        out.append(orjson.loads(line[6:]))
    assert done, "the stream did not end with [DONE]"
    return out


def _stream(base: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return _events(r)


def _objects(base: str) -> list[tuple[str, Any, dict[str, Any] | None]]:
    """(schema name, object, override schema) for every kind of answer `base` gives."""
    sdk = client_for(base, timeout=120)
    got: list[tuple[str, Any, dict[str, Any] | None]] = []

    models = sdk.models.with_raw_response.list()
    got.append(("ListModelsResponse", models.http_response.json(), None))

    # length, then stop; then several choices with logprobs (their own code path)
    for kw, chat_kw, text_kw in (
            ({"max_tokens": 3}, {}, {"echo": True}),
            ({"max_tokens": 32, "stop": [" "]}, {}, {"echo": True}),
            ({"max_tokens": 3, "n": 2}, {"logprobs": True, "top_logprobs": 2}, {"logprobs": 2})):
        raw = sdk.chat.completions.with_raw_response.create(
            model=MODEL, messages=chat(f"Continue: {COUNTING}"), temperature=0, **kw, **chat_kw)
        got.append((CHAT, raw.http_response.json(), None))
        raw = sdk.completions.with_raw_response.create(
            model=MODEL, prompt=COUNTING, temperature=0, **kw, **text_kw)
        got.append((TEXT, raw.http_response.json(), None))

    # A forced tool call and a JSON-schema answer (constrained decoding), whole and streamed.
    for kw in (TOOLS, {"max_tokens": 60, "response_format": {
            "type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}}):
        raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=ASK,
                                                             temperature=0, **kw)
        got.append((CHAT, raw.http_response.json(), None))
        got += [(CHUNK, c, None) for c in _stream(
            base, "/v1/chat/completions", {"model": MODEL, "messages": ASK, "temperature": 0,
                                           **kw})]

    use = {"stream_options": {"include_usage": True}, "max_tokens": 4, "temperature": 0}
    relaxed = _text_chunk_schema()
    for extra_chat, extra_text in (({}, {"echo": True}),
                                   ({"n": 2, "logprobs": True, "top_logprobs": 2},
                                    {"n": 2, "logprobs": 2})):
        chunks = _stream(base, "/v1/chat/completions",
                         {"model": MODEL, "messages": chat("Hi"), **use, **extra_chat})
        got += [(CHUNK, c, None) for c in chunks]
        for c in _stream(base, "/v1/completions",
                         {"model": MODEL, "prompt": COUNTING, **use, **extra_text}):
            final = not c["choices"] or c["choices"][0]["finish_reason"] is not None
            got.append((TEXT, c, None if final else relaxed))

    bad = [  # each failure a client can cause here, OpenAI-shaped
        httpx.post(f"{base}/v1/chat/completions", json={"model": "nope", "messages": chat("x")}),
        httpx.post(f"{base}/v1/chat/completions",
                   json={"model": MODEL, "messages": chat("x"), "temperature": 9}),
        httpx.post(f"{base}/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"}),
        httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "word " * 5000}),
        httpx.get(f"{base}/v1/no-such-route"),
    ]
    for r in bad:
        assert r.status_code in (400, 404), r.text
        got.append(("ErrorResponse", r.json(), None))
    return got


def _check(objects: list[tuple[str, Any, dict[str, Any] | None]]) -> None:
    for kind in (CHAT, TEXT):  # both finish reasons were seen, whole and streamed
        assert {c["finish_reason"] for n, o, _ in objects if n == kind
                for c in o.get("choices", []) if c["finish_reason"]} >= {"stop", "length"}
    assert any(c["message"].get("tool_calls") for n, o, _ in objects if n == CHAT
               for c in o["choices"]), "no tool call was checked"
    problems = [p for name, obj, override in objects for p in errors(obj, name, override)]
    assert not problems, "\n".join(problems)


def test_worker_responses_match_the_openai_spec(llama_worker) -> None:
    objs = _objects(llama_worker.url)
    # Every chat message names its refusal (required by the spec), as null.
    messages = [c["message"] for n, o, _ in objs if n == CHAT for c in o["choices"]]
    assert len(messages) == 6 and all(m["refusal"] is None for m in messages)
    assert any(c.get("logprobs") for n, o, _ in objs if n in (CHAT, TEXT)
               for c in o.get("choices", []))  # the logprobs shapes were checked too
    _check(objs)


def test_gateway_responses_match_the_openai_spec(gateway) -> None:
    objs = _objects(gateway.url)
    card = httpx.get(f"{gateway.url}/v1/models/{MODEL}")
    objs.append(("Model", card.json(), None))
    objs.append(("ErrorResponse", httpx.get(f"{gateway.url}/v1/models/nope").json(), None))
    _check(objs)


def test_the_validator_catches_a_deviation() -> None:
    """The check itself can fail: the shapes Corral sent before the spec test existed."""
    old = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL,
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                        "logprobs": None, "finish_reason": "stop"}]}
    assert errors(old, CHAT) == [f"{CHAT} at /choices/0/message: 'refusal' is a required "
                                 "property"]
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL,
             "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None}]}
    assert errors(chunk, TEXT)  # strict: null is not in the enum ...
    assert not errors(chunk, TEXT, _text_chunk_schema())  # ... relaxed for non-final chunks
    assert errors({"error": {"message": "x", "type": "y"}}, "ErrorResponse")
