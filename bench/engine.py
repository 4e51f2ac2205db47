"""Real-model engine benchmark: both backends and llama-cpp-python's own server, one run.

    .venv/bin/python bench/engine.py [--write] [--levels 1,2,4,8] [--rounds 3]

Three servers on the same GGUF (SmolLM2-135M Q4_1) and box, all up at once and measured in
turn, round robin per concurrency level, so that other load on the box weighs on each alike:

- `corral worker --backend llama --parallel 8 --threads 2` (continuous batching),
- `corral worker --backend openvino --parallel 8 --threads 2 --device CPU`,
- `python -m llama_cpp.server --n_threads 2 --interrupt_requests False` (one request at a
  time; without that flag a new request cancels the one streaming).

1. Aggregate output tokens/s at each concurrency: `corral bench` closed loop (streamed chat
   completions, distinct prompts, greedy, `--max-tokens`), `--rounds` requests per client.
2. Second-turn TTFT over a ~1,000-token history, cached vs cold (bench/openvino_bench.py's
   `second_turn_ttft`: turn 1 fills the cache, turn 2 is timed; cold is the same shape over
   a history never seen). Medians of `--ttft-runs` pairs.

Needs `pip install sse-starlette starlette-context pydantic-settings` for llama_cpp.server.
`--write` replaces the `engine` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from common import (
    HOST,
    MODEL,
    LoadSpec,
    Proc,
    bench,
    command_line,
    free_port,
    machine,
    start_worker,
    write_section,
)
from openvino_bench import second_turn_ttft

from worker.models import resolve

BR = "  "  # Markdown line break
# Runs to max_tokens on all three servers at temperature 0 (the counting prompt of
# openvino_bench.py stops after ~7 tokens in llama.cpp's chat template).
PROMPT = "Write a long essay about the history of Rome."


def start_llama_cpp_server(threads: int, ctx: int, procs: list[Proc]) -> Proc:
    port = free_port()
    proc = Proc([sys.executable, "-m", "llama_cpp.server", "--model", str(resolve(MODEL)[1]),
                 "--model_alias", MODEL, "--n_threads", str(threads), "--n_ctx", str(ctx),
                 "--interrupt_requests", "False", "--host", HOST, "--port", str(port)],
                name=f"llama-cpp-server-{port}").start()
    procs.append(proc)
    proc.url = f"http://{HOST}:{port}"  # type: ignore[attr-defined]
    proc.wait_http(f"{proc.url}/v1/models", timeout=120)  # type: ignore[attr-defined]
    return proc


def level(url: str, c: int, requests: int, max_tokens: int) -> dict:
    spec = LoadSpec(base_url=url, model=MODEL, requests=requests, concurrency=c,
                    max_tokens=max_tokens, stream=True, timeout=300, distinct_prompts=True,
                    prompt=PROMPT, extra_body={"temperature": 0})
    s, _ = bench(spec)
    return {"tok_s": s["output_tokens_per_second"], "tokens": s["output_tokens"],
            "errors": s["errors"], "ttft_p50_ms": (s.get("ttft_ms") or {}).get("p50"),
            "tokens_source": s.get("tokens_source")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=3, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="llama_cpp.server's --n_threads")
    ap.add_argument("--corral-threads", type=int, default=os.cpu_count() or 1,
                    help="--threads of both Corral workers (default: every core; without "
                    "it the two, on one host, would split the cores between them)")
    ap.add_argument("--ttft-runs", type=int, default=5)
    ap.add_argument("--notes", type=int, default=40, help="history size (~25 tokens each)")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    where = machine()
    procs: list[Proc] = []
    try:
        threads = ["--threads", str(a.corral_threads)]
        llama = start_worker("--parallel", "8", *threads, "--ctx-size", "2048",
                             backend="llama", wait=False)
        procs.append(llama.proc)
        ov = start_worker("--parallel", "8", *threads, "--device", "CPU", "--ctx-size", "2048",
                          backend="openvino", wait=False)
        procs.append(ov.proc)
        lcs = start_llama_cpp_server(a.threads, 2048, procs)
        llama.wait_ready()
        ov.wait_ready()
        targets = {"llama": llama.url, "openvino": ov.url,
                   "llama_cpp.server": lcs.url}  # type: ignore[attr-defined]
        for url in targets.values():  # warm up
            level(url, 1, 1, 8)
        rows: dict[str, dict[int, dict]] = {k: {} for k in targets}
        for c in levels:
            for name, url in targets.items():
                rows[name][c] = level(url, c, c * a.rounds, a.max_tokens)
                print(json.dumps({"target": name, "concurrency": c, **rows[name][c]}),
                      file=sys.stderr, flush=True)
        ttft = {}
        for name, url in targets.items():
            ttft[name] = second_turn_ttft(url, a.ttft_runs, a.notes)
    finally:
        for p in reversed(procs):  # by PID (each Proc its own process group)
            p.stop()
    out = {"machine": where, "throughput": rows, "second_turn": ttft}
    print(json.dumps(out, indent=2))
    if a.write:
        write_section("engine", render(out, a, levels))


def render(out: dict, a: argparse.Namespace, levels: list[int]) -> str:
    rows, ttft = out["throughput"], out["second_turn"]
    head = "| server | " + " | ".join(f"c={c} tok/s" for c in levels) + \
        " | c=4 / c=1 | TTFT p50 at c=1 / c=8 ms | errors |"
    lines = [head, "|---|" + "---:|" * (len(levels) + 3)]
    ratio: dict[str, float] = {}
    for name, r in rows.items():
        one, four = r.get(1, {}).get("tok_s"), r.get(4, {}).get("tok_s")
        ratio[name] = four / one if one and four else float("nan")
        t1 = r.get(levels[0], {}).get("ttft_p50_ms")
        t8 = r.get(levels[-1], {}).get("ttft_p50_ms")
        lines.append(f"| {name} | " + " | ".join(f"{r[c]['tok_s']:.0f}" for c in levels)
                     + f" | **{ratio[name]:.2f}x** | {t1:.0f} / {t8:.0f} | "
                     + f"{sum(r[c]['errors'] for c in levels)} |")
    tt = ["| server | history tokens | TTFT cached ms | TTFT cold ms | cold / cached |",
          "|---|---:|---:|---:|---:|"]
    for name, t in ttft.items():
        tt.append(f"| {name} | {t['history_tokens']} | {t['ttft_cached_ms']:.0f} | "
                  f"{t['ttft_cold_ms']:.0f} | **{t['speedup']:.1f}x** |")
    lt = rows["llama"].get(levels[-1], {}).get("tok_s", 0)
    lc = rows["llama_cpp.server"].get(levels[-1], {}).get("tok_s", 0) or 1
    met = [n for n in ("llama", "openvino") if ratio[n] >= 2]
    ttft_met = [n for n in ("llama", "openvino") if ttft[n]["speedup"] >= 5]
    src = ", ".join(f"{n}: {r[levels[0]].get('tokens_source')}" for n, r in rows.items())
    r4 = {n: f"{ratio[n]:.3f}x" for n in ("llama", "openvino")}
    return f"""## Engine: continuous batching and the prompt cache, real model

Command: `{command_line()}`{BR}
Machine: {out['machine']}.

SmolLM2-135M-Instruct Q4_1 (the bundled GGUF) on three servers, all up at once and measured
in turn at each level (round robin, so background load weighs on each alike): Corral's
llama backend (`--parallel 8 --threads {a.corral_threads}`), Corral's openvino backend
(`--parallel 8 --threads {a.corral_threads} --device CPU`), and llama-cpp-python's own
server (`python -m llama_cpp.server --n_threads {a.threads} --interrupt_requests False`,
one request at a time).
Load: `corral bench` closed loop at concurrency c, {a.rounds} x c streamed chat completions of
{a.max_tokens} greedy tokens, distinct prompts (`Request i. {PROMPT}`, which runs to the
limit on all three); tok/s = output tokens / wall time of the level (tokens counted from
{src}).

{chr(10).join(lines)}

Second turn over a ~1,000-token history (`{a.notes}` notes), median of {a.ttft_runs} pairs:
*cached* sends turn 1 first and times turn 2's first token; *cold* times the same shape
over a history never seen.

{chr(10).join(tt)}

Verdict: 4 streams >= 2x one stream (goal): llama {r4["llama"]}, openvino {r4["openvino"]}, \
{"met by " + " and ".join(met) if met else "missed by both"}; Corral llama at c={levels[-1]} \
does {lt / lc:.1f}x llama_cpp.server's tok/s. Second turn >= 5x faster than cold (goal): \
{"met by " + " and ".join(ttft_met) if ttft_met else "missed"}.
"""


if __name__ == "__main__":
    os.environ.setdefault("NO_PROXY", "*")
    main()
