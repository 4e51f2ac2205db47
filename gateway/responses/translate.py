"""A Responses request becomes a chat completion request; output items become chat turns.

The Responses API is served by the chat path (admission, routing, upstream, relay), so the
two never disagree about tools, structured output or sampling. This module is pure: it
normalises the request's input items (ids assigned, as `input_items` lists them), turns
items into chat messages (`function_call` items into an assistant turn's `tool_calls`,
`function_call_output` into a `tool` turn), and builds the chat body. Errors name the
Responses parameter (`input[1].content[0].type`, `text.format.schema`), also when the chat
validation or a worker found them (`rename_param`).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from wire.errors import bad_request
from wire.responses import ResponsesRequest

_TEXT_PARTS = {"user": "input_text", "system": "input_text", "developer": "input_text",
               "assistant": "output_text"}
_UNSUPPORTED_PARTS = {"input_image": "images", "input_file": "files", "input_audio": "audio"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --------------------------------------------------------------------------- input items


def input_items(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as normalised items with ids (what `input_items` returns)."""
    if isinstance(req.input, str):
        return [_message("user", req.input)]
    return [_item(raw, f"input[{i}]") for i, raw in enumerate(req.input)]


def _message(role: str, text: str, status: str = "completed") -> dict[str, Any]:
    part: dict[str, Any] = {"type": _TEXT_PARTS[role], "text": text}
    if role == "assistant":
        part["annotations"] = []
    return {"id": new_id("msg"), "type": "message", "role": role, "content": [part],
            "status": status}


def _str(raw: dict[str, Any], key: str, where: str, empty: bool = False) -> str:
    v = raw.get(key)
    if not isinstance(v, str) or (not v and not empty):
        raise bad_request(f"{where}.{key} must be a non-empty string.", param=f"{where}.{key}")
    return v


def _item(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise bad_request(f"{where} must be an object.", param=where)
    kind = raw.get("type", "message")
    if kind == "message":
        role = raw.get("role")
        if role not in _TEXT_PARTS:
            raise bad_request(f"{where}.role must be one of user, assistant, system, "
                              "developer.", param=f"{where}.role")
        item = _message(role, _content_text(raw.get("content"), role, where))
        if isinstance(raw.get("id"), str) and raw["id"]:
            item["id"] = raw["id"]
        return item
    if kind == "function_call":
        return {"id": raw.get("id") or new_id("fc"), "type": "function_call",
                "call_id": _str(raw, "call_id", where), "name": _str(raw, "name", where),
                "arguments": _str(raw, "arguments", where, empty=True),
                "status": "completed"}
    if kind == "function_call_output":
        out = raw.get("output")
        if isinstance(out, list):
            out = _content_text(out, "user", f"{where}.output", key="output")
        if not isinstance(out, str):
            raise bad_request(f"{where}.output must be a string.", param=f"{where}.output")
        return {"id": raw.get("id") or new_id("fco"), "type": "function_call_output",
                "call_id": _str(raw, "call_id", where), "output": out, "status": "completed"}
    if kind == "item_reference":
        raise bad_request("item_reference inputs are not supported; use "
                          "previous_response_id.", param=f"{where}.type")
    raise bad_request(f"Input items of type {kind!r} are not supported.", param=f"{where}.type")


def _content_text(content: Any, role: str, where: str, key: str = "content") -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.{key} must be a string or a list of parts.",
                          param=f"{where}.{key}" if key == "content" else where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]" if key == "content" else f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _UNSUPPORTED_PARTS:
            raise bad_request(f"This model does not accept {_UNSUPPORTED_PARTS[kind]} "
                              f"({kind!r} parts).", param=f"{at}.type")
        if kind not in ("input_text", "output_text", "text") or not isinstance(
                part.get("text"), str):
            raise bad_request(f"Content parts must be input_text (or output_text for "
                              f"assistant turns) with a text; got {kind!r}.",
                              param=f"{at}.type")
        texts.append(part["text"])
    return "".join(texts)


# --------------------------------------------------------------------------- chat turns


def to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items (input or output) as chat messages; adjacent function calls share one turn."""
    msgs: list[dict[str, Any]] = []
    for it in items:
        kind = it["type"]
        if kind == "message":
            msgs.append({"role": it["role"],
                         "content": "".join(p.get("text", "") for p in it["content"])})
        elif kind == "function_call":
            call = {"id": it["call_id"], "type": "function",
                    "function": {"name": it["name"], "arguments": it["arguments"]}}
            last = msgs[-1] if msgs else None
            if last is not None and last["role"] == "assistant":  # one assistant turn
                last.setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            msgs.append({"role": "tool", "tool_call_id": it["call_id"],
                         "content": it["output"]})
    return msgs


# --------------------------------------------------------------------------- the chat body


def chat_tools(req: ResponsesRequest) -> list[dict[str, Any]] | None:
    if not req.tools:
        return None
    out = []
    for t in req.tools:
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise bad_request(f"tool_choice type {choice.get('type')!r} is not supported; use "
                      "'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}.",
                      param="tool_choice")


def chat_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    kind = fmt.get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        js = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": js}
    return None


def chat_body(req: ResponsesRequest, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completion request that serves `req`, always streamed with usage."""
    msgs = ([{"role": "system", "content": req.instructions}] if req.instructions else [])
    msgs += history
    if not msgs:
        raise bad_request("input must hold at least one item.", param="input")
    body: dict[str, Any] = {"model": req.model, "messages": msgs, "stream": True,
                            "stream_options": {"include_usage": True}}
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
        v = getattr(req, name)
        if v is not None:
            body[name] = v
    tools = chat_tools(req)
    if tools is not None:
        body["tools"] = tools
    choice = chat_tool_choice(req.tool_choice)
    if choice is not None:
        body["tool_choice"] = choice
    fmt = chat_format(req.text_format)
    if fmt is not None:
        body["response_format"] = fmt
    return body


# Chat parameter names, as errors from the chat validation or a worker give them, mapped
# to the Responses parameter the client sent (in `param` and in the message).
_RENAMES = [
    (re.compile(r"\bresponse_format\.json_schema\."), "text.format."),
    (re.compile(r"\bresponse_format(\.json_schema)?\b"), "text.format"),
    (re.compile(r"\btools\[(\d+)\]\.function\."), r"tools[\1]."),
    (re.compile(r"\btools\[(\d+)\]\.function\b"), r"tools[\1]"),
    (re.compile(r"\btool_choice\.function\.name\b"), "tool_choice.name"),
    (re.compile(r"\bmax_completion_tokens\b|\bmax_tokens\b"), "max_output_tokens"),
]
_MESSAGES = re.compile(r"^messages\b.*")


def rename(text: str | None) -> str | None:
    """`text` (a param or an error message) with chat names turned into Responses names."""
    if not text:
        return text
    for pat, repl in _RENAMES:
        text = pat.sub(repl, text)
    return text


def rename_param(param: str | None) -> str | None:
    param = rename(param)
    return _MESSAGES.sub("input", param) if param else param
