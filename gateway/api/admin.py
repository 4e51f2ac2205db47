"""Admin routes (the cluster token): usage per user across every gateway replica."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response

from wire.http import json_response

if TYPE_CHECKING:
    from gateway.core import Gateway

router = APIRouter()


@router.get("/admin/usage")
async def usage(request: Request) -> Response:
    """`{"object": "usage", "source", "users": {user: {requests, prompt_tokens,
    completion_tokens, total_tokens, by_status: {status: n}, end_users: {forwarded id:
    {the same fields, metric_id}}}}}` (`end_users` only behind a front end's key)."""
    gw: Gateway = request.app.state.gateway
    gw.auth.cluster(request)
    for k in gw.keys.by_digest.values():  # run-time keys another replica may have served
        if k.user not in gw.usage.users:
            gw.usage.users.append(k.user)
    return json_response(await gw.usage.report())
