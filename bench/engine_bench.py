"""Engine benchmark for one worker: batching throughput and prompt-cache TTFT.

    .venv/bin/python bench/engine_bench.py                       # starts a llama worker
    .venv/bin/python bench/engine_bench.py --base-url http://127.0.0.1:8100

1. Aggregate completion tokens/s at concurrency 1, 2, 4, 8 (streamed completions,
   `--max-tokens` each, `--rounds` requests per client).
2. Second-turn time to first token with a ~`--history-tokens` conversation whose first turn
   is in the worker's prompt cache, against the same conversation cold (a unique system
   prompt prefix, so nothing can be reused).

Prints one JSON object. Without `--base-url` it starts `corral worker --parallel 8` on a
free port and stops it (by its PID) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "corral.cli", "worker", "--backend", "llama", "--host",
           "127.0.0.1", "--port", str(port), "--parallel", str(args.parallel),
           "--ctx-size", str(args.ctx_size), "--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the worker exited during startup")
        try:
            if httpx.get(f"{url}/status", timeout=2).json().get("state") in ("ready", "busy"):
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit("the worker did not become ready in 120 s")


def stream(http: httpx.Client, url: str, path: str, body: dict) -> dict:
    """One streamed request: TTFT, completion tokens (from usage), wall time."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    use: dict = {}
    with http.stream("POST", url + path, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                use = obj["usage"]
            for c in obj.get("choices", []):
                piece = c.get("text") or (c.get("delta") or {}).get("content")
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
    return {"ttft": ttft, "tokens": use.get("completion_tokens", 0),
            "prompt_tokens": use.get("prompt_tokens", 0),
            "cached": (use.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            "seconds": time.perf_counter() - t0}


def throughput(url: str, model: str, concurrency: int, rounds: int, max_tokens: int) -> dict:
    def client(i: int) -> list[dict]:
        out = []
        with httpx.Client(timeout=300) as http:
            for j in range(rounds):
                out.append(stream(http, url, "/v1/completions", {
                    "model": model, "prompt": f"Story {i}.{j}: Once upon a time, a horse",
                    "max_tokens": max_tokens, "temperature": 0.8, "seed": 1000 * i + j}))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for rs in pool.map(client, range(concurrency)) for r in rs]
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens,
            "seconds": round(wall, 2), "tokens_per_second": round(tokens / wall, 1),
            "ttft_p50_ms": round(1000 * statistics.median(r["ttft"] or 0 for r in results))}


def history(n_tokens: int) -> str:
    # ~22 tokens a sentence with this tokenizer.
    sentences = [f"Note {i}: the herd crossed river number {i} at dawn and rested by the "
                 f"{['oaks', 'pines', 'willows', 'cedars'][i % 4]}." for i in range(n_tokens // 22)]
    return " ".join(sentences)


def second_turn_ttft(url: str, model: str, n_tokens: int, trials: int) -> dict:
    doc = history(n_tokens)
    cached, cold = [], []
    with httpx.Client(timeout=300) as http:
        for _ in range(trials):
            def conversation(nonce: str) -> list[dict]:
                return [{"role": "system", "content": f"[{nonce}] You are a helpful assistant."},
                        {"role": "user", "content": doc + "\nWhich river came first?"}]

            first = conversation(uuid.uuid4().hex[:8])
            r1 = http.post(url + "/v1/chat/completions", json={
                "model": model, "messages": first, "max_tokens": 16, "temperature": 0}).json()
            answer = r1["choices"][0]["message"]["content"]
            follow = [{"role": "assistant", "content": answer},
                      {"role": "user", "content": "Give it a one-word title."}]
            body = {"model": model, "max_tokens": 4, "temperature": 0}
            cached.append(stream(http, url, "/v1/chat/completions",
                                 {**body, "messages": first + follow}))
            other = conversation(uuid.uuid4().hex[:8])  # same length, nothing reusable
            cold.append(stream(http, url, "/v1/chat/completions",
                               {**body, "messages": other + follow}))

    def summary(rs: list[dict]) -> dict:
        return {"ttft_ms_median": round(1000 * statistics.median(r["ttft"] for r in rs)),
                "ttft_ms": [round(1000 * r["ttft"]) for r in rs],
                "prompt_tokens": rs[0]["prompt_tokens"], "cached_tokens": rs[0]["cached"]}

    return {"cached": summary(cached), "cold": summary(cold)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default=None, help="a running worker (default: start one)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ctx-size", type=int, default=2048)
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--history-tokens", type=int, default=1000)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()

    proc = None
    url = args.base_url
    if url is None:
        proc, url = start_worker(args)
    try:
        status = httpx.get(f"{url}/status", timeout=5).json()
        out = {"worker": {k: status.get(k) for k in ("backend", "slots_total", "n_ctx",
                                                     "tokens_per_second")},
               "hardware": {k: status["hardware"].get(k) for k in ("cpu", "cores", "threads")},
               "throughput": [], "second_turn": None}
        for c in (int(x) for x in args.concurrency.split(",")):
            out["throughput"].append(throughput(url, args.model, c, args.rounds,
                                                args.max_tokens))
            print(json.dumps(out["throughput"][-1]), file=sys.stderr)
        out["second_turn"] = second_turn_ttft(url, args.model, args.history_tokens,
                                              args.trials)
        out["prompt_cache"] = httpx.get(f"{url}/status", timeout=5).json().get("prompt_cache")
        print(json.dumps(out, indent=2))
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
