"""Decode speed of one sequence: the whole model local vs split over 1 and 2 RPC shards.

    .venv/bin/python bench/rpc_split.py [--model smollm2-135m] [--tokens 128] [--runs 5]

Every process gets 1 thread. `local` is a worker holding the whole model; `split-N` is a
split head (worker.rpc.head) with N shards (worker.rpc.shard) on loopback, the layers
shared evenly. Speed is tokens after the first over the time from the first to the last
(the median over runs), from a streamed legacy completion with greedy decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.models import resolve  # noqa: E402
from worker.rpc.head import HeadProcess  # noqa: E402
from worker.rpc.shard import ShardHost, _free_loopback_port, child_env  # noqa: E402

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


async def decode_rate(base: str, model: str, tokens: int) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    first = last = 0.0
    n = 0
    async with httpx.AsyncClient(timeout=300) as c, \
            c.stream("POST", f"{base}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev.get("choices") and ev["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
            if ev.get("usage"):
                n = ev["usage"]["completion_tokens"]
    return (n - 1) / (last - first) if n > 1 and last > first else 0.0


async def measure(base: str, model: str, tokens: int, runs: int) -> float:
    await decode_rate(base, model, 8)  # warm up
    return statistics.median([await decode_rate(base, model, tokens) for _ in range(runs)])


def _start_local(path: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "corral.cli", "worker", "--port", str(port),
                             "--model", path, "--threads", "1", "--parallel", "1"],
                            env=child_env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


async def local(path: str, model: str, tokens: int, runs: int) -> float:
    port = _free_loopback_port()
    p = _start_local(path, port)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as c:
            for _ in range(1200):
                try:
                    if (await c.get(f"{base}/status")).json().get("state") == "ready":
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        return await measure(base, Path(path).stem, tokens, runs)
    finally:
        os.killpg(p.pid, 9)
        p.wait()


async def split(path: str, model: str, n_shards: int, tokens: int, runs: int) -> float:
    shards = [ShardHost("127.0.0.1", ["127.0.0.1"], 1) for _ in range(n_shards)]
    head = None
    try:
        endpoints = [s.start() for s in shards]
        share = [1.0 / (n_shards + 1)] * (n_shards + 1)
        head = HeadProcess("bench", path, model, endpoints, share, 1, 1, 2048)
        await head.start()
        return await measure(head.base, model, tokens, runs)
    finally:
        if head is not None:
            await head.stop()
        for s in shards:
            s.stop()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    _, path = resolve(a.model)
    name = path.stem
    results = {"local": await local(str(path), name, a.tokens, a.runs)}
    for n in (1, 2):
        results[f"split-{n}"] = await split(str(path), name, n, a.tokens, a.runs)
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))


if __name__ == "__main__":
    asyncio.run(main())
