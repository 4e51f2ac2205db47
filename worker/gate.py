"""Answers `/v1/*` for a worker that cannot serve yet, before any route runs.

While the model loads (or is fetched, or a split head comes up), every `/v1/*` call gets
503 `model_loading` with `Retry-After`, as llama-server does: a script that polls
`/v1/models` must never read "200, no models" as the answer and crash on `data[0]`. A
worker whose model failed to load says why, in a 503. An idle worker (no model by design,
waiting to be placed) passes: its `/v1/models` is an honest empty list. `/healthz`,
`/status` and `/metrics` always pass, so probes see the worker alive and loading.

Middleware rather than a check in each route, so routes added later are covered too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from wire import errors
from wire.http import error_response

#: What `/v1/*` can do now, and why not (the load error) when `down`.
Availability = tuple[Literal["ready", "loading", "idle", "down"], str | None]

RETRY_AFTER = 1.0  # the gateway probes every 0.5 s; a client may come back as soon


class Gate:
    """ASGI middleware: `/v1/*` answers 503 while `availability()` says loading or down."""

    def __init__(self, app: ASGIApp, availability: Callable[[], Availability]) -> None:
        self.app = app
        self.availability = availability

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith("/v1/"):
            state, why = self.availability()
            err: errors.APIError | None = None
            if state == "loading":
                err = errors.loading("The model is still loading on this worker; retry "
                                     "shortly.", RETRY_AFTER)
            elif state == "down":
                err = errors.APIError(
                    503, f"The model failed to load on this worker: {why or 'unknown error'}",
                    "service_unavailable", None, "model_load_failed")
            if err is not None:
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)
