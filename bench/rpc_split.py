"""Decode speed of one sequence: the whole model local vs split over 1 and 2 RPC shards.

    .venv/bin/python bench/rpc_split.py [--model smollm2-135m] [--tokens 128] [--runs 5]

Every process gets 1 thread. `local` is a worker holding the whole model; `split-N` is a
split head (worker.rpc.head) with N shards (worker.rpc.shard) on loopback, the layers
shared evenly. All three run at once and are measured in turn, round robin, so that other
load on the box weighs on each alike. Speed is tokens after the first over the time from
the first to the last, from a streamed legacy completion with greedy decoding.
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


async def wait_ready(base: str) -> None:
    async with httpx.AsyncClient() as c:
        for _ in range(3000):
            try:
                if (await c.get(f"{base}/status")).json().get("state") == "ready":
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{base} did not become ready")


def _start_local(path: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "corral.cli", "worker", "--port", str(port),
                             "--model", path, "--threads", "1", "--parallel", "1"],
                            env=child_env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    _, path = resolve(a.model)
    name = path.stem
    port = _free_loopback_port()
    local = _start_local(str(path), port)
    shards: list[ShardHost] = []
    heads: dict[str, HeadProcess] = {}
    try:
        for n in (1, 2):  # the layers shared evenly between the head and its shards
            hosts = [ShardHost("127.0.0.1", ["127.0.0.1"], 1) for _ in range(n)]
            shards += hosts
            endpoints = [h.start() for h in hosts]
            heads[f"split-{n}"] = HeadProcess("bench", str(path), name, endpoints,
                                              [1.0 / (n + 1)] * (n + 1), 1, 1, 2048)
        await asyncio.gather(*(h.start() for h in heads.values()))
        bases = {"local": f"http://127.0.0.1:{port}",
                 **{k: h.base for k, h in heads.items()}}
        await wait_ready(bases["local"])
        rates: dict[str, list[float]] = {k: [] for k in bases}
        for base in bases.values():
            await decode_rate(base, name, 8)  # warm up
        # Round robin, so that whatever else runs on the box weighs on every setup alike.
        for _ in range(a.runs):
            for k, base in bases.items():
                rates[k].append(await decode_rate(base, name, a.tokens))
        print(json.dumps({k: {"median": round(statistics.median(v), 1),
                              "min": round(min(v), 1), "max": round(max(v), 1)}
                          for k, v in rates.items()}))
    finally:
        os.killpg(local.pid, 9)
        local.wait()
        for h in heads.values():
            await h.stop()
        for sh in shards:
            sh.stop()


if __name__ == "__main__":
    asyncio.run(main())
