"""Who may call: API keys on /v1/* (when configured) and the cluster token on /cluster writes.

Keys come from the config file (compared in constant time, `hmac.compare_digest`, over every
one so the time does not depend on which matched) and from the run-time store (keys.py,
looked up by the digest of what was sent). Secrets are never logged.

Closed views: once any key exists, `/cluster`, the dashboard and `/openapi.json` need a
valid key or the cluster token (`viewer`), unless `public_dashboard`; `/metrics` needs
`metrics_token` (or the cluster token) when one is set.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from gateway.config import ApiKey, GatewayConfig
from gateway.keys import KeyStore
from wire.errors import APIError


def _bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def unauthorized(message: str) -> APIError:
    return APIError(401, message, "invalid_request_error", None, "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"})


class Auth:
    def __init__(self, cfg: GatewayConfig, store: KeyStore | None = None) -> None:
        self.keys = [(k.key.encode(), k) for k in cfg.api_keys]
        self.cluster_token = cfg.cluster_token.encode()
        self.metrics_token = cfg.metrics_token.encode()
        self.public_dashboard = cfg.public_dashboard
        self.store = store or KeyStore()

    @property
    def open(self) -> bool:
        return not self.keys and not self.store.closed

    def api_key(self, request: Request) -> ApiKey | None:
        """The caller's key; None when no keys are configured. Raises 401 otherwise."""
        if self.open:
            return None
        raw = _bearer(request)
        found = self.match(raw)
        if found is None:
            if not raw:
                raise unauthorized("You didn't provide an API key. Provide it in the "
                                   "Authorization header as 'Bearer YOUR_KEY'.")
            raise unauthorized("Incorrect API key provided.")
        return found

    def match(self, raw: str) -> ApiKey | None:
        """The key whose secret is `raw` (configured or stored), compared in constant time."""
        given = raw.encode()
        found: ApiKey | None = None
        for secret, key in self.keys:
            if hmac.compare_digest(given, secret) and found is None:
                found = key
        return found or self.store.lookup(raw)

    def viewer(self, request: Request) -> None:
        """The cluster's views: open without keys or with `public_dashboard`; else a valid
        API key or the cluster token. Raises 401."""
        if self.open or self.public_dashboard:
            return
        raw = _bearer(request)
        if raw and (hmac.compare_digest(raw.encode(), self.cluster_token)
                    or self.match(raw) is not None):
            return
        raise APIError(401, "This view needs an API key or the cluster token (Authorization: "
                       "Bearer ...); public_dashboard = true in [gateway] opens it.",
                       "invalid_request_error", None, "invalid_api_key",
                       {"WWW-Authenticate": "Bearer"})

    def metrics(self, request: Request) -> None:
        """/metrics: open unless `metrics_token` is set; then it or the cluster token."""
        if not self.metrics_token:
            return
        given = _bearer(request).encode()
        if given and (hmac.compare_digest(given, self.metrics_token)
                      or hmac.compare_digest(given, self.cluster_token)):
            return
        raise APIError(401, "GET /metrics needs the metrics token (Authorization: Bearer "
                       "$metrics_token).", "invalid_request_error", None,
                       "invalid_metrics_token", {"WWW-Authenticate": "Bearer"})

    def cluster(self, request: Request) -> None:
        given = _bearer(request).encode()
        if not (given and hmac.compare_digest(given, self.cluster_token)):
            raise APIError(401, "Cluster writes need the cluster token "
                           "(Authorization: Bearer $CORRAL_CLUSTER_TOKEN).",
                           "invalid_request_error", None, "invalid_cluster_token",
                           {"WWW-Authenticate": "Bearer"})
