"""Chat completion chunks in, Responses API events out, and the response object they build.

`Builder` is fed the chat stream's chunks (as the relay passes them, failover included) and
returns the typed events in OpenAI's order, each with its `sequence_number`:
`response.created`, `response.in_progress`; per text item `output_item.added`,
`content_part.added`, `output_text.delta`..., `output_text.done`, `content_part.done`,
`output_item.done`; per tool call `output_item.added`, `function_call_arguments.delta`...,
`function_call_arguments.done`, `output_item.done`; then `response.completed` (or
`response.incomplete` when max_output_tokens cut it, `response.failed` when the worker
failed). One item is open at a time, as OpenAI streams them. A non-streamed request runs
the same builder and returns `response`, so both shapes always agree.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.responses.translate import new_id, to_messages
from wire.responses import ResponsesRequest


def skeleton(req: ResponsesRequest, rid: str) -> dict[str, Any]:
    """The response object before any output: what `response.created` carries."""
    tools = [{"type": "function", "name": t.get("name"), "description": t.get("description"),
              "parameters": t.get("parameters"), "strict": t.get("strict", True)}
             for t in req.tools or []]
    return {
        "id": rid, "object": "response", "created_at": int(time.time()),
        "status": "in_progress", "background": False, "error": None,
        "incomplete_details": None, "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens, "model": req.model, "output": [],
        "parallel_tool_calls": True if req.parallel_tool_calls is None
        else req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": None, "summary": None}, "store": req.store,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": req.text_format},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": tools, "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": "disabled", "usage": None, "user": req.user,
        "metadata": req.metadata or {},
    }


def sse_event(ev: dict[str, Any]) -> bytes:
    return b"event: " + ev["type"].encode() + b"\ndata: " + orjson.dumps(ev) + b"\n\n"


def chunks(piece: bytes) -> list[dict[str, Any]]:
    """The JSON objects of the `data:` lines in whole SSE events (comments, [DONE] skipped)."""
    out = []
    for line in piece.split(b"\n"):
        if line.startswith(b"data: {"):
            try:
                obj = orjson.loads(line[6:])
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


class Builder:
    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        self.seq = 0
        self.open: dict[str, Any] | None = None  # the output item being streamed
        self.calls: dict[int, dict[str, Any]] = {}  # chat tool_call index -> item
        self.finish: str | None = None
        self.failed = False

    @property
    def output(self) -> list[dict[str, Any]]:
        return self.response["output"]

    def _ev(self, type: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": type, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def _snapshot(self) -> dict[str, Any]:
        return orjson.loads(orjson.dumps(self.response))  # events carry a copy, not a view

    def start(self) -> list[dict[str, Any]]:
        return [self._ev("response.created", response=self._snapshot()),
                self._ev("response.in_progress", response=self._snapshot())]

    # ------------------------------------------------------------------ items
    def _add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        evs = self._close()
        self.output.append(item)
        self.open = item
        evs.append(self._ev("response.output_item.added", output_index=len(self.output) - 1,
                            item=dict(item, content=[]) if item["type"] == "message"
                            else dict(item)))
        if item["type"] == "message":
            part = item["content"][0]
            evs.append(self._ev("response.content_part.added", item_id=item["id"],
                                output_index=len(self.output) - 1, content_index=0,
                                part=dict(part)))
        return evs

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        idx = self.output.index(item)
        item["status"] = status
        evs = []
        if item["type"] == "message":
            part = item["content"][0]
            evs += [self._ev("response.output_text.done", item_id=item["id"], output_index=idx,
                             content_index=0, text=part["text"], logprobs=[]),
                    self._ev("response.content_part.done", item_id=item["id"],
                             output_index=idx, content_index=0, part=dict(part))]
        else:
            evs.append(self._ev("response.function_call_arguments.done", item_id=item["id"],
                                output_index=idx, name=item["name"],
                                arguments=item["arguments"]))
        evs.append(self._ev("response.output_item.done", output_index=idx,
                            item=orjson.loads(orjson.dumps(item))))
        return evs

    def _text(self, delta: str) -> list[dict[str, Any]]:
        evs: list[dict[str, Any]] = []
        if self.open is None or self.open["type"] != "message":
            evs = self._add({"id": new_id("msg"), "type": "message", "status": "in_progress",
                             "role": "assistant",
                             "content": [{"type": "output_text", "text": "",
                                          "annotations": []}]})
        item = self.open
        assert item is not None
        if not delta:
            return evs
        item["content"][0]["text"] += delta
        evs.append(self._ev("response.output_text.delta", item_id=item["id"],
                            output_index=len(self.output) - 1, content_index=0, delta=delta,
                            logprobs=[]))
        return evs

    def _call(self, tc: dict[str, Any]) -> list[dict[str, Any]]:
        evs: list[dict[str, Any]] = []
        index = tc.get("index", 0)
        fn = tc.get("function") or {}
        item = self.calls.get(index)
        if item is None:
            item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress",
                    "arguments": "", "call_id": tc.get("id") or new_id("call"),
                    "name": fn.get("name") or ""}
            self.calls[index] = item
            evs = self._add(item)
        args = fn.get("arguments")
        if args:
            item["arguments"] += args
            evs.append(self._ev("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=self.output.index(item), delta=args))
        return evs

    # ------------------------------------------------------------------ the stream
    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """Events for one chat chunk (an `{"error": ...}` chunk fails the response)."""
        if self.failed:
            return []
        err = chunk.get("error")
        if err is not None:
            e = err if isinstance(err, dict) else {}
            return self.fail(e.get("message") or "The worker failed.",
                             e.get("code") or "server_error")
        if chunk.get("model"):
            self.response["model"] = chunk["model"]
        use = chunk.get("usage")
        if isinstance(use, dict):
            self._usage(use)
        evs: list[dict[str, Any]] = []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                evs += self._text(delta["content"])
            for tc in delta.get("tool_calls") or ():
                evs += self._call(tc)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return evs

    def _usage(self, use: dict[str, Any]) -> None:
        p, c = use.get("prompt_tokens", 0) or 0, use.get("completion_tokens", 0) or 0
        cached = (use.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0
        self.response["usage"] = {
            "input_tokens": p, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": c, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": p + c}

    def finish_events(self) -> list[dict[str, Any]]:
        """Closes the output; returns the done events, not yet the terminal one."""
        if self.failed:
            return []
        if self.finish is None:  # the stream ended without a finish: never a silent cut
            return self.fail("The worker's stream ended before the answer finished.",
                             "server_error")
        cut = self.finish == "length"
        evs = []
        if not self.output:  # an empty answer is still one (empty) message
            evs += self._text("")
        evs += self._close("incomplete" if cut else "completed")
        self.response["status"] = "incomplete" if cut else "completed"
        if cut:
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
        return evs

    def terminal(self) -> dict[str, Any]:
        """`response.completed` / `response.incomplete` / `response.failed`."""
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
            self.response["status"], "response.failed")
        return self._ev(kind, response=self._snapshot())

    def fail(self, message: str, code: str) -> list[dict[str, Any]]:
        self.failed = True
        self.open = None
        self.response["status"] = "failed"
        self.response["error"] = {"code": code, "message": message}
        return []

    def history(self) -> list[dict[str, Any]]:
        """This response's output as chat turns, for a later previous_response_id."""
        return to_messages(self.output)
