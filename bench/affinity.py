"""Session affinity, measured: prompt-cache hits and later-turn TTFT with affinity on vs off.

    .venv/bin/python bench/affinity.py [--workers 4] [--conversations 16] [--turns 3]

Starts N real llama.cpp workers (1 thread each) on 127.0.0.1 and, one after the other, two
gateways in front of them: `[gateway] affinity = true` and `affinity = false`. Each phase
runs the same number of concurrent multi-turn chats, each opening with its own ~300-token
document (so only the worker that served a chat's earlier turn can have its prefix
cached). Per phase it reports the workers' own prompt-cache counters (/status
`prompt_cache`, deltas), the cached share of later turns' prompt tokens (from usage
`prompt_tokens_details.cached_tokens`) and the TTFT of later turns, seen by the client.
Phases use fresh documents, so the first phase's cache cannot help the second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from procs import Gateway, Worker, start_gateway, start_worker, wait_for  # noqa: E402

MODEL = "smollm2-135m"
WORDS = ("river", "meadow", "harvest", "lantern", "copper", "orchard", "valley", "thunder",
         "ember", "willow", "granite", "saddle", "prairie", "canyon", "falcon", "juniper",
         "ridge", "pasture", "bramble", "quarry")


def document(rng: random.Random, words: int = 220) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def cache_counters(workers: list[Worker]) -> dict[str, int]:
    total: dict[str, int] = {"requests": 0, "hits": 0, "reused_tokens": 0, "prompt_tokens": 0}
    for w in workers:
        st = httpx.get(f"{w.url}/status", timeout=10).json()
        pc = st.get("prompt_cache") or {}
        total["hits"] += int(pc.get("prompt_cache_hits", 0))
        total["reused_tokens"] += int(pc.get("prompt_cache_reused_tokens", 0))
        for line in httpx.get(f"{w.url}/metrics", timeout=10).text.splitlines():
            if line.startswith("corral_worker_prompt_tokens_total "):
                total["prompt_tokens"] += int(float(line.split()[-1]))
    return total


async def chat(http: httpx.AsyncClient, url: str, msgs: list[dict], max_tokens: int
               ) -> tuple[float, str, int, int]:
    """(TTFT seconds, answer, prompt tokens, cached prompt tokens) of one streamed turn."""
    body = {"model": MODEL, "messages": msgs, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    use: dict[str, Any] = {}
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ev = orjson.loads(line[6:])
            if ev.get("usage"):
                use = ev["usage"]
            for ch in ev.get("choices") or ():
                if ch["delta"].get("content"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(ch["delta"]["content"])
    cached = (use.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return ttft or time.perf_counter() - t0, "".join(parts), use.get("prompt_tokens", 0), cached


async def phase(url: str, convs: int, turns: int, max_tokens: int, seed: int
                ) -> list[list[tuple[float, int, int]]]:
    rng = random.Random(seed)
    docs = [document(rng) for _ in range(convs)]
    async with httpx.AsyncClient(timeout=600, trust_env=False,
                                 limits=httpx.Limits(max_connections=convs * 2)) as http:
        async def one(k: int) -> list[tuple[float, int, int]]:
            msgs = [{"role": "system", "content": "You answer in one short sentence."},
                    {"role": "user", "content": f"Read this: {docs[k]} What is it about?"}]
            out = []
            for t in range(turns):
                ttft, answer, prompt, cached = await chat(http, url, msgs, max_tokens)
                out.append((ttft, prompt, cached))
                msgs = [*msgs, {"role": "assistant", "content": answer},
                        {"role": "user", "content": f"Say more about point {t + 1}."}]
            return out

        return await asyncio.gather(*(one(k) for k in range(convs)))


def run_phase(workers: list[Worker], affinity: bool, args: argparse.Namespace, seed: int
              ) -> dict[str, Any]:
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)  # noqa: SIM115
    cfg.write(f"[gateway]\naffinity = {'true' if affinity else 'false'}\n")
    cfg.close()
    g: Gateway | None = None
    try:
        g = start_gateway("--config", cfg.name, *[a for w in workers for a in ("--worker", w.url)])
        wait_for(lambda: sum(w["state"] in ("ready", "busy") for w in httpx.get(
            f"{g.url}/cluster", timeout=5).json()["workers"]) == len(workers), 60, 0.1,
            "workers ready")
        before = cache_counters(workers)
        t0 = time.perf_counter()
        results = asyncio.run(phase(g.url, args.conversations, args.turns, args.max_tokens,
                                    seed))
        wall = time.perf_counter() - t0
        after = cache_counters(workers)
    finally:
        if g is not None:
            g.proc.stop()
        Path(cfg.name).unlink()
    later = [r for conv in results for r in conv[1:]]
    second = [conv[1][0] for conv in results if len(conv) > 1]
    d = {k: after[k] - before[k] for k in after}
    requests = args.conversations * args.turns
    return {
        "affinity": affinity,
        "requests": requests,
        "seconds": round(wall, 1),
        "worker_cache_hits": d["hits"],
        "worker_cache_hit_rate": round(d["hits"] / requests, 3),
        "worker_reused_token_share": round(d["reused_tokens"] / max(1, d["prompt_tokens"]), 3),
        "later_turns_cached_share": round(sum(c for _, _, c in later)
                                          / max(1, sum(p for _, p, _ in later)), 3),
        "turn2_ttft_p50": round(statistics.median(second), 3),
        "turn2_ttft_mean": round(statistics.fmean(second), 3),
        "later_ttft_p50": round(statistics.median([t for t, _, _ in later]), 3),
        "turn1_ttft_p50": round(statistics.median([conv[0][0] for conv in results]), 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=4, help="slots per worker")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    workers: list[Worker] = []
    try:
        for _ in range(args.workers):
            workers.append(start_worker("--parallel", str(args.parallel), "--threads", "1",
                                        "--ctx-size", "1024", "--max-queue", "64"))
        rows = [run_phase(workers, True, args, seed=1), run_phase(workers, False, args, seed=2)]
    finally:
        for w in workers:
            w.proc.stop()
    if args.json:
        print(json.dumps(rows))
        return 0
    keys = [k for k in rows[0] if k != "affinity"]
    print(f"{'':28}{'affinity on':>14}{'affinity off':>14}")
    for k in keys:
        print(f"{k:28}{rows[0][k]!s:>14}{rows[1][k]!s:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
