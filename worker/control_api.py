"""The worker's control API: the gateway tells a worker what to be (`worker.control` does it).

`POST /control/placement` (cluster token, `worker.auth`) with a role
(`worker.roles.PlacementRequest`); `GET /control/placement` reads it back.
`POST /control/models` (a model and its file) loads one more model beside those held;
`DELETE /control/models/{name}` drains it (finishes what it holds, takes nothing new) and
frees it; `GET /control/models` lists them. While this worker is a split head, `HeadRelay`
sends `/v1/*` and `/metrics` to the head child. `install` wires all of it into the app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from wire.errors import APIError
from wire.http import M, json_response, read_model
from wire.status import WorkerStatus
from worker.auth import authorize
from worker.control import Control
from worker.hosting import ModelFileRequest
from worker.roles import PlacementRequest

if TYPE_CHECKING:
    from worker.state import WorkerState

router = APIRouter()


def _control(request: Request) -> Control:
    return request.app.state.control


async def _body(request: Request, model: type[M]) -> M:
    """The request's body as `model`, once the caller is known to hold the cluster token."""
    authorize(request)
    return await read_model(request, model)


@router.get("/control/placement")
async def get_placement(request: Request) -> Response:
    return json_response(_control(request).view())


@router.post("/control/placement")
async def set_placement(request: Request) -> Response:
    req = await _body(request, PlacementRequest)
    return json_response(await _control(request).apply(req))


@router.get("/control/models")
async def get_models(request: Request) -> Response:
    return json_response({"models": request.app.state.worker.hosting.views()})


@router.post("/control/models")
async def load_model(request: Request) -> Response:
    req = await _body(request, ModelFileRequest)
    c = _control(request)
    async with c._lock:
        return json_response(c.load_model(req))


@router.delete("/control/models/{name:path}")
async def unload_model(request: Request, name: str) -> Response:
    authorize(request)
    return json_response(_control(request).unload_model(name))


class HeadRelay:
    """ASGI middleware: while this worker is a split head, `/v1/*` (and `/metrics`, whose
    counters live there) go to the head child."""

    def __init__(self, app: ASGIApp, get_control: Any) -> None:
        self.app = app
        self.get_control = get_control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/v1/") or path == "/metrics"):
            c: Control | None = self.get_control()
            if c is not None and c.managed and c.role == "head":
                from worker.rpc.relay import relay

                head = c.head
                up = head is not None and head.ready and c.phase != "broken"
                if path == "/metrics" and not up:
                    await self.app(scope, receive, send)  # this process's own counters
                    return
                if head is None or not up:
                    err = APIError(503, "The split model is not ready on this worker.",
                                   "service_unavailable", None, "no_healthy_worker",
                                   {"Retry-After": "1"})
                    resp = json_response(err.body(), 503, err.headers)
                    await resp(scope, receive, send)
                    return
                await relay(scope, receive, send, c.relay_client, head.base,
                            c.cfg.worker_id, c.broken)
                return
        await self.app(scope, receive, send)


def install(app: FastAPI, state: WorkerState) -> Control:
    """Adds the control routes, the head relay and the `placement` field of `/status`."""
    control = Control(state)
    app.state.control = control
    app.include_router(router)
    app.add_middleware(HeadRelay, get_control=lambda: getattr(app.state, "control", None))
    base_status = app.state.status

    def status() -> WorkerStatus:
        return control.decorate(base_status())

    app.state.status = status
    app.state.availability = control.availability
    return control
