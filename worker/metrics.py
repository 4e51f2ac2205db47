"""Worker metrics (names in ../shared/CONTRACT.md), read from the engine at scrape time.

Nothing is counted per token on the hot path: a collector reads the engine's own counters
when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from worker.engine import Engine


class _Sum:
    """The engines of a worker holding several models, read as one (the contract's metric
    names carry no model label)."""

    def __init__(self, engines: list[Engine]) -> None:
        self.engines = engines
        self.slots_busy = sum(e.slots_busy for e in engines)
        self.queue_depth = sum(e.queue_depth for e in engines)
        self.ready = any(e.ready for e in engines)


class EngineCollector:
    def __init__(self, engines: Callable[[], list[Engine]] | Engine) -> None:
        self.engines = engines if callable(engines) else (lambda: [engines])

    def collect(self) -> Iterator[Metric]:
        engines = self.engines()
        if len(engines) == 1:
            yield from self._one(engines[0])
            return
        yield from self._many(engines)

    def _many(self, engines: list[Engine]) -> Iterator[Metric]:
        s = _Sum(engines)
        yield GaugeMetricFamily("corral_worker_slots_busy", "Slots generating now.", s.slots_busy)
        yield GaugeMetricFamily("corral_worker_slots_total", "Slots.",
                                sum(e.backend.slots for e in engines))
        yield GaugeMetricFamily("corral_worker_queue_depth", "Requests waiting for a slot.",
                                s.queue_depth)
        yield GaugeMetricFamily("corral_worker_tokens_per_second",
                                "Measured single-stream decode speed (the first model's).",
                                engines[0].stats.tokens_per_second)
        yield GaugeMetricFamily("corral_worker_ready", "1 when the model is loaded.", s.ready)
        for name, attr, doc in (("requests", "requests", "Generations started."),
                                ("generated_tokens", "generated_tokens",
                                 "Completion tokens generated."),
                                ("prompt_tokens", "prompt_tokens", "Prompt tokens received.")):
            yield CounterMetricFamily(f"corral_worker_{name}", doc,
                                      sum(getattr(e.stats, attr) for e in engines))
        for name, key, doc in (("prompt_cache_hits", "prompt_cache_hits",
                                "Requests that reused a cached prompt prefix."),
                               ("prompt_cache_reused_tokens", "prompt_cache_reused_tokens",
                                "Prompt tokens served from the prompt cache instead of "
                                "prefilled.")):
            yield CounterMetricFamily(f"corral_worker_{name}", doc,
                                      sum(e.backend.stats().get(key, 0) for e in engines))
        yield from _llama_stats([e.backend.stats() for e in engines])

    def _one(self, e: Engine) -> Iterator[Metric]:
        b = e.backend.stats()
        yield GaugeMetricFamily("corral_worker_slots_busy", "Slots generating now.", e.slots_busy)
        yield GaugeMetricFamily("corral_worker_slots_total", "Slots.", e.backend.slots)
        yield GaugeMetricFamily(
            "corral_worker_queue_depth", "Requests waiting for a slot.", e.queue_depth
        )
        yield GaugeMetricFamily(
            "corral_worker_tokens_per_second",
            "Measured single-stream decode speed.",
            e.stats.tokens_per_second,
        )
        yield GaugeMetricFamily("corral_worker_ready", "1 when the model is loaded.", e.ready)
        yield CounterMetricFamily(
            "corral_worker_requests", "Generations started.", e.stats.requests
        )
        yield CounterMetricFamily(
            "corral_worker_generated_tokens", "Completion tokens generated.",
            e.stats.generated_tokens,
        )
        yield CounterMetricFamily(
            "corral_worker_prompt_tokens", "Prompt tokens received.", e.stats.prompt_tokens
        )
        yield CounterMetricFamily(
            "corral_worker_prompt_cache_hits",
            "Requests that reused a cached prompt prefix.",
            b.get("prompt_cache_hits", 0),
        )
        yield CounterMetricFamily(
            "corral_worker_prompt_cache_reused_tokens",
            "Prompt tokens served from the prompt cache instead of prefilled.",
            b.get("prompt_cache_reused_tokens", 0),
        )
        yield from _llama_stats([b])


def _llama_stats(stats: list[dict[str, int]]) -> Iterator[Metric]:
    """The llama backend's host-memory prompt cache and drafts (0 where there are none)."""
    def total(key: str) -> int:
        return sum(s.get(key, 0) for s in stats)

    yield CounterMetricFamily(
        "corral_worker_host_cache_restores",
        "Prompts whose KV came back from the host-memory prompt cache.",
        total("host_cache_restores"))
    yield CounterMetricFamily(
        "corral_worker_host_cache_restored_tokens",
        "Prompt tokens restored from host memory instead of prefilled.",
        total("host_cache_restored_tokens"))
    yield GaugeMetricFamily("corral_worker_host_cache_bytes",
                            "Host memory held by the prompt cache's KV states.",
                            total("host_cache_bytes"))
    # Speculative drafts (llama_lookup.py, llama_history.py): whether they pay is the
    # share kept; the history's count says how often earlier answers drafted.
    yield CounterMetricFamily(
        "corral_worker_draft_tokens", "Draft tokens verified (prompt lookup and history).",
        total("lookup_drafted_tokens"))
    yield CounterMetricFamily(
        "corral_worker_draft_accepted_tokens", "Draft tokens kept: steps saved.",
        total("lookup_accepted_tokens"))
    yield CounterMetricFamily(
        "corral_worker_history_drafts", "Drafts taken from earlier requests' answers.",
        total("lookup_history_drafts"))
    # The decode thread's time: in llama_decode, and in Python from one decode to the
    # next while there is work (sampling, detokenizing, handing text over, waiting for the
    # GIL). The second over their sum is the engine's own overhead.
    yield CounterMetricFamily(
        "corral_worker_decode_seconds", "Time in llama_decode.", total("decode_us") / 1e6)
    yield CounterMetricFamily(
        "corral_worker_step_gap_seconds",
        "Time between two llama_decode calls while busy: the loop's Python.",
        total("step_gap_us") / 1e6)


def registry_for(engines: Callable[[], list[Engine]] | Engine) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=True)
    reg.register(EngineCollector(engines))
    return reg
