"""`corral bench`: a load generator for any OpenAI-compatible endpoint.

    corral bench --base-url http://127.0.0.1:8000 --concurrency 8 --requests 200 --stream

Modules: `load` (requests, timing, SSE parsing), `stats` (percentiles, the summary),
`report` (rich table), `plot` (PNG, needs the `bench` extra).

Exit status: 0 when the run finished and was reported, whether or not requests failed
(failures are counted in `errors` and `errors_by_kind`); 1 when `--plot` was asked for
without matplotlib installed; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys

import orjson

from corral.bench.load import LoadSpec, Result, Runner
from corral.bench.stats import summarize

__all__ = ["LoadSpec", "Result", "Runner", "bench", "run", "summarize"]


def bench(spec: LoadSpec) -> tuple[dict, list[Result]]:
    """Runs one load and returns (summary, per-request results)."""
    runner = Runner(spec)
    results = runner.run()
    return summarize(spec, results, runner.duration), results


def spec_from_args(a: argparse.Namespace) -> LoadSpec:
    concurrency = a.concurrency if a.concurrency is not None else (None if a.rate else 1)
    return LoadSpec(
        base_url=a.base_url, model=a.model, requests=a.requests, concurrency=concurrency,
        rate=a.rate, max_tokens=a.max_tokens, prompt=a.prompt, stream=a.stream,
        api_key=a.api_key if a.api_key and a.api_key != "none" else None,
        timeout=getattr(a, "timeout", 60.0), seed=getattr(a, "seed", 0),
        distinct_prompts=getattr(a, "distinct_prompts", False),
    )


def run(a: argparse.Namespace) -> int:
    try:
        spec = spec_from_args(a)
        runner = Runner(spec)
    except ValueError as exc:
        print(f"corral bench: {exc}", file=sys.stderr)
        return 2
    if a.plot:
        from corral.bench import plot

        if not plot.available():
            print(f"corral bench: {plot.INSTALL_HINT}", file=sys.stderr)
            return 1
    results = runner.run()
    summary = summarize(spec, results, runner.duration)
    if a.plot:
        from corral.bench import plot

        plot.write(a.plot, results, summary)
        summary["plot"] = a.plot
    if a.json:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    else:
        from corral.bench.report import render

        render(summary)
        if a.plot:
            print(f"plot written to {a.plot}")
    return 0
