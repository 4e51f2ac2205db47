"""Load generation: closed-loop (C in flight) or open-loop (Poisson arrivals) over httpx.

One `Result` per request, timed on the client with `time.perf_counter()`: the request's
start (just before the request line is written), the first content-bearing chunk, every
later content-bearing chunk, and the end. Server-sent events are split and parsed here,
with no SDK between the socket and the clock; only `data:` payloads are decoded, once.
Every request has a total deadline, so a run always ends: a closed loop after at most
ceil(N / C) deadlines, an open loop at most one deadline after its last arrival.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson


@dataclass
class LoadSpec:
    base_url: str
    model: str
    requests: int
    concurrency: int | None = None  # closed loop: this many in flight
    rate: float | None = None  # open loop: Poisson arrivals per second
    max_tokens: int = 64
    prompt: str = "Tell me a short story about a horse."
    stream: bool = False
    api_key: str | None = None
    timeout: float = 60.0
    seed: int = 0
    # Prefix each prompt with its request number, so no two requests share a prefix (a
    # gateway with prompt-cache affinity would otherwise pin identical prompts to one worker).
    distinct_prompts: bool = False
    # Request i asks prompts[i % len] instead of `prompt`: requests unlike each other
    # (an engine that drafts from earlier answers must not meet the same question again).
    prompts: tuple[str, ...] = ()
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "open" if self.rate else "closed"


@dataclass
class Result:
    """One request as the client saw it. Times are seconds from the request's start."""

    ok: bool
    latency: float
    status: int | None = None
    error: str | None = None  # kind, e.g. "http_404", "timeout", "connect", "stream_error"
    message: str | None = None
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # content-bearing chunks only
    output_tokens: int = 0
    tokens_from_usage: bool = False
    start: float = 0.0  # seconds since the run began
    lag: float = 0.0  # open loop: how late the client sent it versus its scheduled arrival
    worker: str | None = None  # x-corral-worker, when a Corral gateway or worker answered
    # Sent again because a kept-alive connection turned out closed before any response
    # byte (see STALE): how many times.
    stale_retries: int = 0

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (streamed requests)."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def v1_url(base_url: str) -> str:
    """`http://h:p` → `http://h:p/v1`; a URL that already has a path is used as given."""
    base = base_url.rstrip("/")
    return base + "/v1" if urlsplit(base).path in ("", "/") else base


def request_body(spec: LoadSpec, i: int = 0) -> bytes:
    text = spec.prompts[i % len(spec.prompts)] if spec.prompts else spec.prompt
    prompt = f"Request {i}. {text}" if spec.distinct_prompts else text
    body: dict[str, Any] = {
        "model": spec.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": spec.max_tokens,
        "stream": spec.stream,
    }
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    body.update(spec.extra_body)
    return orjson.dumps(body)


#: httpx's words when a pooled keep-alive connection was closed by the server before it
#: sent anything for the request just written on it. llama.cpp's llama-server does this
#: after every streamed response (it announces `Keep-Alive: timeout=5, max=100`, then
#: closes): the stream before was complete, and the new request was never read, so it
#: is sent again on another connection rather than counted as a protocol error.
STALE = "Server disconnected without sending a response."
STALE_RETRIES = 2


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException)):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "protocol"
    if isinstance(exc, httpx.HTTPError):
        return "transport"
    return type(exc).__name__


def _http_error(status: int, raw: bytes) -> tuple[str, str]:
    message = raw[:300].decode(errors="replace")
    try:
        err = orjson.loads(raw).get("error") or {}
        message = str(err.get("message") or message)
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return f"http_{status}", message


def _content(obj: dict[str, Any]) -> str | None:
    """The text a chat or legacy-completion chunk carries, if any."""
    choices = obj.get("choices")
    if not choices:
        return None
    c = choices[0]
    delta = c.get("delta")
    if delta is not None:
        return delta.get("content") or delta.get("reasoning_content") or None
    return c.get("text") or None


async def _one_stream(client: httpx.AsyncClient, url: str, body: bytes, t0: float
                      ) -> Result:
    res = Result(ok=False, latency=0.0)
    async with client.stream("POST", url, content=body) as r:
        res.status = r.status_code
        res.worker = r.headers.get("x-corral-worker")
        if r.status_code != 200:
            res.error, res.message = _http_error(r.status_code, await r.aread())
            res.latency = time.perf_counter() - t0
            return res
        buf = b""
        chunks = 0
        done = False
        async for data in r.aiter_bytes():
            now = time.perf_counter() - t0
            buf += data
            if b"\r\n" in buf:
                buf = buf.replace(b"\r\n", b"\n")
            while (cut := buf.find(b"\n\n")) >= 0:
                event, buf = buf[:cut], buf[cut + 2 :]
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue  # comments, `event:`, `id:`, keep-alives
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    try:
                        obj = orjson.loads(payload)
                    except orjson.JSONDecodeError:
                        res.error, res.message = "bad_event", payload[:200].decode(errors="replace")
                        continue
                    if "error" in obj and not obj.get("choices"):
                        err = obj["error"] if isinstance(obj["error"], dict) else {}
                        res.error = "stream_error"
                        res.message = str(err.get("message") or obj["error"])
                        continue
                    if _content(obj):
                        chunks += 1
                        if res.ttft is None:
                            res.ttft = now
                        res.chunk_times.append(now)
                    use = obj.get("usage")
                    if use and use.get("completion_tokens") is not None:
                        res.output_tokens = int(use["completion_tokens"])
                        res.tokens_from_usage = True
        res.latency = time.perf_counter() - t0
        if not res.tokens_from_usage:
            res.output_tokens = chunks
        if res.error is None and not done:
            res.error, res.message = "incomplete", "the stream ended without data: [DONE]"
        res.ok = res.error is None
        return res


async def _one_plain(client: httpx.AsyncClient, url: str, body: bytes, t0: float) -> Result:
    r = await client.post(url, content=body)
    res = Result(ok=False, latency=time.perf_counter() - t0, status=r.status_code,
                 worker=r.headers.get("x-corral-worker"))
    raw = r.content
    if r.status_code != 200:
        res.error, res.message = _http_error(r.status_code, raw)
        return res
    try:
        obj = orjson.loads(raw)
        use = obj.get("usage") or {}
        if use.get("completion_tokens") is not None:
            res.output_tokens = int(use["completion_tokens"])
            res.tokens_from_usage = True
        else:  # no usage: about four characters a token
            c = obj["choices"][0]
            text = (c.get("message") or {}).get("content") or c.get("text") or ""
            res.output_tokens = max(1, len(text) // 4) if text else 0
        res.ok = True
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        res.error, res.message = "bad_response", raw[:200].decode(errors="replace")
    return res


class Runner:
    """Sends `spec.requests` requests and returns their results in issue order."""

    def __init__(self, spec: LoadSpec, transport: httpx.AsyncBaseTransport | None = None
                 ) -> None:
        if spec.requests < 1:
            raise ValueError("requests must be at least 1")
        if spec.rate is not None and spec.rate <= 0:
            raise ValueError("rate must be positive")
        if spec.rate is None and (spec.concurrency or 1) < 1:
            raise ValueError("concurrency must be at least 1")
        self.spec = spec
        self.transport = transport  # tests pass an httpx.MockTransport
        self.url = v1_url(spec.base_url) + "/chat/completions"
        self.bodies = ([request_body(spec, i) for i in range(spec.requests)]
                       if spec.distinct_prompts or spec.prompts
                       else [request_body(spec)] * spec.requests)
        self.results: list[Result | None] = [None] * spec.requests
        self.t_start = 0.0
        self.duration = 0.0

    def _client(self) -> httpx.AsyncClient:
        s = self.spec
        # Open loop: never queue on the client side, or the arrival process is not Poisson.
        conns = s.requests if s.rate else (s.concurrency or 1)
        headers = {"content-type": "application/json", "accept": "text/event-stream"
                   if s.stream else "application/json"}
        if s.api_key:
            headers["authorization"] = f"Bearer {s.api_key}"
        return httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(s.timeout, connect=min(10.0, s.timeout)),
            limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns),
            trust_env=False,  # loopback benchmarks must not detour through a proxy
            transport=self.transport,
        )

    async def _send(self, client: httpx.AsyncClient, i: int, scheduled: float) -> None:
        t0 = time.perf_counter()
        try:
            res = await asyncio.wait_for(self._attempts(client, i, t0), self.spec.timeout)
        except Exception as exc:  # every failure is a counted result, never a crash
            res = Result(ok=False, latency=time.perf_counter() - t0, error=_error_kind(exc),
                         message=str(exc)[:200] or type(exc).__name__)
        res.start = t0 - self.t_start
        res.lag = max(0.0, res.start - scheduled)
        self.results[i] = res

    async def _attempts(self, client: httpx.AsyncClient, i: int, t0: float) -> Result:
        """One request, sent again (timed from the first try) when its connection was a
        stale keep-alive one (STALE); a last failure says it was retried."""
        one = _one_stream if self.spec.stream else _one_plain
        for n in range(STALE_RETRIES + 1):
            try:
                res = await one(client, self.url, self.bodies[i], t0)
            except httpx.RemoteProtocolError as exc:
                if str(exc) != STALE:
                    raise
                if n == STALE_RETRIES:
                    raise httpx.RemoteProtocolError(
                        f"{STALE} (also on {n} fresh attempts)") from exc
                continue
            res.stale_retries = n
            return res
        raise AssertionError("unreachable")

    async def _closed(self, client: httpx.AsyncClient) -> None:
        next_i = 0

        async def loop() -> None:
            nonlocal next_i
            while next_i < self.spec.requests:
                i, next_i = next_i, next_i + 1
                await self._send(client, i, time.perf_counter() - self.t_start)

        c = min(self.spec.concurrency or 1, self.spec.requests)
        await asyncio.gather(*(loop() for _ in range(c)))

    async def _open(self, client: httpx.AsyncClient) -> None:
        rng = random.Random(self.spec.seed)
        rate = float(self.spec.rate or 1.0)
        tasks = []
        at = 0.0
        for i in range(self.spec.requests):
            delay = self.t_start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(self._send(client, i, at)))
            at += rng.expovariate(rate)
        await asyncio.gather(*tasks)

    async def run_async(self) -> list[Result]:
        async with self._client() as client:
            self.t_start = time.perf_counter()
            if self.spec.rate:
                await self._open(client)
            else:
                await self._closed(client)
            self.duration = time.perf_counter() - self.t_start
        return [r for r in self.results if r is not None]

    def run(self) -> list[Result]:
        return asyncio.run(self.run_async())
