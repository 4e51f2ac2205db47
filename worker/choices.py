"""Requests with `n` > 1 or logprobs: several choices from one prompt evaluation.

The engine's `generate` serves the plain n=1 case; this is its sibling for the rest. It takes
`n` slots at once (all or nothing), submits one `Sequence` whose `forks` are the other
choices (the backend evaluates the prompt once and forks it), and merges their outputs into
one stream of `ChoiceDelta`s tagged by index. Stop strings are matched per choice; a
choice's logprobs travel with the chunk that carries their tokens' text (`logprobs.Pending`).
Usage: completion tokens summed over the choices, the prompt counted once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import Response, StreamingResponse

from wire import openai as oa
from wire.errors import APIError, bad_request
from wire.http import error_response, json_response
from wire.sse import SSE_DONE, sse
from worker.backends.base import SamplingParams, Sequence, TokenLogprob
from worker.engine import Engine, _StopMatcher
from worker.logprobs import Pending, chat_logprobs, completion_logprobs


@dataclass
class ChoiceDelta:
    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None


@dataclass
class Totals:
    """Filled as the generation runs; final when the generator is exhausted."""

    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class _Choice:
    seq: Sequence
    matcher: _StopMatcher
    pending: Pending = field(default_factory=Pending)
    done: bool = False


async def generate_choices(
    engine: Engine, prompt: list[int], max_tokens: int, params: SamplingParams,
    stop: list[str] | None, n: int, top: int | None, totals: Totals,
) -> AsyncIterator[ChoiceDelta]:
    """Yields the choices' deltas, interleaved as they come; each choice's last one has
    `finish` set. Cancels whatever is still running on exit."""
    hand = engine.handoff()  # one event-loop wake-up per decode step, not per token
    out: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    await engine._acquire(n)
    released = [False] * n

    def release(i: int) -> None:
        if not released[i]:
            released[i] = True
            engine._release(1)

    def finished_in_loop(i: int, reason: str, error: str | None) -> None:
        release(i)
        out.put_nowait((i, "f", reason, error))

    def make(i: int) -> Sequence:
        put = out.put_nowait
        return Sequence(
            oa.new_id("seq"), prompt, max_tokens, params,
            on_tokens=lambda text, k: hand.put(put, (i, "t", text, k)),
            on_finish=lambda r, e: hand.put(finished_in_loop, i, r, e),
            logprobs=top,
            on_logprobs=(lambda lps: hand.put(put, (i, "l", lps)))
            if top is not None else None,
            index=i,
        )

    seqs = [make(i) for i in range(n)]
    seqs[0].forks = seqs[1:]
    choices = [_Choice(s, _StopMatcher(stop or [])) for s in seqs]
    left = n
    submitted = False
    engine.stats.requests += 1
    engine.stats.prompt_tokens += len(prompt)
    try:
        engine.backend.submit(seqs[0])
        submitted = True
        while left:
            i, kind, *rest = await out.get()
            c = choices[i]
            if c.done:
                continue  # a choice cut by its stop string still reports its finish
            if kind == "l":
                c.pending.add(rest[0])
            elif kind == "t":
                text, k = rest
                totals.completion_tokens += k
                engine.stats.generated_tokens += k
                safe, hit = c.matcher.feed(text)
                if hit:
                    engine.backend.cancel(c.seq)
                    c.done, left = True, left - 1
                    yield ChoiceDelta(i, safe, c.pending.take(safe), "stop")
                elif safe:
                    yield ChoiceDelta(i, safe, c.pending.take(safe))
            else:
                reason, error = rest
                if reason == "error":
                    raise APIError(500, error or "generation failed", "server_error")
                c.done, left = True, left - 1
                tail = c.matcher.flush()
                c.pending.take(tail)
                totals.cached_tokens = seqs[0].cached_tokens
                yield ChoiceDelta(i, tail, c.pending.rest(), reason)
    finally:
        if not submitted:
            for i in range(n):
                release(i)
        else:
            for c in choices:
                if not c.done:
                    engine.backend.cancel(c.seq)


# --------------------------------------------------------------------------- responses


def _logprobs(chat: bool, top: int | None, entries: list[TokenLogprob],
              offsets: list[int], i: int) -> dict[str, Any] | None:
    if top is None:
        return None
    if chat:
        return chat_logprobs(entries)
    body, offsets[i] = completion_logprobs(entries, offsets[i])
    return body


async def collect(gen: AsyncIterator[ChoiceDelta], n: int
                  ) -> tuple[list[str], list[list[TokenLogprob]], list[str]]:
    texts: list[list[str]] = [[] for _ in range(n)]
    lps: list[list[TokenLogprob]] = [[] for _ in range(n)]
    finish = ["stop"] * n
    async for d in gen:
        texts[d.index].append(d.text)
        lps[d.index].extend(d.logprobs)
        if d.finish:
            finish[d.index] = d.finish
    return ["".join(t) for t in texts], lps, finish


def body(chat: bool, model: str, prefix: str, top: int | None, texts: list[str],
         lps: list[list[TokenLogprob]], finish: list[str], use: dict[str, Any]
         ) -> dict[str, Any]:
    offsets = [len(prefix)] * len(texts)
    choices = []
    for i, text in enumerate(texts):
        lp = _logprobs(chat, top, lps[i], offsets, i)
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text,
                                                    "refusal": None},
                            "logprobs": lp, "finish_reason": finish[i]})
        else:
            choices.append({"index": i, "text": prefix + text, "logprobs": lp,
                            "finish_reason": finish[i]})
    return {"id": oa.new_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices, "usage": use}


async def stream(chat: bool, model: str, prefix: str, top: int | None, n: int,
                 include_usage: bool, prompt_tokens: int, totals: Totals,
                 gen: AsyncIterator[ChoiceDelta], offset: int = 0) -> AsyncIterator[bytes]:
    """SSE: a role (or echo) chunk per choice, then each choice's deltas as they come,
    a finish chunk per choice, the usage chunk when asked for, `[DONE]`."""
    rid = oa.new_id("chatcmpl" if chat else "cmpl")
    obj = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())
    offsets = [len(prefix) + offset] * n

    def chunk(choices: list[dict[str, Any]], use: dict[str, Any] | None = None) -> bytes:
        out: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                               "choices": choices}
        if use is not None:
            out["usage"] = use
        return sse(out)

    def choice(i: int, text: str, lp: dict[str, Any] | None, finish: str | None
               ) -> dict[str, Any]:
        if chat:
            delta = {"content": text} if finish is None or text else {}
            return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}

    try:
        for i in range(n):
            if chat:
                yield chunk([{"index": i, "delta": oa.ROLE_DELTA, "logprobs": None,
                              "finish_reason": None}])
            elif prefix:
                yield chunk([choice(i, prefix, None, None)])
        async for d in gen:
            if d.text or d.logprobs:
                lp = _logprobs(chat, top, d.logprobs, offsets, d.index)
                yield chunk([choice(d.index, d.text, lp, None)])
            if d.finish:
                yield chunk([choice(d.index, "", None, d.finish)])
    except APIError as err:
        # Headers are gone already: the error travels as a final event, never a silent cut.
        yield sse(err.body())
        return
    finally:
        await gen.aclose()  # type: ignore[attr-defined]
    if include_usage:
        use = oa.usage(prompt_tokens, totals.completion_tokens, totals.cached_tokens)
        yield chunk([], use)
    yield SSE_DONE


async def serve(job: Any, engine: Engine, params: SamplingParams, headers: dict[str, str],
                gone: Callable[[], Awaitable[None]]) -> Response:
    """The whole answer for an `api.Job` with n > 1 or logprobs. `gone`: makes an awaitable
    that finishes when the client hangs up (a non-streamed request then stops)."""
    req = job.req
    chat = job.kind == "chat"
    n, top = req.n, req.top_n
    totals = Totals()
    gen = generate_choices(engine, job.prompt, job.max_tokens, params, req.stop, n, top,
                           totals)
    if req.stream:
        return StreamingResponse(
            stream(chat, req.model, job.prefix, top, n, req.include_usage, len(job.prompt),
                   totals, gen, getattr(req, "logprobs_offset", 0)),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    work = asyncio.ensure_future(collect(gen, n))
    left = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if not work.done():
            work.cancel()  # the client left: stop generating for nobody
    if not work.done() or work.cancelled():
        return Response(status_code=499)
    try:
        texts, lps, finish = work.result()
    except APIError as err:
        return error_response(err)
    use = oa.usage(len(job.prompt), totals.completion_tokens, totals.cached_tokens)
    return json_response(body(chat, req.model, job.prefix, top, texts, lps, finish, use),
                         headers=headers)


def check(job: Any, backend: Any, params: SamplingParams) -> None:
    """400s before anything starts: what this worker cannot honour."""
    if job.prefix and job.req.top_n is not None:
        raise bad_request("echo with logprobs is not supported", param="echo",
                          code="unsupported_parameter")
    backend.validate_choices(job.req.n, job.req.top_n, params.greedy)
