"""The placer: turns the model catalogue (gateway.catalog) into models on workers.

Every second, and whenever the set of workers changes, it plans (`gateway.placement.plan`)
over the workers that asked to be placed (started without `--model`: their `/status` says
`placement.managed`), from the memory they report (`gateway.inventory`), and pushes the
plan through the worker control API (cluster token):

- replicas, several models per worker where memory allows: model by model
  (`gateway.replicas`: `POST /control/models` to load, `DELETE` to drain and unload);
- split: the shards first (each answers with its RPC endpoint, open to the head's address
  only), then the head with those endpoints and the tensor split;
- workers with no place in the plan are told `none` (boxes no placement needs stay free).

What is planned: every pinned model (`--model`, `models = [...]`, `pin = true`) with its
`min_replicas`; every unpinned one asked for in the last `model_idle_ttl` seconds (a request
for one loaded nowhere wakes the placer: `demand`), so an idle one is unloaded; and one
more replica of a busy model each round it stays busy (requests waiting in the gateway
queue for it, or its slots all taken), while memory is free. The planner evicts the least
recently used unpinned model when a model needs the room.

A model the plan leaves out (it fits no worker and no split of them, or pinned models hold
the memory it needs) is never silent: one log line when it becomes unplaceable, an
`unplaceable` entry with the numbers in `/cluster` placements, and a 503
`model_unplaceable` saying why for requests (`refusal`), including those already waiting
for it. The plan is logged only when it changes (plans come in a canonical order).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from gateway import inventory, placer_view
from gateway.catalog import Catalog, ModelFile
from gateway.demand import Demand
from gateway.memory_need import MemoryNeed, estimate
from gateway.placement import Placement, Unplaceable, WorkerSpec, explain, hosted, plan
from gateway.replicas import Backoff, Reconciler, broken_loads, held, reported
from wire.errors import APIError

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.registry import Registry
    from gateway.topology import Topology
    from gateway.worker_record import Worker

log = logging.getLogger("corral.gateway")

TICK_SECONDS = 1.0
# Joined workers heartbeat every 3 s: after a (re)start, wait until each has been heard
# from before planning, so a partial view does not move placements that are running fine.
STARTUP_GRACE = 4.0
DEAD_AFTER = 2.0
PROBE_MAX = 8  # split candidates whose pairs are probed (n(n-1)/2 short probes)
PUSH_TIMEOUT = 30.0


__all__ = ["ModelFile", "Placer"]


class Placer:
    def __init__(self, cfg: GatewayConfig, registry: Registry,
                 topology: Topology | None = None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.topology = topology
        self.catalog = Catalog(cfg)
        self.demand = Demand(cfg, self.catalog, registry)
        self.unreadable: dict[str, str] = {}  # catalogued files the planner cannot read
        self.fail_waiting: Callable[[str, APIError], None] = lambda model, err: None
        self._workers: list[WorkerSpec] = []  # as of the last round (refusal's numbers)
        self._needs: dict[str, MemoryNeed] = {}
        self.replicas = Reconciler(self._call, self._file_fields)
        self.current: list[Placement] = []
        self.draining: list[Placement] = []  # still serving until their successor is ready
        self.generation = 0
        self.unplaceable: dict[str, Unplaceable] = {}  # declared models the plan left out
        self.rounds = 0  # planning rounds, and how many changed the plan (metrics)
        self.changes = 0
        self.errors: dict[str, str] = {}  # worker id -> last push error
        self._down_since: dict[str, float] = {}
        self._retries = Backoff()  # a broken split head's worker id
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._started = time.monotonic()
        self._headers = {"Authorization": f"Bearer {cfg.cluster_token}"}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(PUSH_TIMEOUT, connect=2.0),
                                         headers=self._headers)
        self.registry.listeners.append(self._wake.set)
        if self.catalog.declared:  # names known before the first request (no hashing)
            await self._load_catalog()
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._client:
            await self._client.aclose()

    async def _load_catalog(self) -> None:
        await self.catalog.load()
        self.registry.known_models.update(self.catalog)

    # ------------------------------------------------------------------ demand
    def resolve(self, requested: str) -> str:
        """A requested name or alias -> the catalogued name."""
        return self.catalog.resolve(requested)

    def touch(self, model: str) -> None:
        """A request for `model`: in use (gateway.demand); if it is catalogued but served
        nowhere, the placer plans at once (on demand)."""
        if self.demand.touch(model):
            self._wake.set()

    def loadable(self, model: str) -> bool:
        """Whether a request for `model`, served nowhere now, should wait for it to load."""
        return (model in self.catalog and model not in self.unplaceable
                and model not in self.unreadable)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("placement round failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_SECONDS)
            await asyncio.sleep(0.2)  # let a burst of registry changes settle

    # ------------------------------------------------------------------ planning
    def managed(self) -> list[Worker]:
        # A worker joined through another gateway replica (shared through Redis) is placed
        # by that replica: two placers must not push roles to the same worker.
        return [w for w in self.registry.workers.values()
                if (w.status.get("placement") or {}).get("managed")
                and not self.registry.learned_elsewhere(w.id)]

    def _alive(self, w: Worker, now: float) -> bool:
        if w.fails == 0 and w.status:
            self._down_since.pop(w.id, None)
            return True
        since = self._down_since.setdefault(w.id, now)
        return now - since < DEAD_AFTER

    def _estimate(self, workers: list[Worker]) -> dict[str, MemoryNeed]:
        n_ctx = max((int(w.status.get("n_ctx") or 0) for w in workers), default=0) or 2048
        slots = max((inventory.slots_per_model(w) for w in workers), default=1)
        out = {}
        for m in self.catalog.values():
            try:
                out[m.name] = estimate(m.path, n_ctx, slots)
            except Exception as exc:  # one unreadable file must not stop the others
                if m.name not in self.unreadable:
                    log.error("model %s cannot be placed: %s is not a readable GGUF: %s",
                              m.name, m.path, exc)
                self.unreadable[m.name] = f"{m.path.name} is not a readable GGUF ({exc})"
                continue
            self.unreadable.pop(m.name, None)
        return out

    async def tick(self) -> None:
        if not self.catalog.read:
            # Declared models are read at once; the default one only when a worker waits.
            if not (self.catalog.declared or self.managed()):
                return
            await self._load_catalog()
        if not self.catalog.files:
            return
        now = time.monotonic()
        if now - self._started < STARTUP_GRACE:
            return
        workers = [w for w in self.managed() if self._alive(w, now)]
        if not workers and not self.current:
            self.unplaceable = {}  # no worker at all: "no healthy worker", not "too big"
            return
        needs = await asyncio.to_thread(self._estimate, workers)
        running = inventory.running(workers)
        names = [n for n in self.demand.wanted(now, {p.model for p in running})
                 if n in needs]
        models = self.demand.specs(names, needs, now, len(workers), self.current)
        specs = [WorkerSpec(w.id, inventory.capacity(w, needs)) for w in workers]
        self._workers, self._needs = specs, needs
        cost = None
        if self.topology is not None and any(
                all(w.memory < m.need for w in specs) for m in models):
            # A split is needed: measure its candidates' links (once per PAIR_TTL).
            if len(specs) <= PROBE_MAX:
                await self.topology.probe_pairs([w.id for w in specs], self._client)
            cost = self.topology.cost
        new = plan(models, specs, self.current or running, cost)
        self.rounds += 1
        if new != self.current:  # both canonical: equal roles compare equal
            self.changes += 1
            log.warning("placement: %s", [p.to_json() for p in new] or "nothing placed")
        self.current = new
        # Left out and someone needs it (pinned, or requests wait): say why. An unpinned
        # model nobody waits for is simply not loaded now.
        must = {m.name: needs[m.name] for m in models if m.pinned or m.demanded}
        self._note_unplaceable(explain(must, specs, new), {w.id for w in workers})
        by_id = {w.id: w for w in workers}
        for w in workers:  # a placement that serves again starts its retry count afresh
            if reported(w).get("state") == "ready":
                self._retries.clear(w.id)
        want = hosted(new)
        planned = {p.model for p in new}
        ready = {p.model for p in new if inventory.serving(p, by_id)}
        split_members = {wid for p in new if p.mode == "split" for wid in p.workers}
        for name in planned:
            await self.catalog.hash(name)  # what workers verify; once per file
        self._fail_broken_loads(new, by_id)
        jobs = [self._apply(p, by_id) for p in new if p.mode == "split"]
        # Make before break: what serves a model now keeps serving it until the model's new
        # placement is ready (a split giving way to a replica on a bigger worker, say).
        pending = planned - ready
        old_splits = [rp for rp in running if rp.mode == "split" and rp.model in pending
                      and rp not in new]
        busy_split = {wid for rp in old_splits for wid in rp.workers}
        keep: list[Placement] = []
        for w in workers:
            models_here = want.get(w.id, [])
            if w.id in split_members or (w.id in busy_split and not models_here):
                continue
            if models_here or held(w):
                jobs.append(self.replicas.worker(w, models_here, ready, planned))
                keep += [Placement(m, "replica", (w.id,), w.id, (1.0,)) for m in
                         self.replicas.keeping(w, models_here, ready, planned)]
            elif reported(w).get("role") not in ("none", None):
                jobs.append(self._push(w, {"role": "none"}))
        self.draining = keep + old_splits
        await asyncio.gather(*jobs)

    def _fail_broken_loads(self, new: list[Placement], by_id: dict[str, Worker]) -> None:
        """Requests waiting for a model whose every planned replica failed to load get a
        503 saying why at once (the load is retried; they need not wait it out)."""
        for model, err in broken_loads(new, by_id).items():
            if not self.registry.by_model.get(model):
                self.fail_waiting(model, APIError(
                    503, f"The model {model!r} failed to load: {err}", "service_unavailable",
                    None, "model_load_failed", {"Retry-After": "5"}))

    def _note_unplaceable(self, found: dict[str, Unplaceable], managed: set[str]) -> None:
        """Keeps `unplaceable`, logging each model once when it becomes so (and when it
        stops). A model some worker we do not place serves is not a dead end."""
        served = {m for w in self.registry.workers.values()
                  if w.id not in managed and w.healthy for m in w.models}
        found = {k: u for k, u in found.items() if k not in served}
        for name, u in found.items():
            if name not in self.unplaceable:
                log.error("model %s cannot be placed: %s", name, u.reason)
            if not self.registry.by_model.get(name):  # requests waiting for it: say why now
                self.fail_waiting(name, self._unplaceable_error(name, u))
        for name in self.unplaceable.keys() - found.keys():
            log.warning("model %s is no longer unplaceable", name)
        self.unplaceable = found

    def refusal(self, model: str) -> APIError | None:
        """The 503 for a request to a model that cannot be placed, while nothing serves it:
        one the last round left out, or a catalogued one bigger than every worker and all
        of them together (no round needs to try it)."""
        if self.registry.by_model.get(model):
            return None
        if model in self.unreadable:
            return APIError(503, f"The model {model!r} cannot be placed: "
                            f"{self.unreadable[model]}.", "service_unavailable", None,
                            "model_unplaceable")
        u = self.unplaceable.get(model)
        if u is None and model in self._needs and self._workers:
            too_big = explain({model: self._needs[model]}, self._workers, ())[model]
            if too_big.split < too_big.need.total:
                u = too_big
        return None if u is None else self._unplaceable_error(model, u)

    @staticmethod
    def _unplaceable_error(model: str, u: Unplaceable) -> APIError:
        return APIError(503, f"The model {model!r} cannot be placed on this cluster: "
                        f"{u.reason}.", "service_unavailable", None, "model_unplaceable")

    # ------------------------------------------------------------------ pushing
    def _file_fields(self, model: str) -> dict[str, Any]:
        m = self.catalog.files[model]
        quoted = urllib.parse.quote(model, safe="")
        base = f"http://{self._public_host()}:{self.cfg.port}"
        return {"model": model, "sha256": m.sha256, "size": m.size,
                "model_url": f"{base}/cluster/models/{quoted}/file",
                "path": str(m.path)}  # a worker on the gateway's box may use it in place

    def _public_host(self) -> str:
        host = self.cfg.host
        return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host

    async def _apply(self, p: Placement, by_id: dict[str, Worker]) -> None:
        """A split: the shards, then the head (replicas go through `self.replicas`)."""
        head = by_id[p.head] if p.head else None
        if head is None:
            return
        hr = reported(head)
        head_broken = hr.get("state") == "broken"
        if head_broken:
            if not self._retries.may_retry(head.id):
                return
            self._retries.retried(head.id)
        peer = urllib.parse.urlsplit(head.url).hostname or "127.0.0.1"
        endpoints: list[str] = []
        for sid in p.workers[1:]:
            s = by_id[sid]
            sr = reported(s)
            ok = (sr.get("role") == "shard" and sr.get("model") == p.model
                  and sr.get("state") == "ready" and sr.get("rpc_endpoint")
                  and not head_broken)
            if ok:
                endpoints.append(sr["rpc_endpoint"])
                continue
            body = {"role": "shard", "model": p.model, "allow_peer": [peer], "restart": True}
            answer = await self._push(s, body)
            if not answer or not answer.get("rpc_endpoint"):
                return  # try again next round
            endpoints.append(answer["rpc_endpoint"])
        if (hr.get("role") == "head" and hr.get("model") == p.model
                and hr.get("shards") == endpoints
                and hr.get("tensor_split") == list(p.tensor_split) and not head_broken):
            return
        await self._push(head, {"role": "head", **self._file_fields(p.model),
                                "shards": endpoints, "tensor_split": list(p.tensor_split),
                                "restart": head_broken})

    async def _push(self, w: Worker, body: dict[str, Any]) -> dict[str, Any] | None:
        return await self._call(w, "POST", "/control/placement", body)

    async def _call(self, w: Worker, method: str, path: str,
                    body: dict[str, Any] | None) -> dict[str, Any] | None:
        assert self._client is not None
        self.generation += 1
        what = (body or {}).get("role") or (body or {}).get("model") or path.rsplit("/", 1)[-1]
        if body is not None:
            body = {**body, "generation": self.generation}
        try:
            r = await self._client.request(method, w.base + path, json=body)
        except httpx.HTTPError as exc:
            self.errors[w.id] = f"{type(exc).__name__}: {exc}"
            log.warning("placing %s (%s %s) failed: %s", w.id, method, what, exc)
            return None
        if method == "DELETE" and r.status_code in (200, 404):
            # Unloading (draining) there: no new request goes to it from now on.
            self.registry.model_gone(w, urllib.parse.unquote(path.rsplit("/", 1)[-1]))
        if r.status_code != 200:
            self.errors[w.id] = f"HTTP {r.status_code}: {r.text[:200]}"
            log.warning("worker %s refused its placement: %s", w.id, self.errors[w.id])
            return None
        self.errors.pop(w.id, None)
        answer = r.json()
        # Seen at once, not at the next probe, so the next round does not push it again.
        w.status["placement"] = answer
        return answer

    # ------------------------------------------------------------------ reading
    def placements(self, unmanaged: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The contract's `/cluster` placements: ours, plus self-placed replicas."""
        return placer_view.placements(self, unmanaged)

    def loads(self) -> list[dict[str, Any]]:
        """Models being fetched, loaded, drained (or failed) on managed workers."""
        return placer_view.loads(self)
