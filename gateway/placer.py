"""The placer: turns declared models (`--model`, `models = [...]`) into roles on workers.

Every second, and whenever the set of workers changes, it plans (`gateway.placement.plan`)
over the workers that asked to be placed (started without `--model`: their `/status` says
`placement.managed`), from the memory they report, and pushes each worker its role through
the worker control API (`POST /control/placement`, cluster token):

- replica: the model's name, where to fetch it (`/cluster/models/{name}/file` here) and its
  sha256 and size;
- split: the shards first (each answers with its RPC endpoint, open to the head's address
  only), then the head with those endpoints and the tensor split;
- workers with no place in the plan are told `none`.

A push happens only when what a worker reports differs from its role, or its placement
broke (a dead head is restarted with fresh shards). A worker that stops answering is
given `DEAD_AFTER` seconds before the plan moves its work elsewhere. Requests for a split
model reach its head by ordinary routing: the head is the member that reports the model.

A declared model the plan leaves out (it fits no worker and no split of them) is never
silent: one log line when it becomes unplaceable, an `unplaceable` entry with the numbers in
`/cluster` placements, and a 503 `model_unplaceable` saying why for requests (`refusal`).
The plan is logged only when it changes (plans come in a canonical order).

The declared files are served to workers by `api/models.py`, from `catalog` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from gateway.placement import (
    MemoryNeed,
    ModelSpec,
    Placement,
    Unplaceable,
    WorkerSpec,
    estimate,
    explain,
    plan,
    summary,
)
from wire.errors import APIError

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.registry import Registry, Worker
    from gateway.topology import Topology

log = logging.getLogger("corral.gateway")

TICK_SECONDS = 1.0
# Joined workers heartbeat every 3 s: after a (re)start, wait until each has been heard
# from before planning, so a partial view does not move placements that are running fine.
STARTUP_GRACE = 4.0
DEAD_AFTER = 2.0
PROBE_MAX = 8  # split candidates whose pairs are probed (n(n-1)/2 short probes)
PUSH_TIMEOUT = 30.0


@dataclass
class ModelFile:
    name: str
    path: Path
    size: int
    sha256: str


def _sha256(path: Path) -> str:
    from worker.fetch import sha256_of

    return sha256_of(path)


class Placer:
    def __init__(self, cfg: GatewayConfig, registry: Registry,
                 topology: Topology | None = None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.topology = topology
        self.declared = list(cfg.models)
        self.catalog: dict[str, ModelFile] = {}
        self._catalog_read = False
        self.current: list[Placement] = []
        self.draining: list[Placement] = []  # still serving until their successor is ready
        self.generation = 0
        self.unplaceable: dict[str, Unplaceable] = {}  # declared models the plan left out
        self.rounds = 0  # planning rounds, and how many changed the plan (metrics)
        self.changes = 0
        self.errors: dict[str, str] = {}  # worker id -> last push error
        self._down_since: dict[str, float] = {}
        self._retries: dict[str, tuple[int, float]] = {}  # broken worker -> (count, next)
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
        from worker.models import DEFAULT_MODEL, resolve

        names = self.declared or [DEFAULT_MODEL]
        for spec in names:
            try:
                name, path = resolve(spec)
            except Exception as exc:
                log.error("model %r cannot be placed: %s", spec, exc)
                continue
            sha = await asyncio.to_thread(_sha256, path)
            self.catalog[name] = ModelFile(name, path, path.stat().st_size, sha)
            self.registry.known_models.add(name)

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

    @staticmethod
    def capacity(w: Worker) -> int:
        mem = w.status.get("memory") or {}
        return int(mem.get("available") or 0) + int(mem.get("model_bytes") or 0)

    def _needs(self, workers: list[Worker]) -> dict[str, MemoryNeed]:
        n_ctx = max((int(w.status.get("n_ctx") or 0) for w in workers), default=0) or 2048
        slots = max((int(w.status.get("slots_total") or 1) for w in workers), default=1)
        return {m.name: estimate(m.path, n_ctx, slots) for m in self.catalog.values()}

    async def tick(self) -> None:
        if not self._catalog_read:
            # Declared models are read at once; the default one only when a worker waits.
            if not (self.declared or self.managed()):
                return
            self._catalog_read = True
            await self._load_catalog()
        if not self.catalog:
            return
        now = time.monotonic()
        if now - self._started < STARTUP_GRACE:
            return
        workers = [w for w in self.managed() if self._alive(w, now)]
        if not workers and not self.current:
            self.unplaceable = {}  # no worker at all: "no healthy worker", not "too big"
            return
        needs = await asyncio.to_thread(self._needs, workers)
        models = [ModelSpec(name, need.total) for name, need in needs.items()]
        specs = [WorkerSpec(w.id, self.capacity(w)) for w in workers]
        cost = None
        if self.topology is not None and any(
                all(w.memory < m.need for w in specs) for m in models):
            # A split is needed: measure its candidates' links (once per PAIR_TTL).
            if len(specs) <= PROBE_MAX:
                await self.topology.probe_pairs([w.id for w in specs], self._client)
            cost = self.topology.cost
        new = plan(models, specs, self.current or self._running(workers), cost)
        self.rounds += 1
        if new != self.current:  # both canonical: equal roles compare equal
            self.changes += 1
            log.warning("placement: %s", [p.to_json() for p in new] or "nothing placed")
        self.current = new
        self._note_unplaceable(explain(needs, specs, new), {w.id for w in workers})
        by_id = {w.id: w for w in workers}
        for w in workers:  # a placement that serves again starts its retry count afresh
            if self._reported(w).get("state") == "ready":
                self._retries.pop(w.id, None)
        placed: set[str] = set()
        jobs = []
        for p in new:
            placed.update(p.workers)
            jobs.append(self._apply(p, by_id))
        # Make before break: what serves a model now keeps serving it until the model's new
        # placement is ready (a split giving way to a replica on a bigger worker, say).
        ready = {p.model for p in new if self._serving(p, by_id)}
        pending = {p.model for p in new} - ready
        self.draining = [rp for rp in self._running(workers)
                         if rp.model in pending and rp not in new]
        keep = {wid for rp in self.draining for wid in rp.workers}
        for w in workers:
            if w.id not in placed | keep and self._reported(w).get("role") != "none":
                jobs.append(self._push(w, {"role": "none"}))
        await asyncio.gather(*jobs)

    def _note_unplaceable(self, found: dict[str, Unplaceable], managed: set[str]) -> None:
        """Keeps `unplaceable`, logging each model once when it becomes so (and when it
        stops). A model some worker we do not place serves is not a dead end."""
        served = {m for w in self.registry.workers.values()
                  if w.id not in managed and w.healthy for m in w.models}
        found = {k: u for k, u in found.items() if k not in served}
        for name, u in found.items():
            if name not in self.unplaceable:
                log.error("model %s cannot be placed: %s", name, u.reason)
        for name in self.unplaceable.keys() - found.keys():
            log.warning("model %s is no longer unplaceable", name)
        self.unplaceable = found

    def refusal(self, model: str) -> APIError | None:
        """The 503 for a request to a model that cannot be placed, while nothing serves it."""
        u = self.unplaceable.get(model)
        if u is None or self.registry.by_model.get(model):
            return None
        return APIError(503, f"The model {model!r} cannot be placed on this cluster: "
                        f"{u.reason}.", "service_unavailable", None, "model_unplaceable")

    def _serving(self, p: Placement, by_id: dict[str, Worker]) -> bool:
        for wid in p.workers:
            r = self._reported(by_id[wid])
            role = "replica" if p.mode == "replica" else ("head" if wid == p.head else "shard")
            if r.get("role") != role or r.get("model") != p.model or r.get("state") != "ready":
                return False
        return True

    def _running(self, workers: list[Worker]) -> list[Placement]:
        """What the workers already run (after a gateway restart), so the plan keeps it."""
        out: list[Placement] = []
        by_endpoint = {self._reported(w).get("rpc_endpoint"): w.id for w in workers
                       if self._reported(w).get("role") == "shard"}
        for w in workers:
            r = self._reported(w)
            if r.get("state") == "broken" or not r.get("model"):
                continue
            if r.get("role") == "replica":
                out.append(Placement(r["model"], "replica", (w.id,), w.id, (1.0,)))
            elif r.get("role") == "head":
                shards = tuple(by_endpoint.get(e) for e in r.get("shards") or ())
                if shards and all(shards):
                    out.append(Placement(r["model"], "split", (w.id, *shards), w.id,
                                         tuple(r.get("tensor_split") or ())))
        return out

    # ------------------------------------------------------------------ pushing
    def _file_fields(self, model: str) -> dict[str, Any]:
        m = self.catalog[model]
        quoted = urllib.parse.quote(model, safe="")
        base = f"http://{self._public_host()}:{self.cfg.port}"
        return {"model": model, "sha256": m.sha256, "size": m.size,
                "model_url": f"{base}/cluster/models/{quoted}/file",
                "path": str(m.path)}  # a worker on the gateway's box may use it in place

    def _public_host(self) -> str:
        host = self.cfg.host
        return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host

    @staticmethod
    def _reported(w: Worker) -> dict[str, Any]:
        return w.status.get("placement") or {}

    async def _apply(self, p: Placement, by_id: dict[str, Worker]) -> None:
        if p.mode == "replica":
            w = by_id[p.workers[0]]
            r = self._reported(w)
            broken = r.get("state") == "broken"
            if broken and not self._may_retry(w.id):
                return
            if r.get("role") != "replica" or r.get("model") != p.model or broken:
                if broken:
                    self._retried(w.id)
                await self._push(w, {"role": "replica", **self._file_fields(p.model)})
            return
        head = by_id[p.head] if p.head else None
        if head is None:
            return
        hr = self._reported(head)
        head_broken = hr.get("state") == "broken"
        if head_broken:
            if not self._may_retry(head.id):
                return
            self._retried(head.id)
        peer = urllib.parse.urlsplit(head.url).hostname or "127.0.0.1"
        endpoints: list[str] = []
        for sid in p.workers[1:]:
            s = by_id[sid]
            sr = self._reported(s)
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

    def _may_retry(self, wid: str) -> bool:
        """A broken placement is retried at once, then after 1, 2, 4 … 60 s."""
        return time.monotonic() >= self._retries.get(wid, (0, 0.0))[1]

    def _retried(self, wid: str) -> None:
        n, _ = self._retries.get(wid, (0, 0.0))
        self._retries[wid] = (n + 1, time.monotonic() + min(60.0, 2.0 ** n))

    async def _push(self, w: Worker, body: dict[str, Any]) -> dict[str, Any] | None:
        assert self._client is not None
        self.generation += 1
        body = {**body, "generation": self.generation}
        try:
            r = await self._client.post(w.base + "/control/placement", json=body)
        except httpx.HTTPError as exc:
            self.errors[w.id] = f"{type(exc).__name__}: {exc}"
            log.warning("placing %s as %s failed: %s", w.id, body["role"], exc)
            return None
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
        ours = {w.id for w in self.managed()}
        out = []
        for p in unmanaged:
            ids = [i for i in p.get("workers", []) if i not in ours]
            if ids:
                out.append({**p, "workers": ids})
        for e in summary(self.current):
            e["state"] = self._state(e)
            if e.get("mode") == "split" and self.topology is not None:
                # What the chosen set's links add to each decoded token (topology.cost).
                e["expected_network_ms_per_token"] = round(
                    self.topology.cost(e["head"], e["workers"]), 3)
            out.append(e)
        for e in summary(self.draining):
            e["state"] = "draining"
            out.append(e)
        out.extend(u.to_json() for u in self.unplaceable.values())
        return out

    def _state(self, e: dict[str, Any]) -> str:
        states = []
        for wid in e["workers"]:
            w = self.registry.workers.get(wid)
            states.append(((w.status.get("placement") or {}).get("state")) if w else "down")
        if any(s in ("broken", "down", None) for s in states):
            return "broken"
        if all(s == "ready" for s in states):
            return "ready"
        return "loading"
