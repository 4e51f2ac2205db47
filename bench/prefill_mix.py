"""Long and short prompts on workers that read at different speeds (issue 21).

    .venv/bin/python bench/balancing.py --scenario prefill [--requests 240]

Three sim workers decode at the same rate but read prompts at 1x, 1x and 3x a base
prefill rate (one prompt at a time, as a compute-bound box does). Poisson arrivals mix 20%
3,000-token and 80% 50-token prompts at `--utilization` of what the three can read. Four
routers get the same arrivals: Corral with cost routing, Corral with today's load/capacity
score (`cost_routing = false`), round robin, and an oracle proxy that knows both rates of
every worker, each prompt's exact length, and (being the only router) all in-flight work.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from common import (
    MODEL,
    Proc,
    command_line,
    gateway_for,
    machine,
    start_worker,
    wait_for,
    write_section,
)

from corral.bench import LoadSpec, Runner, summarize

LONG_TOKENS, SHORT_TOKENS, LONG_SHARE = 3000, 50, 0.2
SPEEDS = (1, 1, 3)


def oracle_pick(ups: list[list[Any]], body: bytes, max_tokens: int) -> list[Any]:
    """Least expected finish with exact knowledge: ups rows are [url, prefill tok/s,
    decode tok/s, slots, in flight, reader free at]; updates the chosen row's reader."""
    prompt = len(body) / 4
    now = time.monotonic()

    def finish(u: list[Any]) -> float:
        over = u[4] + 1 - u[3]
        wait = max(u[5] - now, over * max_tokens / (u[3] * u[2]) if over > 0 else 0.0)
        return wait + prompt / u[1] + max_tokens / u[2]

    up = min(ups, key=finish)
    up[5] = max(up[5], now) + prompt / up[1]
    return up


def _bodies(n: int, max_tokens: int, seed: int) -> tuple[list[bytes], list[bool]]:
    rng = random.Random(seed)
    longs = [rng.random() < LONG_SHARE for _ in range(n)]
    bodies = []
    for i, long in enumerate(longs):
        text = f"Request {i}. " + ("horse " * (LONG_TOKENS * 4 // 6) if long
                                   else "a short question about horses " * 7)
        bodies.append(orjson.dumps({
            "model": MODEL, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}))
    return bodies, longs


def _pct(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def _idle(url: str) -> bool:
    s = httpx.get(f"{url}/status", timeout=2).json()
    return s["slots_busy"] == 0 and s["queue_depth"] == 0


def run(a: Any, start_proxy: Any) -> int:
    base = a.prefill_rate
    note = machine()
    workers = [start_worker("--sim-tokens-per-second", str(a.base_rate), "--parallel",
                            str(a.slots), "--max-queue", "512", "--ctx-size", "8192",
                            "--sim-prefill-tokens-per-second",
                            str(base * m), backend="sim") for m in SPEEDS]
    mean_prompt = LONG_SHARE * LONG_TOKENS + (1 - LONG_SHARE) * SHORT_TOKENS
    capacity = sum(base * m for m in SPEEDS) / mean_prompt  # requests/s the readers take
    rate = a.utilization * capacity
    procs: list[Proc] = [w.proc for w in workers]
    rows = []
    try:
        tmp = Path(tempfile.mkdtemp(prefix="corral-bench-"))
        extra = "".join(f"{kv.split('=', 1)[0]} = {kv.split('=', 1)[1]}\n"
                        for kv in a.gateway_setting)
        (tmp / "new.toml").write_text("[gateway]\n" + extra)
        (tmp / "old.toml").write_text("[gateway]\ncost_routing = false\n" + extra)
        gw = gateway_for(workers, "--config", str(tmp / "new.toml"))
        procs.append(gw.proc)
        old = gateway_for(workers, "--config", str(tmp / "old.toml"))
        procs.append(old.proc)
        ups = [f"{w.url},{base * m},{a.base_rate},{a.slots}"
               for w, m in zip(workers, SPEEDS, strict=True)]
        rr, rr_url = start_proxy("rr", [f"{w.url},1,{a.slots}" for w in workers])
        oracle, oracle_url = start_proxy("oracle-prefill", ups)
        procs += [rr, oracle]
        targets = [("Corral, cost routing (new)", gw.url),
                   ("Corral, load/capacity score (today)", old.url),
                   ("round robin", rr_url), ("oracle (both rates, exact prompts)", oracle_url)]
        for i, v in enumerate(a.variant):  # "label:key=value;key=value", cost routing on
            label, _, kvs = v.partition(":")
            f = tmp / f"variant{i}.toml"
            f.write_text("[gateway]\n" + extra + "".join(
                f"{kv.split('=', 1)[0]} = {kv.split('=', 1)[1]}\n" for kv in kvs.split(";")
                if kv))
            g = gateway_for(workers, "--config", str(f))
            procs.append(g.proc)
            targets.append((f"Corral, cost routing, {label}", g.url))
        bodies, longs = _bodies(a.requests, a.max_tokens, a.seed)
        for name, url in targets:
            if a.only and not any(o in name for o in a.only):
                continue
            wait_for(lambda: all(_idle(w.url) for w in workers), 120, 0.1, "idle workers")
            spec = LoadSpec(base_url=url, model=MODEL, requests=a.requests, rate=rate,
                            max_tokens=a.max_tokens, stream=True, timeout=300, seed=a.seed)
            runner = Runner(spec)
            runner.bodies = bodies
            res = runner.run()
            s = summarize(spec, res, runner.duration)
            ttft_long = [r.ttft * 1000 for r, lg in zip(res, longs, strict=True)
                         if r.ok and lg and r.ttft is not None]
            ttft_short = [r.ttft * 1000 for r, lg in zip(res, longs, strict=True)
                          if r.ok and not lg and r.ttft is not None]
            row = {"target": name, "ttft_p50": s["ttft_ms"]["p50"],
                   "ttft_p99": s["ttft_ms"]["p99"], "p50": s["latency_ms"]["p50"],
                   "p99": s["latency_ms"]["p99"], "long_ttft_p50": _pct(ttft_long, 0.5),
                   "short_ttft_p99": _pct(ttft_short, 0.99), "errors": s["errors"]}
            rows.append(row)
            print(orjson.dumps(row).decode(), flush=True)
    finally:
        for p in reversed(procs):
            p.stop()
    lines = ["| router | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms | "
             "long-prompt TTFT p50 ms | short-prompt TTFT p99 ms | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['ttft_p50']:.0f} | {r['ttft_p99']:.0f} | "
                     f"{r['p50']:.0f} | {r['p99']:.0f} | {r['long_ttft_p50']:.0f} | "
                     f"{r['short_ttft_p99']:.0f} | {r['errors']} |")
    if len(rows) < 4:  # --only: an experiment, not the table
        print("\n".join(lines))
        return 0
    new, today, oracle_row = rows[0], rows[1], rows[3]
    verdict = (f"Cost routing's latency p99 is {new['p99'] / oracle_row['p99']:.2f}x the "
               f"oracle's (goal: within 1.2x) and {new['p99'] / today['p99']:.2f}x today's "
               f"scoring (goal: at most 0.67x); TTFT p99 "
               f"{new['ttft_p99'] / today['ttft_p99']:.2f}x today's.")
    body = "\n".join([
        "## Balancing prompt reading: long and short prompts, 1x / 1x / 3x readers",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {note}.",
        "",
        f"Three sim workers, {a.slots} slots each, all decoding at {a.base_rate:g} tokens/s "
        f"per slot, reading prompts at {', '.join(f'{base * m:g}' for m in SPEEDS)} tokens/s "
        f"(one prompt at a time). Streamed chat completions of {a.max_tokens} tokens; "
        f"{LONG_SHARE:.0%} of prompts are {LONG_TOKENS:,} tokens, the rest {SHORT_TOKENS}. "
        f"What the three can read: {capacity:.2f} req/s; open-loop Poisson arrivals at "
        f"{a.utilization:g} of it ({rate:.2f} req/s), {a.requests} requests, seed {a.seed}, "
        "the same arrivals and prompts for every router. 'today' is the same gateway with "
        "`cost_routing = false` (load over slots x decode speed, prompt length unseen).",
        "",
        *lines,
        "",
        verdict,
    ])
    write_section("balancing-prefill", body)
    return 0


def serve_oracle(ups_spec: list[str]) -> list[list[Any]]:
    ups = []
    for u in ups_spec:
        url, prefill, decode, slots = u.rsplit(",", 3)
        ups.append([url, float(prefill), float(decode), int(slots), 0, 0.0])
    return ups

