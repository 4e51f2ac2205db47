"""Gateway metrics, with the contract's names (../shared/CONTRACT.md → docs).

Per-worker gauges are read from the registry at scrape time by a collector, so the hot path
does no per-worker bookkeeping and departed workers vanish from the output by themselves.
The `model` label takes only models some worker has served or the config names; anything
else is counted as `other`, so clients cannot blow up the label cardinality.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.registry import Registry
from gateway.worker_record import STATES

if TYPE_CHECKING:
    from gateway.placer import Placer

disable_created_metrics()  # no `_created` series: half the scrape size, no loss

WORKER_STATES = STATES  # corral_worker_state's `state` values
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_WAIT = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _WorkerCollector:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.queue_length: Callable[[], int] | None = None
        self.placer: Placer | None = None

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("corral_worker_up", "1 when the worker is healthy.",
                               labels=["worker"])
        qd = GaugeMetricFamily("corral_worker_queue_depth", "Requests queued at the worker "
                               "(as last probed).", labels=["worker"])
        inf = GaugeMetricFamily("corral_inflight", "Requests this gateway has in flight on the "
                                "worker.", labels=["worker"])
        st = GaugeMetricFamily("corral_worker_state", "1 for the state the worker is in "
                               "(/cluster's), 0 for the others.", labels=["worker", "state"])
        for w in list(self.registry.workers.values()):
            up.add_metric([w.id], 1.0 if w.healthy else 0.0)
            qd.add_metric([w.id], w.queue_depth)
            inf.add_metric([w.id], w.inflight)
            now = w.to_json()["state"]
            for s in WORKER_STATES:
                st.add_metric([w.id, s], 1.0 if s == now else 0.0)
        yield up
        yield st
        yield qd
        yield inf
        if self.queue_length is not None:
            yield GaugeMetricFamily("corral_queue_length", "Requests waiting in the gateway "
                                    "queue for a worker.", self.queue_length())
        if self.placer is not None:
            yield from _placement(self.placer)


def _placement(placer: Placer) -> Iterator[Metric]:
    """The placer's rounds, how many changed the plan (a flapping plan shows here), and the
    declared models it cannot place."""
    yield CounterMetricFamily("corral_placement_rounds", "Placement rounds planned.",
                              placer.rounds)
    yield CounterMetricFamily("corral_placement_changes", "Placement rounds that changed "
                              "the plan.", placer.changes)
    un = GaugeMetricFamily("corral_model_unplaceable", "1 for a declared model that fits no "
                           "worker and no split of them.", labels=["model"])
    for name in sorted(placer.catalog):
        un.add_metric([name], 1.0 if name in placer.unplaceable else 0.0)
    yield un


class Metrics:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.prom = CollectorRegistry(auto_describe=True)
        r = self.prom
        self.requests = Counter("corral_requests_total", "Requests answered, by HTTP status.",
                                ["model", "status"], registry=r)
        self.duration = Histogram("corral_request_duration_seconds",
                                  "Seconds from request to the last byte.", ["model"],
                                  buckets=_LATENCY, registry=r)
        self.ttft = Histogram("corral_time_to_first_token_seconds",
                              "Seconds from request to the first generated token.", ["model"],
                              buckets=_TTFT, registry=r)
        self.tokens = Counter("corral_tokens_total", "Tokens processed.", ["model", "kind"],
                              registry=r)
        self.retries = Counter("corral_retries_total", "Requests retried on another worker.",
                               ["reason"], registry=r)
        self.rejected = Counter("corral_rejected_total", "Requests refused by the gateway.",
                                ["reason"], registry=r)
        self.queue_wait = Histogram("corral_queue_wait_seconds",
                                    "Seconds a request waited in the gateway queue.",
                                    buckets=_WAIT, registry=r)
        self.upstream_errors = Counter("corral_upstream_errors_total",
                                       "Failures talking to workers.", ["kind"], registry=r)
        self.collector = _WorkerCollector(registry)
        r.register(self.collector)

    def model_label(self, model: str) -> str:
        return model if model in self.registry.known_models else "other"

    def finished(self, model: str, status: int, seconds: float, ttft: float | None = None,
                 prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        m = self.model_label(model)
        self.requests.labels(m, str(status)).inc()
        self.duration.labels(m).observe(seconds)
        if ttft is not None:
            self.ttft.labels(m).observe(ttft)
        if prompt_tokens:
            self.tokens.labels(m, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(m, "completion").inc(completion_tokens)
