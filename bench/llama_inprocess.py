"""The llama backend's decode loop with no HTTP in front, paired with llama-server's own
per-token time: is a gap in the engine (llama.cpp as llama-cpp-python builds it, the
Python loop) or in the serving around it?

    .venv/bin/python bench/llama_inprocess.py [--write] [--pairs 12] [--tokens 64]

In one process: the bundled model loaded by `LlamaBackend` (4 slots, 2 threads), one greedy
sequence at a time through the real `BatchLoop`. Beside it, llama-server (built from the
llama.cpp that llama-cpp-python vendors, bench/llama_server_build.py), asked the same kind
of prompt non-streamed; its own `timings.predicted_per_token_ms` is the reference. The two
alternate, request by request, so the box's drifting speed weighs on both alike. Reported
per pair: the loop's time per generated token after the first (prefill excluded) over
llama-server's, the share of the loop's time spent outside `llama_decode`, and the
prefill's time per prompt token read over llama-server's.
`--write` replaces the `llama-inprocess` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import httpx
from common import MODEL, command_line, machine, write_section
from llama_server import start_llama_server
from llama_server_build import build, installed_version


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    import llama_cpp

    from worker.backends.base import SamplingParams, Sequence
    from worker.backends.llama import LlamaBackend
    from worker.models import resolve

    where = machine()
    server = start_llama_server(str(build()), a.threads, [])
    try:
        be = LlamaBackend(str(resolve(MODEL)[1]), parallel=4, threads=a.threads,
                          ctx_size=2048, lookup=0)
        be.load()
        decodes: list[tuple[int, float]] = []
        real = llama_cpp.llama_decode

        def timed(ctx, batch):  # the loop looks llama_decode up at call time
            t = time.perf_counter()
            rc = real(ctx, batch)
            decodes.append((batch.n_tokens, time.perf_counter() - t))
            return rc

        llama_cpp.llama_decode = timed

        def loop_run(text: str) -> tuple[float, float, float]:
            done = threading.Event()
            marks: list[float] = []
            seq = Sequence("bench", be.tokenize(be.render_chat([{"role": "user",
                                                                 "content": text}])),
                           a.tokens, SamplingParams(temperature=0.0),
                           on_tokens=lambda _t, _n: marks.append(time.perf_counter()),
                           on_finish=lambda _r, _e: done.set())
            decodes.clear()
            be.submit(seq)
            done.wait(300)
            wall = marks[-1] - marks[0]
            inside = sum(d for _, d in decodes[1:])  # after the prefill step
            n, prefill = decodes[0]
            return wall / (len(marks) - 1), 1 - inside / wall, prefill / n

        rows = []
        for i in range(a.pairs):
            text = f"Request {i} at {time.time()}. Write a long essay about the history of Rome."
            r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,  # type: ignore[attr-defined]
                           json={"model": MODEL, "max_tokens": a.tokens, "temperature": 0,
                                 "messages": [{"role": "user", "content": text + " (s)"}]})
            t = r.json()["timings"]
            ref = t["predicted_per_token_ms"] / 1000
            per, outside, prefill = loop_run(text)
            rows.append((ref, per, outside, prefill / (t["prompt_ms"] / 1000 / t["prompt_n"])))
            print(f"llama-server {ref * 1e3:.2f} ms/token, loop {per * 1e3:.2f} ms/token, "
                  f"outside llama_decode {outside:.1%}, prefill ratio {rows[-1][3]:.2f}",
                  file=sys.stderr, flush=True)
        be.close()
    finally:
        server.stop()
    ratios = [per / ref for ref, per, _, _ in rows]
    pre = [r[3] for r in rows]
    med = {k: statistics.median(r[i] for r in rows) for i, k in enumerate(("ref", "per", "out"))}
    table = "\n".join([
        "| pairs | decode: loop / llama-server, median (range) | llama-server ms/token | "
        "loop ms/token | loop's time outside `llama_decode` | prefill per token: loop / "
        "llama-server |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {len(rows)} | **{statistics.median(ratios):.2f}** ({min(ratios):.2f}-"
        f"{max(ratios):.2f}) | {med['ref'] * 1e3:.2f} | {med['per'] * 1e3:.2f} | "
        f"{med['out']:.1%} | {statistics.median(pre):.2f} ({min(pre):.2f}-{max(pre):.2f}) |"])
    text = f"""## llama: the decode loop without HTTP, paired with llama-server

Command: `{command_line()}`{"  "}
Machine: {where}.

llama-cpp-python {installed_version()}: `LlamaBackend` in this process (4 slots, {a.threads}
threads, drafts off), one greedy sequence of {a.tokens} tokens at a time through its
`BatchLoop`, alternating with llama-server asked the same kind of prompt; llama-server's own
`timings.predicted_per_token_ms` against the loop's time per token after the first, and
its `prompt_ms / prompt_n` against the loop's prefill `llama_decode` per prompt token read
(both read the prompt after the same cached template prefix). Medians.

{table}
"""
    print(text)
    if a.write:
        write_section("llama-inprocess", text)


if __name__ == "__main__":
    os.environ.setdefault("NO_PROXY", "*")
    main()
