"""Constrained vs free decoding speed, real model, both backends.

    .venv/bin/python bench/structured.py [--write] [--rounds 3] [--max-tokens 128]

One worker per backend (`--parallel 4`), measured in turn. Each stream's decode rate is
(completion tokens - 1) / (last chunk - first chunk): prefill and TTFT are left out, so
what is compared is the per-token cost. Scenarios, `--rounds` times each (medians):

- free alone: one streamed chat answer, free text, greedy, to `--max-tokens`;
- constrained alone: the same with `response_format` json_schema (strict), a schema whose
  one string field needs more than `--max-tokens` to close, so both run to the limit;
- 4 free: four free streams at once (the baseline for "free streams beside");
- constrained + 3 free: one constrained stream and three free ones at once.

Goals (issue 14): constrained within 15% of free, alone and beside others, and the free
streams beside a constrained one as fast as beside free ones. `--write` replaces the
`structured` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import httpx
import orjson
from common import MODEL, command_line, machine, start_worker, write_section

PROMPT = "Write a long essay about the history of Rome."
SCHEMA = {"type": "object",
          "properties": {"essay": {"type": "string", "minLength": 1200}},
          "required": ["essay"], "additionalProperties": False}


def one_stream(url: str, max_tokens: int, constrained: bool, i: int) -> float:
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Request {i}. {PROMPT}"}]}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "essay", "schema": SCHEMA, "strict": True}}
    first = last = 0.0
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ev = orjson.loads(line[6:])
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            elif ev["choices"] and ev["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    if tokens < max_tokens or last <= first:
        raise RuntimeError(f"stream stopped early ({tokens} tokens)")
    return (tokens - 1) / (last - first)


def scenario(url: str, max_tokens: int, kinds: list[bool], base: int) -> list[float]:
    """Runs streams of `kinds` (True = constrained) at once; their decode rates."""
    out: list[float] = [0.0] * len(kinds)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            out[k] = one_stream(url, max_tokens, kinds[k], base + k)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(kinds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def measure(url: str, rounds: int, max_tokens: int) -> dict[str, float]:
    res: dict[str, list[float]] = {k: [] for k in
                                   ("free", "con", "free4", "con_beside", "free_beside")}
    scenario(url, 8, [False, True], 0)  # warm-up: grammar code paths, caches
    for r in range(rounds):
        b = 100 * (r + 1)
        res["free"] += scenario(url, max_tokens, [False], b)
        res["con"] += scenario(url, max_tokens, [True], b + 10)
        res["free4"] += scenario(url, max_tokens, [False] * 4, b + 20)
        mix = scenario(url, max_tokens, [True, False, False, False], b + 30)
        res["con_beside"].append(mix[0])
        res["free_beside"] += mix[1:]
    return {k: statistics.median(v) for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--backends", default="llama,openvino")
    ap.add_argument("--attach", action="append", default=[], metavar="BACKEND=URL",
                    help="measure a worker already running (same flags as below)")
    args = ap.parse_args()
    attached = dict(a.split("=", 1) for a in args.attach)
    where = machine()
    rows = []
    for backend in args.backends.split(","):
        if backend in attached:
            m = measure(attached[backend], args.rounds, args.max_tokens)
        else:
            extra = ("--threads", "2") if backend == "llama" else ("--device", "CPU")
            w = start_worker("--parallel", "4", *extra, backend=backend)
            try:
                m = measure(w.url, args.rounds, args.max_tokens)
            finally:
                w.proc.stop()
        print(backend, {k: round(v, 1) for k, v in m.items()}, flush=True)
        rows.append((backend, m))
    lines = [
        "## Structured outputs: constrained vs free decoding",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {where}.",
        "",
        "One worker per backend (`--parallel 4`; llama `--threads 2`, openvino `--device "
        "CPU`), SmolLM2-135M Q4_1. Streamed greedy chat answers of "
        f"{args.max_tokens} tokens; a stream's tok/s is its decode rate ((tokens - 1) / "
        "(last chunk - first chunk)), median over "
        f"{args.rounds} rounds. *Constrained*: `response_format` json_schema strict "
        "(one string field that cannot close before the limit). *Beside*: the same "
        "stream with three free streams running at once.",
        "",
        "| backend | free alone | constrained alone | ratio | 4 free, each | constrained "
        "beside 3 free | ratio | free beside a constrained one | vs beside free |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for backend, m in rows:
        alone = m["con"] / m["free"]
        beside = m["con_beside"] / m["free4"]
        free_effect = m["free_beside"] / m["free4"]
        lines.append(
            f"| {backend} | {m['free']:.1f} | {m['con']:.1f} | **{alone:.2f}x** | "
            f"{m['free4']:.1f} | {m['con_beside']:.1f} | **{beside:.2f}x** | "
            f"{m['free_beside']:.1f} | **{free_effect:.2f}x** |")
        ok = alone >= 0.85 and beside >= 0.85 and free_effect >= 0.95
        verdicts.append(f"{backend} {'met' if ok else 'not met'}")
    lines += ["", "Goal: constrained within 15% of free (ratio >= 0.85) alone and beside, "
              "free streams unaffected (>= 0.95x): " + "; ".join(verdicts) + "."]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section("structured", body)


if __name__ == "__main__":
    main()
