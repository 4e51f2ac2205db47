"""`POST /v1/embeddings` in front of the cluster.

Validated once here, then admitted, routed and relayed like a non-streamed chat request,
with one difference: only workers whose `/status` says `capabilities.embeddings` get it
(`routing.EMBEDDINGS`). A model none of whose workers can embed is a 400 naming `model`,
not a wait. The key's tpm counts the prompt tokens (estimated at admission, settled from
the response's `usage`), and usage is recorded per user as for chat.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from gateway.api.openai import GATEWAY, Accounted, _body_schema
from gateway.call import Call
from gateway.routing import EMBEDDINGS, capable
from gateway.upstream import _error
from wire import errors
from wire.embeddings import EmbeddingRequest
from wire.http import read_json, validation_error

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.config import ApiKey

router = APIRouter()

PATH = "/v1/embeddings"


def estimate(req: EmbeddingRequest) -> int:
    """Prompt tokens for the tpm reservation: exact for token arrays, ~4 chars a token."""
    return sum(len(x) if isinstance(x, list) else len(x) // 4 + 2 for x in req.items)


def _can_embed(gw: Gateway, model: str) -> None:
    ws = gw.registry.by_model.get(model)
    if ws and not any(capable(w, EMBEDDINGS) for w in ws):
        backends = sorted({w.status.get("backend", "?") for w in ws})
        raise errors.bad_request(
            f"No worker serving the model {model!r} can compute embeddings (backends: "
            f"{', '.join(backends)}); serve it on a llama worker for embeddings.",
            param="model", code="embeddings_unsupported")


@router.post(PATH, openapi_extra=_body_schema(EmbeddingRequest))  # type: ignore[arg-type]
async def embeddings(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    started = time.perf_counter()
    model = ""
    key: ApiKey | None = None
    try:
        key = gw.auth.api_key(request)
        body = await read_json(request)
        try:
            req = EmbeddingRequest.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc) from None
        model = req.model
        _can_embed(gw, model)
        res = await gw.limits.admit(key, estimate(req) if key is not None and key.tpm else 0)
        call = Call(model, PATH, await request.body(), False, False,
                    key.user if key else req.user)
        call.need = EMBEDDINGS
        call.started = started
    except errors.APIError as err:
        gw.metrics.finished(model, err.status, time.perf_counter() - started)
        if err.status == 401:
            gw.metrics.rejected.labels("unauthorized").inc()
        else:
            if err.code == "rate_limit_exceeded":
                gw.metrics.rejected.labels("rate_limited").inc()
            if key is not None or gw.auth.open:
                gw.usage.record(key.user if key else None, err.status, 0, 0)
        return _error(err, GATEWAY)
    resp = await gw.upstream.handle(request, call)
    return Accounted(resp, gw, res, key.user if key else None)
