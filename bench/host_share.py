"""Issue 13's scenario: three workers on one box, a team's burst, one worker killed.

    .venv/bin/python bench/host_share.py [--write] [--streams 12] [--max-tokens 160]

A gateway placing the bundled model, and three `corral worker --join` on this box, first
with the defaults (each its share of the cores, 4 slots), then as before issue 13 (every
core each, `--threads <cpus> --parallel 1`). `--streams` streamed greedy chat completions
at once; once three are being decoded, one worker is SIGKILLed. Counted: the streams that
finish within `--deadline` seconds, and how long they took. `--write` replaces the
`host-share` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import httpx
import openai
from common import (
    MODEL,
    command_line,
    machine,
    start_gateway,
    start_worker,
    wait_for,
    write_section,
)
from engine import BR, PROMPT


def _cluster(url: str) -> dict:
    return httpx.get(f"{url}/cluster", timeout=5).json()


def scenario(extra: list[str], streams: int, max_tokens: int, deadline: float) -> dict:
    g = start_gateway("--model", MODEL)
    env = {"CORRAL_CLUSTER_TOKEN": g.token}
    ws = [start_worker("--join", g.url, *extra, wait=False, env=env) for _ in range(3)]
    try:
        wait_for(lambda: sum(1 for w in _cluster(g.url)["workers"]
                             if w["state"] in ("ready", "busy") and w["models"]) == 3,
                 600, 0.5, "three placed replicas")
        before = [(w["hardware"]["threads"], w["slots_total"])
                  for w in _cluster(g.url)["workers"]]
        try:  # the gateway reports a host once it stays oversubscribed for 3 s
            wait_for(lambda: bool(_cluster(g.url).get("warnings")), 10, 0.25, "a warning")
            warned = True
        except TimeoutError:
            warned = False
        client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="none", max_retries=0,
                               timeout=deadline)
        done: list[float] = []
        errors: list[str] = []
        t0 = time.monotonic()

        def one(i: int) -> None:
            try:
                for _ in client.chat.completions.create(
                        model=MODEL, stream=True, max_tokens=max_tokens, temperature=0,
                        messages=[{"role": "user", "content": f"Request {i}. {PROMPT}"}]):
                    pass
                done.append(time.monotonic() - t0)
            except Exception as exc:  # counted, with its kind
                errors.append(type(exc).__name__)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        wait_for(lambda: sum(w["slots_busy"] for w in _cluster(g.url)["workers"]) >= 3, 120,
                 0.1, "three streams decoding")
        ws[0].proc.kill()
        for t in threads:
            t.join(deadline + 10)
        in_time = sorted(d for d in done if d <= deadline)
        return {"workers": before, "warned": warned, "finished": len(in_time),
                "last_s": round(in_time[-1], 1) if in_time else None,
                "errors": {e: errors.count(e) for e in set(errors)}}
    finally:
        for w in ws:
            w.proc.stop()
        g.proc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--deadline", type=float, default=120.0)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    cpus = os.cpu_count() or 1
    where = machine()
    setups = {"defaults (shared cores, 4 slots)": [],
              f"before: `--threads {cpus} --parallel 1`": ["--threads", str(cpus),
                                                           "--parallel", "1"]}
    rows = {}
    for name, extra in setups.items():
        rows[name] = scenario(extra, a.streams, a.max_tokens, a.deadline)
        print(json.dumps({"setup": name, **rows[name]}), file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=2))
    if a.write:
        write_section("host-share", render(rows, a, where))


def render(rows: dict, a: argparse.Namespace, where: str) -> str:
    lines = ["| setup | threads, slots per worker | gateway warned | finished in "
             f"{a.deadline:.0f} s | last one at s | errors |", "|---|---|---|---:|---:|---|"]
    for name, r in rows.items():
        per = ", ".join(f"{t}t/{s}" for t, s in r["workers"])
        errs = ", ".join(f"{n} {k}" for k, n in sorted(r["errors"].items())) or "0"
        last = "-" if r["last_s"] is None else f"{r['last_s']:.0f}"
        lines.append(f"| {name} | {per} | {'yes' if r['warned'] else 'no'} | "
                     f"{r['finished']} / {a.streams} | {last} | {errs} |")
    return f"""## Three workers on one box: shared cores vs every core each (issue 13)

Command: `{command_line()}`{BR}
Machine: {where}.

A gateway placing the bundled model on three `corral worker --join` on this box; {a.streams}
streamed greedy chat completions of {a.max_tokens} tokens at once; once three are being
decoded, one worker is SIGKILLed (its streams continue elsewhere). Workers with the
defaults share the box's cores (on 2 CPUs three workers still get 1 thread each, the
floor, so the gateway warns until one is gone; survivors re-share) and have 4 slots;
*before* is the old default of every core each and 1 slot.

{chr(10).join(lines)}
"""


if __name__ == "__main__":
    os.environ.setdefault("NO_PROXY", "*")
    main()
