"""The OpenAI API in front of the cluster: validate once at the edge, then route and relay.

Path of a request: here (auth, validation, the key's rate limits) → admission (a worker,
or wait, or refuse) → routing (which worker) → upstream (relay, retry before the first
byte). When the response has been sent (or the client left), its real token usage settles
the key's token reservation and is recorded per user (`Accounted`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from gateway import capabilities
from gateway.affinity import SESSION_HEADER, session_key
from gateway.identity import EndUser, resolve
from gateway.limits import Reservation, estimate_tokens
from gateway.loading import LoadingStream
from gateway.upstream import Call, _error
from wire import errors
from wire import openai as oa
from wire.http import json_response, parse_model, read_json
from wire.status import WORKER_HEADER

if TYPE_CHECKING:
    from gateway.config import ApiKey
    from gateway.core import Gateway

router = APIRouter()

GATEWAY = "gateway"  # x-corral-worker value when no worker was involved


def _gw(request: Request) -> Gateway:
    return request.app.state.gateway


_PROMPT = re.compile(rb'"prompt_tokens":\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens":\s*(\d+)')


def _prompt_chars(req: oa.SamplingFields) -> int:
    if isinstance(req, oa.ChatCompletionRequest):
        return sum(len(m.text()) + 8 for m in req.messages)
    return len(req.prompt_text) if isinstance(req, oa.CompletionRequest) else 0


def _new_chars(req: oa.SamplingFields, total: int) -> int:
    """The part of the prompt a worker holding the conversation's cache has not read: the
    messages after the last assistant turn (its cache holds everything before them)."""
    if not isinstance(req, oa.ChatCompletionRequest):
        return total
    new = 0
    for m in reversed(req.messages):
        if m.role == "assistant":
            return new
        new += len(m.text()) + 8
    return total


class Accounted(Response):
    """Sends the upstream response, then settles the key's tokens and records usage."""

    def __init__(self, inner: Response, gw: Gateway, res: Reservation, user: str | None,
                 end: EndUser | None = None, model: str = "") -> None:
        self.inner = inner
        self.model = model
        self.gw = gw
        self.res = res
        self.user = user
        self.end = end
        self.status_code = inner.status_code
        self.background = None
        self.raw_headers = inner.raw_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.inner(scope, receive, send)
        finally:
            self.gw.placer.touch(self.model)  # idle unloading counts from its last answer
            status, prompt, completion = self._outcome()
            self.gw.limits.settle(self.res, prompt + completion)
            self.gw.usage.record(self.user, status, prompt, completion, self.end)
            if status == 200:  # what this model's answers take, for cost routing
                self.gw.router.lengths.observe(self.model, completion)
            self.gw.budgets.spend(self.res.key, self.end.id if self.end else None,
                                  prompt + completion)

    def _outcome(self) -> tuple[int, int, int]:
        relay: Any = getattr(self.inner, "relay", None)
        if relay is not None:  # a stream: the relay read the usage chunk
            status = 200 if relay.done or relay.worker_error else (502 if relay.broken else 499)
            return (status, relay.prompt_tokens,
                    relay.completion_tokens or max(0, relay.events - 3))
        status = self.inner.status_code
        body = getattr(self.inner, "body", b"")
        i = body.rfind(b'"usage":') if status == 200 and isinstance(body, bytes) else -1
        if i < 0:
            return status, 0, 0
        pm, cm = _PROMPT.search(body, i), _COMPLETION.search(body, i)
        return status, int(pm[1]) if pm else 0, int(cm[1]) if cm else 0


async def _proxy(request: Request, path: str, model_cls: type[oa.SamplingFields],
                 estimate: Callable[[Any], int] | None = None,
                 need: tuple[int, int] | None = None,
                 check: Callable[[Gateway, Any], None] | None = None) -> Response:
    """Validate, admit and relay one request. `estimate` (prompt tokens for the tpm
    reservation), `need` (routing.Need) and `check` (a refusal before admission) let other
    routes (api/embeddings.py) share this path; chat and completions use the defaults."""
    gw = _gw(request)
    started = time.perf_counter()
    model = ""
    key: ApiKey | None = None
    end: EndUser | None = None
    try:
        key = gw.auth.api_key(request)
        body = await read_json(request)
        end = resolve(key, request.headers, body)  # a trusted front end's end user
        eid = end.id if end is not None else None
        req = parse_model(model_cls, body)
        aliased = gw.placer.resolve(req.model)  # an alias: the catalogued name
        renamed = aliased != req.model
        if renamed:
            req.model = body["model"] = aliased
        model = req.model
        gw.placer.touch(model)  # in use; loaded on demand when served nowhere
        if check is not None:
            check(gw, req)
        refused = gw.placer.refusal(model)  # a model too big for every worker and split
        if refused is not None:
            gw.metrics.rejected.labels("model_unplaceable").inc()
            raise refused
        await gw.budgets.check(key, eid)
        tokens = 0
        if key is not None and (key.tpm or key.user_tpm):
            tokens = (estimate(req) if estimate is not None
                      else estimate_tokens(_prompt_chars(req), req.limit))
        res = await gw.limits.admit(key, tokens, eid)
        stream = req.stream
        if stream:
            # Always ask the worker for usage (exact token metrics); the relay drops that
            # chunk again when the client did not ask for it.
            opts = body.get("stream_options")
            body["stream_options"] = {**(opts if isinstance(opts, dict) else {}),
                                      "include_usage": True}
            raw = orjson.dumps(body)
        elif renamed:
            raw = orjson.dumps(body)  # the alias, renamed
        else:
            raw = await request.body()  # cached by starlette: forwarded as the client sent it
        who = end.queue_user if end is not None else (key.user if key else req.user)
        call = Call(model, path, raw, stream, req.include_usage, who)
        chars = _prompt_chars(req)
        if estimate is None:  # other routes (embeddings) generate nothing: load/capacity
            call.job = gw.router.lengths.job(model, chars, _new_chars(req, chars), req.limit)
        top = req.top_n  # type: ignore[attr-defined]
        if req.n > 1 or top is not None:
            call.need = (-1 if top is None else top, req.n)
        if need is not None:
            call.need = need
        if gw.cfg.affinity:
            sk = session_key(model, request.headers.get(SESSION_HEADER), body,
                             end.chat if end is not None else None)
            if sk is not None:
                call.session, call.affine = sk
        call.started = started
    except errors.APIError as err:
        count_refusal(gw, model, started, err, key, end)
        return _error(err, GATEWAY)
    if stream and not gw.registry.by_model.get(model) and gw.placer.loadable(model):
        # Loaded nowhere: it loads on demand; the stream says so while it waits.
        resp: Response = LoadingStream(gw.upstream.handle(request, call))
    else:
        resp = await gw.upstream.handle(request, call)
    return Accounted(resp, gw, res, key.user if key else None, end, model)


def count_refusal(gw: Gateway, model: str, started: float, err: errors.APIError,
                  key: ApiKey | None, end: EndUser | None) -> None:
    """Metrics and usage for a request refused at the edge (auth, limits, budgets,
    validation); shared by every route that runs the chat path's edge checks."""
    gw.metrics.finished(model, err.status, time.perf_counter() - started)
    if err.status == 401:
        gw.metrics.rejected.labels("unauthorized").inc()
        return
    if err.code == "rate_limit_exceeded":
        gw.metrics.rejected.labels("rate_limited").inc()
    elif err.code == "insufficient_quota":
        gw.metrics.rejected.labels("insufficient_quota").inc()
    if key is not None or gw.auth.open:
        gw.usage.record(key.user if key else None, err.status, 0, 0, end)


# Routes read the raw JSON (validated once, by hand); the OpenAPI document still describes
# the bodies with the wire models, so clients and fuzzers know their shape.
_REF = "#/components/schemas/{model}"


def _body_schema(model: type[oa.SamplingFields]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=_REF)
    schema.pop("$defs", None)
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


def install_openapi(app: Any) -> None:
    """/openapi.json with the request models' nested schemas under components."""
    from fastapi.openapi.utils import get_openapi

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version="1", routes=app.routes)
            defs = schema.setdefault("components", {}).setdefault("schemas", {})
            for m in (oa.ChatCompletionRequest, oa.CompletionRequest):
                defs.update(m.model_json_schema(ref_template=_REF).get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build


@router.post("/v1/chat/completions", openapi_extra=_body_schema(oa.ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    return await _proxy(request, "/v1/chat/completions", oa.ChatCompletionRequest)


@router.post("/v1/completions", openapi_extra=_body_schema(oa.CompletionRequest))
async def completions(request: Request) -> Response:
    return await _proxy(request, "/v1/completions", oa.CompletionRequest)


@router.get("/v1/models")
async def models(request: Request) -> Response:
    gw = _gw(request)
    try:
        gw.auth.api_key(request)
    except errors.APIError as err:
        return _error(err, GATEWAY)
    names = list(dict.fromkeys([*gw.placer.catalog, *gw.registry.models()]))
    cards = [_card(gw, m) for m in names]
    return json_response({"object": "list", "data": cards}, headers={WORKER_HEADER: GATEWAY})


def _card(gw: Gateway, model: str) -> dict[str, Any]:
    """A `/v1/models` entry: OpenAI's fields, plus where it is loaded (`loaded_on`, the
    healthy workers serving it; empty: it loads on the first request) and its `state`."""
    on = sorted(w.id for w in gw.registry.by_model.get(model, ()))
    m = gw.placer.catalog.get(model)
    if on:
        state = "loaded"
    elif model in gw.placer.unplaceable or model in gw.placer.unreadable:
        state = "unplaceable"
    elif any(load["model"] == model for load in gw.placer.loads()):
        state = "loading"
    else:
        state = "unloaded"
    card: dict[str, Any] = {
        "id": model, "object": "model", "created": gw.started, "owned_by": "corral",
        "capabilities": capabilities.of_model(gw.registry, model)
        or list(capabilities.GENERATION), "loaded_on": on, "state": state}
    if m is not None:
        card["pinned"] = m.pin
        if m.aliases:
            card["aliases"] = list(m.aliases)
    return card


@router.get("/v1/models/{model:path}")
async def model(request: Request, model: str) -> Response:
    gw = _gw(request)
    try:
        gw.auth.api_key(request)
        model = gw.placer.resolve(model)
        if model not in gw.registry.by_model and model not in gw.placer.catalog:
            raise errors.not_found(f"The model {model!r} does not exist.")
    except errors.APIError as err:
        return _error(err, GATEWAY)
    return json_response(_card(gw, model), headers={WORKER_HEADER: GATEWAY})
