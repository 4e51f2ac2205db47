"""Admin routes for API keys at run time (the cluster token); `corral keys` calls them.

`POST /admin/keys` makes a key (or stores the one given) and returns its secret once;
`GET /admin/keys` lists every key, config-file ones included, by id and never by secret;
`PATCH /admin/keys/{id}` changes a run-time key's limits and budgets (null or 0: none);
`DELETE /admin/keys/{id}` revokes one. Config-file keys are changed in the file.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field

from gateway.config import ApiKey
from gateway.config_file import ApiKeyEntry, _Strict
from gateway.keys import LIMIT_FIELDS, new_secret, public
from wire.errors import APIError, bad_request
from wire.http import json_response, parse_model, read_json, read_model

if TYPE_CHECKING:
    from gateway.core import Gateway

log = logging.getLogger("corral.gateway")
router = APIRouter()


class NewKey(ApiKeyEntry):
    """`POST /admin/keys`: a config-file key's fields; the secret is made when not given."""

    key: str | None = Field(None, min_length=16)  # type: ignore[assignment]
    user: str = Field(min_length=1, max_length=128)


class Limits(_Strict):
    """`PATCH /admin/keys/{id}`: the limits and budgets to change (null or 0: none)."""

    rpm: int | None = Field(None, ge=0)
    tpm: int | None = Field(None, ge=0)
    user_rpm: int | None = Field(None, ge=0)
    user_tpm: int | None = Field(None, ge=0)
    tokens_per_day: int | None = Field(None, ge=0)
    tokens_per_month: int | None = Field(None, ge=0)
    user_tokens_per_day: int | None = Field(None, ge=0)
    user_tokens_per_month: int | None = Field(None, ge=0)


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    gw.auth.cluster(request)
    return gw


def _all(gw: Gateway) -> list[ApiKey]:
    return [k for _, k in gw.auth.keys] + list(gw.keys.by_digest.values())


def _find(gw: Gateway, key_id: str) -> ApiKey:
    for k in _all(gw):
        if k.id == key_id:
            if k.source != "runtime":
                raise APIError(409, f"The key {key_id!r} comes from the config file; change "
                               "it there.", "invalid_request_error", "id", "config_key")
            return k
    raise APIError(404, f"No API key {key_id!r}.", "invalid_request_error", "id",
                   "key_not_found")


@router.get("/admin/keys")
async def list_keys(request: Request) -> Response:
    gw = _gw(request)
    data = [public(k, gw.keys.created.get(k.digest)) for k in _all(gw)]
    return json_response({"object": "list", "data": data})


@router.post("/admin/keys")
async def add_key(request: Request) -> Response:
    gw = _gw(request)
    body = await read_model(request, NewKey)
    secret = body.key or new_secret()
    if gw.auth.match(secret) is not None:
        raise bad_request("That key exists already.", param="key", code="key_exists")
    template = body.model_copy(update={"key": secret}).to_key(0)
    was_open = gw.auth.open
    key = await gw.keys.add(template, secret)
    if key.user not in gw.usage.users:
        gw.usage.users.append(key.user)
    log.warning("api keys: added %s for user %r (frontend=%s)%s", key.id, key.user,
                key.frontend, "; /v1/* is closed now" if was_open else "")
    return json_response({**public(key, gw.keys.created.get(key.digest)), "key": secret}, 201)


@router.patch("/admin/keys/{key_id}")
async def set_limits(request: Request, key_id: str) -> Response:
    gw = _gw(request)
    key = _find(gw, key_id)
    raw = await read_json(request)
    limits = parse_model(Limits, raw)
    if key.frontend is None and any(raw.get(f) for f in LIMIT_FIELDS if f.startswith("user_")):
        raise bad_request("Per-end-user limits need a front-end key (frontend).",
                          param=next(f for f in LIMIT_FIELDS if f.startswith("user_")
                                     and raw.get(f)))
    changes: dict[str, Any] = {f: (getattr(limits, f) or None) for f in raw if f in LIMIT_FIELDS}
    key = await gw.keys.set_limits(key, changes)
    log.warning("api keys: limits of %s (user %r) set: %s", key.id, key.user, changes)
    return json_response(public(key, gw.keys.created.get(key.digest)))


@router.delete("/admin/keys/{key_id}")
async def revoke(request: Request, key_id: str) -> Response:
    gw = _gw(request)
    key = _find(gw, key_id)
    await gw.keys.revoke(key)
    log.warning("api keys: revoked %s (user %r)", key.id, key.user)
    return json_response({"id": key.id, "object": "api_key", "deleted": True})
