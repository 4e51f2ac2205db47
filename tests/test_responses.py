"""The Responses API through real gateways: two replicas on one real redis-server, in front
of the session's llama.cpp worker on the bundled model, driven by the official openai SDK.

Few real-model requests, short answers. Function calls and json_schema ride on the chat
path's tools and structured output (wire/tools.py), so the two never disagree.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import MODEL, client_for
from procs import Gateway, metric, start_gateway, start_redis, wait_for

from gateway.api.responses import conversation_key
from gateway.responses.events import Builder, skeleton
from gateway.responses.translate import input_items, rename_param, to_messages
from wire.responses import ResponsesRequest

HEADER = "x-corral-worker"
KEYS = """
[[api_keys]]
key = "sk-alice"
user = "alice"
[[api_keys]]
key = "sk-bob"
user = "bob"
[[api_keys]]
key = "sk-webui"
user = "webui"
frontend = "openwebui"
"""
END_USER = "X-OpenWebUI-User-Id"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False},
           "strict": True}


@pytest.fixture(scope="module")
def gateways(llama_worker, tmp_path_factory) -> Iterator[tuple[Gateway, Gateway]]:
    conf = tmp_path_factory.mktemp("responses") / "corral.toml"
    conf.write_text(KEYS)
    redis, url = start_redis()
    started: list[Gateway] = []
    try:
        for _ in range(2):
            started.append(start_gateway("--worker", llama_worker.url, "--redis-url", url,
                                         "--config", str(conf)))
        for g in started:
            wait_for(lambda g=g: httpx.get(f"{g.url}/readyz").status_code == 200, 60, 0.05,
                     "gateway ready")
        yield started[0], started[1]
    finally:
        for g in started:
            g.proc.stop()
        redis.stop()


def alice(g: Gateway) -> openai.OpenAI:
    return client_for(g.url, api_key="sk-alice")


def bob(g: Gateway) -> openai.OpenAI:
    return client_for(g.url, api_key="sk-bob")


def test_text_is_stored_shared_and_private(gateways) -> None:
    a, b = gateways
    before = metric(a.url, "corral_user_tokens_total", user="alice", kind="completion")
    raw = alice(a).responses.with_raw_response.create(
        model=MODEL, instructions="Answer in one short sentence.", input="What is 2+2?",
        max_output_tokens=40, temperature=0)
    r = raw.parse()
    assert raw.headers[HEADER] != "gateway"  # a worker served it
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status in ("completed", "incomplete") and r.output_text.strip()
    u = r.usage
    assert u.input_tokens > 5 and 0 < u.output_tokens <= 40
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.output_tokens_details.reasoning_tokens == 0
    assert u.input_tokens_details.cached_tokens >= 0
    # per-user usage counts it like chat
    wait_for(lambda: metric(a.url, "corral_user_tokens_total", user="alice",
                            kind="completion") >= before + u.output_tokens, 5, 0.05, "usage")

    # stored in Redis: the other replica serves it, and its input items
    got = alice(b).responses.retrieve(r.id)
    assert got.output_text == r.output_text and got.usage.output_tokens == u.output_tokens
    items = alice(b).responses.input_items.list(r.id)
    assert [(i.type, i.role) for i in items.data] == [("message", "user")]
    assert items.data[0].content[0].type == "input_text"
    assert items.data[0].content[0].text == "What is 2+2?"

    # another key sees none of it
    with pytest.raises(openai.NotFoundError):
        bob(a).responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        bob(b).responses.input_items.list(r.id)
    with pytest.raises(openai.NotFoundError):
        bob(a).responses.delete(r.id)
    with pytest.raises(openai.BadRequestError) as exc:
        bob(a).responses.create(model=MODEL, input="and then?", previous_response_id=r.id)
    assert exc.value.body["param"] == "previous_response_id"

    # delete: gone for every replica
    alice(b).responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        alice(a).responses.retrieve(r.id)


def test_stream_with_the_sdk_helper(gateways) -> None:
    a, b = gateways
    with alice(a).responses.stream(model=MODEL, input="Name a colour.", max_output_tokens=24,
                                   temperature=0, store=True) as s:
        events = list(s)
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    tail = ["response.output_text.done", "response.content_part.done",
            "response.output_item.done"]
    assert types[-4:-1] == tail
    assert set(types[4:-4]) == {"response.output_text.delta"}
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert types[-1] in ("response.completed", "response.incomplete")
    assert final.status == types[-1].removeprefix("response.") and deltas
    assert final.output[0].content[0].text == deltas
    assert final.usage.output_tokens > 0
    if types[-1] == "response.completed":
        assert s.get_final_response().output_text == deltas
    # stored before the last event: the other replica has it at once
    assert alice(b).responses.retrieve(final.id).output[0].content[0].text == deltas


def test_behind_a_front_end_each_end_user_sees_only_their_own(gateways) -> None:
    a, b = gateways

    def as_user(g: Gateway, uid: str | None) -> openai.OpenAI:
        return client_for(g.url, api_key="sk-webui",
                          default_headers={END_USER: uid} if uid else None)

    r = as_user(a, "u1").responses.create(model=MODEL, input="Hi", max_output_tokens=4)
    assert as_user(b, "u1").responses.retrieve(r.id).id == r.id
    for other in (as_user(b, "u2"), as_user(a, None), alice(a)):
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError):
        as_user(a, "u2").responses.create(model=MODEL, input="and?", previous_response_id=r.id)


def test_store_false_is_not_kept(gateways) -> None:
    a, _ = gateways
    r = alice(a).responses.create(model=MODEL, input="Hi", max_output_tokens=4, store=False)
    assert r.store is False and r.usage.output_tokens > 0
    with pytest.raises(openai.NotFoundError):
        alice(a).responses.retrieve(r.id)


def test_json_schema_text_format(gateways) -> None:
    a, _ = gateways
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = alice(a).responses.create(
        model=MODEL, input="Invent a person: name and age.", max_output_tokens=60,
        temperature=0, text={"format": {"type": "json_schema", "name": "person",
                                        "schema": schema, "strict": True}})
    assert r.status == "completed"
    obj = json.loads(r.output_text)
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)
    assert r.text.format.type == "json_schema"


def test_forced_function_call_round_trip_through_a_second_gateway(gateways) -> None:
    a, b = gateways
    raw = alice(a).responses.with_raw_response.create(
        model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40,
        temperature=0)
    r = raw.parse()
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and len(calls) >= 1
    call = calls[0]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    assert call.call_id and call.id.startswith("fc_")

    # the tool's answer goes to the other replica, which reads the conversation from Redis
    with alice(b).responses.stream(
            model=MODEL, previous_response_id=r.id, tools=[WEATHER], max_output_tokens=30,
            temperature=0, input=[{"type": "function_call_output", "call_id": call.call_id,
                                   "output": json.dumps({"temp_c": 21})}]) as s:
        events = list(s)
    final = events[-1].response
    assert final.previous_response_id == r.id and final.output_text
    # the whole first turn was in the worker's prompt cache: the turn continued there
    assert final.usage.input_tokens_details.cached_tokens > 0
    items = alice(a).responses.input_items.list(final.id, order="asc")
    assert [i.type for i in items.data] == ["function_call_output"]
    assert items.data[0].call_id == call.call_id


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0].type"),
    ({"background": True}, "background"),
    ({"input": [{"role": "user", "content": [{"type": "input_image",
                                              "image_url": "https://x/y.png"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"type": "function_call_output", "output": "1"}]}, "input[0].call_id"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"include": ["file_search_call.results"]}, "include[0]"),
    ({"previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"input": ""}, "input"),
])
def test_bad_input_is_a_400_naming_the_parameter(gateways, extra, param) -> None:
    a, _ = gateways
    body = {"model": MODEL, "input": "hi", **extra}
    with pytest.raises(openai.BadRequestError) as exc:
        alice(a).responses.create(**body)
    assert exc.value.body["param"] == param, exc.value.body


def test_unknown_ids_and_bad_pages(gateways) -> None:
    a, _ = gateways
    with pytest.raises(openai.NotFoundError):
        alice(a).responses.retrieve("resp_unknown")
    with pytest.raises(openai.BadRequestError) as exc:
        alice(a).responses.input_items.list("resp_unknown", limit=0)
    assert exc.value.body["param"] == "limit"
    with pytest.raises(openai.AuthenticationError):
        client_for(a.url, api_key="sk-wrong").responses.retrieve("resp_unknown")


# ------------------------------------------------------------------ translation, no model


def _req(**kw) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": MODEL, **kw})


def test_items_become_chat_turns() -> None:
    req = _req(input=[
        {"role": "user", "content": [{"type": "input_text", "text": "a"},
                                     {"type": "input_text", "text": "b"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"x\":1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": "two"}])
    items = input_items(req)
    assert [i["id"][:3] for i in items] == ["msg", "fc_", "fc_", "fco", "fco"]
    msgs = to_messages(items)
    assert msgs[0] == {"role": "user", "content": "ab"}
    assert msgs[1]["role"] == "assistant" and [c["id"] for c in msgs[1]["tool_calls"]] == [
        "c1", "c2"]
    assert msgs[2:] == [{"role": "tool", "tool_call_id": "c1", "content": "one"},
                        {"role": "tool", "tool_call_id": "c2", "content": "two"}]


def test_chat_param_names_become_responses_names() -> None:
    assert rename_param("response_format.json_schema.schema") == "text.format.schema"
    assert rename_param("tools[2].function.parameters") == "tools[2].parameters"
    assert rename_param("tool_choice.function.name") == "tool_choice.name"
    assert rename_param("messages.0.content") == "input"
    assert rename_param("max_completion_tokens") == "max_output_tokens"


def _chunk(delta=None, finish=None, usage=None) -> dict:
    out: dict = {"model": MODEL, "choices": [] if delta is None else [
        {"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        out["usage"] = usage
    return out


def test_builder_orders_text_then_tool_call_events() -> None:
    b = Builder(skeleton(_req(input="x"), "resp_1"))
    evs = b.start()
    for c in (_chunk({"role": "assistant", "content": ""}), _chunk({"content": "Hi"}),
              _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                      "function": {"name": "f", "arguments": ""}}]}),
              _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\""}}]}),
              _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}),
              _chunk({}, "tool_calls"),
              _chunk(usage={"prompt_tokens": 7, "completion_tokens": 3,
                            "prompt_tokens_details": {"cached_tokens": 4}})):
        evs += b.feed(c)
    evs += b.finish_events()
    evs.append(b.terminal())
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    assert [e["type"].removeprefix("response.") for e in evs] == [
        "created", "in_progress", "output_item.added", "content_part.added",
        "output_text.delta", "output_text.done", "content_part.done", "output_item.done",
        "output_item.added", "function_call_arguments.delta",
        "function_call_arguments.delta", "function_call_arguments.done", "output_item.done",
        "completed"]
    final = evs[-1]["response"]
    assert final["output"][1]["arguments"] == '{"a":1}' and final["output"][1]["call_id"] \
        == "call_1"
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 4
    assert evs[0]["response"]["output"] == [] and evs[0]["response"]["status"] == "in_progress"
    assert b.history()[0]["tool_calls"][0]["function"]["name"] == "f"


def test_builder_never_cuts_silently() -> None:
    b = Builder(skeleton(_req(input="x"), "resp_2"))
    b.start()
    b.feed(_chunk({"content": "par"}))
    b.feed({"error": {"message": "The worker serving this stream failed.",
                      "code": "worker_failed"}})
    assert b.finish_events() == []
    end = b.terminal()
    assert end["type"] == "response.failed"
    assert end["response"]["error"]["code"] == "worker_failed"

    b = Builder(skeleton(_req(input="x"), "resp_3"))
    b.start()
    b.feed(_chunk({"content": "par"}))  # the stream ends without a finish_reason
    b.finish_events()
    assert b.terminal()["type"] == "response.failed"

    b = Builder(skeleton(_req(input="x", max_output_tokens=2), "resp_4"))
    b.start()
    b.feed(_chunk({"content": "ab"}, "length"))
    done = b.finish_events()
    assert done[-1]["item"]["status"] == "incomplete"
    end = b.terminal()
    assert end["type"] == "response.incomplete"
    assert end["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_continued_conversation_keeps_its_first_turns_affinity_key() -> None:
    first = conversation_key(MODEL, None, None, "resp_root", False)
    later = conversation_key(MODEL, None, None, "resp_root", True)
    assert first[0] == later[0] and first[1] is False and later[1] is True
    assert conversation_key(MODEL, None, None, "resp_other", True)[0] != first[0]
    assert conversation_key(MODEL, "s1", None, "resp_root", False) == (
        f"{MODEL}\x00s\x00s1", True)  # the client's session header wins, as on chat


def test_memory_store_is_bounded() -> None:
    import asyncio

    from gateway.responses.store import ResponseStore

    async def go() -> None:
        s = ResponseStore(None, ttl=60, max_bytes=100, max_entries=2)
        assert await s.put("r1", {"x": 1}) and await s.put("r2", {"x": 2})
        assert await s.put("r3", {"x": 3})  # over the count: the oldest goes
        assert await s.get("r1") is None and (await s.get("r3")) == {"x": 3}
        assert not await s.put("big", {"x": "y" * 200})  # over the size: not stored
        assert await s.get("big") is None
        await s.delete("r2")
        assert await s.get("r2") is None and s._bytes == len(b'{"x":3}')
        expired = ResponseStore(None, ttl=-1)
        await expired.put("old", {"x": 1})
        assert await expired.get("old") is None

    asyncio.run(go())
