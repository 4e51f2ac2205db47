"""Relaying the worker's `/v1/*` to its split-head child, never leaving a client hanging.

A plain ASGI relay: the request body goes to the child as is, the response comes back as
it streams. If the child is gone or dies mid-answer (a lost shard aborts it; the watchdog
kills a frozen one), the client gets an OpenAI-shaped 503 before the first byte, or a
final error event in a stream that already started: never a silent cut, never a hang.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import orjson
from starlette.types import Receive, Scope, Send

from wire.errors import error_body
from wire.sse import sse
from wire.status import WORKER_HEADER

_HOP = {b"host", b"content-length", b"connection", b"transfer-encoding", b"keep-alive"}


async def _error(send: Send, worker_id: str, message: str) -> None:
    body = orjson.dumps(error_body(message, "service_unavailable", None, "split_head_failed"))
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"retry-after", b"1"),
        (WORKER_HEADER.encode(), worker_id.encode())]})
    await send({"type": "http.response.body", "body": body})


async def relay(scope: Scope, receive: Receive, send: Send, client: httpx.AsyncClient,
                base: str, worker_id: str, on_failure: Callable[[str], None]) -> None:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k.lower() not in _HOP]
    url = base + scope["path"] + (("?" + scope["query_string"].decode())
                                  if scope.get("query_string") else "")
    req = client.build_request(scope["method"], url, headers=headers, content=b"".join(chunks))
    try:
        r = await client.send(req, stream=True)
    except httpx.HTTPError as exc:
        on_failure(f"the split head did not answer: {type(exc).__name__}")
        await _error(send, worker_id, "The split model's head failed; retry shortly.")
        return
    try:
        is_stream = r.headers.get("content-type", "").startswith("text/event-stream")
        if not is_stream:  # a whole answer: read it all, so a failure is still a clean 503
            try:
                body = await r.aread()
            except httpx.HTTPError as exc:
                on_failure(f"the split head failed mid-answer: {type(exc).__name__}")
                await _error(send, worker_id, "The split model's head failed; retry shortly.")
                return
        out = [(k.encode(), v.encode()) for k, v in r.headers.items()
               if k.encode().lower() not in _HOP]
        await send({"type": "http.response.start", "status": r.status_code, "headers": out})
        if not is_stream:
            await send({"type": "http.response.body", "body": body})
            return
        try:
            async for chunk in r.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            on_failure(f"the split head failed mid-stream: {type(exc).__name__}")
            await send({"type": "http.response.body", "more_body": True, "body": sse(error_body(
                "The split model's head failed before finishing this stream.",
                "server_error", None, "split_head_failed"))})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await r.aclose()
