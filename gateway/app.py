"""The gateway's app factory: the parts (`core.Gateway`) behind the routes (`api/`)."""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from gateway.api import admin, cluster, embeddings, keys, lifecycle, models, openai, responses
from gateway.config import GatewayConfig
from gateway.core import Gateway
from gateway.guard import BodyGuard
from wire import http as errors
from wire import mdns

log = logging.getLogger("corral.gateway")

__all__ = ["Gateway", "create_app"]  # Gateway: its old home, for callers that import it here


async def advertise(cfg: GatewayConfig) -> mdns.Advertiser | None:
    """The gateway's mDNS record, when bound off loopback or asked; a failure to
    advertise is logged, never fatal (workers can still --join)."""
    if not mdns.wanted(cfg.host, cfg.discover):
        return None
    try:
        adv = mdns.Advertiser(cfg.host, cfg.port, cfg.cluster_name)
        await adv.start()
    except OSError as exc:
        log.warning("mDNS advertising failed (workers must --join): %s", exc)
        return None
    return adv


def create_app(cfg: GatewayConfig) -> FastAPI:
    gw = Gateway(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        adv = await advertise(cfg)
        try:
            yield
        finally:
            if adv is not None:
                await adv.stop()
            await gw.stop()

    app = FastAPI(title="Corral gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # served by api/cluster.py, closed like /cluster
    app.state.gateway = gw
    app.add_middleware(BodyGuard, max_body_bytes=cfg.max_body_bytes,
                       body_timeout=cfg.body_timeout)
    errors.install(app)
    app.include_router(openai.router)
    app.include_router(embeddings.router)
    app.include_router(responses.router)
    app.include_router(cluster.router)
    app.include_router(lifecycle.router)
    app.include_router(admin.router)
    app.include_router(keys.router)
    app.include_router(models.router)
    try:  # the dashboard (`GET /`) is its own module, built separately
        dashboard = importlib.import_module("gateway.api.dashboard")
    except ModuleNotFoundError as exc:
        if exc.name != "gateway.api.dashboard":
            raise
    else:
        app.include_router(dashboard.router)
    openai.install_openapi(app)
    return app
