"""The worker's app factory: its state (`worker.state`), routes, control API; load and join."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from wire import http
from wire.status import WorkerStatus
from worker import control_api, lifecycle, linkprobe
from worker.api import router
from worker.backends.base import Backend
from worker.config import WorkerConfig
from worker.embed import router as embeddings_router
from worker.gate import Gate
from worker.join import discover_and_join, discovering, join_loop
from worker.polite import Polite
from worker.state import WorkerState
from worker.wol import WakeInfo


def create_app(cfg: WorkerConfig, backend: Backend | None = None) -> FastAPI:
    state = WorkerState(cfg, backend)
    polite = Polite(cfg) if cfg.polite else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(state.load())]
        if cfg.join:
            tasks.append(asyncio.create_task(join_loop(cfg)))
        elif discovering(cfg):
            tasks.append(asyncio.create_task(discover_and_join(cfg)))
        if state.cores is not None:  # this host's cores, shared with its other workers
            tasks.append(asyncio.create_task(state.share_cores()))
        if polite is not None:
            tasks.append(asyncio.create_task(polite.run()))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            await app.state.lifecycle.close()
            await app.state.control.close()
            state.backend.close()
            if state.cores is not None:
                state.cores.close()

    app = FastAPI(title="Corral worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = state.engine
    app.state.worker_id = state.worker_id
    app.state.model_names = state.model_names
    app.state.started = state.started
    app.state.registry = state.registry
    app.state.served_models = state.served_models
    app.state.status = state.status
    app.state.availability = state.availability
    app.state.worker = state
    http.install(app)
    app.include_router(router)
    app.include_router(embeddings_router)
    state.control = control_api.install(app, state)
    app.include_router(linkprobe.router)
    wake = WakeInfo(cfg)

    def decorate(st: WorkerStatus) -> WorkerStatus:
        """Lifecycle fields of /status: how to wake us; polite mode's offer."""
        st.wake = wake.get()
        if polite is not None:
            st.capacity = polite.capacity(st.slots_total)
            st.polite = polite.view()
        return st

    lifecycle.install(app, state, decorate)
    # Outermost (added last): loading answers 503 before the head relay or any route.
    app.add_middleware(Gate, availability=lambda: app.state.availability())
    return app
