"""The gateway's app factory: wires shared state, registry, routing, admission and upstream."""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

from gateway import placer
from gateway.admission import Admission
from gateway.affinity import Affinity
from gateway.api import admin, cluster, embeddings, openai
from gateway.auth import Auth
from gateway.config import GatewayConfig
from gateway.guard import BodyGuard
from gateway.limits import Limiter
from gateway.metrics import Metrics
from gateway.placer import Placer
from gateway.registry import Registry
from gateway.routing import Router
from gateway.state import SharedState, make_state
from gateway.upstream import Upstream
from gateway.usage import Usage
from wire import http as errors

log = logging.getLogger("corral.gateway")


class Gateway:
    """Everything the routes need, on `app.state.gateway`."""

    def __init__(self, cfg: GatewayConfig, state: SharedState | None = None) -> None:
        self.cfg = cfg
        self.started = int(time.time())
        self.state = state or make_state(cfg.redis_url)
        self.auth = Auth(cfg)
        self.registry = Registry(cfg, self.state)
        self.metrics = Metrics(self.registry)
        self.router = Router(self.registry, cfg.worker_queue_allowance, cfg.affinity_slack)
        self.admission = Admission(cfg, self.registry, self.router, self.metrics)
        self.upstream = Upstream(cfg, self.registry, self.admission, self.metrics)
        if cfg.affinity:
            self.upstream.affinity = Affinity(cfg, self.state)
        self.placer = Placer(cfg, self.registry)
        redis = self.state.redis_client
        self.limits = Limiter(redis)
        self.usage = Usage(self.metrics.prom, [k.user for k in cfg.api_keys], redis)

    async def start(self) -> None:
        await self.registry.start()
        await self.placer.start()
        await self.limits.start()
        await self.usage.start()

    async def stop(self) -> None:
        await self.placer.stop()
        await self.usage.stop()
        await self.limits.stop()
        await self.registry.stop()
        await self.upstream.close()
        if self.upstream.affinity is not None:
            await self.upstream.affinity.close()
        await self.state.close()


def create_app(cfg: GatewayConfig) -> FastAPI:
    gw = Gateway(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(title="Corral gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.gateway = gw
    app.add_middleware(BodyGuard, max_body_bytes=cfg.max_body_bytes,
                       body_timeout=cfg.body_timeout)
    errors.install(app)
    app.include_router(openai.router)
    app.include_router(embeddings.router)
    app.include_router(cluster.router)
    app.include_router(admin.router)
    app.include_router(placer.router)
    try:  # the dashboard (`GET /`) is its own module, built separately
        dashboard = importlib.import_module("gateway.api.dashboard")
    except ModuleNotFoundError as exc:
        if exc.name != "gateway.api.dashboard":
            raise
    else:
        app.include_router(dashboard.router)
    openai.install_openapi(app)
    return app
