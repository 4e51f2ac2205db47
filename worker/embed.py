"""The worker's `POST /v1/embeddings`: validate, tokenize, hand the inputs to the backend.

Embeddings do not take generation slots: the backend computes them beside generation (the
llama backend on its decode thread, `backends/llama_embed.py`), so they are bounded here by
the worker's queue size in requests, and the gateway counts them in its in-flight load.
"""

from __future__ import annotations

import asyncio
import threading

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from wire import embeddings as emb
from wire import errors
from wire.http import read_model
from wire.status import WORKER_HEADER
from worker.api import engine_for
from worker.backends.base import Backend, BackendError

router = APIRouter()

#: Inputs tokenized on the event loop; more go to a thread, so the loop keeps moving bytes.
_INLINE_INPUTS = 8


def _tokens(backend: Backend, items: list[str | list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    window, vocab = backend.embed_window, backend.vocab_size
    for i, item in enumerate(items):
        if isinstance(item, str):
            tokens = backend.tokenize(item)
        else:
            bad = next((t for t in item if t < 0 or (vocab and t >= vocab)), None)
            if bad is not None:
                raise errors.bad_request(
                    f"input[{i}] holds the token id {bad}, outside this model's vocabulary "
                    f"of {vocab} tokens", param="input")
            tokens = list(item)
        if len(tokens) > window:
            raise errors.bad_request(
                f"This model's maximum context length for embeddings is {window} tokens. "
                f"However, input[{i}] is {len(tokens)} tokens.", param="input",
                code="context_length_exceeded")
        out.append(tokens)
    return out


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    req = await read_model(request, emb.EmbeddingRequest)
    state = request.app.state
    engine = engine_for(request, req.model)
    backend: Backend = engine.backend
    info = backend.embeddings()
    if info is None:
        backend.embed([], threading.Event())  # raises the backend's 400
        raise errors.bad_request("This worker cannot compute embeddings.", param="model")
    if req.dimensions is not None and req.dimensions != info.get("dimensions"):
        raise errors.bad_request(
            f"This model does not support the dimensions parameter: its embeddings have "
            f"{info.get('dimensions')} dimensions and cannot be shortened.",
            param="dimensions", code="unsupported_parameter")
    # Embedding requests in progress on this worker, bounded by --max-queue.
    if getattr(state, "embeddings_inflight", 0) >= engine.max_queue:
        raise errors.overloaded("The worker's embedding queue is full; retry shortly.")
    items = req.items
    if len(items) > _INLINE_INPUTS:
        tokens = await asyncio.to_thread(_tokens, backend, items)
    else:
        tokens = _tokens(backend, items)
    cancelled = threading.Event()
    state.embeddings_inflight = getattr(state, "embeddings_inflight", 0) + 1
    try:
        work = asyncio.wrap_future(backend.embed(tokens, cancelled))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            cancelled.set()  # the client left: the backend drops the rest
            work.cancel()
            return Response(status_code=499)
        try:
            vectors = work.result()
        except BackendError as exc:
            raise errors.APIError(500, str(exc), "server_error") from None
    finally:
        state.embeddings_inflight -= 1
    body = emb.response(req.model, vectors, req.encoding_format, sum(map(len, tokens)))
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json",
                    headers={WORKER_HEADER: state.worker_id})
