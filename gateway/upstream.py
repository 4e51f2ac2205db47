"""Talking to workers: one pooled client, retry before the first byte, a thin stream relay.

A request is tried on a worker picked by admission/routing. If it fails before any byte
reached the client — connect error, timeout, 5xx, or 429 from a full worker — the worker is
released (and ejected, for failures), and the request goes to another one, up to
`max_attempts` in all. Once bytes flow, the relay passes the worker's bytes through as they
come: it splits them on event boundaries only to count events, to time the first token and
to read (and, if the client did not ask for it, drop) the usage chunk. The gateway always
asks workers for usage so that token metrics are exact.

A stream that breaks mid-way ends with an OpenAI-shaped error event, never a silent cut.
`_continue_elsewhere` is where mid-stream continuation on another worker plugs in (a later
issue): it gets the stream's state and may return a new upstream to keep relaying from.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import httpx
import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.admission import Admission, Exhausted
from gateway.config import GatewayConfig
from gateway.metrics import Metrics
from gateway.registry import Registry, Worker
from gateway.transport import LeanTransport
from worker.protocol import WORKER_HEADER, APIError, error_body, sse, unavailable

RETRYABLE = frozenset((429, 500, 502, 503, 504))
_JSON = {"content-type": "application/json"}
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class Call:
    """One client request on its way through the gateway."""

    __slots__ = ("model", "path", "body", "stream", "client_usage", "user", "started",
                 "tried")

    def __init__(self, model: str, path: str, body: bytes, stream: bool, client_usage: bool,
                 user: str | None = None) -> None:
        self.model = model
        self.path = path
        self.body = body
        self.stream = stream
        self.client_usage = client_usage
        self.user = user
        self.started = time.perf_counter()
        self.tried: list[str] = []


class _Retry(Exception):
    """This attempt failed before the client saw a byte; try another worker."""

    def __init__(self, reason: str, response: Response) -> None:
        self.reason = reason
        self.response = response


class ClientGone(Exception):
    pass


def _error(err: APIError, worker: str) -> Response:
    return Response(orjson.dumps(err.body()), err.status,
                    {**err.headers, WORKER_HEADER: worker}, media_type="application/json")


def _relayed(r: httpx.Response, body: bytes, worker: str) -> Response:
    headers = {WORKER_HEADER: worker}
    if "retry-after" in r.headers:
        headers["retry-after"] = r.headers["retry-after"]
    return Response(body, r.status_code, headers,
                    media_type=r.headers.get("content-type", "application/json"))


async def _disconnected(request: Request) -> None:
    # The body is read already, so the next message is the client hanging up.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Runs `work`, cancelling it if the client hangs up first (then raises ClientGone)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone


class Upstream:
    def __init__(self, cfg: GatewayConfig, registry: Registry, admission: Admission,
                 metrics: Metrics) -> None:
        self.cfg = cfg
        self.registry = registry
        self.admission = admission
        self.metrics = metrics
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=cfg.connect_timeout, read=cfg.read_timeout,
                                  write=30.0, pool=30.0),
            limits=httpx.Limits(max_connections=cfg.max_connections,
                                max_keepalive_connections=cfg.max_connections,
                                keepalive_expiry=60.0),
            trust_env=False,  # worker traffic never goes through an HTTP(S)_PROXY
            transport=LeanTransport(cfg.max_connections) if cfg.lean_transport else None,
        )

    async def close(self) -> None:
        await self.client.aclose()

    # ------------------------------------------------------------------ the request
    async def handle(self, request: Request, call: Call) -> Response:
        try:
            return await until_disconnect(request, self._handle(call))
        except ClientGone:
            self.metrics.finished(call.model, 499, time.perf_counter() - call.started)
            return Response(status_code=499)

    async def _handle(self, call: Call) -> Response:
        last: Response | None = None
        attempts = self.cfg.max_attempts
        for attempt in range(attempts):
            try:
                w = await self.admission.acquire(call.model, call.tried, call.user)
            except Exhausted:
                break
            except APIError as err:
                self.metrics.finished(call.model, err.status, time.perf_counter() - call.started)
                return _error(err, call.tried[-1] if call.tried else "gateway")
            try:
                if call.stream:
                    return await self._open_stream(call, w)  # owns the lease from here
                resp = await self._complete(call, w)
            except _Retry as r:
                self.admission.release(w)
                call.tried.append(w.id)
                last = r.response
                if attempt + 1 < attempts:
                    self.metrics.retries.labels(r.reason).inc()
                continue
            except BaseException:
                self.admission.release(w)
                raise
            self.admission.release(w)
            return resp
        if last is None:
            last = _error(unavailable("No worker could serve the request.", retry_after=1),
                          call.tried[-1] if call.tried else "gateway")
        self.metrics.finished(call.model, last.status_code, time.perf_counter() - call.started)
        return last

    def _failed(self, w: Worker, exc: httpx.HTTPError) -> _Retry:
        kind = "timeout" if isinstance(exc, httpx.TimeoutException) else (
            "connect" if isinstance(exc, httpx.ConnectError) else "protocol")
        self.metrics.upstream_errors.labels(kind).inc()
        self.registry.eject(w, f"{kind}: {exc!s:.200}")
        err = unavailable(f"The worker failed to answer ({kind}).", retry_after=1)
        return _Retry(kind, _error(err, w.id))

    def _bad_status(self, w: Worker, r: httpx.Response, body: bytes) -> _Retry:
        if r.status_code == 429:
            self.registry.saturated(w)
            reason = "worker_busy"
        else:
            self.metrics.upstream_errors.labels("http_5xx").inc()
            self.registry.eject(w, f"HTTP {r.status_code}")
            reason = "http_5xx"
        return _Retry(reason, _relayed(r, body, w.id))

    # ------------------------------------------------------------------ whole responses
    async def _complete(self, call: Call, w: Worker) -> Response:
        try:
            r = await self.client.post(w.base + call.path, content=call.body, headers=_JSON)
        except httpx.HTTPError as exc:
            raise self._failed(w, exc) from None
        body = r.content
        if r.status_code in RETRYABLE:
            raise self._bad_status(w, r, body)
        prompt = completion = 0
        if r.status_code == 200:
            i = body.rfind(b'"usage":')
            if i >= 0:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    use = orjson.loads(body).get("usage") or {}
                    prompt = use.get("prompt_tokens", 0)
                    completion = use.get("completion_tokens", 0)
        elapsed = time.perf_counter() - call.started
        self.metrics.finished(call.model, r.status_code, elapsed, None, prompt, completion)
        return _relayed(r, body, w.id)

    # ------------------------------------------------------------------ streams
    async def _open_stream(self, call: Call, w: Worker) -> Response:
        req = self.client.build_request("POST", w.base + call.path, content=call.body,
                                        headers=_JSON)
        try:
            r = await self.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise self._failed(w, exc) from None
        try:
            if r.status_code != 200:
                body = await r.aread()
                if r.status_code in RETRYABLE:
                    raise self._bad_status(w, r, body)
                self.admission.release(w)
                self.metrics.finished(call.model, r.status_code,
                                      time.perf_counter() - call.started)
                return _relayed(r, body, w.id)
            it = r.aiter_raw()
            try:
                first = await it.__anext__()
            except StopAsyncIteration:
                self.metrics.upstream_errors.labels("empty").inc()
                raise _Retry("empty", _error(unavailable("The worker sent nothing."), w.id)
                             ) from None
            except httpx.HTTPError as exc:
                raise self._failed(w, exc) from None
        except BaseException:
            await r.aclose()
            raise
        relay = Relay(self, call, w, r, it, first)
        return RelayResponse(relay, {WORKER_HEADER: w.id, **_SSE_HEADERS})


class Relay:
    """One stream from a worker to the client."""

    __slots__ = ("up", "call", "worker", "resp", "it", "first", "events", "ttft", "done",
                 "worker_error", "broken", "prompt_tokens", "completion_tokens", "closed")

    def __init__(self, up: Upstream, call: Call, worker: Worker, resp: httpx.Response,
                 it: AsyncIterator[bytes], first: bytes) -> None:
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
                        self.events += piece.count(b"\n\n")
                        if self.ttft is None and (b'"delta":{"content":' in piece
                                                  or b'"text":"' in piece):
                            self.ttft = time.perf_counter() - self.call.started
                        if b'"usage":' in piece:
                            piece = self._usage(piece)
                        if piece.endswith(b"data: [DONE]\n\n"):
                            self.done = True
                        elif b'data: {"error"' in piece:
                            self.worker_error = True
                        if piece:
                            yield piece
                    chunk = await it.__anext__()
            except StopAsyncIteration:
                pass
            except httpx.HTTPError as exc:
                self.up.metrics.upstream_errors.labels("midstream").inc()
                self.up.registry.eject(self.worker, f"stream broke: {exc!s:.200}")
            if self.done or self.worker_error:
                return
            chunk = await self._continue_elsewhere()
        self.broken = True
        yield sse(error_body("The worker serving this stream failed before finishing it.",
                             "server_error", None, "worker_failed"))

    async def _continue_elsewhere(self) -> bytes | None:
        """Where mid-stream continuation plugs in (a later issue).

        It will re-send the request to another worker with the text relayed so far as a
        final assistant message (`continue_final_message`), swap `resp`, `it` and `worker`
        (releasing the old lease, taking a new one), and return the new stream's first
        chunk with the role chunk dropped. Until then the stream ends with an explicit
        error event: never a silent cut.
        """
        return None

    def _usage(self, piece: bytes) -> bytes:
        """Reads usage from the usage chunk; drops that chunk if the client did not ask."""
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
                    if not self.call.client_usage and obj.get("choices") == []:
                        continue
            keep.append(ev + b"\n\n")
        return b"".join(keep)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self.resp.aclose()  # mid-stream: drops the connection, so the worker aborts
        finally:
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
