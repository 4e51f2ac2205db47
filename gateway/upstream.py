"""Talking to workers: one pooled client, attempts, retry before the first byte.

A request is tried on a worker picked by admission/routing. If it fails before any byte
reached the client — connect error, timeout, 5xx, or 429 from a full worker — the worker is
released (and ejected, for failures), and the request goes to another one, up to
`max_attempts` in all. A whole response is relayed as it came; a stream, once its first
chunk arrived, belongs to a `relay.Relay` (pass-through, and the mid-stream continuation
of `continuation.py`), which gets this upstream back as its `call.StreamOpener`.

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
import re
import time
from collections.abc import Awaitable, Mapping
from typing import Any

import httpx
import orjson
from fastapi import Request
from fastapi.responses import Response

from gateway.admission import Admission, Exhausted
from gateway.affinity import Affinity
from gateway.call import Call, Opened, Retry
from gateway.config import GatewayConfig
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.relay import Relay, RelayResponse
from gateway.transport import LeanTransport
from gateway.worker_record import Worker
from wire.errors import APIError, unavailable
from wire.status import WORKER_HEADER

log = logging.getLogger("corral.gateway")
RETRYABLE = frozenset((429, 500, 502, 503, 504))
#: A worker's 503 codes that say the model is not (or no longer) served there, by design.
MOVED = re.compile(rb'"code":\s*"(?:model_draining|no_model|model_loading)"')
_JSON = {"content-type": "application/json"}
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ClientGone(Exception):
    pass


def _model_of(body: bytes) -> str:
    """The model a request body names (read only on the rare error path)."""
    try:
        model = orjson.loads(body).get("model")
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    return model if isinstance(model, str) else ""


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
                w = await self.admission.acquire(call.model, call.tried, call.user, prefer,
                                                   call.need, call.job)
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
            except Retry as r:
                self.admission.release(w)
                if r.reason != "model_moved":  # moved: it is out of the model's workers
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

    def _failed(self, w: Worker, exc: httpx.HTTPError) -> Retry:
        kind = "timeout" if isinstance(exc, httpx.TimeoutException) else (
            "connect" if isinstance(exc, httpx.ConnectError) else "protocol")
        self.metrics.upstream_errors.labels(kind).inc()
        self.registry.eject(w, f"{kind}: {exc!s:.200}")
        err = unavailable(f"The worker failed to answer ({kind}).", retry_after=1)
        return Retry(kind, _error(err, w.id))

    def _bad_status(self, w: Worker, r: httpx.Response | _Reply, body: bytes,
                    model: str = "") -> Retry:
        if r.status_code == 503 and MOVED.search(body[:400]):
            # The model is being unloaded there, or not loaded yet (a view older than the
            # placer's last change): the worker is fine. It drops out of the model's
            # workers until its next probe; the request waits for (or takes) another.
            self.registry.model_gone(w, model)
            return Retry("model_moved", _relayed(r, body, w.id))
        if r.status_code == 429:
            self.registry.saturated(w)
            reason = "worker_busy"
        else:
            self.metrics.upstream_errors.labels("http_5xx").inc()
            self.registry.eject(w, f"HTTP {r.status_code}")
            reason = "http_5xx"
        return Retry(reason, _relayed(r, body, w.id))

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
        raises Retry so that another worker gets the request. (The waiting task itself is
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
            raise Retry("stall", _error(err, w.id)) from None
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
            raise self._bad_status(w, r, body, call.model)
        prompt = completion = 0
        if r.status_code == 200:
            i = body.rfind(b'"usage":')
            if i >= 0:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    try:  # usage comes last: parse the tail, not a whole embeddings body
                        use = orjson.loads(b"{" + body[i:]).get("usage") or {}
                    except orjson.JSONDecodeError:
                        use = orjson.loads(body).get("usage") or {}
                    prompt = use.get("prompt_tokens", 0)
                    completion = use.get("completion_tokens", 0)
        elapsed = time.perf_counter() - call.started
        self.metrics.finished(call.model, r.status_code, elapsed, None, prompt, completion)
        return _relayed(r, body, w.id)

    # ------------------------------------------------------------------ streams
    async def send_stream(self, w: Worker, path: str, body: bytes
                           ) -> Opened | Response:
        """Opens a stream on `w`: (response, its byte iterator, first chunk), or a final
        non-200 response to relay as is. Raises Retry when another worker should try."""
        return await self._watched(w, self._open(w, path, body))

    async def _open(self, w: Worker, path: str, body: bytes
                    ) -> Opened | Response:
        req = self.client.build_request("POST", w.base + path, content=body, headers=_JSON)
        try:
            r = await self.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise self._failed(w, exc) from None
        try:
            if r.status_code != 200:
                data = await r.aread()
                if r.status_code in RETRYABLE:
                    raise self._bad_status(w, r, data, _model_of(body))
                return _relayed(r, data, w.id)
            it = r.aiter_raw()
            try:
                first = await it.__anext__()
            except StopAsyncIteration:
                self.metrics.upstream_errors.labels("empty").inc()
                raise Retry("empty", _error(unavailable("The worker sent nothing."), w.id)
                             ) from None
            except httpx.HTTPError as exc:
                raise self._failed(w, exc) from None
        except BaseException:
            await r.aclose()
            raise
        return r, it, first

    async def _open_stream(self, call: Call, w: Worker) -> Response:
        opened = await self.send_stream(w, call.path, call.body)
        if isinstance(opened, Response):
            self.admission.release(w)
            self.metrics.finished(call.model, opened.status_code,
                                  time.perf_counter() - call.started)
            return opened
        r, it, first = opened
        relay = Relay(self, call, w, r, it, first)
        w.watched.add(relay)
        return RelayResponse(relay, {WORKER_HEADER: w.id, **_SSE_HEADERS})
