"""Session affinity, measured: prompt-cache hits and later-turn TTFT with affinity on vs off.

    .venv/bin/python bench/affinity.py [--workers 4] [--conversations 16] [--turns 3]

Two phases, `[gateway] affinity = true` then `affinity = false`, each on N freshly started
real llama.cpp workers (1 thread each, cold caches) behind a fresh gateway on 127.0.0.1.
Each phase runs the same number of concurrent multi-turn chats; each chat opens with its
own document (so only the worker that served a chat's earlier turn can hold
its prefix), and its user "thinks" for `--think` seconds (+-50%) between turns, while the
other chats keep the workers busy. Per phase it reports the workers' own prompt-cache
counters (/status `prompt_cache`: requests that reused a prefix, and the share of prompt
tokens reused), the cached share of later turns' prompt tokens (usage
`prompt_tokens_details.cached_tokens`) and the TTFT of the second and later turns, as
the client sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
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


def document(rng: random.Random, words: int) -> str:
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


async def phase(url: str, args: argparse.Namespace, seed: int
                ) -> list[list[tuple[float, int, int]]]:
    convs, turns, max_tokens, think = args.conversations, args.turns, args.max_tokens, args.think
    rng = random.Random(seed)
    docs = [document(rng, args.doc_words) for _ in range(convs)]
    starts = [rng.uniform(0, args.stagger) for _ in range(convs)]
    pauses = [[rng.uniform(0.5, 1.5) * think for _ in range(turns)] for _ in range(convs)]
    async with httpx.AsyncClient(timeout=600, trust_env=False,
                                 limits=httpx.Limits(max_connections=convs * 2)) as http:
        async def one(k: int) -> list[tuple[float, int, int]]:
            msgs = [{"role": "system", "content": f"You answer in one short sentence ({seed})."},
                    {"role": "user", "content": f"Read this: {docs[k]} What is it about?"}]
            out = []
            await asyncio.sleep(starts[k])  # users do not all start in the same instant
            for t in range(turns):
                ttft, answer, prompt, cached = await chat(http, url, msgs, max_tokens)
                out.append((ttft, prompt, cached))
                if t + 1 < turns:
                    await asyncio.sleep(pauses[k][t])  # the user reads and types
                msgs = [*msgs, {"role": "assistant", "content": answer},
                        {"role": "user", "content": f"Say more about point {t + 1}."}]
            return out

        return await asyncio.gather(*(one(k) for k in range(convs)))


def run_phase(affinity: bool, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)  # noqa: SIM115
    cfg.write(f"[gateway]\naffinity = {'true' if affinity else 'false'}\n")
    cfg.close()
    g: Gateway | None = None
    workers: list[Worker] = []
    try:
        for _ in range(args.workers):
            workers.append(start_worker("--parallel", str(args.parallel), "--threads", "1",
                                        "--ctx-size", "1024", "--max-queue", "64"))
        g = start_gateway("--config", cfg.name, *[a for w in workers for a in ("--worker", w.url)])
        wait_for(lambda: sum(w["state"] in ("ready", "busy") for w in httpx.get(
            f"{g.url}/cluster", timeout=5).json()["workers"]) == len(workers), 60, 0.1,
            "workers ready")
        before = cache_counters(workers)
        t0 = time.perf_counter()
        results = asyncio.run(phase(g.url, args, seed))
        wall = time.perf_counter() - t0
        after = cache_counters(workers)
    finally:
        if g is not None:
            g.proc.stop()
        for w in workers:
            w.proc.stop()
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
    ap.add_argument("--think", type=float, default=2.0,
                    help="mean seconds a user pauses between turns")
    ap.add_argument("--stagger", type=float, default=4.0,
                    help="conversations start at random within this many seconds")
    ap.add_argument("--doc-words", type=int, default=120,
                    help="words in each conversation's opening document")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write", action="store_true",
                    help="also write the results into docs/BENCHMARKS.md (its own section)")
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]
    rows = [run_phase(True, args, seed=1), run_phase(False, args, seed=2)]
    if args.json:
        print(json.dumps(rows))
        return 0
    keys = [k for k in rows[0] if k != "affinity"]
    print(f"{'':28}{'affinity on':>14}{'affinity off':>14}")
    for k in keys:
        print(f"{k:28}{rows[0][k]!s:>14}{rows[1][k]!s:>14}")
    if args.write:
        table = ["| | affinity on | affinity off |", "|---|---:|---:|"]
        table += [f"| {LABELS.get(k, k)} | {rows[0][k]} | {rows[1][k]} |" for k in keys]
        write_section("affinity", "\n".join([
            "## Session affinity: prompt-cache reuse and later-turn TTFT",
            "",
            f"Command: `.venv/bin/python {' '.join(sys.argv)}`  ",
            f"Machine: {os.cpu_count()} CPU, load average {load_at_start:.1f} at start, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            f"{args.workers} real llama.cpp workers (SmolLM2-135M, 1 thread, {args.parallel} "
            f"slots each, fresh per phase), {args.conversations} concurrent conversations of "
            f"{args.turns} turns (starting within {args.stagger:g} s), each opening with its "
            f"own {args.doc_words}-word document, greedy, {args.max_tokens} tokens per "
            f"answer, {args.think:g} s mean think time between turns. TTFTs in seconds, "
            "seen by the client. A *hit* is any reuse of a cached prefix (the shared "
            "system prompt counts), so the reused-token shares are the telling rows.",
            "",
            *table,
        ]))
    return 0


LABELS = {
    "worker_cache_hits": "worker prompt-cache hits (requests reusing a prefix)",
    "worker_cache_hit_rate": "worker prompt-cache hit rate (hits / requests)",
    "worker_reused_token_share": "prompt tokens reused from the cache, all turns",
    "later_turns_cached_share": "prompt tokens cached, turns 2+ (usage cached_tokens)",
    "turn2_ttft_p50": "turn-2 TTFT p50",
    "turn2_ttft_mean": "turn-2 TTFT mean",
    "later_ttft_p50": "turns 2+ TTFT p50",
    "turn1_ttft_p50": "turn-1 TTFT p50",
}
DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def write_section(name: str, body: str) -> None:
    """Replaces (or appends) the `<!-- bench:name -->` section of docs/BENCHMARKS.md."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pat = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = (pat.sub(lambda _m: block, text) if pat.search(text)
            else text.rstrip() + "\n\n" + block + "\n")
    DOC.write_text(text if text.endswith("\n") else text + "\n")


if __name__ == "__main__":
    sys.exit(main())
