"""The worker's state: its backend and engine, the models it serves, and its `/status`.

Built by `worker.app.create_app` and changed by `worker.control` when a gateway places
models here; both import it, and it imports neither. A worker started with `--model` serves
that one model on `engine`; a placed worker holds any number of models in `hosting`
(worker.hosting), each with its own engine, and `engine_for` picks by the request's model.
`/status` keeps its one-model fields (the primary model's speeds and capabilities; slots
and queue summed over the models, which is the load the gateway routes by) and lists every
model in `per_model`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from wire.status import WorkerStatus
from worker import hardware
from worker.backends.base import Backend
from worker.backends.idle import IdleBackend
from worker.config import WorkerConfig
from worker.engine import Engine
from worker.gate import Availability
from worker.hostcores import POLL_SECONDS, HostCores, host_id
from worker.hosting import Hosted, Hosting, ModelFileRequest, model_file
from worker.metrics import registry_for
from worker.models import resolve

if TYPE_CHECKING:
    from worker.control import Control

log = logging.getLogger("corral.worker")


def make_backend(cfg: WorkerConfig, model_path: Path | None,
                 threads: int | None = None) -> Backend:
    """The configured backend; `threads` (the host share) stands in for a missing --threads."""
    threads = cfg.threads or threads
    if cfg.backend == "sim":
        from worker.backends.sim import SimBackend

        return SimBackend(cfg.sim_tokens_per_second, cfg.sim_ttft, cfg.parallel, cfg.ctx_size,
                          prefill_tokens_per_second=cfg.sim_prefill_tokens_per_second)
    if model_path is None:
        raise ValueError(f"the {cfg.backend} backend needs a model")
    if cfg.backend == "llama":
        from worker.backends.llama import LlamaBackend

        return LlamaBackend(str(model_path), cfg.parallel, cfg.ctx_size, threads)
    if cfg.backend == "openvino":
        from worker.backends.openvino import OpenVINOBackend

        return OpenVINOBackend(str(model_path), cfg.parallel, cfg.ctx_size, cfg.device,
                               batch_invariant=cfg.batch_invariant, threads=threads)
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
        self.control: Control | None = None  # set by worker.app.create_app
        # The host's cores, shared with the other workers on it (not by a split head's
        # child, which is given its threads, nor by the sim, which computes nothing).
        self.cores: HostCores | None = None
        if backend is None and cfg.backend != "sim":
            self.cores = HostCores(host_id(cfg.host_id), self.worker_id, cfg.threads,
                                   self.computing)
            self.cores.open()
        self._told_threads = 0
        if backend is not None:
            self.backend = backend
        elif self.model_id:
            self.backend = make_backend(cfg, path, self.decode_threads())
        else:  # no --model: wait for the gateway to place one (worker.control)
            self.backend = IdleBackend(cfg.parallel, cfg.ctx_size, cfg.backend)
        self.engine = Engine(self.backend, cfg.max_queue)
        self.hosting = Hosting(lambda path: make_backend(cfg, path, self.decode_threads()),
                               cfg.max_queue, self._file_for)
        self._verified: dict[str, str] = {}  # local path -> sha256
        self.registry = registry_for(self.engines)
        self.load_error: str | None = None

    def idle_backend(self) -> Backend:
        return IdleBackend(self.cfg.parallel, self.cfg.ctx_size, self.cfg.backend)

    async def _file_for(self, req: ModelFileRequest, h: Hosted) -> Path:
        def progress(phase: str, dl: object) -> None:
            h.state, h.download = phase, dl  # type: ignore[assignment]

        return await model_file(req, self.cfg, self._verified, progress)

    def engines(self) -> list[Engine]:
        """Every engine serving now (the metrics sum them)."""
        out = [self.engine] if self.engine.ready else []
        return (out + [h.engine for h in self.hosting.ready()]) or [self.engine]

    def engine_for(self, model: str) -> Engine | None:
        """The engine serving `model` here, or None."""
        if model in self.model_names and self.engine.ready:
            return self.engine
        return self.hosting.engine(model)

    # ------------------------------------------------------------------ host cores
    def computing(self) -> bool:
        """Whether this worker runs a model (or a split's part) and so takes its share."""
        c = self.control
        if c is not None and c.managed:
            return c.role != "none"
        return bool(self.model_id)

    def decode_threads(self) -> int | None:
        """Threads for what starts now: --threads, else this worker's share of the host."""
        if self.cfg.threads:
            return self.cfg.threads
        if self.cores is None:
            return None
        self._told_threads = self.cores.refresh()
        return self._told_threads

    def current_threads(self) -> int:
        """The threads decoding here now: 0 while nothing is placed."""
        if self.backend.name == "sim":
            return self.cfg.threads or hardware.usable_cpus()
        c = self.control
        if c is not None and c.managed:
            child = c.head or c.shard
            if child is not None:
                return child.threads
        hosted = self.hosting.ready()
        backend = hosted[0].engine.backend if hosted and not self.engine.ready else self.backend
        return int(getattr(backend, "current_threads", 0) or 0)

    def adjust_threads(self) -> None:
        """Follows workers coming and going on this host (llama.cpp between decode steps;
        OpenVINO and split children keep what they were started with, and say so to the
        others, which share what is left)."""
        if self.cores is None:
            return
        c = self.control
        child = c is not None and c.managed and (c.head or c.shard)
        setter = None if child else getattr(self.backend, "set_threads", None)
        computing = self.computing()
        fixed = computing and setter is None and not self.cfg.threads
        self.cores.pin(self.current_threads() if fixed else None)
        n = self.cores.refresh()
        if self.cfg.threads or not computing or setter is None:
            return
        setter(n)
        if n != self._told_threads:
            log.warning("worker %s: %d decode thread(s) now (%d computing worker(s) share "
                        "host %s's %d CPUs)", self.worker_id, n, self.cores.live_workers(),
                        self.cores.host_id, self.cores.cpus)
            self._told_threads = n

    async def share_cores(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                self.adjust_threads()
            except Exception:  # never take the worker down over it; say why
                log.exception("re-reading the host's workers failed")

    def _host_facts(self) -> dict:
        cores = self.cores
        return {"host_id": cores.host_id if cores else host_id(self.cfg.host_id),
                "cpus": cores.cpus if cores else hardware.usable_cpus(),
                "threads_explicit": bool(self.cfg.threads),
                "host_workers": cores.live_workers() if cores else None}

    # ------------------------------------------------------------------ serving
    def served_models(self) -> list[str]:
        own = sorted(self.model_names) if self.engine.ready else []
        return own + [n for n in self.hosting.names() if n not in own]

    def availability(self) -> Availability:
        """What `/v1/*` can do now (worker.gate); `Control.availability` when placed."""
        if self.engine.ready or self.hosting.ready():
            return "ready", None
        if self.load_error:
            return "down", self.load_error
        return ("loading" if self.model_id else "idle"), None

    def status(self) -> WorkerStatus:
        e = self.engine
        hosted = self.hosting.ready()
        if hosted and not e.ready:
            return self._hosted_status(hosted)
        state, _ = self.availability()
        if state == "ready":
            state = "busy" if e.slots_busy >= self.backend.slots else "ready"
        st = WorkerStatus(
            id=self.worker_id,
            backend=self.backend.name,
            models=self.served_models(),
            state=state,
            queue_depth=e.queue_depth,
            slots_total=self.backend.slots,
            slots_busy=e.slots_busy,
            hardware=hardware.hardware(
                {**self.backend.describe(), "batch_invariant": self.backend.batch_invariant},
                self.current_threads(), self._host_facts()),
            memory=hardware.memory(self.cfg.memory_limit, self.model_bytes),
            tokens_per_second=round(e.stats.tokens_per_second, 2),
            decode_tokens_per_second=round(e.stats.decode_tokens_per_second, 2),
            prefill_tokens_per_second=round(e.stats.prefill_tokens_per_second, 2),
            n_ctx=self.backend.n_ctx,
            prompt_cache=self.backend.stats(),
            capabilities=self.backend.capabilities(),
            embeddings=self.backend.embeddings(),
        )
        st.per_model = self.hosting.views()  # type: ignore[attr-defined]
        return st

    def _hosted_status(self, hosted: list[Hosted]) -> WorkerStatus:
        """A placed worker holding models: the primary's speeds and capabilities, the load
        (slots, queue) summed over all of them, and each one in `per_model`."""
        first = hosted[0].engine
        b = first.backend
        slots = sum(h.engine.backend.slots for h in hosted)
        busy = sum(h.engine.slots_busy for h in hosted)
        st = WorkerStatus(
            id=self.worker_id, backend=b.name, models=self.served_models(),
            state="busy" if busy >= slots else "ready",
            queue_depth=sum(h.engine.queue_depth for h in hosted),
            slots_total=slots, slots_busy=busy,
            hardware=hardware.hardware(
                {**b.describe(), "batch_invariant": b.batch_invariant},
                self.current_threads(), self._host_facts()),
            memory=hardware.memory(self.cfg.memory_limit, self.hosting.model_bytes()),
            tokens_per_second=round(first.stats.tokens_per_second, 2),
            decode_tokens_per_second=round(first.stats.decode_tokens_per_second, 2),
            prefill_tokens_per_second=round(first.stats.prefill_tokens_per_second, 2),
            n_ctx=b.n_ctx, prompt_cache=b.stats(), capabilities=b.capabilities(),
            embeddings=b.embeddings())
        st.per_model = self.hosting.views()  # type: ignore[attr-defined]
        return st

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
        log.warning("worker %s ready: %s on %s, %d decode thread(s)%s", self.worker_id,
                    self.model_id, self.backend.name, self.current_threads(),
                    "" if self.cfg.threads or self.cores is None else
                    f" (its share of host {self.cores.host_id}'s {self.cores.cpus} CPUs)")
