"""A streamed request that waits for its model to load: SSE comments until it is served.

A request for a catalogued model loaded nowhere waits in the gateway queue while the placer
loads it (seconds to minutes). A stream answers at once with `200` and `: loading` comment
lines (every `EVERY` seconds; SSE clients, the OpenAI SDK among them, ignore comments), so
neither the client nor a proxy in between times out; then the worker's stream follows as
from any loaded model. The worker is not known when the headers leave, so its
`x-corral-worker` is `gateway`. An error found while waiting (the load timed out, the model
cannot be placed) becomes one OpenAI-shaped error event, as a stream broken mid-way does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from fastapi.responses import Response
from starlette.types import Message, Receive, Scope, Send

from wire.status import WORKER_HEADER

EVERY = 2.0
KEEPALIVE = b": loading\n\n"


class LoadingStream(Response):
    def __init__(self, work: Coroutine[Any, Any, Response], every: float = EVERY) -> None:
        self.work = work
        self.every = every
        self.status_code = 200
        self.background = None
        self.relay: Any = None  # the inner stream's relay, once there (api/openai.Accounted)
        self.init_headers({"content-type": "text/event-stream", "cache-control": "no-cache",
                           "x-accel-buffering": "no", WORKER_HEADER: "gateway"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.ensure_future(self.work)
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            while True:
                await send({"type": "http.response.body", "body": KEEPALIVE,
                            "more_body": True})
                done, _ = await asyncio.wait({task}, timeout=self.every)
                if done:
                    break
            inner = task.result()
        except BaseException:
            task.cancel()  # the client left: the request leaves the queue (upstream.py)
            raise
        self.relay = getattr(inner, "relay", None)
        if self.relay is None:  # not a stream: an error answered while waiting
            self.status_code = inner.status_code
            body = bytes(getattr(inner, "body", b"") or b"{}")
            await send({"type": "http.response.body", "body": b"data: " + body + b"\n\n",
                        "more_body": False})
            return

        async def body_only(message: Message) -> None:
            if message["type"] != "http.response.start":  # ours left already
                await send(message)

        await inner(scope, receive, body_only)
