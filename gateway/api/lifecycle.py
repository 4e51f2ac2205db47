"""`POST /cluster/workers/{id}/drain` (cluster token): stop sending a worker new work, let
what it has finish (or, past `deadline`, continue elsewhere), then it leaves or sleeps
(gateway/lifecycle.py). Body, optional: `{"then": "leave" | "sleep", "deadline": seconds}`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response

from wire.errors import not_found
from wire.http import json_response, read_model
from wire.status import DrainRequest

if TYPE_CHECKING:
    from gateway.core import Gateway

router = APIRouter()


@router.post("/cluster/workers/{worker_id:path}/drain")
async def drain(request: Request, worker_id: str) -> Response:
    gw: Gateway = request.app.state.gateway
    gw.auth.cluster(request)
    body = await read_model(request, DrainRequest, empty={})
    w = gw.registry.workers.get(worker_id)
    if w is None:
        raise not_found(f"No worker {worker_id!r} in this cluster.", param="id")
    return json_response(await gw.lifecycle.drain(w, body.then, body.deadline, "api"))
