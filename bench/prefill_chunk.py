"""How many prompt tokens a llama step should carry while other sequences decode.

    .venv/bin/python bench/prefill_chunk.py [--chunks 64,128,256,512] [--repeats 3] [--write]

A long prompt arriving while others stream is read in chunks, one per decode step
(`CORRAL_LLAMA_PREFILL_CHUNK`, worker/backends/llama_batch.py): small chunks keep the
running streams' tokens coming but take more steps to read the prompt; big ones read it
sooner and pause the streams longer. Per chunk size, one worker (`--parallel 4
--threads 2`) streams 3 answers of 400 tokens; once they run, a prompt of ~1,500 tokens
arrives (1 token asked). Measured: the newcomer's time to first token, and the running
streams' longest pause and median gap between tokens while it was read. Medians over
`--repeats` runs; the worker settings are measured in turn, so box load weighs on all.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import httpx
from common import MODEL, command_line, machine, start_worker, wait_for, write_section

STORY = "Write a long story about a dragon and a knight."


def document(lines: int) -> str:
    """The long prompt: `lines` numbered lines of ~19 tokens each."""
    return " ".join(f"Line {i}: the herd crossed the river at dawn and the rancher counted it."
                    for i in range(lines))


RUNS = iter(range(1_000_000))


def one(url: str, doc: str) -> tuple[float, float, float]:
    """(newcomer TTFT, longest stream pause, median stream gap) in ms, while it was read.
    Every prompt starts differently, so no run reads a cached prefix."""
    n = next(RUNS)
    ticks: list[list[float]] = [[] for _ in range(3)]
    stop = threading.Event()

    def stream(i: int) -> None:
        msg = {"role": "user", "content": f"({n}.{i}) {STORY}"}
        body = {"model": MODEL, "messages": [msg],
                "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.Client(timeout=300) as c, c.stream("POST", f"{url}/v1/chat/completions",
                                                      json=body) as r:
            for line in r.iter_lines():
                if stop.is_set():
                    return
                if line.startswith("data: {"):
                    ticks[i].append(time.perf_counter())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(len(t) >= 8 for t in ticks), 120, 0.01, "3 running streams")
        ask = f"Run {n}. Summarise:\n{doc}"
        body = {"model": MODEL, "messages": [{"role": "user", "content": ask}],
                "max_tokens": 1, "temperature": 0}
        sent = time.perf_counter()
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).raise_for_status()
        done = time.perf_counter()
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    gaps = [b - a for ts in ticks for a, b in zip(ts, ts[1:], strict=False)
            if sent <= b and a <= done]
    return ((done - sent) * 1000, max(gaps, default=0.0) * 1000,
            statistics.median(gaps) * 1000 if gaps else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", default="64,128,256,512",
                    help="CORRAL_LLAMA_PREFILL_CHUNK values (prompt tokens per shared step)")
    ap.add_argument("--step-seconds", default=None,
                    help="CORRAL_LLAMA_STEP_SECONDS values instead (the step's time bound), "
                         "with the chunk cap at the batch size")
    ap.add_argument("--lines", type=int, default=100, help="lines of the long prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    doc = document(a.lines)
    where = machine()
    if a.step_seconds:
        knob, label = "CORRAL_LLAMA_STEP_SECONDS", "step time bound, s"
        values = a.step_seconds.split(",")
        fixed = {"CORRAL_LLAMA_PREFILL_CHUNK": "512"}
    else:
        knob, label = "CORRAL_LLAMA_PREFILL_CHUNK", "prompt tokens per shared step"
        values = a.chunks.split(",")
        fixed = {"CORRAL_LLAMA_STEP_SECONDS": "1000"}  # the token cap alone decides
    workers = {v: start_worker("--parallel", "4", "--threads", "2", env={**fixed, knob: v})
               for v in values}
    got: dict[str, list[tuple[float, float, float]]] = {v: [] for v in values}
    try:
        for v in values:  # a warm-up each: the first long prompt also sizes the step cost
            one(workers[v].url, doc)
        for _ in range(a.repeats):
            for v in values:
                got[v].append(one(workers[v].url, doc))
                print(v, [round(x) for x in got[v][-1]], flush=True)
    finally:
        for w in workers.values():
            w.proc.stop()
    lines = [f"`{command_line()}` on {where}. A prompt of {a.lines} lines (~19 tokens each) "
             "arrives while 3 streams decode (`--parallel 4 --threads 2`); medians of "
             f"{a.repeats} runs, settings measured in turn; `{knob}` varied.", "",
             f"| {label} | newcomer TTFT ms | streams' longest pause ms "
             "| streams' median gap ms |", "|---:|---:|---:|---:|"]
    for v in values:
        ttft, pause, gap = (statistics.median(x[k] for x in got[v]) for k in range(3))
        lines.append(f"| {v} | {ttft:.0f} | {pause:.0f} | {gap:.0f} |")
    print("\n".join(lines))
    if a.write:
        write_section("prefill-chunk", "## llama: prompt tokens per step beside decoding\n\n"
                      + "\n".join(lines))


if __name__ == "__main__":
    main()
