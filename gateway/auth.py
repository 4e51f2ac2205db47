"""Who may call: API keys on /v1/* (when configured) and the cluster token on /cluster writes.

Secrets are compared in constant time (`hmac.compare_digest`, over every configured key so
the time does not depend on which one matched) and never logged.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from gateway.config import ApiKey, GatewayConfig
from wire.errors import APIError


def _bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def unauthorized(message: str) -> APIError:
    return APIError(401, message, "invalid_request_error", None, "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"})


class Auth:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.keys = [(k.key.encode(), k) for k in cfg.api_keys]
        self.cluster_token = cfg.cluster_token.encode()

    @property
    def open(self) -> bool:
        return not self.keys

    def api_key(self, request: Request) -> ApiKey | None:
        """The caller's key; None when no keys are configured. Raises 401 otherwise."""
        if not self.keys:
            return None
        given = _bearer(request).encode()
        found: ApiKey | None = None
        for secret, key in self.keys:
            if hmac.compare_digest(given, secret) and found is None:
                found = key
        if found is None:
            if not given:
                raise unauthorized("You didn't provide an API key. Provide it in the "
                                   "Authorization header as 'Bearer YOUR_KEY'.")
            raise unauthorized("Incorrect API key provided.")
        return found

    def cluster(self, request: Request) -> None:
        given = _bearer(request).encode()
        if not (given and hmac.compare_digest(given, self.cluster_token)):
            raise APIError(401, "Cluster writes need the cluster token "
                           "(Authorization: Bearer $CORRAL_CLUSTER_TOKEN).",
                           "invalid_request_error", None, "invalid_cluster_token",
                           {"WWW-Authenticate": "Bearer"})
