"""The cluster's own routes: its state, joining and leaving, health and readiness."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import capabilities
from wire.errors import bad_request, not_found
from wire.http import json_response, read_model
from wire.status import JoinRequest

if TYPE_CHECKING:
    from gateway.core import Gateway

router = APIRouter()


def _gw(request: Request) -> Gateway:
    return request.app.state.gateway


@router.get("/cluster")
async def cluster(request: Request) -> Response:
    _gw(request).auth.viewer(request)  # closed once API keys exist (auth.py)
    reg = _gw(request).registry
    return json_response({
        "workers": [{**w.to_json(), "capabilities": capabilities.of_worker(w)}
                    for w in list(reg.workers.values())],
        "placements": _gw(request).placer.placements(reg.placements()),
        "links": _gw(request).topology.to_json(),
        "warnings": _gw(request).hosts.current,
        "models": capabilities.models(reg),
        "loads": _gw(request).placer.loads(),  # models being fetched, loaded or drained
    })


@router.post("/cluster/workers")
async def join(request: Request) -> Response:
    gw = _gw(request)
    gw.auth.cluster(request)
    body = await read_model(request, JoinRequest)
    if not body.url.startswith(("http://", "https://")):
        raise bad_request("url must be an http:// or https:// URL", param="url")
    w, new = gw.registry.join(body.id, body.url)
    return json_response({"id": w.id, "url": w.url, "state": w.state}, 201 if new else 200)


@router.delete("/cluster/workers/{worker_id:path}")
async def leave(request: Request, worker_id: str) -> Response:
    gw = _gw(request)
    gw.auth.cluster(request)
    if not gw.registry.leave(worker_id):
        raise not_found(f"No worker {worker_id!r} in this cluster.", param="id")
    await gw.registry.withdraw(worker_id)
    return json_response({"id": worker_id, "deleted": True})


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> Response:
    """The OpenAPI document: a view like /cluster (closed once API keys exist)."""
    _gw(request).auth.viewer(request)
    return json_response(request.app.openapi())


@router.get("/healthz")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    reg = _gw(request).registry
    healthy = sum(1 for w in reg.workers.values() if w.healthy)
    return json_response({"status": "ready" if healthy else "unavailable",
                          "healthy_workers": healthy}, 200 if healthy else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    _gw(request).auth.metrics(request)  # needs metrics_token when one is set
    return Response(generate_latest(_gw(request).metrics.prom), media_type=CONTENT_TYPE_LATEST)
