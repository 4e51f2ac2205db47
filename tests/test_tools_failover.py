"""A constrained stream cut halfway (its worker SIGKILLed) and continued on another worker
still validates: the gateway sends what was relayed (text, or tool calls rebuilt from
their deltas) and the next worker advances the grammar over it before generating."""

from __future__ import annotations

import json

import jsonschema
import orjson
import pytest
from conftest import MODEL
from procs import metric, wait_for
from test_failover import Stream, needs_llama, ready_gateway

NOTE = {"type": "object",
        "properties": {"title": {"type": "string", "maxLength": 40},
                       "body": {"type": "string", "minLength": 60, "maxLength": 300}},
        "required": ["title", "body"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "save_note", "parameters": NOTE}}
ASK = [{"role": "user", "content": "Write a note about horses, then save it."}]


def _kill_after(s: Stream, workers: list, n: int, count) -> None:
    wait_for(lambda: count(s) >= n or s.error is not None or s.done, 120, 0.01,
             f"{n} events")
    assert s.error is None and not s.done, "the stream ended before the cut"
    next(w for w in workers if w.id == s.worker).proc.kill()


def _call_deltas(s: Stream) -> list[dict]:
    return [p for e in s.events for ch in e.get("choices") or ()
            for p in (ch.get("delta") or {}).get("tool_calls") or ()]


@needs_llama
@pytest.mark.timeout(400)
def test_constrained_streams_continue_and_validate(worker_factory, gateway_factory) -> None:
    # Started together; ready_gateway waits until each serves.
    ws = [worker_factory("--parallel", "1", "--threads", "1", wait=False) for _ in range(3)]
    g = ready_gateway(gateway_factory, *ws)
    base = {"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 160,
            "stream": True}

    # A tool call cut inside its arguments: the rest arrive under the same index, no new id.
    s = Stream(g.url, "/v1/chat/completions",
               {**base, "tools": [TOOL], "parallel_tool_calls": False,
                "tool_choice": {"type": "function", "function": {"name": "save_note"}}},
               deadline=300)
    _kill_after(s, ws, 12, lambda s: len(_call_deltas(s)))
    s.join()
    assert s.done and not [e for e in s.events if "error" in e]
    parts = _call_deltas(s)
    assert [p["index"] for p in parts] == [0] * len(parts)
    assert [p.get("id") for p in parts if p.get("id")] == [parts[0]["id"]]
    jsonschema.validate(json.loads("".join(p["function"].get("arguments") or ""
                                           for p in parts)), NOTE)
    assert any(ch.get("finish_reason") == "tool_calls" for e in s.events
               for ch in e["choices"])

    # A json_schema answer cut halfway: the text as a whole validates.
    s = Stream(g.url, "/v1/chat/completions",
               {**base, "response_format": {"type": "json_schema", "json_schema": {
                   "name": "note", "schema": NOTE, "strict": True}}}, deadline=300)
    _kill_after(s, ws, 12, lambda s: len(s.content()))
    s.join()
    assert s.done and not [e for e in s.events if "error" in e]
    jsonschema.validate(json.loads("".join(s.content())), NOTE)
    assert metric(g.url, "corral_retries_total", reason="midstream") == 2


def test_continuation_body_carries_the_calls_sent_so_far() -> None:
    from test_failover import _chat_chunk, _ev, _relay

    r = _relay("/v1/chat/completions", {"model": MODEL, "messages": ASK, "stream": True,
                                        "tools": [TOOL], "tool_choice": "required",
                                        "max_tokens": 50})
    head = {"index": 0, "id": "call_a", "type": "function",
            "function": {"name": "save_note", "arguments": ""}}
    r.pieces = [_ev(_chat_chunk({"role": "assistant", "content": ""}))
                + _ev(_chat_chunk({"tool_calls": [head]})),
                _ev(_chat_chunk({"tool_calls": [{"index": 0, "function": {
                    "arguments": '{"title": '}}]}))
                + _ev(_chat_chunk({"tool_calls": [{"index": 0, "function": {
                    "arguments": '"Ho'}}]}))]
    assert r._take_stock() is None and r.sent_tokens == 3
    body = orjson.loads(r._continuation_body())
    assert body["continue_final_message"] is True and body["max_tokens"] == 47
    assert body["messages"][-1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function",
         "function": {"name": "save_note", "arguments": '{"title": "Ho'}}]}
