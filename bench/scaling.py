"""Throughput scaling: 1, 2, 4, 8 sim workers behind one gateway vs N x one worker direct.

    .venv/bin/python bench/scaling.py [--counts 1 2 4 8] [--rate 20] [--slots 4]

Each sim worker decodes `--rate` tokens/s per slot on `--slots` slots, slow enough that
the 2-core box is not the bottleneck at 8 workers. First one worker is measured direct
(closed loop, concurrency = its slots); then for each N a fresh gateway fronts N workers
and gets concurrency N x slots. Efficiency = gateway tokens/s / (N x direct tokens/s);
goal >= 0.9. The gateway's CPU use over each run is read with psutil.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CpuMeter,
    command_line,
    gateway_for,
    load,
    machine,
    plot,
    sim_workers,
    write_section,
)


def steady_tokens_per_second(results: list) -> float:
    """Tokens streamed while every client was still busy: from the start until the last
    request was sent. Excludes the drain at the end, where a closed loop's last few
    requests run on partly idle workers whatever the router does."""
    t_end = max(r.start for r in results)
    if t_end <= 0:
        return 0.0
    n = sum(1 for r in results if r.ok for t in r.chunk_times if r.start + t <= t_end)
    return n / t_end


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rate", type=float, default=20.0, help="sim tokens/s per slot")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client")
    ap.add_argument("--load-factor", type=float, default=2.0,
                    help="clients in flight per slot (>1 saturates the workers)")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args()

    note = machine()
    workers = sim_workers(max(a.counts), a.rate, a.slots)
    rows = []
    try:
        c = round(a.slots * a.load_factor)
        load(workers[0].url, a.slots, concurrency=a.slots, max_tokens=4)  # warm up
        base, bres = load(workers[0].url, c * a.rounds, concurrency=c,
                          max_tokens=a.max_tokens)
        single = steady_tokens_per_second(bres)
        single_run = base["output_tokens_per_second"]
        print(json.dumps({"direct": single, "direct_whole_run": single_run,
                          "errors": base["errors"]}))
        for n in a.counts:
            gw = gateway_for(workers[:n])
            try:
                c = round(n * a.slots * a.load_factor)
                load(gw.url, n, concurrency=n, max_tokens=4)  # warm the pool
                with CpuMeter(gw.proc.pid).measure() as cpu:
                    s, res = load(gw.url, c * a.rounds, concurrency=c, max_tokens=a.max_tokens)
            finally:
                gw.proc.stop()
            spread = sorted(s["workers"].values())
            steady = steady_tokens_per_second(res)
            row = {"n": n, "concurrency": c, "tok_s": steady,
                   "rps": s["requests_per_second"], "ideal": n * single,
                   "eff": steady / (n * single),
                   "run_tok_s": s["output_tokens_per_second"],
                   "run_eff": s["output_tokens_per_second"] / (n * single_run),
                   "p50": s["latency_ms"]["p50"] if s["latency_ms"] else None,
                   "p99": s["latency_ms"]["p99"] if s["latency_ms"] else None,
                   "ttft_p50": s["ttft_ms"]["p50"] if s["ttft_ms"] else None,
                   "errors": s["errors"], "cores": cpu["cores"],
                   "cpu_ms_per_req": cpu["cpu_s"] * 1000 / s["requests"],
                   "idle": cpu["box_idle_cores"],
                   "spread": f"{spread[0]}-{spread[-1]}" if spread else "-"}
            rows.append(row)
            print(json.dumps(row))
    finally:
        for w in workers:
            w.proc.stop()

    lines = ["| workers | concurrency | tokens/s via gateway | N x direct | efficiency | "
             "whole-run efficiency | req/s | latency p50 / p99 ms | TTFT p50 ms | "
             "requests per worker (min-max) | gateway CPU (cores) | gateway CPU-ms/req | "
             "box idle cores | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['concurrency']} | {r['tok_s']:.0f} | {r['ideal']:.0f} | "
            f"**{r['eff']:.2f}** | {r['run_eff']:.2f} | {r['rps']:.1f} | "
            f"{r['p50']:.0f} / {r['p99']:.0f} | "
            f"{r['ttft_p50']:.0f} | {r['spread']} | {r['cores']:.2f} | "
            f"{r['cpu_ms_per_req']:.2f} | {r['idle']:.2f} | {r['errors']} |")
    met = [str(r["n"]) for r in rows if r["eff"] >= 0.9]
    missed = [str(r["n"]) for r in rows if r["eff"] < 0.9]
    verdict = (f"Goal (>= 0.9 N) met at N = {', '.join(met) or 'none'}"
               + (f"; missed at N = {', '.join(missed)}." if missed else "."))
    verdict += (" Gateway CPU-ms/req here includes its background work (worker probes) "
                "spread over few, long requests; see the overhead section for the "
                "per-request cost.")
    def draw(ax: Any) -> None:
        ns = [r["n"] for r in rows]
        ax.plot(ns, [r["ideal"] for r in rows], "--", color="grey", label="N x one worker")
        ax.plot(ns, [0.9 * r["ideal"] for r in rows], ":", color="grey", label="goal 0.9 N")
        ax.plot(ns, [r["tok_s"] for r in rows], "o-", label="through the gateway")
        ax.set_xlabel("sim workers")
        ax.set_ylabel("output tokens/s")
        ax.set_xticks(ns)
        ax.legend()
        ax.grid(alpha=0.3)

    plot_line = "" if a.no_plot else plot("scaling.png", "throughput vs workers", (5.5, 3.6), draw)
    body = "\n".join([
        "## Scaling: N sim workers behind one gateway",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {note}.",
        "",
        f"Sim workers: {a.rate:g} tokens/s per slot, {a.slots} slots, TTFT 50 ms; streamed "
        f"chat completions of {a.max_tokens} tokens (distinct prompts), closed loop at "
        f"concurrency = {a.load_factor:g} x N x slots (saturating), {a.rounds} requests per "
        f"client. One worker direct: {single:.1f} tokens/s steady ({single_run:.1f} over the "
        f"whole run; {base['errors']} errors). *tokens/s* counts tokens streamed while every "
        "client was busy (start to the last request sent); *efficiency* = that / (N x one "
        "worker direct), goal >= 0.9. *Whole-run efficiency* divides all tokens by the whole "
        "run, so it also charges the closed loop's drain (a worker that got one request more "
        "than another runs one more round alone).",
        "",
        *lines,
        "",
        verdict,
        plot_line,
    ])
    write_section("scaling", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
