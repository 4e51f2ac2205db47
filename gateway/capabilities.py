"""What each model can do, from its workers' `/status`: the `capabilities` lists that
`/v1/models` entries and `/cluster` carry (extra fields OpenAI clients ignore)."""

from __future__ import annotations

from typing import Any

from gateway.registry import Registry
from gateway.routing import EMBEDDINGS, capable
from gateway.worker_record import Worker

#: Every worker serving a model generates: chat and legacy completions.
GENERATION = ("chat", "completions")


def of_worker(w: Worker) -> list[str]:
    if not w.models:
        return []
    return [*GENERATION, "embeddings"] if capable(w, EMBEDDINGS) else list(GENERATION)


def of_model(registry: Registry, model: str) -> list[str]:
    """The union over the model's healthy workers (all its workers when none is healthy)."""
    ws = registry.by_model.get(model) or [
        w for w in registry.workers.values() if model in w.models]
    caps: set[str] = set()
    for w in ws:
        caps.update(of_worker(w))
    return [c for c in (*GENERATION, "embeddings") if c in caps]


def models(registry: Registry) -> list[dict[str, Any]]:
    """`/cluster`'s per-model view: capabilities and the workers serving it."""
    return [{"id": m, "capabilities": of_model(registry, m),
             "workers": sorted(w.id for w in registry.by_model.get(m, ()))}
            for m in registry.models()]
