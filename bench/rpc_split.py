"""Replicate vs split (llama.cpp RPC) on loopback, with and without added network latency.

    .venv/bin/python bench/rpc_split.py [--write] [--tokens 64] [--streams 4] [--runs 3]
                                        [--delays 0.5,2]

Every model process gets 1 thread. `local` is a worker holding the whole model (one
replica); `replicas-2` is a gateway in front of it and a second such worker; `split-N` is a
split head (worker.rpc.head) with N shards (worker.rpc.shard) on loopback, the layers
shared evenly, either connected directly or through bench/delay_proxy.py adding `--delays`
ms each way between the head and every shard (this kernel has no netem). All setups run at
once and are measured in turn, round robin, so that other load on the box weighs on each
alike. Per setup and run: one stream's decode speed (tokens after the first over the time
from the first to the last, a streamed legacy completion, greedy) and the aggregate of
`--streams` concurrent streams (all their tokens over the wall time from sending to the last
token). `--write` replaces the `split` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import Proc, command_line, gateway_for, machine, start_worker, write_section  # noqa: E402

from worker.models import resolve  # noqa: E402
from worker.rpc.shard import ShardHost, child_env  # noqa: E402
from worker.rpc.supervisor import HeadProcess  # noqa: E402

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
BR = "  "  # Markdown line break


async def stream(c: httpx.AsyncClient, base: str, model: str, tokens: int) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = 0.0
    n = 0
    async with c.stream("POST", f"{base}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev.get("choices") and ev["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
            if ev.get("usage"):
                n = ev["usage"]["completion_tokens"]
    return {"t0": t0, "first": first, "last": last, "tokens": n}


async def decode_rate(base: str, model: str, tokens: int) -> float:
    async with httpx.AsyncClient(timeout=300) as c:
        s = await stream(c, base, model, tokens)
    n, first, last = s["tokens"], s["first"], s["last"]
    return (n - 1) / (last - first) if n > 1 and last > first else 0.0


async def aggregate_rate(base: str, model: str, tokens: int, streams: int) -> float:
    async with httpx.AsyncClient(timeout=300,
                                 limits=httpx.Limits(max_connections=streams + 2)) as c:
        t0 = time.perf_counter()
        got = await asyncio.gather(*(stream(c, base, model, tokens) for _ in range(streams)))
    wall = max(s["last"] for s in got) - t0
    return sum(s["tokens"] for s in got) / wall if wall > 0 else 0.0


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


def start_delay_proxy(delay_ms: float, upstreams: list[str]) -> tuple[subprocess.Popen[str],
                                                                        dict[str, str]]:
    """bench/delay_proxy.py for `upstreams`; returns it and {upstream: proxied endpoint}."""
    args = [sys.executable, str(BENCH / "delay_proxy.py"), "--delay-ms", str(delay_ms)]
    for u in upstreams:
        args += ["--upstream", u]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, start_new_session=True)
    mapping = {}
    assert p.stdout is not None
    for line in p.stdout:
        if line.startswith("LISTEN "):
            _, port, up = line.split()
            mapping[up] = f"127.0.0.1:{port}"
        elif line.strip() == "READY":
            return p, mapping
    raise RuntimeError("the delay proxy did not start")


def stop_delay_proxy(p: subprocess.Popen[str]) -> dict:
    """SIGTERM; returns the delay it actually added (its last stdout line)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        out, _ = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)
        return {}
    lines = [x for x in out.splitlines() if x.startswith("{")]
    return json.loads(lines[-1])["added_ms"] if lines else {}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--delays", default="0.5,2", help="ms each way, between head and shards")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    delays = [0.0] + [float(x) for x in a.delays.split(",") if x]
    _, path = resolve(a.model)
    name = path.stem
    where = machine()
    procs: list[Proc] = []
    shards: list[ShardHost] = []
    heads: dict[str, HeadProcess] = {}
    proxies: dict[float, subprocess.Popen[str]] = {}
    added: dict[float, dict] = {}
    try:
        env = child_env(1)
        one = ("--model", str(path), "--threads", "1", "--parallel", str(a.streams),
               "--ctx-size", "2048")
        ws = [start_worker(*one, env=env, wait=False) for _ in range(2)]
        procs += [w.proc for w in ws]
        layout: dict[str, tuple[int, float]] = {}
        for d in delays:
            for n in (1, 2):  # the layers shared evenly between the head and its shards
                hosts = [ShardHost("127.0.0.1", ["127.0.0.1"], 1) for _ in range(n)]
                shards += hosts
                endpoints = [h.start() for h in hosts]
                if d > 0:
                    p, mapping = start_delay_proxy(d, endpoints)
                    proxies[d * 1000 + n] = p  # one proxy process per setup
                    endpoints = [mapping[e] for e in endpoints]
                key = f"split-{n}" + (f", +{d:g} ms each way" if d else "")
                layout[key] = (n, d)
                heads[key] = HeadProcess("bench", str(path), name, endpoints,
                                         [1.0 / (n + 1)] * (n + 1), 1, a.streams, 2048)
        await asyncio.gather(*(h.start() for h in heads.values()))
        for w in ws:
            w.wait_ready()
        gw = gateway_for(ws)
        procs.append(gw.proc)
        bases = {"local": ws[0].url, "replicas-2 (gateway)": gw.url,
                 **{k: h.base for k, h in heads.items()}}
        await wait_ready(ws[0].url)
        single: dict[str, list[float]] = {k: [] for k in bases}
        agg: dict[str, list[float]] = {k: [] for k in bases}
        for base in bases.values():
            await decode_rate(base, name, 8)  # warm up
        for p in proxies.values():  # count the added delay from here on, not the loading
            os.killpg(p.pid, signal.SIGUSR1)
        # Round robin, so that whatever else runs on the box weighs on every setup alike.
        for _ in range(a.runs):
            for k, base in bases.items():
                single[k].append(await decode_rate(base, name, a.tokens))
                agg[k].append(await aggregate_rate(base, name, a.tokens, a.streams))
                print(json.dumps({"setup": k, "single": round(single[k][-1], 1),
                                  "aggregate": round(agg[k][-1], 1)}), file=sys.stderr,
                      flush=True)
    finally:
        for key, p in proxies.items():
            added[key] = stop_delay_proxy(p)
        for h in heads.values():
            await h.stop()
        for sh in shards:
            sh.stop()
        for pr in reversed(procs):
            pr.stop()
    out = {"machine": where, "single": single, "aggregate": agg,
           "added_delay_ms": {str(k): v for k, v in added.items()}}
    print(json.dumps(out, indent=2))
    if a.write:
        write_section("split", render(out, a, layout, added))


def render(out: dict, a: argparse.Namespace, layout: dict[str, tuple[int, float]],
           added: dict[float, dict]) -> str:
    def med(v: list[float]) -> float:
        return statistics.median(v) if v else 0.0

    single, agg = out["single"], out["aggregate"]
    base1, base4 = med(single["local"]), med(agg["local"])
    lines = [f"| setup | model processes (1 thread each) | added one-way delay, measured | "
             f"1 stream tok/s | vs local | {a.streams} streams aggregate tok/s | vs local |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for k in single:
        n, d = layout.get(k, (0, 0.0))
        procs = 1 if k == "local" else 2 if k.startswith("replicas") else n + 1
        got = added.get(d * 1000 + n) if d else None
        delay = (f"{d:g} ms (mean {got['mean']:.2f}, p99 {got['p99']:.2f})"
                 if got and got.get("count") else f"{d:g} ms" if d else "-")
        s, g = med(single[k]), med(agg[k])
        spread = (f" ({min(single[k]):.0f}-{max(single[k]):.0f})",
                  f" ({min(agg[k]):.0f}-{max(agg[k]):.0f})")
        lines.append(f"| {k} | {procs} | {delay} | {s:.1f}{spread[0]} | {s / base1:.2f} | "
                     f"{g:.1f}{spread[1]} | {g / base4:.2f} |")

    def ratio(key: str, v: dict) -> str:
        return f"{med(v[key]) / (base1 if v is single else base4):.2f}" if key in v else "-"

    worst = max(layout, key=lambda k: (layout[k][1], layout[k][0]))
    best_split = max(layout, key=lambda k: med(single[k]))
    beats = med(single[best_split]) > base1
    rep = "replicas-2 (gateway)"
    verdict = (f"one stream on split-1 runs at {ratio('split-1', single)}x local, split-2 at "
               f"{ratio('split-2', single)}x; with {layout[worst][1]:g} ms added each way, "
               f"split-{layout[worst][0]} falls to {ratio(worst, single)}x (1 stream) and "
               f"{ratio(worst, agg)}x "
               f"({a.streams} streams), while two replicas give {ratio(rep, agg)}x local for "
               f"{a.streams} streams: "
               + ("a split setup beat the local replica here (" + best_split + ")" if beats
                  else "on one box splitting does not beat a replica; split only where the "
                  "model fits no single box"))
    return f"""## Split vs replicate: llama.cpp RPC on loopback, with added latency

Command: `{command_line()}`{BR}
Machine: {out['machine']}.

SmolLM2-135M Q4_1, every model process 1 thread: `local` is one worker with the whole model
(`--parallel {a.streams}`); `replicas-2` a gateway over it and a second such worker;
`split-N` a split head with N RPC shards, the layers shared evenly between the head and
the shards, connected directly or through bench/delay_proxy.py (asyncio, loopback) adding a
fixed delay each way on every head-shard connection (*measured* is what the proxy actually
added per chunk). All setups up at once, measured in turn, round robin, {a.runs} runs;
medians (min-max). 1 stream: greedy streamed completion of {a.tokens} tokens, tokens after
the first over first-to-last time. Aggregate: {a.streams} such streams at once, all tokens
over the wall time. The box has 2 cores: `split-2` runs 3 model threads on them.

{chr(10).join(lines)}

Verdict: {verdict}.
"""


if __name__ == "__main__":
    asyncio.run(main())
