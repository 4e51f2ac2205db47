"""The gateway's parts, wired once: what every route reaches through `app.state.gateway`.

Its own module (not app.py) so the routes in `gateway/api/` can name its type without
importing the app that includes them: dependencies point one way, app → api → core →
(registry, placer, upstream, ...).
"""

from __future__ import annotations

import time

from gateway.admission import Admission
from gateway.affinity import Affinity
from gateway.auth import Auth
from gateway.budgets import Budgets
from gateway.config import GatewayConfig
from gateway.hostload import HostWatch
from gateway.keys import KeyStore
from gateway.lifecycle import Lifecycle
from gateway.limits import Limiter
from gateway.metrics import Metrics
from gateway.placer import Placer
from gateway.registry import Registry
from gateway.responses.store import ResponseStore
from gateway.routing import Router
from gateway.state import SharedState, make_state
from gateway.topology import Topology
from gateway.upstream import Upstream
from gateway.usage import Usage


class Gateway:
    """Everything the routes need, on `app.state.gateway`."""

    def __init__(self, cfg: GatewayConfig, state: SharedState | None = None) -> None:
        self.cfg = cfg
        self.started = int(time.time())
        self.state = state or make_state(cfg.redis_url)
        redis = self.state.redis_client
        self.keys = KeyStore(redis)
        self.auth = Auth(cfg, self.keys)
        self.registry = Registry(cfg, self.state)
        self.metrics = Metrics(self.registry)
        self.router = Router(self.registry, cfg.worker_queue_allowance, cfg.affinity_slack,
                             cfg.cost_routing, cfg.worker_queue_seconds)
        self.admission = Admission(cfg, self.registry, self.router, self.metrics)
        self.upstream = Upstream(cfg, self.registry, self.admission, self.metrics)
        if cfg.affinity:
            self.upstream.affinity = Affinity(cfg, self.state)
        self.topology = Topology(
            lambda: {w.id: w.url for w in self.registry.workers.values()}, cfg.cluster_token)
        self.placer = Placer(cfg, self.registry, self.topology)
        # On demand: requests wait for a catalogued model to load; the placer sees them.
        self.admission.loadable = self.placer.loadable
        self.placer.demand.queued = self.admission.waiting
        self.placer.fail_waiting = self.admission.fail
        self.metrics.collector.placer = self.placer
        self.lifecycle = Lifecycle(cfg, self.registry, self.admission, self.placer,
                                   self.metrics)
        self.hosts = HostWatch(self.registry, max(cfg.probe_interval, 0.5))
        self.limits = Limiter(redis)
        self.budgets = Budgets(redis)
        self.usage = Usage(self.metrics.prom, [k.user for k in cfg.api_keys], redis)
        self.responses = ResponseStore(redis, cfg.responses_ttl, cfg.responses_max_bytes,
                                       cfg.responses_max_entries)

    async def start(self) -> None:
        await self.keys.start()
        await self.budgets.start()
        await self.registry.start()
        await self.topology.start()
        await self.placer.start()
        await self.lifecycle.start()
        await self.hosts.start()
        await self.limits.start()
        await self.usage.start()

    async def stop(self) -> None:
        await self.hosts.stop()
        await self.lifecycle.stop()
        await self.placer.stop()
        await self.topology.stop()
        await self.usage.stop()
        await self.limits.stop()
        await self.budgets.stop()
        await self.keys.stop()
        await self.registry.stop()
        await self.upstream.close()
        if self.upstream.affinity is not None:
            await self.upstream.affinity.close()
        await self.state.close()
