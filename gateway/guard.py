"""Guards at the gateway's door: bounded request bodies, slow clients cut off.

- `BodyGuard` (ASGI middleware): a body larger than `max_body_bytes` gets a 413
  OpenAI-shaped error — at once when `content-length` says so, else as soon as the bytes
  read pass the bound (chunked uploads); a body that takes longer than `body_timeout` to
  arrive gets a 408. Both close the connection. Only the body phase is timed: once the
  body is in, `receive` is passed through untouched (it then only reports a disconnect).
- `guarded_protocol` (uvicorn HTTP protocol): a client must finish a request's headers
  within `head_timeout` seconds of its first byte (or of connecting), else the connection
  is closed. ASGI apps only see complete headers, so this lives in the protocol.

Each slow client costs one idle socket and one timer; the event loop never waits for it,
so it cannot block other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from wire.errors import APIError


class _Refused(APIError):
    """The body is not read to its end: the connection closes after the answer."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(status, message, "invalid_request_error", None, code,
                         {"connection": "close"})


def _too_large(limit: int) -> _Refused:
    return _Refused(413, f"The request body is larger than the gateway accepts ({limit} "
                    "bytes).", "request_too_large")


class BodyGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout: float) -> None:
        self.app = app
        self.max = max_body_bytes
        self.timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    size = -1
                if size > self.max:
                    await _reply(send, _too_large(self.max))
                    return
                break
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        seen = 0
        body_done = False
        limit = self.max

        async def guarded() -> Message:
            nonlocal seen, body_done
            if body_done:
                return await receive()
            left = deadline - loop.time()
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, left))
            except TimeoutError:
                raise _Refused(408, "The request body did not arrive in time.",
                               "request_timeout") from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)
                if not msg.get("more_body", False):
                    body_done = True
            return msg

        try:  # `send` is passed as is: nothing added per streamed chunk
            await self.app(scope, guarded, send)
        except _Refused as err:  # the app read the body without catching it (rare: the
            with contextlib.suppress(RuntimeError):  # APIError handler normally answers)
                await _reply(send, err)


async def _reply(send: Send, err: APIError) -> None:
    body = orjson.dumps(err.body())
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def guarded_protocol(head_timeout: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a deadline on each request's headers."""

    class Guarded(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(head_timeout, self._head_expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Guarded
