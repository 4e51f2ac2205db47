"""Worker metrics (names in ../shared/CONTRACT.md), read from the engine at scrape time.

Nothing is counted per token on the hot path: a collector reads the engine's own counters
when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from worker.engine import Engine


class EngineCollector:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        e = self.engine
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


def registry_for(engine: Engine) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=True)
    reg.register(EngineCollector(engine))
    return reg
