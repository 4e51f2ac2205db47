"""What one hop through Corral costs: a sim worker direct vs through the gateway (vs LiteLLM).

    .venv/bin/python bench/overhead.py [--requests 500] [--no-litellm]

One fast sim worker (1000 tokens/s per slot, no TTFT, 64 slots, so it is never the
bottleneck) and one gateway in front of it, real processes on 127.0.0.1. Each target gets
the same loads: `hey` (if installed) sending non-streamed chat completions at concurrency 1
(added latency) and 16 (request/s), then `corral bench` streaming at concurrency 8. The
gateway's CPU time (psutil, user + system) is read before and after each load, so the
cost per request is measured, not estimated. Goals: < 1 ms added at p50, and at least 5x
less CPU per request than LiteLLM's proxy.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MODEL,
    CpuMeter,
    command_line,
    gateway_for,
    litellm_missing,
    load,
    machine,
    sim_worker,
    start_litellm,
    write_section,
)

MAX_TOKENS = 4


def hey(url: str, n: int, c: int) -> dict:
    n = max(c, n // c * c)  # hey sends n // c per connection
    body = json.dumps({"model": MODEL, "max_tokens": MAX_TOKENS,
                       "messages": [{"role": "user", "content": "Say hi."}]})
    out = subprocess.run(
        ["hey", "-n", str(n), "-c", str(c), "-m", "POST", "-T", "application/json",
         "-d", body, "-t", "30", f"{url}/v1/chat/completions"],
        capture_output=True, text=True, timeout=300,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = {int(q): float(s) * 1000 for q, s in re.findall(r"(\d+)%+ in ([\d.]+) secs", out)}
    ok = sum(int(k) for k in re.findall(r"\[200\]\s+(\d+) responses", out))
    return {"rps": rps, "p50": pct.get(50), "p99": pct.get(99), "ok": ok, "n": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=500, help="requests per hey run")
    ap.add_argument("--stream-requests", type=int, default=200)
    ap.add_argument("--no-litellm", action="store_true")
    a = ap.parse_args()

    have_hey = shutil.which("hey") is not None
    start_note = machine()
    worker = sim_worker(1000, 64, ttft=0.0, max_queue=1024)
    procs = [worker.proc]
    try:
        gw = gateway_for([worker])
        procs.append(gw.proc)
        targets = [("direct to worker", worker.url, None),
                   ("Corral gateway", gw.url, gw.proc.pid)]
        litellm_note = "skipped (--no-litellm)" if a.no_litellm else litellm_missing()
        if litellm_note is None:
            try:
                lp = start_litellm([worker])
                procs.append(lp)
                targets.append(("LiteLLM proxy", lp.url, lp.pid))
            except RuntimeError as exc:
                litellm_note = str(exc)[:400]
        rows = []
        for name, url, pid in targets:
            load(url, 50, concurrency=4, max_tokens=MAX_TOKENS, stream=False)  # warm up
            runs = []
            # Direct runs meter the worker, only for the box's idle CPU; proxies meter
            # themselves, which is the CPU per request reported.
            meter = CpuMeter(pid or worker.proc.pid)
            if have_hey:
                for c in (1, 16):
                    with meter.measure() as cpu:
                        r = hey(url, a.requests, c)
                    runs.append((f"hey -c {c}, not streamed", r["rps"], r["p50"], r["p99"],
                                 r["n"] - r["ok"], cpu, r["n"]))
            with meter.measure() as cpu:
                s, _ = load(url, a.stream_requests, concurrency=8, max_tokens=16)
            runs.append(("corral bench -c 8, streamed 16 tok", s["requests_per_second"],
                         s["latency_ms"]["p50"] if s["latency_ms"] else None,
                         s["latency_ms"]["p99"] if s["latency_ms"] else None,
                         s["errors"], cpu, s["requests"]))
            for load_name, rps, p50, p99, errs, cpu, n in runs:
                rows.append({"target": name, "load": load_name, "rps": rps, "p50": p50,
                             "p99": p99, "errors": errs,
                             "cpu_ms_per_req": cpu["cpu_s"] * 1000 / n if pid else None,
                             "cores": cpu["cores"] if pid else None,
                             "idle": cpu["box_idle_cores"]})
                print(json.dumps(rows[-1]))
    finally:
        for p in reversed(procs):
            p.stop()

    direct = {r["load"]: r for r in rows if r["target"] == "direct to worker"}
    lines = ["| target | load | req/s | p50 ms | p99 ms | p50 added ms | proxy CPU-ms/req "
             "| proxy cores busy | box idle cores | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = direct.get(r["load"])
        added = (f"{r['p50'] - d['p50']:+.2f}" if d and r["target"] != "direct to worker"
                 and r["p50"] is not None and d["p50"] is not None else "-")
        cpu = "-" if r["cpu_ms_per_req"] is None else f"{r['cpu_ms_per_req']:.2f}"
        cores = "-" if r["cores"] is None else f"{r['cores']:.2f}"
        idle = "-" if r["idle"] is None else f"{r['idle']:.2f}"
        p50 = "-" if r["p50"] is None else f"{r['p50']:.2f}"
        p99 = "-" if r["p99"] is None else f"{r['p99']:.2f}"
        lines.append(f"| {r['target']} | {r['load']} | {r['rps']:.0f} | {p50} | {p99} | "
                     f"{added} | {cpu} | {cores} | {idle} | {r['errors']} |")
    cg = [r for r in rows if r["target"] == "Corral gateway" and r["cpu_ms_per_req"]]
    cl = [r for r in rows if r["target"] == "LiteLLM proxy" and r["cpu_ms_per_req"]]
    verdict = []
    c1 = [r for r in rows if r["load"].startswith("hey -c 1,")]
    d1 = next((r for r in c1 if r["target"] == "direct to worker"), None)
    g1 = next((r for r in c1 if r["target"] == "Corral gateway"), None)
    if d1 and g1 and d1["p50"] is not None and g1["p50"] is not None:
        verdict.append(f"Added p50 at concurrency 1: {g1['p50'] - d1['p50']:+.2f} ms "
                       "(goal < 1 ms).  ")
    if cg and cl:
        ratios = [lr["cpu_ms_per_req"] / g["cpu_ms_per_req"] for g, lr in zip(cg, cl, strict=False)]
        verdict.append("LiteLLM / Corral CPU per request: "
                       + ", ".join(f"{x:.1f}x" for x in ratios) + " (goal >= 5x).  ")
    body = "\n".join([
        "## Overhead: one sim worker direct vs through the gateway",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {start_note}. Load tool: "
        f"{'`hey` (Debian package) and ' if have_hey else ''}`corral bench`, on the same box.",
        "",
        f"Sim worker: 1000 tokens/s per slot, TTFT 0, 64 slots; hey sends `max_tokens` "
        f"{MAX_TOKENS}, not streamed. *p50 added* is the target's p50 minus the direct p50 "
        "under the same load; *proxy CPU-ms/req* is the proxy process's user+system CPU "
        "over the load divided by its requests (psutil); *box idle cores* is the whole "
        "machine's idle CPU meanwhile (near 0: the run was CPU-starved, so its latencies "
        "measure the scheduler as much as the proxy).",
        "",
        *lines,
        "",
        *verdict,
        f"LiteLLM: {litellm_note or 'LiteLLM proxy from .bench-venv, one worker process.'}",
    ])
    write_section("overhead", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
