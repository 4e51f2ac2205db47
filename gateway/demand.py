"""Which catalogued models a placement round plans, and with how many replicas.

- A pinned model always, with its `min_replicas`.
- An unpinned one while it is in use: asked for (`touch`, at a request's start and end) or
  loaded (the moment it became served) less than `model_idle_ttl` ago, or with requests
  waiting for it; past that it drops out of the plan, and its workers unload it.
- One replica more each round a model is busy (requests wait in the gateway queue for it,
  or its workers' slots are all taken) once every replica it has serves, up to one per
  worker; one fewer after `model_idle_ttl` without being busy.
- A model that requests wait for while nothing serves it is `demanded`: the planner may
  evict the least recently used unpinned models for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from gateway.memory_need import MemoryNeed
from gateway.placement import ModelSpec, Placement

if TYPE_CHECKING:
    from gateway.catalog import Catalog
    from gateway.config import GatewayConfig
    from gateway.registry import Registry

log = logging.getLogger("corral.gateway")


class Demand:
    def __init__(self, cfg: GatewayConfig, catalog: Catalog, registry: Registry) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.registry = registry
        self.queued: Callable[[str], int] = lambda model: 0  # set by core: admission's
        self.last_used: dict[str, float] = {}  # model -> monotonic time of its last use
        self.extra: dict[str, int] = {}  # model -> replicas added while it was busy
        self._calm_since: dict[str, float] = {}
        self._served: set[str] = set()  # catalogued models some worker served last round

    def touch(self, model: str) -> bool:
        """A request for `model`; True when it is catalogued and served nowhere (the
        placer should plan now)."""
        if model not in self.catalog:
            return False
        self.last_used[model] = time.monotonic()
        return not self.registry.by_model.get(model)

    def wanted(self, now: float, running: set[str]) -> list[str]:
        """The models this round plans: pinned ones, and unpinned ones in use."""
        ttl = self.cfg.model_idle_ttl
        served = {m for m in self.catalog if self.registry.by_model.get(m)}
        for m in served - self._served:  # just loaded: its idle time counts from now
            self.last_used[m] = max(self.last_used.get(m, now), now)
        self._served = served
        out = []
        for m in self.catalog.values():
            if m.name in running and m.name not in self.last_used:
                self.last_used[m.name] = now  # found running (a gateway restart): from now
            if m.pin or now - self.last_used.get(m.name, -1e18) < ttl or self.queued(m.name):
                out.append(m.name)
            elif m.name in running:
                log.warning("model %s: no request for %.0f s, unloading it", m.name, ttl)
        return out

    def busy(self, model: str) -> bool:
        """Served, and still more asked of it than its workers take (waiting for the first
        load is not busy: one more replica would not come sooner)."""
        ws = self.registry.by_model.get(model) or []
        if not ws:
            return False
        return self.queued(model) > 0 or all(w.load >= w.slots_total for w in ws)

    def specs(self, names: Iterable[str], needs: dict[str, MemoryNeed], now: float,
              workers: int, current: list[Placement]) -> list[ModelSpec]:
        out = []
        for name in names:
            m = self.catalog.files[name]
            base = m.min_replicas if m.pin else 1
            extra = self.extra.get(name, 0)
            if self.busy(name):
                self._calm_since.pop(name, None)
                placed = sum(1 for p in current if p.model == name)
                serving = len(self.registry.by_model.get(name) or ())
                if serving >= placed >= base + extra and placed < workers:
                    extra += 1  # every replica serves and it is still busy: one more
            elif extra and now - self._calm_since.setdefault(name, now) \
                    >= self.cfg.model_idle_ttl:
                extra, self._calm_since[name] = extra - 1, now
            self.extra[name] = extra
            used = self.last_used.get(name, 0.0)
            demanded = bool(self.queued(name)) and not self.registry.by_model.get(name)
            if demanded:
                used = now  # requests wait for it: the most recently used of all
            out.append(ModelSpec(name, needs[name].total, base + extra, m.pin, used,
                                 demanded))
        return out
