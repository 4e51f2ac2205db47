"""The worker's state: its backend and engine, the model it serves, and its `/status`.

Built by `worker.app.create_app` and changed by `worker.control` when a gateway places a
model here; both import it, and it imports neither.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from wire.status import WorkerStatus
from worker import hardware
from worker.backends.base import Backend
from worker.backends.idle import IdleBackend
from worker.config import WorkerConfig
from worker.engine import Engine
from worker.gate import Availability
from worker.metrics import registry_for
from worker.models import resolve

log = logging.getLogger("corral.worker")


def make_backend(cfg: WorkerConfig, model_path: Path | None) -> Backend:
    if cfg.backend == "sim":
        from worker.backends.sim import SimBackend

        return SimBackend(cfg.sim_tokens_per_second, cfg.sim_ttft, cfg.parallel, cfg.ctx_size,
                          prefill_tokens_per_second=cfg.sim_prefill_tokens_per_second)
    if model_path is None:
        raise ValueError(f"the {cfg.backend} backend needs a model")
    if cfg.backend == "llama":
        from worker.backends.llama import LlamaBackend

        return LlamaBackend(str(model_path), cfg.parallel, cfg.ctx_size, cfg.threads)
    if cfg.backend == "openvino":
        from worker.backends.openvino import OpenVINOBackend

        return OpenVINOBackend(str(model_path), cfg.parallel, cfg.ctx_size, cfg.device)
    raise ValueError(f"unknown backend {cfg.backend!r}")


class WorkerState:
    """Everything the routes need, on `app.state`."""

    def __init__(self, cfg: WorkerConfig, backend: Backend | None = None) -> None:
        self.cfg = cfg
        self.worker_id = cfg.worker_id
        self.started = int(time.time())
        if cfg.backend == "sim":  # the sim serves a name; it needs no file
            self.model_id, path = Path(cfg.model or "sim").stem, None
        elif cfg.model:
            self.model_id, path = resolve(cfg.model)
        else:
            self.model_id, path = "", None
        self.model_path = path
        self.model_bytes = path.stat().st_size if path else 0
        self.model_names = {self.model_id} if self.model_id else set()
        if backend is not None:
            self.backend = backend
        elif self.model_id:
            self.backend = make_backend(cfg, path)
        else:  # no --model: wait for the gateway to place one (worker.control)
            self.backend = IdleBackend(cfg.parallel, cfg.ctx_size, cfg.backend)
        self.engine = Engine(self.backend, cfg.max_queue)
        self.registry = registry_for(self.engine)
        self.load_error: str | None = None

    def served_models(self) -> list[str]:
        return sorted(self.model_names) if self.engine.ready else []

    def availability(self) -> Availability:
        """What `/v1/*` can do now (worker.gate); `Control.availability` when placed."""
        if self.engine.ready:
            return "ready", None
        if self.load_error:
            return "down", self.load_error
        return ("loading" if self.model_id else "idle"), None

    def status(self) -> WorkerStatus:
        e = self.engine
        state, _ = self.availability()
        if state == "ready":
            state = "busy" if e.slots_busy >= self.backend.slots else "ready"
        return WorkerStatus(
            id=self.worker_id,
            backend=self.backend.name,
            models=self.served_models(),
            state=state,
            queue_depth=e.queue_depth,
            slots_total=self.backend.slots,
            slots_busy=e.slots_busy,
            hardware=hardware.hardware(
                {**self.backend.describe(), "batch_invariant": self.backend.batch_invariant},
                self.cfg.threads),
            memory=hardware.memory(self.cfg.memory_limit, self.model_bytes),
            tokens_per_second=round(e.stats.tokens_per_second, 2),
            decode_tokens_per_second=round(e.stats.decode_tokens_per_second, 2),
            prefill_tokens_per_second=round(e.stats.prefill_tokens_per_second, 2),
            n_ctx=self.backend.n_ctx,
            prompt_cache=self.backend.stats(),
            capabilities=self.backend.capabilities(),
        )

    async def load(self) -> None:
        if not self.model_id:
            return  # placed later through the control API
        try:
            await asyncio.to_thread(self.backend.load)
        except Exception as exc:  # reported in /status; the process stays up to say so
            self.load_error = str(exc)
            log.exception("loading the model failed")
            return
        self.engine.calibrate()
        self.engine.ready = True
        log.warning("worker %s ready: %s on %s", self.worker_id, self.model_id, self.backend.name)
