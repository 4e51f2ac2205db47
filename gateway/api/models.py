"""The declared model files, served to workers that lack them (cluster token).

`GET /cluster/models` lists them; `GET /cluster/models/{name}/file` streams one (Range
requests, so a worker's interrupted download resumes). The catalogue is the placer's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from wire.errors import not_found
from wire.http import json_response

if TYPE_CHECKING:
    from gateway.core import Gateway

router = APIRouter()


def _gw(request: Request) -> Gateway:
    return request.app.state.gateway


@router.get("/cluster/models")
async def list_models(request: Request) -> Response:
    gw = _gw(request)
    gw.auth.cluster(request)
    return json_response({"data": [{"name": m.name, "size": m.size, "sha256": m.sha256}
                                   for m in gw.placer.catalog.values()]})


@router.get("/cluster/models/{name}/file")
async def model_file(request: Request, name: str) -> Response:
    gw = _gw(request)
    gw.auth.cluster(request)
    m = gw.placer.catalog.get(name)
    if m is None:
        raise not_found(f"The gateway has no file for model {name!r}.")
    return FileResponse(m.path, media_type="application/octet-stream",
                        filename=f"{m.name}.gguf")
