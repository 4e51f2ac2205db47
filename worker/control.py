"""What a gateway has placed this worker as, and the processes and downloads that serve it.

The roles (the request is `worker.roles.PlacementRequest`, the routes `worker.control_api`):
  replica  load the whole model here and serve it (fetching the GGUF if this box lacks it),
           and unload (drain first) any other model held here;
  head     the split head: fetch the GGUF, start the head child with the shards as devices,
           relay `/v1/*` to it (`worker.rpc.head`, `worker.rpc.supervisor`, `worker.rpc.relay`);
  shard    start an RPC shard child that only `allow_peer` may reach; the answer carries its
           `rpc_endpoint` (shards need no file: weights arrive over RPC);
  none     stop whatever ran.
More models may be loaded beside those held (worker.hosting: each its own engine, slots and
queue), and drained and freed one by one; that is the replica role, so a worker that is a
split head or shard refuses it. `/status` gains `placement` (role, phase, error, download
progress, rpc_endpoint), and a worker started without `--model` reports `idle` with no
model until it is placed (`loading` while a placed model comes up; `/v1/*` then answers 503
`model_loading`, see worker.gate). A worker started with `--model` is its own replica and
is not managed (`placement.managed` is false); the gateway leaves it alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from wire.errors import APIError
from wire.status import WorkerStatus
from worker.fetch import Download
from worker.gate import Availability
from worker.hosting import ModelFileRequest, model_file
from worker.roles import PlacementRequest, rpc_hosts, stall_seconds

if TYPE_CHECKING:
    from worker.rpc.shard import ShardHost
    from worker.rpc.supervisor import HeadProcess
    from worker.state import WorkerState

log = logging.getLogger("corral.worker")


class Control:
    """What this worker has been placed as, and the processes and downloads that serve it."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state
        self.cfg = state.cfg
        self.managed = not state.model_id
        self.req: PlacementRequest | None = None
        self.phase = "idle"  # idle | fetching | loading | ready | broken
        self.error: str | None = None
        self.download: Download | None = None
        self.shard: ShardHost | None = None
        self.head: HeadProcess | None = None
        self.rpc_endpoint: str | None = None
        self.changed_at = time.time()
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._jobs: set[asyncio.Future[Any]] = set()  # drains running in the background
        self._verified_paths: dict[str, str] = {}  # path -> sha256, for local files
        self.relay_client = httpx.AsyncClient(timeout=httpx.Timeout(
            None, connect=2.0, write=30.0), limits=httpx.Limits(max_keepalive_connections=64))

    @property
    def role(self) -> str:
        r = self.req.role if self.req else "none"
        if r in ("head", "shard"):
            return r
        return "replica" if self.state.hosting.models else "none"

    def _primary(self) -> Any:
        """The first hosted model (the one the one-model fields of the view describe)."""
        hosted = self.state.hosting.models
        return next(iter(hosted.values())) if hosted else None

    # ------------------------------------------------------------------ reading
    def view(self) -> dict[str, Any]:
        r = self.req
        out: dict[str, Any] = {
            "managed": self.managed, "role": self.role if self.managed else "replica",
            "model": (r.model if r else None) if self.managed else self.state.model_id,
            "generation": r.generation if r else 0,
            "state": self.phase if self.managed else self._own_state(),
            "error": self.error if self.managed else self.state.load_error,
            "since": self.changed_at,
            "models": self.state.hosting.views(),
        }
        if self.managed and self.role == "none":
            out["state"] = "idle"
        h = self._primary() if self.managed and self.role == "replica" else None
        if h is not None:  # the one-model fields, as before several could be held
            out["model"], out["since"] = h.name, h.since
            out["state"] = {"failed": "broken"}.get(h.state, h.state)
            out["error"] = h.error
            if h.download is not None:
                out["download"] = h.download.to_json()
        if self.download is not None:
            out["download"] = self.download.to_json()
        if self.rpc_endpoint:
            out["rpc_endpoint"] = self.rpc_endpoint
        if r and r.role in ("head", "shard"):
            out["shards"], out["tensor_split"] = r.shards, r.tensor_split
        if self.head is not None and self.head.progress.get("offload"):
            out["offload"] = self.head.progress["offload"]
        return out

    def _own_state(self) -> str:
        """The phase of a worker started with --model (not placed by a gateway)."""
        if self.state.engine.ready:
            return "ready"
        return "broken" if self.state.load_error else "loading"

    def availability(self) -> Availability:
        """What `/v1/*` can do now (worker.gate), by the role this worker was placed as."""
        if not self.managed:
            return self.state.availability()
        if self.phase == "broken":
            return "down", self.error
        role = self.role
        if role == "head":
            return ("ready" if self.head is not None and self.head.ready else "loading"), None
        if role == "replica":
            hosted = list(self.state.hosting.models.values())
            if any(h.ready for h in hosted):
                return "ready", None
            if any(h.state in ("loading", "fetching") for h in hosted):
                return "loading", None
            failed = [h for h in hosted if h.state == "failed"]
            if failed and len(failed) == len(hosted):
                return "down", "; ".join(f"{h.name}: {h.error}" for h in failed)
        return "idle", None  # nothing placed, or a shard: no model served over /v1 here

    def decorate(self, st: WorkerStatus) -> WorkerStatus:
        st.placement = self.view()  # type: ignore[attr-defined]
        if not self.managed:
            return st
        role = self.role
        if self.phase == "broken":
            st.state, st.models = "down", []
        elif role == "head":
            p = self.head.progress if self.head else {}
            if self.head is not None and self.head.ready:
                st.models = [self.req.model] if self.req and self.req.model else []
                st.slots_total = int(p.get("slots_total", st.slots_total))
                st.slots_busy = int(p.get("slots_busy", 0))
                st.queue_depth = int(p.get("queue_depth", 0))
                st.tokens_per_second = float(p.get("tokens_per_second", 0.0))
                st.decode_tokens_per_second = st.tokens_per_second
                st.prefill_tokens_per_second = float(p.get("prefill_tokens_per_second", 0.0))
                st.n_ctx = int(p.get("n_ctx", st.n_ctx))
                st.capabilities = dict(p.get("capabilities") or {})
                st.state = "busy" if st.slots_busy >= st.slots_total else "ready"
            else:
                st.state, st.models = "loading", []
        elif role == "shard":
            st.state = "ready" if self.phase == "ready" else "loading"
            st.models = []
        elif role == "none":
            st.state, st.models = "idle", []
        elif not self.state.hosting.ready():  # models being fetched or loaded, or failed
            st.state, st.models = self.availability()[0], []
        return st

    # ------------------------------------------------------------------ changing
    async def apply(self, req: PlacementRequest) -> dict[str, Any]:
        if not self.managed:
            raise APIError(409, "This worker serves the model it was started with "
                           "(--model); it is not placed by a gateway.",
                           "invalid_request_error", None, "not_managed")
        if req.role != "none" and not req.model:
            raise APIError(400, "a placement needs a model", "invalid_request_error", "model")
        if req.role == "head" and (not req.shards or len(req.tensor_split) != len(req.shards) + 1):
            raise APIError(400, "a head needs shards and a tensor_split entry for itself and "
                           "each shard", "invalid_request_error", "tensor_split")
        async with self._lock:
            cur = self.req
            if (cur is not None and cur.same_job(req) and self.phase != "broken"
                    and not req.restart and (req.role != "replica" or self._holds_only(req))):
                cur.generation = req.generation
                return self.view()
            await self._teardown()
            self.req, self.error, self.download = req, None, None
            self._set_phase("idle" if req.role == "none" else "loading")
            hosting = self.state.hosting
            if req.role == "replica":  # this model, and no other (drained first)
                assert req.model
                if req.restart and (h := hosting.get(req.model)) and h.state == "failed":
                    del hosting.models[req.model]
                self.load_model(ModelFileRequest(
                    generation=req.generation, model=req.model, model_url=req.model_url,
                    path=req.path, sha256=req.sha256, size=req.size))
                for name in [n for n in hosting.models if n != req.model]:
                    if (work := hosting.drain(name)) is not None:
                        self._background(work)
            elif req.role == "none":
                for name in list(hosting.models):
                    if (work := hosting.drain(name)) is not None:
                        self._background(work)
            elif req.role == "shard":
                await hosting.unload_all()  # a shard gives its box to the split
                await self._start_shard(req)
            else:
                self._task = asyncio.create_task(self._bring_up(req))
            log.warning("placed as %s%s (generation %d)", req.role,
                        f" of {req.model}" if req.model else "", req.generation)
            return self.view()

    def _holds_only(self, req: PlacementRequest) -> bool:
        h = self.state.hosting.models
        return list(h) == [req.model] and h[req.model].state != "failed"

    def _background(self, work: Any) -> None:
        t = asyncio.ensure_future(work)
        self._jobs.add(t)
        t.add_done_callback(self._jobs.discard)

    def load_model(self, req: ModelFileRequest) -> dict[str, Any]:
        """One more model beside those held (the replica role); refused on a split."""
        if not self.managed:
            raise APIError(409, "This worker serves the model it was started with "
                           "(--model); it is not placed by a gateway.",
                           "invalid_request_error", None, "not_managed")
        if self.role in ("head", "shard"):
            raise APIError(409, f"This worker is a split {self.role}; place it as none first.",
                           "invalid_request_error", None, "split_member")
        if self.req is None or self.req.role != "replica":
            self.req = PlacementRequest(generation=req.generation, role="replica",
                                        model=req.model)
            self._set_phase("loading")
        self.state.hosting.load(req, self.state.idle_backend)
        return self.view()

    def unload_model(self, name: str) -> dict[str, Any]:
        """Starts draining `name` (it finishes what it holds, then is freed)."""
        if self.state.hosting.get(name) is None:
            raise APIError(404, f"The model {name!r} is not held here.",
                           "invalid_request_error", "model", "model_not_found")
        work = self.state.hosting.drain(name)  # served no more from now on
        if work is not None:
            self._background(work)
        return self.view()

    def _set_phase(self, phase: str, error: str | None = None) -> None:
        self.phase = phase
        self.changed_at = time.time()
        if error is not None:
            self.error = error

    def broken(self, why: str) -> None:
        if self.phase == "broken":
            return  # keep the first reason: later ones are its consequences
        log.error("placement broken: %s", why)
        self._set_phase("broken", why)

    def _threads(self) -> int:
        """--threads, else this worker's share of the host (fixed for a shard or head child)."""
        return self.state.decode_threads() or os.cpu_count() or 1

    async def _start_shard(self, req: PlacementRequest) -> None:
        from worker.rpc.shard import ShardHost

        bind, reach = rpc_hosts(self.cfg)
        shard = ShardHost(bind, req.allow_peer, self._threads())
        try:
            await asyncio.to_thread(shard.start)
            self.rpc_endpoint = f"{reach}:{shard.port}"
        except Exception as exc:
            shard.stop()
            self.broken(f"the RPC shard did not start: {exc}")
            return
        self.shard = shard
        self.state.model_bytes = 0
        self._set_phase("ready")
        self._watch = asyncio.create_task(self._watch_shard(shard))

    async def _watch_shard(self, shard: ShardHost) -> None:
        proc = shard.proc
        if proc is not None:
            await asyncio.to_thread(proc.wait)  # returns when the child exits (or is killed)
        if self.shard is shard:
            self.broken("the RPC shard process exited")

    async def _bring_up(self, req: PlacementRequest) -> None:
        """A split head: the models held here drain first (the split takes the box)."""
        try:
            await self.state.hosting.unload_all()
            path = await self._model_file(req)
            self._set_phase("loading")
            await self._start_head(req, path)
            self._set_phase("ready")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("placement as %s failed", req.role)
            self.broken(str(exc) or type(exc).__name__)

    async def _model_file(self, req: PlacementRequest) -> Path:
        assert req.model

        def progress(phase: str, dl: Download | None) -> None:
            self._set_phase(phase)
            self.download = dl

        return await model_file(ModelFileRequest(
            model=req.model, model_url=req.model_url, path=req.path, sha256=req.sha256,
            size=req.size), self.cfg, self._verified_paths, progress)

    async def _start_head(self, req: PlacementRequest, path: Path) -> None:
        from worker.rpc.supervisor import HeadProcess

        cfg = self.cfg
        head = HeadProcess(cfg.worker_id, str(path), req.model or path.stem, req.shards,
                           req.tensor_split, self._threads(), cfg.parallel, cfg.ctx_size,
                           stall_seconds())
        self.head = head
        await head.start()
        share = req.tensor_split[0] / (sum(req.tensor_split) or 1.0)
        self.state.model_bytes = int(os.stat(path).st_size * share)
        self._watch = asyncio.create_task(head.watch(self.broken))

    async def _teardown(self) -> None:
        for t in (self._task, self._watch):
            if t is not None and not t.done():
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
        self._task = self._watch = None
        if self.shard is not None:
            shard, self.shard = self.shard, None
            await asyncio.to_thread(shard.stop)
        self.rpc_endpoint = None
        if self.head is not None:
            head, self.head = self.head, None
            await head.stop()
        self.state.model_bytes = 0  # hosted models count their own (worker.hosting)

    async def close(self) -> None:
        async with self._lock:
            await self._teardown()
        for t in list(self._jobs):
            t.cancel()
        for h in list(self.state.hosting.models.values()):  # shutting down: no drain
            if h.task is not None:
                h.task.cancel()
            await asyncio.to_thread(h.engine.backend.close)
        self.state.hosting.models.clear()
        await self.relay_client.aclose()
