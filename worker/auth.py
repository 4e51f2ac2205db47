"""Who may use `/control/*`: the gateway, which holds the cluster token.

`Authorization: Bearer <cluster token>`; a worker without a token accepts control only from
loopback, so an unconfigured worker cannot be placed (or drained) from the network.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from wire.errors import APIError


def authorize(request: Request) -> None:
    """Raises a 401 unless `request` may control this worker."""
    token = request.app.state.worker.cfg.cluster_token
    if not token:
        host = request.client.host if request.client else ""
        if host in ("127.0.0.1", "::1", "localhost"):
            return
        raise APIError(401, "This worker has no cluster token: control is loopback-only.",
                       "invalid_request_error", None, "invalid_cluster_token")
    auth = request.headers.get("authorization", "")
    scheme, _, given = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                             token.encode()):
        raise APIError(401, "Control needs the cluster token (Authorization: Bearer ...).",
                       "invalid_request_error", None, "invalid_cluster_token",
                       {"WWW-Authenticate": "Bearer"})
