"""The llama worker against llama-server, paired request by request: the finest
comparison this shared box allows.

    .venv/bin/python bench/llama_server_paired.py [--pairs 30] [--bursts 12] [--write]

bench/llama_server.py measures each setup for a whole pass in turn; the box's speed swings
by 10-20% from one pass to the next, so its ratios spread wide. Here both servers get the
same fresh request back to back (who goes first alternates), so a swing weighs on both:
- c=1: one streamed request each; per pair, the client's TTFT ratio and the decode-speed
  ratio (llama-server's time between two tokens over the worker's).
- c=4 and c=8: bursts of 2 x c streamed requests each (`corral bench` closed loop), the
  same new prompts for both; per pair, the tok/s ratio.
Same GGUF, threads, slots and context as bench/llama_server.py; drafts stay on (varied
text gives them nothing to draft from). `--write` replaces the `llama-server-paired`
section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import command_line, machine, start_worker, write_section
from llama_server import CTX, SLOTS, level, start_llama_server, varied
from llama_server_build import build, installed_version


def one(url: str, text: str, max_tokens: int) -> tuple[float, float]:
    """One streamed request (`corral bench`, as every level): its TTFT and its time per
    output token after the first, in ms."""
    r = level(url, 1, 1, max_tokens, "", prompts=(text,))
    if r["errors"] or r["tpot_p50_ms"] is None:
        raise RuntimeError(f"{url}: {r['error_examples'] or 'fewer than two tokens'}")
    return r["ttft_p50_ms"], r["tpot_p50_ms"]


def _cell(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4)
    return f"**{statistics.median(xs):.3f}** ({q[0]:.2f}-{q[2]:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=30, help="c=1 request pairs")
    ap.add_argument("--bursts", type=int, default=12, help="burst pairs per level >1")
    ap.add_argument("--levels", default="4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    where = machine()
    server = start_llama_server(str(build()), a.threads, [])
    worker = None
    try:
        worker = start_worker("--parallel", str(SLOTS), "--threads", str(a.threads),
                              "--ctx-size", str(CTX))
        urls = {"llama-server": server.url, "corral": worker.url}  # type: ignore[attr-defined]
        for url in urls.values():
            one(url, "Say hello.", 8)
        ttft, speed = [], []
        for i in range(a.pairs):
            text = f"Request {i} at {time.time():.0f}. {varied(i)}"
            order = list(urls.items()) if i % 2 == 0 else list(urls.items())[::-1]
            got = {name: one(url, text, a.tokens) for name, url in order}
            ttft.append(got["corral"][0] / got["llama-server"][0])
            speed.append(got["llama-server"][1] / got["corral"][1])
        rows = [f"| 1 | {a.pairs} requests | {_cell(speed)} | {_cell(ttft)} |"]
        k = a.pairs
        for c in (int(x) for x in a.levels.split(",")):
            tok, tt = [], []
            n = 2 * c
            for i in range(a.bursts):
                asks = tuple(f"Burst {i} at {time.time():.0f}. {varied(k + j)}" for j in range(n))
                k += n
                order = list(urls.items()) if i % 2 == 0 else list(urls.items())[::-1]
                got = {name: level(url, c, n, a.tokens, "", prompts=asks) for name, url in order}
                tok.append((got["corral"]["tokens"] / got["corral"]["seconds"])
                           / (got["llama-server"]["tokens"] / got["llama-server"]["seconds"]))
                tt.append(got["corral"]["ttft_p50_ms"] / got["llama-server"]["ttft_p50_ms"])
            rows.append(f"| {c} | {a.bursts} bursts of {n} | {_cell(tok)} | {_cell(tt)} |")
    finally:
        if worker is not None:
            worker.proc.stop()
        server.stop()
    text = f"""## Against llama-server, paired request by request (varied requests)

Command: `{command_line()}`{"  "}
Machine: {where}; load average after: {os.getloadavg()[0]:.1f}.

llama-cpp-python {installed_version()}; `corral worker --backend llama --parallel {SLOTS}
--threads {a.threads} --ctx-size {CTX}` against `llama-server --threads {a.threads}
--parallel {SLOTS} --ctx-size {CTX * SLOTS}`, the same fresh varied request (or burst of
them) to both back to back, who goes first alternating; {a.tokens} greedy tokens,
streamed. Ratios are the worker's over llama-server's (speed: llama-server's time between
tokens over the worker's, so above 1 is faster), median and interquartile range over the
pairs.

| c | pairs | speed ratio (c=1: decode; c>1: tok/s) | TTFT ratio (lower is better) |
|---:|---|---:|---:|
{chr(10).join(rows)}
"""
    print(text)
    if a.write:
        write_section("llama-server-paired", text)


if __name__ == "__main__":
    os.environ.setdefault("NO_PROXY", "*")
    main()
