"""Balancing heterogeneous workers: Corral vs round-robin vs an oracle (vs LiteLLM least-busy).

    .venv/bin/python bench/balancing.py [--requests 120] [--utilization 0.8] [--no-litellm]
    .venv/bin/python bench/balancing.py --scenario prefill   # long/short prompts (prefill_mix.py)

Three sim workers decode at 1x, 2x and 4x a base rate (same slots each). An open-loop
Poisson load at `--utilization` of their combined capacity is sent through each router in
turn (same seed, so the same arrival times):

- Corral's gateway;
- round robin: a tiny proxy in this file (starlette + httpx, bench-only) that cycles;
- oracle: the same proxy choosing the least expected completion time from the known
  speeds, slots and its exact in-flight counts (it is the only router, so it sees all);
- LiteLLM's proxy with `routing_strategy: least-busy`, when .bench-venv has it.

The proxies here run as `python bench/balancing.py --serve rr|oracle ...` subprocesses.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson  # noqa: E402
import prefill_mix  # noqa: E402
from common import (  # noqa: E402
    HOST,
    Proc,
    command_line,
    free_port,
    gateway_for,
    litellm_missing,
    load,
    machine,
    plot,
    sim_workers,
    start_litellm,
    wait_for,
    write_section,
)


def serve(policy: str, port: int, upstreams: list[str]) -> None:
    """The comparison router: round robin, or least expected completion time (oracle)."""
    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    ups: list[list[Any]] = []  # [url, seconds per request on one slot, slots, in flight]
    if policy == "oracle-prefill":  # [url, prefill, decode, slots, in flight, reader free]
        ups = prefill_mix.serve_oracle(upstreams)
    else:
        for u in upstreams:
            url, per_request, slots = u.rsplit(",", 2)
            ups.append([url, float(per_request), int(slots), 0])
    flight = 4 if policy == "oracle-prefill" else 3  # the in-flight column
    cycle = itertools.cycle(range(len(ups)))
    client = httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=1000),
                               trust_env=False)

    def pick() -> list:
        if policy == "rr":
            return ups[next(cycle)]
        # Expected completion: the requests ahead of ours drain `slots` at a time.
        return min(ups, key=lambda u: u[1] * (1 + max(0, u[3] + 1 - u[2]) / u[2]))

    async def chat(request: Request) -> Response:
        body = await request.body()
        up = (prefill_mix.oracle_pick(ups, body, orjson.loads(body)["max_tokens"])
              if policy == "oracle-prefill" else pick())
        up[flight] += 1
        req = client.build_request("POST", up[0] + "/v1/chat/completions", content=body,
                                   headers={"content-type": "application/json"})
        try:
            r = await client.send(req, stream=True)
        except BaseException:
            up[flight] -= 1
            raise

        async def relay():
            try:
                async for chunk in r.aiter_raw():
                    yield chunk
            finally:
                await r.aclose()
                up[flight] -= 1

        keep = {k: v for k, v in r.headers.items() if k == "x-corral-worker"}
        return StreamingResponse(relay(), status_code=r.status_code, headers=keep,
                                 media_type=r.headers.get("content-type"))

    async def health(request: Request) -> Response:
        return Response("ok")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/healthz", health)])
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


def start_proxy(policy: str, upstreams: list[str]) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc([sys.executable, __file__, "--serve", policy, "--port", str(port),
                 "--upstream", *upstreams], name=f"{policy}-{port}").start()
    url = f"http://{HOST}:{port}"
    proc.wait_http(f"{url}/healthz", timeout=30)
    return proc, url


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--utilization", type=float, default=0.8)
    ap.add_argument("--base-rate", type=float, default=10.0, help="1x tokens/s per slot")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--scenario", choices=["speeds", "prefill"], default="speeds",
                    help="speeds: 1x/2x/4x decoders; prefill: 1x/1x/3x prompt readers, "
                         "20%% long prompts")
    ap.add_argument("--prefill-rate", type=float, default=1000.0,
                    help="prefill scenario: 1x prompt tokens/s")
    ap.add_argument("--gateway-setting", action="append", default=[], metavar="KEY=VALUE",
                    help="prefill scenario: a [gateway] setting for both Corral gateways")
    ap.add_argument("--only", action="append", default=[],
                    help="prefill scenario: run only the routers whose name contains this")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:K=V;K=V",
                    help="prefill scenario: one more Corral gateway with these settings")
    ap.add_argument("--serve", choices=["rr", "oracle", "oracle-prefill"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve, a.port, a.upstream)
        return 0
    if a.scenario == "prefill":
        return prefill_mix.run(a, start_proxy)

    ttft = 0.05
    speeds = (1, 2, 4)
    note = machine()
    workers = []
    for m in speeds:  # different rates: one sim_workers call per speed
        workers += sim_workers(1, a.base_rate * m, a.slots, ttft=ttft)
    per_request = [ttft + (a.max_tokens - 1) / (a.base_rate * m) for m in speeds]
    capacity = sum(a.slots / s for s in per_request)  # requests/s
    rate = a.utilization * capacity
    procs: list[Proc] = [w.proc for w in workers]
    rows = []
    results = {}
    litellm_note = "skipped (--no-litellm)" if a.no_litellm else litellm_missing()
    try:
        ups = [f"{w.url},{s},{a.slots}" for w, s in zip(workers, per_request, strict=True)]
        gw = gateway_for(workers)
        procs.append(gw.proc)
        rr, rr_url = start_proxy("rr", ups)
        procs.append(rr)
        oracle, oracle_url = start_proxy("oracle", ups)
        procs.append(oracle)
        targets = [("Corral gateway", gw.url), ("round robin", rr_url),
                   ("oracle (least expected completion)", oracle_url)]
        if litellm_note is None:
            try:
                lp = start_litellm(workers, "least-busy")
                procs.append(lp)
                targets.append(("LiteLLM proxy, least-busy", lp.url))
            except RuntimeError as exc:
                litellm_note = str(exc)[:400]
        for name, url in targets:
            load(url, 6, concurrency=3, max_tokens=2)  # warm up connections
            wait_for(lambda: all(_idle(w.url) for w in workers), 30, 0.1, "idle workers")
            before = [_generated(w.url) for w in workers]
            s, res = load(url, a.requests, rate=rate, max_tokens=a.max_tokens, seed=a.seed,
                          timeout=120)
            # Counted by the workers themselves, so a proxy need not say who served.
            share = " / ".join(f"{(_generated(w.url) - b) / a.max_tokens:.0f}"
                               for w, b in zip(workers, before, strict=True))
            row = {"target": name, "p50": s["latency_ms"]["p50"], "p90": s["latency_ms"]["p90"],
                   "p99": s["latency_ms"]["p99"], "ttft_p50": s["ttft_ms"]["p50"],
                   "ttft_p99": s["ttft_ms"]["p99"], "rps": s["requests_per_second"],
                   "errors": s["errors"], "share": share, "kinds": s["errors_by_kind"]}
            rows.append(row)
            results[name] = [r.latency * 1000 for r in res if r.ok]
            print(json.dumps(row))
    finally:
        for p in reversed(procs):
            p.stop()

    lines = ["| router | latency p50 ms | p90 ms | p99 ms | TTFT p50 / p99 ms | req/s | "
             "requests on 1x / 2x / 4x (worker metrics) | errors |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        share = r["share"]
        lines.append(f"| {r['target']} | {r['p50']:.0f} | {r['p90']:.0f} | {r['p99']:.0f} | "
                     f"{r['ttft_p50']:.0f} / {r['ttft_p99']:.0f} | {r['rps']:.2f} | {share} | "
                     f"{r['errors']} |")
    by = {r["target"]: r for r in rows}
    verdict = ""
    if "Corral gateway" in by and "round robin" in by:
        g, rr = by["Corral gateway"], by["round robin"]
        o = by.get("oracle (least expected completion)")
        verdict = (f"Corral's p99 is {rr['p99'] / g['p99']:.1f}x lower than round robin's"
                   + (f" and {g['p99'] / o['p99']:.2f}x the oracle's" if o else "")
                   + f"; its p50 is {g['p50'] / rr['p50']:.2f}x round robin's"
                   + (f", {g['p50'] / o['p50']:.2f}x the oracle's." if o else "."))
    def draw(ax: Any) -> None:
        for name, v in results.items():
            v = sorted(v)
            ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", label=name)
        ax.set_xlabel("end-to-end latency, ms")
        ax.set_ylabel("fraction of requests ≤ x")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    plot_line = ("" if a.no_plot
                 else plot("balancing.png", "latency CDF per router", (6, 3.8), draw))
    body = "\n".join([
        "## Balancing: heterogeneous workers under Poisson load",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {note}.",
        "",
        f"Three sim workers at {', '.join(f'{a.base_rate * m:g}' for m in speeds)} tokens/s "
        f"per slot ({a.slots} slots each, TTFT {ttft * 1000:.0f} ms); streamed chat "
        f"completions of {a.max_tokens} tokens, so one request takes "
        f"{' / '.join(f'{s:.2f}' for s in per_request)} s on them. Combined capacity "
        f"{capacity:.2f} req/s; open-loop Poisson arrivals at {a.utilization:g} of it "
        f"({rate:.2f} req/s), {a.requests} requests, seed {a.seed}, the same arrival times "
        "for every router. The oracle knows each worker's speed and slots and its own exact "
        "in-flight counts, and sends each request where it is expected to finish first.",
        "",
        *lines,
        "",
        verdict,
        plot_line,
        f"LiteLLM: {litellm_note or 'LiteLLM proxy from .bench-venv, least-busy routing.'}",
    ])
    write_section("balancing", body)
    return 0


def _generated(url: str) -> float:
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("corral_worker_generated_tokens_total"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _idle(url: str) -> bool:
    import httpx

    s = httpx.get(f"{url}/status", timeout=2).json()
    return s["slots_busy"] == 0 and s["queue_depth"] == 0


if __name__ == "__main__":
    sys.exit(main())
