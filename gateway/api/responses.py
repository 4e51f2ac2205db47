"""The Responses API routes: `POST /v1/responses`, `GET`/`DELETE /v1/responses/{id}`,
`GET /v1/responses/{id}/input_items`.

A request is translated into a chat completion (gateway/responses/translate.py) and sent
through the same admission → routing → upstream path as chat, always streamed from the
worker so that a broken stream is continued elsewhere (relay.py); the chat chunks are
turned into Responses events (events.py) for a streaming client, or into the response
object for a plain one. Limits and per-user usage are counted by `Accounted`, as for chat.
Stored responses belong to the key that created them (its user; behind a trusted front end,
the end user it forwarded); anyone else gets 404.
A conversation continued with previous_response_id keeps its root's affinity key, so it
goes back to the worker holding its prompt cache, even through another gateway replica.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from gateway.affinity import SESSION_HEADER, session_key
from gateway.api.openai import GATEWAY, Accounted, count_refusal
from gateway.identity import EndUser, resolve
from gateway.limits import estimate_tokens
from gateway.relay import Relay, RelayResponse
from gateway.responses import translate as tr
from gateway.responses.events import Builder, chunks, skeleton, sse_event
from gateway.upstream import Call, ClientGone, _error, until_disconnect
from wire import errors
from wire import openai as oa
from wire.http import json_response, parse_model, read_json, validation_error
from wire.responses import ResponsesRequest
from wire.status import WORKER_HEADER

if TYPE_CHECKING:
    from gateway.config import ApiKey
    from gateway.core import Gateway

router = APIRouter()


def _gw(request: Request) -> Gateway:
    return request.app.state.gateway


def _owner(key: ApiKey | None, end: EndUser | None) -> str:
    """Who a stored response belongs to: the key's user ("" when the gateway is open) and,
    behind a trusted front end, the end user it forwarded (each sees only their own)."""
    if key is None:
        return ""
    return key.user if end is None else f"{key.user}\x00{end.id}"


def _renamed(err: errors.APIError) -> errors.APIError:
    err.param = tr.rename_param(err.param)
    err.message = tr.rename(err.message) or err.message
    return err


def _caller(gw: Gateway, request: Request) -> str:
    """The owner a GET/DELETE asks as (401 without a valid key or front-end identity)."""
    key = gw.auth.api_key(request)
    return _owner(key, resolve(key, request.headers))


def _not_found(rid: str) -> errors.APIError:
    return errors.APIError(404, f"Response with id {rid!r} not found.",
                           "invalid_request_error", None, "not_found")


async def _record(gw: Gateway, owner: str, rid: str) -> dict[str, Any]:
    try:
        rec = await gw.responses.get(rid)
    except Exception as exc:
        raise errors.unavailable(f"The response store is unavailable ({type(exc).__name__})."
                                 ) from None
    if rec is None or rec.get("owner") != owner:
        raise _not_found(rid)
    return rec


def conversation_key(model: str, header: str | None, user: str | None, root: str,
                     continued: bool, chat: str | None = None) -> tuple[str, bool]:
    """The affinity key of a Responses turn: the client's session header, a front end's
    chat id or the user field as for chat, else the conversation's first response id, the
    same for every later turn (which prefers its worker), whatever instructions each sends."""
    sk = session_key(model, header, {"user": user}, chat)
    return sk if sk is not None else (f"{model}\x00r\x00{root}", continued)


class _Turn:
    """One Responses request on its way: the request, its items, the chat call."""

    def __init__(self, gw: Gateway, req: ResponsesRequest, owner: str,
                 prev: dict[str, Any] | None) -> None:
        self.gw, self.req, self.owner = gw, req, owner
        self.id = tr.new_id("resp")
        self.root = prev["root"] if prev else self.id
        self.items = tr.input_items(req)
        self.history = (prev["history"] if prev else []) + tr.to_messages(self.items)
        self.chat = tr.chat_body(req, self.history)
        try:
            self.checked = oa.ChatCompletionRequest.model_validate(self.chat)
        except ValidationError as exc:
            raise _renamed(validation_error(exc)) from None
        except errors.APIError as err:
            raise _renamed(err) from None
        self.builder = Builder(skeleton(req, self.id))

    async def save(self) -> None:
        b = self.builder
        if not self.req.store or b.response["status"] not in ("completed", "incomplete"):
            return
        await self.gw.responses.put(self.id, {
            "owner": self.owner, "root": self.root, "response": b.response,
            "input_items": self.items, "history": self.history + b.history()})

    async def events(self, relay: Relay) -> AsyncIterator[dict[str, Any]]:
        """Every event of the response, the terminal one after the response is stored."""
        b = self.builder
        for ev in b.start():
            yield ev
        try:
            async for piece in relay.body():
                for chunk in chunks(piece):
                    for ev in b.feed(chunk):
                        yield ev
                if b.failed:
                    break
        except Exception as exc:  # never a silent cut: the client gets response.failed
            b.fail(f"The gateway failed relaying the answer ({type(exc).__name__}).",
                   "server_error")
        for ev in b.finish_events():
            yield ev
        await self.save()
        yield b.terminal()


class _EventStream(StreamingResponse):
    """The Responses event stream; always closes the relay (lease, metrics), like chat."""

    def __init__(self, turn: _Turn, relay: Relay, headers: dict[str, str]) -> None:
        super().__init__(self._body(turn, relay), 200, headers, media_type="text/event-stream")
        self.relay = relay  # what Accounted reads the usage from

    @staticmethod
    async def _body(turn: _Turn, relay: Relay) -> AsyncIterator[bytes]:
        async for ev in turn.events(relay):
            yield sse_event(ev)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self.relay.close())


async def _whole(turn: _Turn, relay: Relay) -> None:
    async for _ in turn.events(relay):
        pass


@router.post("/v1/responses", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": ResponsesRequest.model_json_schema()}}}})
async def create(request: Request) -> Response:
    gw = _gw(request)
    started = time.perf_counter()
    model = ""
    key: ApiKey | None = None
    end: EndUser | None = None
    try:
        key = gw.auth.api_key(request)
        body = await read_json(request)
        end = resolve(key, request.headers, body)  # a trusted front end's end user
        eid = end.id if end is not None else None
        owner = _owner(key, end)
        req = parse_model(ResponsesRequest, body)
        model = req.model = gw.placer.resolve(req.model)  # an alias: the catalogued name
        gw.placer.touch(model)  # in use; loaded on demand when served nowhere
        refused = gw.placer.refusal(model)  # a model too big for every worker and split
        if refused is not None:
            gw.metrics.rejected.labels("model_unplaceable").inc()
            raise refused
        prev = None
        if req.previous_response_id:
            try:
                prev = await _record(gw, owner, req.previous_response_id)
            except errors.APIError as err:
                if err.status != 404:
                    raise
                raise errors.bad_request(
                    f"Previous response with id {req.previous_response_id!r} not found.",
                    param="previous_response_id") from None
        turn = _Turn(gw, req, owner, prev)
        await gw.budgets.check(key, eid)
        chars = sum(len(m.text()) + 8 for m in turn.checked.messages)
        res = await gw.limits.admit(key, estimate_tokens(chars, req.max_output_tokens)
                                    if key is not None and (key.tpm or key.user_tpm) else 0,
                                    eid)
        who = end.queue_user if end is not None else (key.user if key else req.user)
        call = Call(model, "/v1/chat/completions", orjson.dumps(turn.chat), True, True, who)
        # Its expected work, for cost routing: a chained turn's history is cached where
        # the chain went (affinity), so only the new input counts there.
        new = chars if prev is None else min(chars, sum(
            len(m.text()) + 8 for m in turn.checked.messages[-1:]))
        call.job = gw.router.lengths.job(model, chars, new, req.max_output_tokens)
        if gw.cfg.affinity:
            call.session, call.affine = conversation_key(
                model, request.headers.get(SESSION_HEADER), req.user, turn.root,
                prev is not None, end.chat if end is not None else None)
        call.started = started
    except errors.APIError as err:
        count_refusal(gw, model, started, err, key, end)
        return _error(err, GATEWAY)
    resp = await gw.upstream.handle(request, call)
    if not isinstance(resp, RelayResponse):  # an error before any byte: say it in our names
        return Accounted(_chat_error(resp), gw, res, key.user if key else None, end)
    relay = resp.relay
    headers = {WORKER_HEADER: resp.headers.get(WORKER_HEADER, GATEWAY)}
    if req.stream:
        out: Response = _EventStream(turn, relay, {**headers, "cache-control": "no-cache",
                                                   "x-accel-buffering": "no"})
        return Accounted(out, gw, res, key.user if key else None, end)
    try:
        await until_disconnect(request, _whole(turn, relay))
    except ClientGone:
        out = Response(status_code=499)
    else:
        out = _whole_response(turn.builder, headers)
    finally:
        await relay.close()
    out.relay = relay  # type: ignore[attr-defined]  # Accounted reads the usage from it
    return Accounted(out, gw, res, key.user if key else None, end)


def _whole_response(b: Builder, headers: dict[str, str]) -> Response:
    if b.response["status"] == "failed":
        e = b.response["error"] or {}
        err = errors.APIError(502, e.get("message", "The worker failed."), "server_error",
                              None, e.get("code"))
        return _error(err, headers[WORKER_HEADER])
    return json_response(b.response, headers=headers)


def _chat_error(resp: Response) -> Response:
    """A worker's (or admission's) error for the chat request, with Responses names."""
    body = getattr(resp, "body", b"")
    try:
        obj = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return resp
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict):
        return resp
    err["param"] = tr.rename_param(err.get("param"))
    if isinstance(err.get("message"), str):
        err["message"] = tr.rename(err["message"])
    headers = {k: v for k, v in resp.headers.items() if k.lower() != "content-length"}
    return Response(orjson.dumps(obj), resp.status_code, headers,
                    media_type="application/json")


@router.get("/v1/responses/{rid}")
async def retrieve(request: Request, rid: str) -> Response:
    gw = _gw(request)
    try:
        owner = _caller(gw, request)
        if request.query_params.get("stream") in ("true", "1"):
            raise errors.bad_request("Streaming a stored response needs background mode, "
                                     "which is not supported.", param="stream")
        rec = await _record(gw, owner, rid)
    except errors.APIError as err:
        return _error(err, GATEWAY)
    return json_response(rec["response"], headers={WORKER_HEADER: GATEWAY})


@router.delete("/v1/responses/{rid}")
async def delete(request: Request, rid: str) -> Response:
    gw = _gw(request)
    try:
        await _record(gw, _caller(gw, request), rid)
        await gw.responses.delete(rid)
    except errors.APIError as err:
        return _error(err, GATEWAY)
    return json_response({"id": rid, "object": "response", "deleted": True},
                         headers={WORKER_HEADER: GATEWAY})


@router.get("/v1/responses/{rid}/input_items")
async def input_items(request: Request, rid: str) -> Response:
    gw = _gw(request)
    q = request.query_params
    try:
        owner = _caller(gw, request)
        try:
            limit = int(q.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise errors.bad_request("limit must be an integer from 1 to 100.", param="limit")
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise errors.bad_request("order must be 'asc' or 'desc'.", param="order")
        items = list((await _record(gw, owner, rid))["input_items"])
    except errors.APIError as err:
        return _error(err, GATEWAY)
    if order == "desc":
        items.reverse()
    after = q.get("after")
    if after:
        ids = [it["id"] for it in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return json_response({"object": "list", "data": page,
                          "first_id": page[0]["id"] if page else None,
                          "last_id": page[-1]["id"] if page else None,
                          "has_more": len(items) > limit}, headers={WORKER_HEADER: GATEWAY})
