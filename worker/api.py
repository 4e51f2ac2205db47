"""The worker's OpenAI API: validate, render the prompt, hand it to the engine, relay.

Path of a request: `api` (here) → `engine` (queue, slots, stop strings) → `backend`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from wire import errors
from wire import openai as oa
from wire.http import error_response, json_response, read_model
from wire.sse import SSE_DONE, sse
from wire.status import WORKER_HEADER
from worker import choices
from worker.backends.base import SamplingParams
from worker.engine import Delta, Engine
from worker.tools import chat as tools_chat

router = APIRouter()


@dataclass
class Job:
    """A validated request, ready for the engine."""

    kind: str  # "chat" | "text"
    req: oa.SamplingFields
    prompt: list[int]
    max_tokens: int
    prefix: str = ""  # echoed prompt for legacy completions with echo=true
    plan: tools_chat.Plan | None = None  # tools / structured output (worker/tools)
    constraint: object = None  # the backend's compiled form of plan.constraint
    engine: Engine | None = None  # the model's engine (set by _prepare_*)


def engine_for(request: Request, model: str) -> Engine:
    """The engine serving `model` here (a worker may hold several, worker.hosting)."""
    state = request.app.state
    engine = state.worker.engine_for(model)
    if engine is not None:
        return engine
    h = state.worker.hosting.get(model)
    if h is not None:  # held, but not serving: a 503 the gateway retries elsewhere
        if h.state in ("loading", "fetching"):
            raise errors.loading()
        if h.state == "failed":
            raise errors.APIError(503, f"The model {model!r} failed to load on this worker: "
                                  f"{h.error}", "service_unavailable", None,
                                  "model_load_failed")
        raise errors.APIError(503, f"The model {model!r} is being unloaded from this worker.",
                              "service_unavailable", None, "model_draining")
    if not state.worker.served_models():  # worker.gate answers `loading` first; a race
        if state.availability()[0] == "loading":
            raise errors.loading()
        # Idle (nothing placed, or just released): a 503, so a gateway that routed here on
        # a stale view retries elsewhere; a 404 would reach its client.
        raise errors.APIError(503, "No model is placed on this worker.", "service_unavailable",
                              None, "no_model")
    raise errors.not_found(f"The model {model!r} does not exist on this worker.")


# Truncation when a request names none of top_p, top_k, min_p (llama-server's defaults):
# sampling a small model's whole distribution at temperature 1 (OpenAI's default, which
# front ends such as Open WebUI leave unset) yields gibberish within a few tokens.
DEFAULT_TRUNCATION = {"top_p": 0.95, "top_k": 40, "min_p": 0.05}


def _params(req: oa.SamplingFields) -> SamplingParams:
    trunc = ({} if req.model_fields_set & DEFAULT_TRUNCATION.keys()
             else DEFAULT_TRUNCATION)
    return SamplingParams(
        temperature=req.temperature,
        top_p=trunc.get("top_p", req.top_p),
        top_k=int(trunc.get("top_k", req.top_k)),
        min_p=trunc.get("min_p", req.min_p),
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repeat_penalty=req.repeat_penalty,
    )


async def _prepare_chat(request: Request) -> Job:
    req = await read_model(request, oa.ChatCompletionRequest)
    engine = engine_for(request, req.model)
    if tools_chat.needed(req):
        plan = tools_chat.plan(req, engine.backend)
        tokens = engine.backend.tokenize(plan.prompt)
        budget = engine.check_context(len(tokens), req.limit)
        compiled = (engine.backend.compile_constraint(plan.constraint)
                    if plan.constraint is not None else None)
        return Job("chat", req, tokens, budget, plan=plan, constraint=compiled,
                   engine=engine)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    text = engine.backend.render_chat(messages, continue_final=req.continue_final_message)
    tokens = engine.backend.tokenize(text)
    return Job("chat", req, tokens, engine.check_context(len(tokens), req.limit),
               engine=engine)


async def _prepare_text(request: Request) -> Job:
    req = await read_model(request, oa.CompletionRequest)
    engine = engine_for(request, req.model)
    tokens = engine.backend.tokenize(req.prompt_text)
    budget = engine.check_context(len(tokens), req.limit)
    return Job("text", req, tokens, budget, req.prompt_text if req.echo else "",
               engine=engine)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _serve(request, await _prepare_chat(request))


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _serve(request, await _prepare_text(request))


async def _serve(request: Request, job: Job) -> Response:
    engine = job.engine
    assert engine is not None
    if engine.queue_depth >= engine.max_queue:
        raise errors.overloaded("The worker's queue is full; retry shortly.", retry_after=1)
    params = _params(job.req)
    engine.backend.validate(params)
    headers = {WORKER_HEADER: request.app.state.worker_id}
    if job.req.n > 1 or job.req.top_n is not None:  # several choices or logprobs
        if job.plan is not None:  # worker/choices.py has no tool parsing or constraints
            raise errors.bad_request(
                "n > 1 and logprobs cannot be combined with tools or a JSON response_format "
                "yet.", param="n" if job.req.n > 1 else "logprobs",
                code="unsupported_parameter")
        choices.check(job, engine.backend, params)
        return await choices.serve(job, engine, params, headers, lambda: _disconnected(request))
    gen = engine.generate(job.prompt, job.max_tokens, params, job.req.stop, job.constraint)
    if job.req.stream:
        return StreamingResponse(
            _stream(job, gen), media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    collect = asyncio.ensure_future(_collect(gen))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():
            collect.cancel()  # the client left: stop generating for nobody
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)
    try:
        text, last = collect.result()
    except errors.APIError as err:
        return error_response(err)
    use = oa.usage(len(job.prompt), last.completion_tokens, last.cached_tokens)
    rid = oa.new_id("chatcmpl" if job.kind == "chat" else "cmpl")
    model = job.req.model
    if job.plan is not None:
        out = job.plan.output()
        out.feed(text)
        out.finish()
        content, calls = out.message()
        finish = out.finish_reason(last.finish or "stop")
        return json_response(oa.chat_completion(rid, model, content, finish, use,
                                                tool_calls=calls), headers=headers)
    body = (
        oa.chat_completion(rid, model, text, last.finish or "stop", use)
        if job.kind == "chat"
        else oa.text_completion(rid, model, job.prefix + text, last.finish or "stop", use)
    )
    return json_response(body, headers=headers)


async def _collect(gen: AsyncIterator[Delta]) -> tuple[str, Delta]:
    parts: list[str] = []
    last = Delta("", "stop")
    async for d in gen:
        parts.append(d.text)
        last = d
    return "".join(parts), last


async def _disconnected(request: Request) -> None:
    # The body is read already, so the next message is the client hanging up.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(job: Job, gen: AsyncIterator[Delta]) -> AsyncIterator[bytes]:
    chat = job.kind == "chat"
    rid = oa.new_id("chatcmpl" if chat else "cmpl")
    model, created = job.req.model, int(time.time())
    last: Delta | None = None
    try:
        if chat:
            yield sse(oa.chat_chunk(rid, model, created, oa.ROLE_DELTA))
        elif job.prefix:
            yield sse(oa.text_chunk(rid, model, created, job.prefix))
        if job.plan is not None:
            out = job.plan.output()
            async for d in gen:
                last = d
                for delta in out.feed(d.text):
                    yield sse(oa.chat_chunk(rid, model, created, delta))
            for delta in out.finish():
                yield sse(oa.chat_chunk(rid, model, created, delta))
            if last is not None and last.finish is not None:
                last.finish = out.finish_reason(last.finish)
        else:
            async for d in gen:
                last = d
                if d.text:
                    yield sse(
                        oa.chat_chunk(rid, model, created, {"content": d.text})
                        if chat
                        else oa.text_chunk(rid, model, created, d.text)
                    )
    except errors.APIError as err:
        # Headers are gone already: the error travels as a final event, never a silent cut.
        yield sse(err.body())
        return
    finally:
        await gen.aclose()
    assert last is not None and last.finish is not None
    finish = last.finish
    yield sse(
        oa.chat_chunk(rid, model, created, {}, finish)
        if chat
        else oa.text_chunk(rid, model, created, "", finish)
    )
    if job.req.include_usage:
        use = oa.usage(len(job.prompt), last.completion_tokens, last.cached_tokens)
        yield sse(
            oa.chat_chunk(rid, model, created, None, use=use)
            if chat
            else oa.text_chunk(rid, model, created, None, use=use)
        )
    yield SSE_DONE


@router.get("/v1/models")
async def models(request: Request) -> Response:
    state = request.app.state
    cards = [oa.ModelCard(id=m, created=state.started) for m in state.served_models()]
    return json_response(oa.ModelList(data=cards).model_dump())


@router.get("/healthz")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/status")
async def status(request: Request) -> Response:
    return json_response(request.app.state.status().model_dump())


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
