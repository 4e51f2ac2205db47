"""Polite mode: how much Corral slows the box owner's own work.

    .venv/bin/python bench/polite.py [--write] [--rounds 3] [--owner-procs N] [--work W]

The owner's job is CPU-bound (`--owner-procs` Python processes, default one per CPU, each
counting to `--work`); it is timed alone, beside a real llama worker serving a steady load
through a gateway (2 requests at once, 48 tokens each), and beside the same worker started
with `--polite`. Conditions alternate within each round, so a drifting background load
spreads over all three; the ratio of each to `alone` in the same round is what counts.
Also recorded: completion tokens the worker served while the owner's job ran, and what
the polite worker saw of the box when each round began. `--write` replaces the `polite`
section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time

import httpx
from common import (
    MODEL,
    Worker,
    command_line,
    gateway_for,
    machine,
    start_worker,
    started,
    wait_for,
    write_section,
)

OWNER = "import sys\nn = int(sys.argv[1])\nx = 0\nfor i in range(n):\n    x += i * i\n"


class Load:
    """Steady requests through a gateway on threads, counting the tokens served."""

    def __init__(self, url: str, concurrency: int = 2, max_tokens: int = 48) -> None:
        self.url, self.max_tokens = url, max_tokens
        self.tokens = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True)
                        for _ in range(concurrency)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        body = {"model": MODEL, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}
        with httpx.Client(timeout=120) as c:
            while not self.stop.is_set():
                try:
                    r = c.post(f"{self.url}/v1/chat/completions", json=body)
                    if r.status_code == 200:
                        self.tokens += r.json()["usage"]["completion_tokens"]
                except httpx.HTTPError:
                    pass

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(130)


def owner_job(procs: int, work: int) -> float:
    t0 = time.perf_counter()
    ps = [subprocess.Popen([sys.executable, "-c", OWNER, str(work)]) for _ in range(procs)]
    for p in ps:
        p.wait()
    return time.perf_counter() - t0


def busy(w: Worker) -> bool:
    return httpx.get(f"{w.url}/status", timeout=5).json()["slots_busy"] > 0


def run_condition(name: str, gateways: dict, workers: dict, procs: int, work: int) -> dict:
    if name == "alone":
        return {"seconds": owner_job(procs, work), "tokens": 0}
    load = Load(gateways[name].url)
    try:
        seen = httpx.get(f"{workers[name].url}/status", timeout=5).json().get("polite")
        # The worker busy before the owner starts (a polite one may already yield).
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: busy(workers[name]), 10, 0.05, "the worker busy")
        before = load.tokens
        seconds = owner_job(procs, work)
        return {"seconds": seconds, "tokens": load.tokens - before, "polite": seen}
    finally:
        load.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--owner-procs", type=int, default=None)
    ap.add_argument("--work", type=int, default=40_000_000)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    procs = a.owner_procs or os.cpu_count() or 1
    where = machine()
    flags = ("--parallel", "2")
    plain = start_worker(*flags)
    polite = start_worker(*flags, "--polite")
    with started(plain, polite):
        gp, gn = gateway_for([polite]), gateway_for([plain])
        with started(gp, gn):
            gateways, workers = {"polite": gp, "plain": gn}, {"polite": polite, "plain": plain}
            order = ["alone", "plain", "polite"]
            rows: dict[str, list[dict]] = {k: [] for k in order}
            for r in range(a.rounds):
                for name in order[r % 3:] + order[:r % 3]:
                    res = run_condition(name, gateways, workers, procs, a.work)
                    rows[name].append(res)
                    print(f"round {r + 1} {name}: {res['seconds']:.2f} s, "
                          f"{res['tokens']} tokens served meanwhile", flush=True)
    alone = [x["seconds"] for x in rows["alone"]]
    lines = [
        "## Polite mode: the owner's slowdown", "",
        f"`{command_line()}`", "", f"Box: {where}.", "",
        f"The owner's job: {procs} CPU-bound process(es) counting to {a.work:,}; a real "
        f"llama worker (`{MODEL}`, `--parallel 2`) under a steady load of 2 requests at "
        "once through its own gateway. Ratios are to `alone` in the same round.", "",
        "| condition | owner's job, s (median) | vs alone (median of rounds) | tokens "
        "served during it |",
        "|---|---:|---:|---:|",
    ]
    for name in ("alone", "plain", "polite"):
        secs = [x["seconds"] for x in rows[name]]
        ratio = statistics.median(s / b for s, b in zip(secs, alone, strict=True))
        toks = statistics.median(x["tokens"] for x in rows[name])
        label = {"alone": "alone", "plain": "beside a worker",
                 "polite": "beside a `--polite` worker"}[name]
        lines.append(f"| {label} | {statistics.median(secs):.2f} | {ratio:.2f}x | "
                     f"{toks:.0f} |")
    for name in ("plain", "polite"):
        per = ", ".join(f"{x['seconds'] / b:.2f}x" for x, b in zip(rows[name], alone,
                                                                   strict=True))
        lines.append(f"\nPer round, {name} vs alone: {per}.")
    seen = [x.get("polite") or {} for x in rows["polite"]]
    lines += ["", "What the polite worker saw as each polite round began: " + "; ".join(
        f"others {s.get('owner_cpu', 0):.0%} of the CPUs, "
        f"{'yielding' if s.get('yielding') else 'serving'}" for s in seen) + "."]
    if all(s.get("yielding") for s in seen) and not any(x["tokens"] for x in rows["polite"]):
        lines += ["", "Reading: the polite worker was already yielding when every polite round "
                  "began (other work kept the box busy), so its row measures a worker that "
                  "gives way completely, not the switch from serving to yielding (about one "
                  "sample, 0.5 s, plus a probe); rerun on an otherwise idle box for that."]
    body = "\n".join(lines) + "\n"
    print(body)
    if a.write:
        write_section("polite", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
