"""HTTP helpers for both FastAPI apps: JSON responses, body reading, OpenAI-shaped errors.

Every failure a client can cause becomes `{"error": {...}}` with the status OpenAI uses;
nothing reaches the client as a bare 500 or a framework-shaped 422.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from wire.errors import APIError, bad_request, error_body

log = logging.getLogger("corral")

M = TypeVar("M", bound=BaseModel)

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def json_response(body: object, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def error_response(err: APIError) -> Response:
    return json_response(err.body(), err.status, err.headers)


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    where = ".".join(loc)
    return bad_request(f"{msg} ({where})" if where else msg, param=where or None)


async def read_json(request: Request) -> dict:
    """The request body as a JSON object, or a 400."""
    raw = await request.body()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def parse_model(model: type[M], raw: Any) -> M:
    """`raw` validated as `model`, or a 400 naming the first field that is wrong."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def read_model(request: Request, model: type[M], *, empty: dict | None = None) -> M:
    """The request body validated as `model`, or a 400; `empty`: what a blank body means
    (by default a blank body is not JSON, so a 400 too)."""
    if empty is not None and not (await request.body()).strip():
        return parse_model(model, empty)
    return parse_model(model, await read_json(request))


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError) -> Response:
        return error_response(validation_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        kind = _TYPES.get(exc.status_code, "invalid_request_error")
        return json_response(error_body(str(exc.detail), kind), exc.status_code,
                             getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return json_response(error_body("internal error", "server_error"), 500)
