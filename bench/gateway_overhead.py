"""What the gateway costs: CPU-ms per request and added p50 latency vs a sim worker directly.

Starts one sim worker and one gateway in front of it (real processes on 127.0.0.1), sends
the same requests to each, and reads the gateway process's CPU time (psutil) before and
after. Not a test: it prints numbers.

    .venv/bin/python bench/gateway_overhead.py --requests 400 --concurrency 1 8
    .venv/bin/python bench/gateway_overhead.py --httpx-transport   # httpcore, to compare
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from procs import start_gateway, start_worker, wait_for  # noqa: E402

MODEL = "smollm2-135m"


def run_load(url: str, n: int, conc: int, stream: bool, max_tokens: int) -> list[float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there!"}],
            "max_tokens": max_tokens, "stream": stream}
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    with httpx.Client(timeout=30, limits=limits) as http:
        def one(_: int) -> float:
            t0 = time.perf_counter()
            if stream:
                with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200, r.status_code
                    for _line in r.iter_raw():
                        pass
            else:
                r = http.post(f"{url}/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
            return time.perf_counter() - t0

        for i in range(min(20, n)):  # warm up connections
            one(i)
        with ThreadPoolExecutor(conc) as pool:
            return list(pool.map(one, range(n)))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--sim-rate", type=float, default=2000.0, help="sim tokens/s per slot")
    ap.add_argument("--httpx-transport", action="store_true",
                    help="use httpx's default transport (httpcore) instead of the lean one")
    a = ap.parse_args()
    extra: list[str] = []
    if a.httpx_transport:
        conf = Path(tempfile.mkstemp(suffix=".toml")[1])
        conf.write_text("[gateway]\nlean_transport = false\n")
        extra = ["--config", str(conf)]
    w = start_worker("--sim-tokens-per-second", str(a.sim_rate), "--sim-ttft", "0",
                     "--parallel", "16", "--max-queue", "256", backend="sim")
    g = start_gateway("--worker", w.url, *extra)
    try:
        wait_for(lambda: httpx.get(f"{g.url}/readyz").status_code == 200, 30, 0.05, "ready")
        gp = psutil.Process(g.proc.pid)
        wp = psutil.Process(w.proc.pid)
        print(f"{'mode':>8} {'conc':>4} {'direct p50':>11} {'gateway p50':>12} "
              f"{'added p50':>10} {'added p99':>10} {'gw CPU-ms/req':>14} "
              f"{'worker CPU-ms/req':>18}")
        for stream in (False, True):
            for conc in a.concurrency:
                w0 = wp.cpu_times()
                direct = run_load(w.url, a.requests, conc, stream, a.max_tokens)
                w1 = wp.cpu_times()
                cpu0 = gp.cpu_times()
                via = run_load(g.url, a.requests, conc, stream, a.max_tokens)
                cpu1 = gp.cpu_times()
                # Warm-up requests ran inside the window too: count them.
                n = a.requests + min(20, a.requests)
                cpu_ms = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) * 1000 / n
                w_ms = ((w1.user + w1.system) - (w0.user + w0.system)) * 1000 / n
                d50, v50 = statistics.median(direct), statistics.median(via)
                print(f"{'stream' if stream else 'json':>8} {conc:>4} {d50 * 1000:>9.2f}ms "
                      f"{v50 * 1000:>10.2f}ms {(v50 - d50) * 1000:>8.2f}ms "
                      f"{(pct(via, .99) - pct(direct, .99)) * 1000:>8.2f}ms {cpu_ms:>14.3f} "
                      f"{w_ms:>18.3f}")
    finally:
        g.proc.stop()
        w.proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
