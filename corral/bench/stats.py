"""From per-request results to one summary: rates, percentiles, errors.

Times in the summary are milliseconds (keys end in `_ms`); rates are per second.
Percentiles interpolate linearly between order statistics (numpy's default method), so
a p99 over 50 requests is an honest interpolation, not the maximum.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

from corral.bench.load import LoadSpec, Result

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of already-sorted values, linear interpolation."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac


def distribution(values: Iterable[float], scale: float = 1000.0) -> dict[str, float] | None:
    """count, mean, min, p50/p90/p99, max of `values` (seconds) in ms; None when empty."""
    v = sorted(x * scale for x in values)
    if not v:
        return None
    out: dict[str, float] = {"count": len(v), "mean": round(sum(v) / len(v), 3),
                             "min": round(v[0], 3)}
    for q in PERCENTILES:
        out[f"p{q}"] = round(percentile(v, q), 3)
    out["max"] = round(v[-1], 3)
    return out


def summarize(spec: LoadSpec, results: list[Result], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors = Counter(r.error or "unknown" for r in results if not r.ok)
    messages: dict[str, str] = {}
    for r in results:
        if not r.ok and r.error and r.error not in messages:
            messages[r.error] = r.message or ""
    tokens = sum(r.output_tokens for r in ok)
    from_usage = sum(1 for r in ok if r.tokens_from_usage)
    source = ("usage" if from_usage == len(ok) else
              ("chunks" if spec.stream else "estimate") if from_usage == 0 else "mixed")
    dur = max(duration, 1e-9)
    workers = Counter(r.worker for r in ok if r.worker)
    return {
        "base_url": spec.base_url,
        "model": spec.model,
        "mode": spec.mode,
        "concurrency": None if spec.rate else (spec.concurrency or 1),
        "rate": spec.rate,
        "stream": spec.stream,
        "max_tokens": spec.max_tokens,
        "distinct_prompts": spec.distinct_prompts,
        "timeout_s": spec.timeout,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "errors_by_kind": dict(sorted(errors.items())),
        "error_examples": messages,
        # Requests sent again after a server closed a kept-alive connection unannounced.
        "stale_connection_retries": sum(r.stale_retries for r in results),
        "duration_s": round(duration, 4),
        "requests_per_second": round(len(ok) / dur, 3),
        "output_tokens": tokens,
        "output_tokens_per_second": round(tokens / dur, 2),
        "tokens_source": source if ok else None,
        "latency_ms": distribution(r.latency for r in ok),
        "ttft_ms": distribution(r.ttft for r in ok if r.ttft is not None),
        "itl_ms": distribution(x for r in ok for x in r.itls),
        "tpot_ms": distribution(t for r in ok if (t := r.tpot) is not None),
        "client_lag_ms": distribution(r.lag for r in results) if spec.rate else None,
        "workers": dict(sorted(workers.items())),
    }
