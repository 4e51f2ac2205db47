"""`POST /v1/embeddings` in front of the cluster.

The chat path (`api/openai._proxy`: keys, end users, budgets, rpm/tpm, admission, retries
before the first byte, usage per user) with three differences: the tpm reservation is the
inputs' prompt tokens (`estimate`), only workers whose `/status` says
`capabilities.embeddings` get it (`routing.EMBEDDINGS`), and a model none of whose workers
can embed is a 400 naming `model` rather than a wait.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.api.openai import _body_schema, _proxy
from gateway.routing import EMBEDDINGS, capable
from wire import errors
from wire.embeddings import EmbeddingRequest

if TYPE_CHECKING:
    from gateway.core import Gateway

router = APIRouter()

PATH = "/v1/embeddings"


def estimate(req: EmbeddingRequest) -> int:
    """Prompt tokens for the tpm reservation: exact for token arrays, ~4 chars a token."""
    return sum(len(x) if isinstance(x, list) else len(x) // 4 + 2 for x in req.items)


def check(gw: Gateway, req: EmbeddingRequest) -> None:
    ws = gw.registry.by_model.get(req.model)
    if ws and not any(capable(w, EMBEDDINGS) for w in ws):
        backends = sorted({w.status.get("backend", "?") for w in ws})
        raise errors.bad_request(
            f"No worker serving the model {req.model!r} can compute embeddings (backends: "
            f"{', '.join(backends)}); serve it on a llama worker for embeddings.",
            param="model", code="embeddings_unsupported")


@router.post(PATH, openapi_extra=_body_schema(EmbeddingRequest))  # type: ignore[arg-type]
async def embeddings(request: Request) -> Response:
    cls: Any = EmbeddingRequest  # duck-typed like SamplingFields (stream, n, limit, ...)
    return await _proxy(request, PATH, cls, estimate=estimate, need=EMBEDDINGS, check=check)
