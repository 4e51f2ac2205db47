"""Routing that knows prefill from decode (issue 21): sim workers with equal decode rates
and 1x / 3x prompt-reading rates behind a real gateway; the engine learning both rates.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
from conftest import MODEL, all_ready
from procs import Gateway, Worker, wait_for

from worker.backends.base import SamplingParams
from worker.backends.sim import SimBackend
from worker.engine import Engine

HEADER = "x-corral-worker"
DECODE = 50.0  # tokens/s per slot, the same on every worker
SLOW, FAST = 2000.0, 6000.0  # prompt tokens/s: 1x and 3x
LONG = "horse " * 1334  # ~2,000 tokens (the sim reads 4 characters a token)


def reader(factory: Callable[..., Worker], prefill: float) -> Worker:
    """A sim worker, started but not waited for: `gateway` waits for them together."""
    return factory("--sim-tokens-per-second", str(DECODE), "--parallel", "4",
                   "--sim-prefill-tokens-per-second", str(prefill), "--max-queue", "32",
                   backend="sim", wait=False)


def gateway(factory: Callable[..., Gateway], ws: list[Worker]) -> Gateway:
    all_ready(*ws)
    g = factory(*[a for w in ws for a in ("--worker", w.url)])
    wait_for(lambda: sum(x["state"] == "ready" for x in workers(g).values()) == len(ws),
             30, 0.05, "all workers ready")
    return g


def workers(g: Gateway) -> dict[str, dict]:
    return {w["id"]: w for w in httpx.get(f"{g.url}/cluster", timeout=5).json()["workers"]}


def ask(url: str, content: str, max_tokens: int, messages: list[dict] | None = None,
        **headers: str) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=60,
                   json={"model": MODEL, "max_tokens": max_tokens,
                         "messages": messages or [{"role": "user", "content": content}]})
    assert r.status_code == 200, r.text
    return r.headers.get(HEADER, "")


def test_long_prompts_go_to_the_fast_reader_short_ones_spread(worker_factory,
                                                               gateway_factory) -> None:
    slow, fast = reader(worker_factory, SLOW), reader(worker_factory, FAST)
    g = gateway(gateway_factory, [slow, fast])
    seen = workers(g)
    for w, rate in ((slow, SLOW), (fast, FAST)):  # both rates, on /cluster, as calibrated
        assert seen[w.id]["prefill_tokens_per_second"] == rate
        assert seen[w.id]["decode_tokens_per_second"] == DECODE
    with ThreadPoolExecutor(8) as pool:
        longs = collections.Counter(pool.map(
            lambda i: ask(g.url, f"{i} {LONG}", 4), range(8)))
    # Reading 2,000 tokens takes 1 s on the slow reader, 0.33 s on the fast one: the fast
    # one is worth ~3 queued prompts. Decode-only scoring splits them evenly (4 / 4).
    assert longs[fast.id] >= 6, longs
    with ThreadPoolExecutor(16) as pool:
        shorts = collections.Counter(pool.map(
            lambda i: ask(g.url, f"question {i}?", 20), range(16)))
    # 50-token prompts cost ~nothing to read anywhere: decoding decides, and spreads.
    assert min(shorts[slow.id], shorts[fast.id]) >= 4, shorts


def _hold(http: httpx.Client, stack: contextlib.ExitStack, url: str, n: int) -> None:
    """`n` long streams sent straight to a worker: load no gateway counted (external)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hold"}],
            "max_tokens": 2000, "stream": True}
    for _ in range(n):
        r = stack.enter_context(http.stream("POST", f"{url}/v1/chat/completions", json=body))
        assert r.status_code == 200


def _busy(g: Gateway, w: Worker, n: int) -> None:
    wait_for(lambda: workers(g)[w.id]["slots_busy"] + workers(g)[w.id]["queue_depth"] == n,
             20, 0.05, f"{w.id} holding {n}")


def test_cached_long_prefix_returns_to_its_worker_unless_far_busier(worker_factory,
                                                                    gateway_factory) -> None:
    slow, fast = reader(worker_factory, SLOW), reader(worker_factory, FAST)
    g = gateway(gateway_factory, [slow, fast])
    sid = {"x-session-id": "the-long-document"}
    msgs = [{"role": "user", "content": LONG}]
    with httpx.Client(timeout=60) as http:
        with contextlib.ExitStack() as stack:  # the fast reader full: the document starts slow
            _hold(http, stack, fast.url, 6)
            _busy(g, fast, 6)
            assert ask(g.url, "", 4, msgs, **sid) == slow.id
        _busy(g, fast, 0)
        msgs += [{"role": "assistant", "content": "noted"}, {"role": "user", "content": "so?"}]
        # Idle cluster: back to its cache, although the other box reads 3x faster.
        assert ask(g.url, "", 4, msgs, **sid) == slow.id
        with contextlib.ExitStack() as stack:
            # 3 more in flight than the other: past the count guard (slack 2), but reading
            # the prefix again elsewhere (0.33 s) costs more than its free slot here.
            _hold(http, stack, slow.url, 3)
            _busy(g, slow, 3)
            assert ask(g.url, "", 4, msgs, **sid) == slow.id
            _hold(http, stack, slow.url, 3)  # far busier: no room left (4 slots + 2)
            _busy(g, slow, 6)
            assert ask(g.url, "", 4, msgs, **sid) == fast.id


def test_engine_learns_both_rates_from_long_requests() -> None:
    """From 0 (no calibration), within 15% of the sim's true rates after 6 long prompts."""
    prefill, decode = 4000.0, 100.0
    backend = SimBackend(decode, slots=2, n_ctx=8192, prefill_tokens_per_second=prefill)
    backend.load()
    engine = Engine(backend)
    assert engine.stats.prefill_tokens_per_second == engine.stats.decode_tokens_per_second == 0

    async def run() -> None:
        for i in range(6):  # one at a time: each ran alone
            async for _ in engine.generate([i] * 1024, 16, SamplingParams()):
                pass
        # A short prompt says nothing about reading speed: it must not move the figure.
        before = engine.stats.prefill_tokens_per_second
        async for _ in engine.generate([1] * 20, 4, SamplingParams()):
            pass
        assert engine.stats.prefill_tokens_per_second == before

    try:
        asyncio.run(run())
    finally:
        backend.close()
    s = engine.stats
    assert abs(s.prefill_tokens_per_second - prefill) / prefill < 0.15, s
    assert abs(s.decode_tokens_per_second - decode) / decode < 0.15, s
    assert s.tokens_per_second == s.decode_tokens_per_second  # the old name, kept
