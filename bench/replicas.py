"""Real model: 1 vs 2 llama workers with 1 thread each vs one worker with 2 threads.

    .venv/bin/python bench/replicas.py [--write] [--levels 4,8] [--passes 2]

Three llama workers (SmolLM2-135M, `--parallel 8` each): A and B with `--threads 1`, C with
`--threads 2`; three gateways: in front of A, of A + B, of C. Five setups, measured in turn
(round robin, `--passes` times, so background load weighs on each alike): A direct, A via
the gateway, A + B via the gateway, C direct, C via the gateway. Load: `corral bench`
closed loop at each concurrency, 2 x c streamed chat completions of `--max-tokens` greedy
tokens, distinct prompts; tok/s = all output tokens / all wall time of that setup and level.
`--write` replaces the `replicas` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from common import (
    MODEL,
    LoadSpec,
    Proc,
    bench,
    command_line,
    gateway_for,
    machine,
    start_worker,
    write_section,
)
from engine import BR, PROMPT


def level(url: str, c: int, requests: int, max_tokens: int) -> dict:
    spec = LoadSpec(base_url=url, model=MODEL, requests=requests, concurrency=c,
                    max_tokens=max_tokens, stream=True, timeout=300, distinct_prompts=True,
                    prompt=PROMPT, extra_body={"temperature": 0})
    s, _ = bench(spec)
    return {"tokens": s["output_tokens"], "seconds": s["duration_s"], "errors": s["errors"],
            "workers": s.get("workers", {}), "tpot_p50_ms": (s.get("tpot_ms") or {}).get("p50")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="4,8")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    where = machine()
    procs: list[Proc] = []
    try:
        common = ("--parallel", "8", "--ctx-size", "1024")
        ws = [start_worker(*common, "--threads", t, wait=False) for t in ("1", "1", "2")]
        procs += [w.proc for w in ws]
        for w in ws:
            w.wait_ready()
        wa, wb, wc = ws
        gs = []
        for group in ([wa], [wa, wb], [wc]):
            gs.append(gateway_for(group))
            procs.append(gs[-1].proc)
        setups = {"1 worker x 1 thread, direct": wa.url,
                  "1 worker x 1 thread, via gateway": gs[0].url,
                  "2 workers x 1 thread, via gateway": gs[1].url,
                  "1 worker x 2 threads, direct": wc.url,
                  "1 worker x 2 threads, via gateway": gs[2].url}
        for url in setups.values():  # warm up
            level(url, 2, 2, 8)
        runs: dict[str, dict[int, list[dict]]] = {k: {c: [] for c in levels} for k in setups}
        for _ in range(a.passes):
            for c in levels:
                for name, url in setups.items():
                    r = level(url, c, 2 * c, a.max_tokens)
                    runs[name][c].append(r)
                    print(json.dumps({"setup": name, "concurrency": c, **r}), file=sys.stderr,
                          flush=True)
    finally:
        for p in reversed(procs):
            p.stop()
    out = {"machine": where, "runs": runs}
    print(json.dumps(out, indent=2))
    if a.write:
        write_section("replicas", render(out, a, levels))


def render(out: dict, a: argparse.Namespace, levels: list[int]) -> str:
    def rate(rs: list[dict]) -> float:
        return sum(r["tokens"] for r in rs) / max(sum(r["seconds"] for r in rs), 1e-9)

    runs = out["runs"]
    lines = ["| setup | " + " | ".join(f"c={c} tok/s" for c in levels)
             + " | per-pass tok/s | requests per worker | errors |",
             "|---|" + "---:|" * len(levels) + "---|---|---:|"]
    tok = {name: {c: rate(rs[c]) for c in levels} for name, rs in runs.items()}
    for name, rs in runs.items():
        passes = "; ".join(" / ".join(f"{r['tokens'] / r['seconds']:.0f}" for r in rs[c])
                           for c in levels)
        per_worker: dict[str, int] = {}
        for c in levels:
            for r in rs[c]:
                for w, n in r["workers"].items():
                    per_worker[w] = per_worker.get(w, 0) + n
        split = " / ".join(str(n) for n in per_worker.values()) if len(per_worker) > 1 else "-"
        errors = sum(r["errors"] for c in levels for r in rs[c])
        lines.append(f"| {name} | " + " | ".join(f"**{tok[name][c]:.0f}**" for c in levels)
                     + f" | {passes} | {split} | {errors} |")
    two = "2 workers x 1 thread, via gateway"
    one = "1 worker x 1 thread, via gateway"
    big = "1 worker x 2 threads, via gateway"
    verdict = "; ".join(
        f"c={c}: 2 x 1-thread workers {tok[two][c] / tok[one][c]:.2f}x one 1-thread worker, "
        f"{tok[two][c] / tok[big][c]:.2f}x one 2-thread worker" for c in levels)
    return f"""## Replicas: 1 vs 2 one-thread llama workers vs one two-thread worker

Command: `{command_line()}`{BR}
Machine: {out['machine']}.

Real llama.cpp workers (SmolLM2-135M Q4_1, `--parallel 8 --ctx-size 1024` each): A and B
with `--threads 1`, C with `--threads 2`; gateways in front of A, of A + B, and of C.
All up at once and measured in turn (round robin over setups, {a.passes} passes), so
background load weighs on each alike. Load: `corral bench` closed loop, 2 x c streamed
chat completions of {a.max_tokens} greedy tokens per measurement, distinct prompts
(`Request i. {PROMPT}`); tok/s = output tokens / wall time summed over the passes. The
2-core box also runs the gateway and the load generator, so 2 threads of model compute
already oversubscribe it.

{chr(10).join(lines)}

Verdict (no numeric goal in issue 9; through the gateway): {verdict}.
"""


if __name__ == "__main__":
    main()
