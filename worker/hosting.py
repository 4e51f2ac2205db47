"""The models a placed worker holds at once: one engine and backend each, keyed by name.

A gateway places several models on one worker when its memory holds them (the planner's
estimate against `--memory-limit` or the box). Each `Hosted` model has its own backend,
slots and queue (`Engine`), so one model's load, failure or drain leaves the others
serving: a failed load marks that model `failed` with the reason and nothing else.

Unloading never cuts a request: the model is first `draining` (no longer listed as served,
so the gateway routes no new work to it, and this worker refuses new requests for it with a
retryable 503), then closed once its engine holds nothing.

Model files come from `file_for` (a local copy when this box has the same bytes, else a
checksummed, resumable download from the gateway into the size-bounded cache, worker.fetch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from wire.errors import APIError
from worker.backends.base import Backend
from worker.engine import Engine
from worker.fetch import Download, fetch, in_use, sha256_of, target, touch

log = logging.getLogger("corral.worker")

DRAIN_POLL = 0.05  # seconds between looks at a draining engine (an internal wait, bounded)


class ModelFileRequest(BaseModel):
    """A model to load, and where to get its file (the gateway's placer sends it)."""

    generation: int = 0
    model: str
    model_url: str | None = None
    path: str | None = None  # where the gateway has the file: used if this box has it too
    sha256: str | None = None
    size: int | None = None


@dataclass
class Hosted:
    name: str
    engine: Engine
    state: str = "loading"  # fetching | loading | ready | draining | failed
    error: str | None = None
    path: Path | None = None
    size: int = 0  # bytes of its file (the weights it maps)
    since: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    download: Download | None = None
    task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.engine.ready

    def view(self) -> dict[str, Any]:
        """This model's entry in `/status` `per_model` (and the placement's `models`)."""
        e, b = self.engine, self.engine.backend
        out: dict[str, Any] = {
            "name": self.name, "state": self.state, "error": self.error,
            "slots_total": b.slots, "slots_busy": e.slots_busy, "queue_depth": e.queue_depth,
            "memory": {"model_bytes": self.size},
            "tokens_per_second": round(e.stats.tokens_per_second, 2),
            "decode_tokens_per_second": round(e.stats.decode_tokens_per_second, 2),
            "prefill_tokens_per_second": round(e.stats.prefill_tokens_per_second, 2),
            "n_ctx": b.n_ctx, "since": self.since, "last_used": self.last_used,
        }
        if self.ready:
            out["capabilities"] = b.capabilities()
        if self.download is not None:
            out["download"] = self.download.to_json()
        return out


class Hosting:
    """The hosted models of one worker, in load order (the first ready one is primary)."""

    def __init__(self, make: Callable[[Path], Backend], max_queue: int,
                 file_for: Callable[[ModelFileRequest, Hosted], Any]) -> None:
        self.make = make
        self.max_queue = max_queue
        self.file_for = file_for  # async (request, hosted) -> Path
        self.models: dict[str, Hosted] = {}
        self.changed: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------ reading
    def engine(self, name: str) -> Engine | None:
        h = self.models.get(name)
        if h is None or not h.ready:
            return None
        h.last_used = time.time()
        return h.engine

    def get(self, name: str) -> Hosted | None:
        return self.models.get(name)

    def ready(self) -> list[Hosted]:
        return [h for h in self.models.values() if h.ready]

    def names(self) -> list[str]:
        return [h.name for h in self.ready()]

    def model_bytes(self) -> int:
        return sum(h.size for h in self.models.values() if h.state != "failed")

    def views(self) -> list[dict[str, Any]]:
        return [h.view() for h in self.models.values()]

    # ------------------------------------------------------------------ changing
    def load(self, req: ModelFileRequest, idle_backend: Callable[[], Backend]) -> Hosted:
        """Starts loading `req.model` (at once; the load runs in the background). Loading
        a model already held, or loading, is a no-op; a failed one is tried again."""
        h = self.models.get(req.model)
        if h is not None and h.state in ("ready", "loading", "fetching"):
            return h
        if h is not None and h.state == "draining":
            raise APIError(409, f"The model {req.model!r} is being unloaded here; place it "
                           "again when it is gone.", "invalid_request_error", "model",
                           "model_draining")
        h = Hosted(req.model, Engine(idle_backend(), self.max_queue))
        self.models[req.model] = h
        h.task = asyncio.create_task(self._bring_up(h, req))
        log.warning("loading %s (generation %d)", req.model, req.generation)
        return h

    async def _bring_up(self, h: Hosted, req: ModelFileRequest) -> None:
        try:
            path = await self.file_for(req, h)
            h.state, h.path = "loading", path
            backend = self.make(path)
            await asyncio.to_thread(backend.load)
            if self.models.get(h.name) is not h:  # unloaded meanwhile
                await asyncio.to_thread(backend.close)
                return
            h.engine.backend = backend
            h.size = os.stat(path).st_size
            in_use.add(path)
            h.engine.calibrate()
            h.engine.ready = True
            h.state, h.since = "ready", time.time()
            log.warning("%s ready (%d slot(s))", h.name, backend.slots)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # this model only: the others keep serving
            log.exception("loading %s failed", h.name)
            h.state, h.error, h.since = "failed", str(exc) or type(exc).__name__, time.time()
        finally:
            self.changed()

    def drain(self, name: str) -> Any:
        """Marks `name` draining at once (not served from this moment) and returns the
        coroutine that finishes the unload, or None when it is not held or drains already."""
        h = self.models.get(name)
        if h is None or h.state == "draining":
            return None
        was = h.state
        h.state, h.since = "draining", time.time()
        return self._finish(h, was)

    async def unload(self, name: str) -> bool:
        """Drains `name` (finishes what it holds, takes nothing new), then frees it."""
        work = self.drain(name)
        if work is None:
            return name in self.models
        await work
        return True

    async def _finish(self, h: Hosted, was: str) -> None:
        name = h.name
        if h.task is not None and not h.task.done():
            h.task.cancel()
            with contextlib.suppress(BaseException):
                await h.task
        e = h.engine
        if was == "ready":
            log.warning("unloading %s: draining %d request(s)", name,
                        e.slots_busy + e.queue_depth)
        # The engine has no "empty" signal; it empties as its requests finish (bounded).
        while e.slots_busy or e.queue_depth:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL)
        e.ready = False
        if self.models.get(name) is h:
            del self.models[name]
        await asyncio.to_thread(e.backend.close)
        if h.path is not None and not any(o.path == h.path for o in self.models.values()):
            in_use.discard(h.path)
        self.changed()
        log.warning("unloaded %s", name)

    async def unload_all(self) -> None:
        await asyncio.gather(*(self.unload(n) for n in list(self.models)))


async def model_file(req: ModelFileRequest, cfg: Any, verified: dict[str, str],
                     progress: Callable[[str, Download | None], None]) -> Path:
    """The model's file on this box: the cache, a local copy with the same sha256 (this
    box may have it, or share the gateway's disk), else a download from the gateway."""
    if req.sha256:
        cached = target(req.model, req.sha256)
        if cached.is_file() and (req.size is None or cached.stat().st_size == req.size):
            touch(cached)  # recently used: the cache's LRU cleanup keeps it
            return cached
    from worker.models import resolve

    candidates: list[Path] = []
    with contextlib.suppress(APIError, OSError):
        candidates.append(resolve(req.model)[1])
    if req.path and os.environ.get("CORRAL_USE_GATEWAY_PATH", "1") != "0":
        candidates.append(Path(req.path))
    for local in candidates:
        if not req.sha256:
            return local
        key = str(local)
        with contextlib.suppress(OSError):
            if key not in verified:
                verified[key] = await asyncio.to_thread(sha256_of, local)
            if verified[key] == req.sha256:
                return local
    if not (req.model_url and req.sha256 and req.size is not None):
        raise RuntimeError(f"this worker does not have {req.model!r} and the placement "
                           "names no file to fetch")
    dl = Download(req.model, req.sha256, req.size)
    progress("fetching", dl)
    url = req.model_url
    if cfg.join:  # the gateway as this worker reaches it, not as it names itself
        u = urllib.parse.urlsplit(url)
        url = cfg.join.rstrip("/") + u.path + (f"?{u.query}" if u.query else "")
    return await fetch(url, dl, cfg.cluster_token)
