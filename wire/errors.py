"""OpenAI-shaped errors: what a client sees when anything goes wrong, with OpenAI's status."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error that reaches the client OpenAI-shaped, with the status OpenAI uses."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def not_found(message: str, param: str | None = "model") -> APIError:
    return APIError(404, message, "invalid_request_error", param, "model_not_found")


def unavailable(message: str, retry_after: float | None = None) -> APIError:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else {}
    return APIError(503, message, "service_unavailable", None, "no_healthy_worker", headers)


def loading(message: str = "The model is still loading.", retry_after: float = 1.0
            ) -> APIError:
    """503 while a worker loads its model (llama-server answers the same): retry shortly."""
    headers = {"Retry-After": str(max(1, round(retry_after)))}
    return APIError(503, message, "service_unavailable", None, "model_loading", headers)


def overloaded(message: str, retry_after: float = 1.0, code: str = "queue_full") -> APIError:
    headers = {"Retry-After": str(max(1, round(retry_after)))}
    return APIError(429, message, "rate_limit_error", None, code, headers)
