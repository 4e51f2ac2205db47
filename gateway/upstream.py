"""Talking to workers: one pooled client, retry before the first byte, a thin stream relay.

A request is tried on a worker picked by admission/routing. If it fails before any byte
reached the client — connect error, timeout, 5xx, or 429 from a full worker — the worker is
released (and ejected, for failures), and the request goes to another one, up to
`max_attempts` in all. Once bytes flow, the relay passes the worker's bytes through as they
come: it splits them on event boundaries only to count events, to time the first token and
to read (and, if the client did not ask for it, drop) the usage chunk. The gateway always
asks workers for usage so that token metrics are exact.

A stream that breaks mid-way is continued on another worker (`_continue_elsewhere`): the
original request plus the text relayed so far, as an open final assistant message
(`continue_final_message`) or, for legacy completions, appended to the prompt, with
`max_tokens` reduced by the tokens already sent. The client keeps reading the same stream:
the continuation's chunks get the original stream's id/created (one bytes.replace per
piece, on the continuation only) and its role chunk is dropped. Until a break, the relay
only keeps references to the pieces it passed on; they are parsed once, at the break. If
no worker can continue, the stream ends with an OpenAI-shaped error event, never a silent
cut. A failed-over stream names its final worker in an SSE comment before `[DONE]`
(`: x-corral-worker=<id>`; the `x-corral-worker` header names the first one, as headers
left before the break).

A frozen worker (alive but silent: SIGSTOP, a hung driver) keeps its sockets open, so a
read would wait out `read_timeout`. Every call on a worker is registered in its `watched`
set; when the registry declares the worker stalled, waits for a response are cancelled
(and retried elsewhere) and relays have their upstream connection closed, which the
relay sees as a broken stream and continues elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

import httpx
import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.admission import Admission, Exhausted
from gateway.affinity import Affinity
from gateway.config import GatewayConfig
from gateway.metrics import Metrics
from gateway.registry import Registry, Worker
from gateway.transport import LeanTransport
from wire.errors import APIError, error_body, unavailable
from wire.sse import sse
from wire.status import WORKER_HEADER

log = logging.getLogger("corral.gateway")
RETRYABLE = frozenset((429, 500, 502, 503, 504))
_JSON = {"content-type": "application/json"}
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class Call:
    """One client request on its way through the gateway."""

    __slots__ = ("model", "path", "body", "stream", "client_usage", "user", "started",
                 "tried", "session", "affine")

    def __init__(self, model: str, path: str, body: bytes, stream: bool, client_usage: bool,
                 user: str | None = None, session: str | None = None) -> None:
        self.model = model
        self.path = path
        self.body = body
        self.stream = stream
        self.client_usage = client_usage
        self.user = user
        self.started = time.perf_counter()
        self.tried: list[str] = []
        self.session = session  # affinity key (affinity.py), None when there is none
        self.affine = False  # prefer the worker the session went to last


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


class _Reply:
    """A worker's whole answer: what `_relayed` and `_bad_status` need of it."""

    __slots__ = ("status_code", "headers")

    def __init__(self, status_code: int, headers: Mapping[str, str]) -> None:
        self.status_code = status_code
        self.headers = headers  # lower-case names


def _relayed(r: httpx.Response | _Reply, body: bytes, worker: str) -> Response:
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
    """Runs `work` in this task, cancelling it if the client hangs up first (then raises
    ClientGone). One watcher task per request; the work itself needs none."""
    me = asyncio.current_task()
    assert me is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(request)
        gone = True
        me.cancel()  # `work` is still running: `finally` below cancels us before it ends

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone or me.cancelling() > 1:
            raise  # cancelled from elsewhere (shutdown): not ours to swallow
        me.uncancel()
        raise ClientGone from None
    finally:
        watcher.cancel()


class Upstream:
    def __init__(self, cfg: GatewayConfig, registry: Registry, admission: Admission,
                 metrics: Metrics) -> None:
        self.cfg = cfg
        self.registry = registry
        self.admission = admission
        self.metrics = metrics
        self.affinity: Affinity | None = None  # set by the app when affinity is on
        # Non-streamed requests go through the lean transport's own call (no httpx
        # objects: ~0.1 ms per request); streams use httpx's client on the same pool.
        self.lean = LeanTransport(cfg.max_connections) if cfg.lean_transport else None
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=cfg.connect_timeout, read=cfg.read_timeout,
                                  write=30.0, pool=30.0),
            limits=httpx.Limits(max_connections=cfg.max_connections,
                                max_keepalive_connections=cfg.max_connections,
                                keepalive_expiry=60.0),
            trust_env=False,  # worker traffic never goes through an HTTP(S)_PROXY
            transport=self.lean,
        )
        self._addrs: dict[str, tuple[str, int] | None] = {}
        self._stall_cancelled: set[asyncio.Task[Any]] = set()
        self._abandoning: set[asyncio.Task[None]] = set()
        registry.stall_listeners.append(self._stalled)

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
        session = call.session or ""
        aff = self.affinity if session else None
        prefer = await aff.lookup(session) if aff is not None and call.affine else None
        for attempt in range(attempts):
            try:
                w = await self.admission.acquire(call.model, call.tried, call.user, prefer)
            except Exhausted:
                break
            except APIError as err:
                self.metrics.finished(call.model, err.status, time.perf_counter() - call.started)
                return _error(err, call.tried[-1] if call.tried else "gateway")
            try:
                if call.stream:
                    resp = await self._open_stream(call, w)  # owns the lease from here
                    if aff is not None and resp.status_code == 200:
                        aff.record(session, w.id)
                    return resp
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
            if aff is not None and resp.status_code == 200:
                aff.record(session, w.id)
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

    def _bad_status(self, w: Worker, r: httpx.Response | _Reply, body: bytes) -> _Retry:
        if r.status_code == 429:
            self.registry.saturated(w)
            reason = "worker_busy"
        else:
            self.metrics.upstream_errors.labels("http_5xx").inc()
            self.registry.eject(w, f"HTTP {r.status_code}")
            reason = "http_5xx"
        return _Retry(reason, _relayed(r, body, w.id))

    # ------------------------------------------------------------------ frozen workers
    def _stalled(self, w: Worker) -> None:
        """The registry gave up on `w`: move every call still waiting on it."""
        for call in list(w.watched):
            if isinstance(call, Relay):
                t = asyncio.ensure_future(call.abandon(w))
                self._abandoning.add(t)
                t.add_done_callback(self._abandoning.discard)
            else:  # a task waiting in `_watched`
                self._stall_cancelled.add(call)
                call.cancel()

    async def _watched(self, w: Worker, work: Awaitable[Any]) -> Any:
        """Awaits `work` on `w`; if `w` is declared stalled meanwhile, gives up on it and
        raises _Retry so that another worker gets the request. (The waiting task itself is
        registered and cancelled: no extra task per request.)"""
        me = asyncio.current_task()
        assert me is not None
        w.watched.add(me)
        try:
            return await work
        except asyncio.CancelledError:
            if me not in self._stall_cancelled or me.cancelling() > 1:
                raise  # the client left (too): a real cancellation
            me.uncancel()
            self.metrics.upstream_errors.labels("stall").inc()
            self.registry.eject(w, "stalled: no answer to probes")
            err = unavailable("The worker stopped answering.", retry_after=1)
            raise _Retry("stall", _error(err, w.id)) from None
        finally:
            w.watched.discard(me)
            self._stall_cancelled.discard(me)

    def _addr(self, base: str) -> tuple[str, int] | None:
        """(host, port) of a plain-http worker URL, for the lean transport's direct call."""
        try:
            return self._addrs[base]
        except KeyError:
            u = httpx.URL(base)
            addr = (u.host, u.port or 80) if u.scheme == "http" and not u.path.strip("/") \
                else None
            self._addrs[base] = addr
            return addr

    async def _post(self, w: Worker, path: str, body: bytes) -> tuple[_Reply | httpx.Response,
                                                                      bytes]:
        addr = self._addr(w.base) if self.lean is not None else None
        if addr is None:
            r = await self.client.post(w.base + path, content=body, headers=_JSON)
            return r, r.content
        assert self.lean is not None
        status, headers, data = await self.lean.post(
            addr[0], addr[1], path, body, self.cfg.connect_timeout, self.cfg.read_timeout)
        return _Reply(status, headers), data

    # ------------------------------------------------------------------ whole responses
    async def _complete(self, call: Call, w: Worker) -> Response:
        try:
            r, body = await self._watched(w, self._post(w, call.path, call.body))
        except httpx.HTTPError as exc:
            raise self._failed(w, exc) from None
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
    async def _send_stream(self, w: Worker, path: str, body: bytes
                           ) -> tuple[httpx.Response, AsyncIterator[bytes], bytes] | Response:
        """Opens a stream on `w`: (response, its byte iterator, first chunk), or a final
        non-200 response to relay as is. Raises _Retry when another worker should try."""
        return await self._watched(w, self._open(w, path, body))

    async def _open(self, w: Worker, path: str, body: bytes
                    ) -> tuple[httpx.Response, AsyncIterator[bytes], bytes] | Response:
        req = self.client.build_request("POST", w.base + path, content=body, headers=_JSON)
        try:
            r = await self.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise self._failed(w, exc) from None
        try:
            if r.status_code != 200:
                data = await r.aread()
                if r.status_code in RETRYABLE:
                    raise self._bad_status(w, r, data)
                return _relayed(r, data, w.id)
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
        return r, it, first

    async def _open_stream(self, call: Call, w: Worker) -> Response:
        opened = await self._send_stream(w, call.path, call.body)
        if isinstance(opened, Response):
            self.admission.release(w)
            self.metrics.finished(call.model, opened.status_code,
                                  time.perf_counter() - call.started)
            return opened
        r, it, first = opened
        relay = Relay(self, call, w, r, it, first)
        w.watched.add(relay)
        return RelayResponse(relay, {WORKER_HEADER: w.id, **_SSE_HEADERS})


_ROLE = b'"delta":{"role":"assistant"'
_DONE = b"data: [DONE]\n\n"


class Relay:
    """One stream from a worker to the client; in its worker's `watched` set (so that
    `Upstream._stalled` can abandon it) from `_open_stream` until `close`."""

    __slots__ = ("up", "call", "worker", "resp", "it", "first", "events", "ttft", "done",
                 "worker_error", "broken", "prompt_tokens", "completion_tokens", "closed",
                 "pieces", "text", "sent_tokens", "head", "rewrite", "skip_role",
                 "failovers", "leased", "calls")

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
        # Continuation state: references to the pieces relayed from the current upstream
        # (parsed only if it breaks), the text and token count of earlier upstreams, the
        # original stream's `{"id":…,"object":…,"created":N,` head, and the head to swap.
        self.pieces: list[bytes] = []
        self.text = ""
        self.sent_tokens = 0
        self.calls: list[dict[str, Any]] = []  # streamed tool calls, rebuilt at a break
        self.head: bytes | None = None
        self.rewrite: tuple[bytes, bytes] | None = None
        self.skip_role = False
        self.failovers = 0
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
                        if piece.endswith(_DONE):
                            self.done = True
                            if self.failovers:
                                piece = (piece[:-len(_DONE)] + b": x-corral-worker="
                                         + self.worker.id.encode() + b"\n\n" + _DONE)
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

    # ------------------------------------------------------------------ continuation
    def _take_stock(self) -> bytes | None:
        """Parses what the broken upstream sent (once, at the break) into `text` and
        `sent_tokens`. Returns the stream's missing ending if the answer was complete."""
        chat = self.call.path.endswith("/chat/completions")
        finish = None
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
                        self.sent_tokens += 1
                    if delta.get("tool_calls"):
                        self.sent_tokens += _add_calls(self.calls, delta["tool_calls"])
                    finish = ch.get("finish_reason") or finish
        self.pieces = []
        if finish is None:
            return None
        self.up.metrics.upstream_errors.labels("midstream_tail").inc()
        return self._usage_event() + _DONE

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
                w = await up.admission.acquire(call.model, call.tried, call.user)
            except (Exhausted, APIError):
                return None
            up.metrics.retries.labels("midstream").inc()
            try:
                opened = await up._send_stream(w, call.path, body)
            except _Retry:
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
        return out + self._usage_event() + _DONE

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


def _head(ev: bytes) -> bytes:
    """`{"id":"…","object":"…","created":N,` of an event as the worker wrote it (orjson
    keeps the dict's order: id, object, created, model)."""
    i = ev.find(b'"model":')
    return ev[6:i] if i > 0 else b""


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
