"""Worker throughput and prefix-cache TTFT, measured through the OpenAI API.

    .venv/bin/python bench/openvino_bench.py                       # starts an openvino worker
    .venv/bin/python bench/openvino_bench.py --backend llama       # the same on llama.cpp
    .venv/bin/python bench/openvino_bench.py --url http://127.0.0.1:8100   # a running worker

1. Aggregate decode throughput: closed loop at each concurrency (default 1, 2, 4, 8) against
   a worker with --parallel 8; each request streams `--max-tokens` greedy tokens from
   prompts that never stop early. tok/s = completion tokens / wall time of the level.
2. Second-turn TTFT over a ~1,000-token history: "cached" sends turn 1 first, then times
   turn 2 (the history is in the KV cache); "cold" times the same turn 2 shape over a
   history never seen before. Medians of `--ttft-runs` pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m"
COUNT_PROMPT = "Count from one to five hundred in words, separated by commas: one, two, three,"


def stream_completion(http: httpx.Client, url: str, body: dict) -> tuple[float, int]:
    """(seconds to the first content, completion tokens) of one streamed request."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                text = c.get("text") or (c.get("delta") or {}).get("content")
                if text and first is None:
                    first = time.perf_counter() - t0
    return (first if first is not None else time.perf_counter() - t0), tokens


def _cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def _level(http: httpx.Client, url: str, c: int, n: int, max_tokens: int,
           pid: int | None) -> dict:
    counts: list[int] = []
    ttfts: list[float] = []
    lock = threading.Lock()
    todo = list(range(n))

    def work() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            # A distinct prompt per request: no prefix-cache shortcut between them.
            body = {"model": MODEL, "prompt": f"[{i}-{uuid.uuid4().hex[:6]}] " + COUNT_PROMPT,
                    "max_tokens": max_tokens, "temperature": 0}
            ttft, k = stream_completion(http, url, body)
            with lock:
                counts.append(k)
                ttfts.append(ttft)

    t0, cpu0 = time.perf_counter(), _cpu(pid)
    threads = [threading.Thread(target=work) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, _cpu(pid) - cpu0
    row = {"concurrency": c, "requests": n, "completion_tokens": sum(counts),
           "seconds": round(wall, 2), "tokens_per_second": round(sum(counts) / wall, 1),
           "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1)}
    if pid is not None:  # robust to other load on the box: tokens per second of our CPU
        row["tokens_per_cpu_second"] = round(sum(counts) / max(cpu, 1e-6), 1)
    return row


def throughput(base: str, levels: list[int], max_tokens: int, rounds: int,
               pid: int | None = None) -> list[dict]:
    url = f"{base}/v1/completions"
    out = []
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64)) as http:
        stream_completion(http, url, {"model": MODEL, "prompt": COUNT_PROMPT, "max_tokens": 8,
                                      "temperature": 0})  # warm-up
        for c in levels:
            row = _level(http, url, c, c * rounds, max_tokens, pid)
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def raw_pipeline(levels: list[int], max_tokens: int, rounds: int, device: str) -> None:
    """The same load straight on a ContinuousBatchingPipeline: the worker's ceiling."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ovg

    from worker.backends.openvino import OpenVINOBackend
    from worker.models import resolve

    b = OpenVINOBackend(str(resolve(MODEL)[1]), max(levels), 2048, device)
    sc = ovg.SchedulerConfig()
    sc.enable_prefix_caching, sc.max_num_seqs, sc.cache_size = True, max(levels), 1
    pipe = b._open(sc)
    tok = pipe.get_tokenizer()
    cfg = ovg.GenerationConfig()
    cfg.max_new_tokens, cfg.do_sample, cfg.ignore_eos = max_tokens, False, True
    for c in levels:
        t0, cpu0 = time.perf_counter(), time.process_time()
        n = 0
        for _ in range(rounds):
            handles = []
            for i in range(c):
                ids = tok.encode(f"[{i}-{uuid.uuid4().hex[:6]}] {COUNT_PROMPT}").input_ids
                handles.append(pipe.add_request(i, ov.Tensor(np.asarray(ids.data)), cfg))
            while pipe.has_non_finished_requests():
                pipe.step()
                for h in handles:
                    if h.can_read():
                        n += sum(len(o.generated_ids) for o in h.read().values())
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        print(json.dumps({"raw_pipeline": True, "concurrency": c, "completion_tokens": n,
                          "tokens_per_second": round(n / wall, 1),
                          "tokens_per_cpu_second": round(n / cpu, 1)}), flush=True)


def history(nonce: str, notes: int) -> list[dict]:
    text = " ".join(f"Note {i} ({nonce}): the herd crossed the river at dawn and rested."
                    for i in range(notes))
    return [
        {"role": "system", "content": f"You are a careful assistant. Session {nonce}."},
        {"role": "user", "content": f"Remember these notes. {text}"},
        {"role": "assistant", "content": "I have read all the notes and will remember them."},
    ]


def second_turn_ttft(base: str, runs: int, notes: int) -> dict:
    url = f"{base}/v1/chat/completions"
    cached, cold, prompt_tokens = [], [], 0
    ask = {"role": "user", "content": "Which note came first?"}
    with httpx.Client(timeout=600) as http:
        for _ in range(runs):
            warm = history(uuid.uuid4().hex[:8], notes)
            # Turn 1: fills the cache with the history (its answer is not timed).
            r = http.post(url, json={"model": MODEL, "messages": [*warm, {"role": "user",
                          "content": "Ready?"}], "max_tokens": 4, "temperature": 0})
            r.raise_for_status()
            prompt_tokens = r.json()["usage"]["prompt_tokens"]
            body = {"model": MODEL, "max_tokens": 1, "temperature": 0}
            cached.append(stream_completion(http, url, {**body, "messages": [*warm, ask]})[0])
            fresh = history(uuid.uuid4().hex[:8], notes)
            cold.append(stream_completion(http, url, {**body, "messages": [*fresh, ask]})[0])
    row = {"history_tokens": prompt_tokens, "runs": runs,
           "ttft_cached_ms": round(statistics.median(cached) * 1000, 1),
           "ttft_cold_ms": round(statistics.median(cold) * 1000, 1)}
    row["speedup"] = round(row["ttft_cold_ms"] / max(row["ttft_cached_ms"], 1e-3), 1)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running worker (else one is started)")
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--device", default="CPU")
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    ap.add_argument("--ttft-runs", type=int, default=5)
    ap.add_argument("--notes", type=int, default=40, help="history size (~25 tokens each)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--raw", action="store_true",
                    help="the throughput levels straight on the pipeline, no worker")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    if a.raw:
        raw_pipeline(levels, a.max_tokens, a.rounds, a.device)
        return

    worker = None
    base = a.url
    if base is None:
        from procs import start_worker

        extra = ["--parallel", str(a.parallel), "--ctx-size", "2048"]
        if a.backend == "openvino":
            extra += ["--device", a.device]
        if a.backend == "llama":
            extra += ["--threads", str(os.cpu_count() or 1)]
        worker = start_worker(*extra, backend=a.backend)
        base = worker.url
    try:
        status = httpx.get(f"{base}/status", timeout=10).json()
        print(json.dumps({"backend": status["backend"], "slots": status["slots_total"],
                          "calibrated_tokens_per_second": status["tokens_per_second"],
                          "load_average": os.getloadavg()}), flush=True)
        if not a.skip_throughput:
            throughput(base, levels, a.max_tokens, a.rounds,
                       worker.proc.pid if worker is not None else None)
        second_turn_ttft(base, a.ttft_runs, a.notes)
    finally:
        if worker is not None:
            worker.proc.stop()


if __name__ == "__main__":
    main()
