"""The OpenAI API in front of the cluster: validate once at the edge, then route and relay.

Path of a request: here (auth, validation) → admission (a worker, or wait, or refuse) →
routing (which worker) → upstream (relay, retry before the first byte).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from gateway.upstream import Call, _error
from worker import protocol as p
from worker.errors import json_response, read_json, validation_error

if TYPE_CHECKING:
    from gateway.app import Gateway

router = APIRouter()

GATEWAY = "gateway"  # x-corral-worker value when no worker was involved


def _gw(request: Request) -> Gateway:
    return request.app.state.gateway


async def _proxy(request: Request, path: str, model_cls: type[p.SamplingFields]) -> Response:
    gw = _gw(request)
    started = time.perf_counter()
    model = ""
    try:
        key = gw.auth.api_key(request)
        body = await read_json(request)
        try:
            req = model_cls.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc) from None
        model = req.model
        stream = req.stream
        if stream:
            # Always ask the worker for usage (exact token metrics); the relay drops that
            # chunk again when the client did not ask for it.
            opts = body.get("stream_options")
            body["stream_options"] = {**(opts if isinstance(opts, dict) else {}),
                                      "include_usage": True}
            raw = orjson.dumps(body)
        else:
            raw = await request.body()  # cached by starlette: forwarded as the client sent it
        call = Call(model, path, raw, stream, req.include_usage, key.user if key else req.user)
        call.started = started
    except p.APIError as err:
        gw.metrics.finished(model, err.status, time.perf_counter() - started)
        if err.status == 401:
            gw.metrics.rejected.labels("unauthorized").inc()
        return _error(err, GATEWAY)
    return await gw.upstream.handle(request, call)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _proxy(request, "/v1/chat/completions", p.ChatCompletionRequest)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _proxy(request, "/v1/completions", p.CompletionRequest)


@router.get("/v1/models")
async def models(request: Request) -> Response:
    gw = _gw(request)
    try:
        gw.auth.api_key(request)
    except p.APIError as err:
        return _error(err, GATEWAY)
    cards = [{"id": m, "object": "model", "created": gw.started, "owned_by": "corral"}
             for m in gw.registry.models()]
    return json_response({"object": "list", "data": cards}, headers={p.WORKER_HEADER: GATEWAY})


@router.get("/v1/models/{model:path}")
async def model(request: Request, model: str) -> Response:
    gw = _gw(request)
    try:
        gw.auth.api_key(request)
        if model not in gw.registry.by_model:
            raise p.not_found(f"The model {model!r} does not exist.")
    except p.APIError as err:
        return _error(err, GATEWAY)
    card = {"id": model, "object": "model", "created": gw.started, "owned_by": "corral"}
    return json_response(card, headers={p.WORKER_HEADER: GATEWAY})
