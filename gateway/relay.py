"""A stream from a worker to its client: bytes passed through as they come.

The relay splits the worker's bytes on event boundaries only to count events, to time the
first token and to read (and, if the client did not ask for it, drop) the usage chunk; the
gateway always asks workers for usage so that token metrics are exact. Until a break it
only keeps references to the pieces it passed on. A stream that breaks mid-way (the worker
died, or the registry declared it stalled and `abandon` closed its socket) is continued on
another worker (`continuation.Continuation`). A failed-over stream names its final worker
in an SSE comment before `[DONE]` (`: x-corral-worker=<id>`; the `x-corral-worker` header
names the first one, as headers left before the break).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.call import Call, StreamOpener
from gateway.continuation import Continuation
from gateway.worker_record import Worker
from wire.errors import error_body
from wire.sse import SSE_DONE, sse

log = logging.getLogger("corral.gateway")


class Relay(Continuation):
    """One stream from a worker to the client; in its worker's `watched` set (so that
    `Upstream._stalled` can abandon it) from `Upstream._open_stream` until `close`."""

    __slots__ = ("up", "call", "worker", "resp", "it", "first", "events", "ttft", "done",
                 "worker_error", "broken", "prompt_tokens", "completion_tokens", "closed",
                 "leased")

    def __init__(self, up: StreamOpener, call: Call, worker: Worker, resp: httpx.Response,
                 it: AsyncIterator[bytes], first: bytes) -> None:
        super().__init__()
        self.up = up
        self.call = call
        self.worker = worker
        self.resp = resp
        self.it = it
        self.first = first
        self.events = 0
        self.ttft: float | None = None
        self.done = False
        self.worker_error = False
        self.broken = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.closed = False
        self.leased = True  # holds the admission lease on `worker`

    async def abandon(self, frozen: Worker) -> None:
        """`frozen` stopped answering: drop the connection to it; `body` then sees a broken
        stream and continues elsewhere. (No-op if the relay moved on meanwhile.)"""
        if self.worker is frozen and not self.closed and not self.resp.is_closed:
            self.up.metrics.upstream_errors.labels("stall").inc()
            await self.resp.aclose()

    async def body(self) -> AsyncIterator[bytes]:
        chunk: bytes | None = self.first
        while chunk is not None:
            buf = b""
            it = self.it
            try:
                while True:
                    if buf:
                        chunk = buf + chunk
                    cut = chunk.rfind(b"\n\n") + 2
                    if cut < 2:
                        buf = chunk
                    else:
                        if cut == len(chunk):
                            piece, buf = chunk, b""
                        else:
                            piece, buf = chunk[:cut], chunk[cut:]
                        if self.failovers:  # a continuation: same id/created as before
                            piece = self._rewritten(piece)
                        self.events += piece.count(b"\n\n")
                        if self.ttft is None and (b'"delta":{"content":' in piece
                                                  or b'"text":"' in piece
                                                  or b'"delta":{"tool_calls":' in piece):
                            self.ttft = time.perf_counter() - self.call.started
                        if b'"usage":' in piece:
                            piece = self._usage(piece)
                        if piece.endswith(SSE_DONE):
                            self.done = True
                            if self.failovers:
                                piece = (piece[:-len(SSE_DONE)] + b": x-corral-worker="
                                         + self.worker.id.encode() + b"\n\n" + SSE_DONE)
                        elif b'data: {"error"' in piece:
                            self.worker_error = True
                        if piece:
                            self.pieces.append(piece)
                            yield piece
                    chunk = await it.__anext__()
            except StopAsyncIteration:
                pass
            except httpx.HTTPError as exc:
                self.up.metrics.upstream_errors.labels("midstream").inc()
                self.up.registry.eject(self.worker, f"stream broke: {exc!s:.200}")
            except Exception as exc:  # a bug, not a worker failure: still never a silent cut
                log.exception("relaying a stream from %s failed", self.worker.id)
                self.up.metrics.upstream_errors.labels("midstream").inc()
                self.up.registry.eject(self.worker, f"stream broke: {exc!r:.200}")
            if self.done or self.worker_error:
                return
            try:
                ending = self._take_stock()
                if ending is not None:  # the answer was complete: only the tail was lost
                    self.done = True
                    yield ending
                    return
                chunk = await self._continue_elsewhere()
            except Exception:
                log.exception("continuing a broken stream failed")
                chunk = None
        self.broken = True
        yield sse(error_body("The worker serving this stream failed before finishing it.",
                             "server_error", None, "worker_failed"))

    def _usage(self, piece: bytes) -> bytes:
        """Reads usage from the usage chunk; drops that chunk if the client did not ask.
        After a failover, the usage counts the whole answer and the original prompt."""
        keep = []
        for ev in piece.split(b"\n\n")[:-1]:
            if b'"usage":' in ev and ev.startswith(b"data: {"):
                try:
                    obj = orjson.loads(ev[6:])
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict):
                    use = obj.get("usage") or {}
                    self.prompt_tokens = use.get("prompt_tokens", 0) or 0
                    self.completion_tokens = use.get("completion_tokens", 0) or 0
                    if self.failovers and self.sent_tokens:
                        self.prompt_tokens = max(0, self.prompt_tokens - self.sent_tokens)
                        self.completion_tokens += self.sent_tokens
                        use.update(prompt_tokens=self.prompt_tokens,
                                   completion_tokens=self.completion_tokens,
                                   total_tokens=self.prompt_tokens + self.completion_tokens)
                        use.pop("prompt_tokens_details", None)
                        ev = b"data: " + orjson.dumps(obj)
                    if not self.call.client_usage and obj.get("choices") == []:
                        continue
            keep.append(ev + b"\n\n")
        return b"".join(keep)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.worker.watched.discard(self)
        try:
            if self.leased:  # mid-stream: drops the connection, so the worker aborts
                await self.resp.aclose()
        finally:
            if self.leased:
                self.leased = False
                self.up.admission.release(self.worker)
            status = 200 if self.done or self.worker_error else (502 if self.broken else 499)
            completion = self.completion_tokens or max(0, self.events - 3)
            self.up.metrics.finished(self.call.model, status,
                                     time.perf_counter() - self.call.started, self.ttft,
                                     self.prompt_tokens, completion)


class RelayResponse(StreamingResponse):
    """A streaming response that always closes its upstream and gives back its lease."""

    def __init__(self, relay: Relay, headers: dict[str, Any]) -> None:
        super().__init__(relay.body(), 200, headers, media_type="text/event-stream")
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self.relay.close())
