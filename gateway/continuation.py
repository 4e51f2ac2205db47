"""Continuing a stream that broke mid-answer on another worker.

The relay (`relay.Relay`, which is a `Continuation`) keeps references to the pieces it
passed on from the current upstream; only when that upstream breaks are they parsed, once,
into the text and token count sent so far (`_take_stock`). If the answer was complete and
only its tail was lost, the relay writes the ending itself. Otherwise the original request
goes to another worker with the text so far as an open final assistant message
(`continue_final_message`) or, for legacy completions, appended to the prompt, with
`max_tokens` reduced by the tokens already sent (`_continuation_body`). The client keeps
reading the same stream: the continuation's chunks get the original stream's id/created
(one bytes.replace per piece, on the continuation only) and its role chunk is dropped
(`_rewritten`). If no worker can continue, `_continue_elsewhere` says so and the relay ends
the stream with an OpenAI-shaped error event, never a silent cut.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from fastapi.responses import Response

from gateway.admission import Exhausted
from gateway.call import Call, Retry, StreamOpener
from gateway.worker_record import Worker
from wire.errors import APIError
from wire.sse import SSE_DONE

log = logging.getLogger("corral.gateway")
_ROLE = b'"delta":{"role":"assistant"'


class Continuation:
    """The continuation state and steps of a relay (mixed into `relay.Relay`)."""

    __slots__ = ("pieces", "text", "sent_tokens", "head", "rewrite", "skip_role", "failovers",
                 "calls")

    # The relay's own state, which a continuation reads and swaps (set by `relay.Relay`).
    up: StreamOpener
    call: Call
    worker: Worker
    resp: httpx.Response
    it: AsyncIterator[bytes]
    done: bool
    leased: bool
    prompt_tokens: int

    def __init__(self) -> None:
        # References to the pieces relayed from the current upstream (parsed only if it
        # breaks), the text and token count of earlier upstreams, the original stream's
        # `{"id":…,"object":…,"created":N,` head, and the head to swap.
        self.pieces: list[bytes] = []
        self.text = ""
        self.sent_tokens = 0
        self.calls: list[dict[str, Any]] = []  # streamed tool calls, rebuilt at a break
        self.head: bytes | None = None
        self.rewrite: tuple[bytes, bytes] | None = None
        self.skip_role = False
        self.failovers = 0

    def _take_stock(self) -> bytes | None:
        """Parses what the broken upstream sent (once, at the break) into `text` and
        `sent_tokens`. Returns the stream's missing ending if the answer was complete."""
        chat = self.call.path.endswith("/chat/completions")
        finish = None
        finished: set[int] = set()  # n > 1: the choices that ended
        for piece in self.pieces:
            for ev in piece.split(b"\n\n"):
                if not ev.startswith(b"data: {"):
                    continue
                try:
                    obj = orjson.loads(ev[6:])
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(obj, dict):
                    continue
                if self.head is None and isinstance(obj.get("id"), str):
                    self.head = _head(ev)
                for ch in obj.get("choices") or ():
                    delta = ch.get("delta") or {}
                    part = delta.get("content") if chat else ch.get("text")
                    if part:
                        self.text += part
                        self.sent_tokens += _tokens(ch.get("logprobs"), chat)
                    if delta.get("tool_calls"):
                        self.sent_tokens += _add_calls(self.calls, delta["tool_calls"])
                    if ch.get("finish_reason"):
                        finish = ch["finish_reason"]
                        finished.add(ch.get("index", 0))
        self.pieces = []
        if finish is None or len(finished) < self._choices():
            return None
        self.up.metrics.upstream_errors.labels("midstream_tail").inc()
        return self._usage_event() + SSE_DONE

    def _usage_event(self) -> bytes:
        """The usage chunk the client asked for, from what the gateway knows."""
        if not self.call.client_usage or self.head is None:
            return b""
        use = orjson.dumps({"prompt_tokens": self.prompt_tokens,
                            "completion_tokens": self.sent_tokens,
                            "total_tokens": self.prompt_tokens + self.sent_tokens})
        return (b"data: " + self.head + b'"model":' + orjson.dumps(self.call.model)
                + b',"choices":[],"usage":' + use + b"}\n\n")

    def _continuation_body(self) -> bytes | None:
        """The request that continues the answer on another worker; None if it is done."""
        body = orjson.loads(self.call.body)
        limit_key = "max_completion_tokens" if body.get("max_completion_tokens") else (
            "max_tokens")
        limit = body.get(limit_key)
        if self.call.path.endswith("/chat/completions"):
            msgs = list(body["messages"])
            last = msgs[-1] if msgs else None
            if body.get("continue_final_message") and isinstance(last, dict):
                prior = last.get("content") or ""
                if isinstance(prior, list):
                    prior = "".join(p.get("text") or "" for p in prior if isinstance(p, dict))
                msgs[-1] = {**last, "content": prior + self.text}
            else:
                msgs.append({"role": "assistant", "content": self.text})
            if self.calls:  # the worker re-renders them and advances the constraint over them
                msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] or None,
                            "tool_calls": [*(msgs[-1].get("tool_calls") or []), *self.calls]}
            body["messages"] = msgs
            body["continue_final_message"] = True
        else:
            if limit is None:
                limit = 16  # the legacy API's default
            prompt = body["prompt"]
            prompt = prompt if isinstance(prompt, str) else prompt[0]
            text = self.text
            if body.get("echo"):
                text = text.removeprefix(prompt)
                body["echo"] = False
                limit += 1  # the echoed prompt was one event, not a token
            body["prompt"] = prompt + text
            if body.get("logprobs") is not None:  # offsets continue from the text sent
                body["logprobs_offset"] = len(self.text)
        if isinstance(limit, int):
            left = limit - self.sent_tokens
            if left <= 0:
                return None
            body[limit_key] = left
        return orjson.dumps(body)

    async def _continue_elsewhere(self) -> bytes | None:
        """Re-sends the request to another worker with the text relayed so far as an open
        final assistant message (or a longer prompt), and swaps in the new upstream.

        Returns the new stream's first chunk (rewritten), or None when no worker could
        continue (the caller then ends the stream with an error event).
        """
        up, call = self.up, self.call
        if self._choices() > 1 and self.head is not None:
            # n > 1 streams are not continued (see ARCHITECTURE.md, "n and logprobs"):
            # the relay ends the stream with an OpenAI-shaped error event instead.
            log.warning("a stream with n=%d broke on %s mid-answer; ending it with an error "
                        "event", self._choices(), self.worker.id)
            return None
        if self.head is None or not (self.text or self.calls):
            # Nothing of the answer reached the client: start afresh, same id rewritten.
            body: bytes | None = call.body
        else:
            body = self._continuation_body()
        old = self.worker
        self.leased = False
        old.watched.discard(self)
        try:
            await self.resp.aclose()
        finally:
            up.admission.release(old)
        call.tried.append(old.id)
        if body is None:  # every token was sent already: finish with "length"
            self.done = True
            return self._length_ending()
        for _ in range(up.cfg.max_attempts):
            try:
                w = await up.admission.acquire(call.model, call.tried, call.user,
                                               need=call.need, job=call.job)
            except (Exhausted, APIError):
                return None
            up.metrics.retries.labels("midstream").inc()
            try:
                opened = await up.send_stream(w, call.path, body)
            except Retry:
                up.admission.release(w)
                call.tried.append(w.id)
                continue
            except BaseException:
                up.admission.release(w)
                raise
            if isinstance(opened, Response):  # the worker refused it (4xx): give up ...
                up.admission.release(w)
                if b"unsupported_continuation" in bytes(opened.body):
                    call.tried.append(w.id)  # ... unless another kind of worker can do it
                    continue
                return None
            self.resp, self.it, first = opened
            self.worker = w
            w.watched.add(self)
            self.leased = True
            self.failovers += 1
            self.skip_role = self.head is not None and call.path.endswith("/chat/completions")
            self.rewrite = None
            self.pieces = []
            return first
        return None

    def _length_ending(self) -> bytes:
        chat = self.call.path.endswith("/chat/completions")
        assert self.head is not None
        model = orjson.dumps(self.call.model)
        choice = (b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}' if chat
                  else b'{"index":0,"text":"","logprobs":null,"finish_reason":"length"}')
        out = b"data: " + self.head + b'"model":' + model + b',"choices":[' + choice + b"]}\n\n"
        return out + self._usage_event() + SSE_DONE

    def _rewritten(self, piece: bytes) -> bytes:
        if self.rewrite is None:  # the continuation's first event names its own head
            i = piece.find(b"data: {")
            new = _head(piece[i:piece.find(b"\n\n", i)]) if i >= 0 else b""
            if not new:
                return piece
            if self.head is None:
                self.head = new
            self.rewrite = (new, self.head)
        new, old = self.rewrite
        if new != old:
            piece = piece.replace(new, old)
        if self.skip_role and _ROLE in piece:
            self.skip_role = False
            ev_end = piece.find(b"\n\n", piece.find(_ROLE)) + 2
            ev_start = piece.rfind(b"data: ", 0, piece.find(_ROLE))
            piece = piece[:ev_start] + piece[ev_end:]
        return piece

    def _choices(self) -> int:
        return self.call.need[1] if self.call.need else 1


def _tokens(logprobs: object, chat: bool) -> int:
    """Tokens one chunk carries: exact when it has logprobs, else one per chunk."""
    if isinstance(logprobs, dict):
        items = logprobs.get("content") if chat else logprobs.get("tokens")
        if isinstance(items, list) and items:
            return len(items)
    return 1


def _head(ev: bytes) -> bytes:
    """`{"id":"…","object":"…","created":N,` of an event as the worker wrote it (orjson
    keeps the dict's order: id, object, created, model)."""
    i = ev.find(b'"model":')
    return ev[6:i] if i > 0 else b""


def _add_calls(calls: list[dict[str, Any]], deltas: list[Any]) -> int:
    """Folds streamed `delta.tool_calls` into whole calls (by index); returns the count."""
    n = 0
    for d in deltas:
        if not isinstance(d, dict) or not isinstance(d.get("index"), int):
            continue
        i, fn = d["index"], d.get("function") or {}
        while len(calls) <= i:
            calls.append({"id": "", "type": "function",
                          "function": {"name": "", "arguments": ""}})
        call = calls[i]
        call["id"] = d.get("id") or call["id"]
        call["function"]["name"] += fn.get("name") or ""
        call["function"]["arguments"] += fn.get("arguments") or ""
        n += 1
    return n
