"""The workers the gateway knows, their health and their load.

Workers come from `--worker`, the config file, or join by themselves. Each is probed with
`GET /status` every `probe_interval` seconds, so its load view is never much older than
that. States: `loading` (known, not serving yet), `idle` (holds no model by design: started
without `--model`, waiting to be placed), `ready`, `busy` (every slot taken), `down`
(unreachable or failing). A worker is ejected at once on a connect error, a 5xx or a
timeout seen by a real request (passive), and re-admitted by the next probe that succeeds
after the ejection. A joined worker that stops heartbeating for `join_ttl` is dropped.

A worker that fails every probe for `stall_timeout` seconds while requests are on it is
declared stalled: a frozen process keeps its sockets open, so those requests would
otherwise wait out the read timeout. The `stall_listeners` (upstream.py) move them.

Each worker's record is a `gateway.worker_record.Worker`; `gateway.probe_status` copies a probe's
answer into it, and the registry acts on the state it yields.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from gateway import cost, probe_status
from gateway.config import GatewayConfig
from gateway.state import SharedState
from gateway.transport import LeanTransport
from gateway.worker_record import HEALTHY, Worker, id_from_url

log = logging.getLogger("corral.gateway")

DOWN_MARK_SECONDS = 5.0  # an ejection reported by another replica is applied this long


class Registry:
    def __init__(self, cfg: GatewayConfig, state: SharedState) -> None:
        self.cfg = cfg
        self.shared = state
        self.replica = f"{socket.gethostname()}:{cfg.port}:{os.getpid()}"  # this gateway
        self.workers: dict[str, Worker] = {}
        # Healthy workers per model, rebuilt on every health or model change: routing reads it.
        self.by_model: dict[str, list[Worker]] = {}
        self.known_models: set[str] = set(cfg.models)
        self.lost_at: dict[str, float] = {}  # model -> when its last healthy worker went
        self.listeners: list[Callable[[], None]] = []  # called when capacity may have freed
        self.stall_listeners: list[Callable[[Worker], None]] = []  # a worker froze
        self.state_listeners: list[Callable[[Worker, str, str], None]] = []  # (w, old, new)
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Shared registry: workers that heartbeat to this replica (id -> monotonic time of
        # the last heartbeat), and workers learned from another replica through shared state.
        self._heard: dict[str, float] = {}
        self._from_shared: set[str] = set()
        # Shared health: ejections seen here, to report; the last one applied per worker.
        self._ejections: dict[str, float] = {}
        self._down_applied: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.cfg.probe_timeout, connect=min(1.0, self.cfg.probe_timeout)),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
            trust_env=False,
            transport=LeanTransport() if self.cfg.lean_transport else None,
        )
        for url in self.cfg.workers:
            self.add(id_from_url(url), url, "static")
        self._tasks.append(asyncio.create_task(self._housekeeping()))

    async def stop(self) -> None:
        for w in self.workers.values():
            if w.task:
                w.task.cancel()
        for t in self._tasks:
            t.cancel()
        for t in [*self._tasks, *(w.task for w in self.workers.values() if w.task)]:
            with contextlib.suppress(BaseException):
                await t
        if self._client:
            await self._client.aclose()

    # ------------------------------------------------------------------ membership
    def add(self, worker_id: str, url: str, source: str) -> Worker:
        w = Worker(worker_id, url, source)
        self.workers[worker_id] = w
        w.task = asyncio.create_task(self._probe_loop(w))
        log.warning("worker %s added at %s (%s)", worker_id, w.url, source)
        return w

    def join(self, worker_id: str | None, url: str) -> tuple[Worker, bool]:
        """A heartbeat from a worker; returns (worker, whether it is new)."""
        url = url.rstrip("/")
        wid = worker_id or id_from_url(url)
        self._heard[wid] = time.monotonic()
        self._from_shared.discard(wid)
        w = self.workers.get(wid)
        if w is None:  # maybe configured statically under its URL's id
            w = next((x for x in self.workers.values() if x.url == url), None)
            if w is not None:
                self._rekey(w, wid)
        if w is None:
            return self.add(wid, url, "joined"), True
        w.last_seen = time.monotonic()
        if w.url != url:
            w.url = w.base = url
            self._set_state(w, "loading", "re-joined at a new URL")
        return w, False

    def leave(self, worker_id: str) -> bool:
        w = self.workers.pop(worker_id, None)
        self._heard.pop(worker_id, None)
        self._from_shared.discard(worker_id)
        if w is None:
            return False
        if w.task:
            w.task.cancel()
        w.state = "down"
        self._rebuild()
        asyncio.create_task(self.shared.forget_worker(worker_id))
        log.warning("worker %s left", worker_id)
        return True

    def _rekey(self, w: Worker, new_id: str) -> None:
        if new_id == w.id or new_id in self.workers:
            return
        self.workers.pop(w.id, None)
        w.id = new_id
        self.workers[new_id] = w

    # ------------------------------------------------------------------ health
    def eject(self, w: Worker, reason: str, share: bool = True) -> None:
        """Passive ejection: a real request saw this worker fail (here, or at another
        replica). The next probe sent after it re-admits the worker if it answers."""
        w.ejected_at = time.monotonic()
        if share:
            self._ejections[w.id] = self._down_applied[w.id] = time.time()
        if w.state != "down":
            self._set_state(w, "down", reason)

    def model_gone(self, w: Worker, model: str) -> None:
        """`model` is not served on `w` (unloaded or moving, said by the worker or the
        placer): out of its workers at once, rather than at the next probe."""
        if model in w.models:
            w.models = w.models - {model}
            self._rebuild()

    def saturated(self, w: Worker) -> None:
        """The worker said 429: treat it as full until its next probe says otherwise."""
        w.external = max(w.external, w.slots_total + self.cfg.worker_queue_allowance)

    def _set_state(self, w: Worker, state: str, why: str = "") -> None:
        old = w.state
        w.state = state
        if why:
            w.last_error = why
        if old != state and not (old in HEALTHY and state in HEALTHY):
            log.warning("worker %s: %s -> %s %s", w.id, old, state, f"({why})" if why else "")
            for fn in self.state_listeners:
                fn(w, old, state)
        if (old in HEALTHY) != (state in HEALTHY):
            self._rebuild()

    def _rebuild(self) -> None:
        by_model: dict[str, list[Worker]] = {}
        for w in self.workers.values():
            self.known_models.update(w.models)
            if w.healthy and w.offered != 0:
                for m in w.models:
                    by_model.setdefault(m, []).append(w)
        now = time.monotonic()
        for m in self.by_model.keys() - by_model.keys():
            self.lost_at[m] = now
        self.by_model = by_model
        self._weigh()

    def _weigh(self) -> None:
        """Capacity = slots x measured decode speed, so a 4x faster box takes ~4x the work."""
        speeds = [w.tokens_per_second for w in self.workers.values() if w.tokens_per_second > 0]
        default = sum(speeds) / len(speeds) if speeds else 1.0
        for w in self.workers.values():
            w.capacity = max(1, w.slots_total) * (w.tokens_per_second or default)
        cost.weigh(self.workers.values())

    def _notify(self) -> None:
        for fn in self.listeners:
            fn()

    def healthy_for(self, model: str) -> list[Worker]:
        return self.by_model.get(model, [])

    def models(self) -> list[str]:
        return sorted(self.by_model)

    # ------------------------------------------------------------------ probes
    async def _probe_loop(self, w: Worker) -> None:
        while True:
            await self.probe(w)
            await asyncio.sleep(self.cfg.probe_interval)

    async def probe(self, w: Worker) -> None:
        assert self._client is not None
        sent = time.monotonic()
        inflight_sent = w.inflight
        try:
            r = await self._client.get(w.base + "/status")
            if r.status_code != 200:
                raise ValueError(f"/status answered {r.status_code}")
            st = orjson.loads(r.content)
            if not isinstance(st, dict):
                raise ValueError("/status is not a JSON object")
        except asyncio.CancelledError:
            raise
        except httpx.ConnectError as exc:
            self._probe_failed(w, f"unreachable: {exc!s:.200}", hard=True)
        except (httpx.HTTPError, ValueError, OSError) as exc:
            self._probe_failed(w, f"{type(exc).__name__}: {exc!s:.200}", hard=False)
        else:
            self._probe_ok(w, st, sent, inflight_sent)

    def _probe_failed(self, w: Worker, why: str, hard: bool) -> None:
        w.fails += 1
        if w.state == "asleep":
            return  # a sleeping box does not answer: that is not an outage
        if hard or w.fails >= 2:
            self._set_state(w, "down", why)
        limit = self.cfg.stall_timeout
        silent = time.monotonic() - w.answered
        if limit > 0 and silent >= limit and w.watched and not w.stalled:
            w.stalled = True
            log.warning("worker %s: no answer for %.0f s, moving its %d requests elsewhere",
                        w.id, silent, len(w.watched))
            for fn in self.stall_listeners:
                fn(w)

    def _probe_ok(self, w: Worker, st: dict[str, Any], sent: float, inflight_sent: int) -> None:
        w.answered = time.monotonic()
        w.stalled = False
        if sent < w.ejected_at:
            return  # this probe left before the ejection: it proves nothing
        w.fails = 0
        if w.source == "static" and isinstance(st.get("id"), str):
            self._rekey(w, st["id"])
        new_state, changed = probe_status.apply(w, st, inflight_sent)
        if w.state != new_state:
            self._set_state(w, new_state, "" if new_state in HEALTHY else w.last_error)
            if new_state in HEALTHY:
                w.last_error = ""
        if changed:
            self._rebuild()
        self._notify()

    async def _housekeeping(self) -> None:
        """Drops joined workers that stopped heartbeating; shares in-flight counts."""
        shared_failing = False
        while True:
            await asyncio.sleep(self.cfg.probe_interval)
            now = time.monotonic()
            for w in list(self.workers.values()):
                if w.id in self._from_shared and shared_failing:
                    continue  # announced by another replica: keep it while Redis is away
                if w.source == "joined" and now - w.last_seen > self.cfg.join_ttl \
                        and w.state != "asleep":  # asleep: kept, to be woken
                    log.warning("worker %s stopped heartbeating; dropping it", w.id)
                    self.leave(w.id)
            try:
                mine = {w.id: w.inflight for w in self.workers.values() if w.inflight}
                await self.shared.publish_inflight(self.replica, mine)
                others = await self.shared.others_inflight(self.replica)
                await self._share_registry()
            except Exception as exc:  # shared state unreachable: route on local knowledge
                if not shared_failing:
                    log.warning("shared state unreachable, routing on local counts: %s", exc)
                shared_failing = True
                continue
            if shared_failing:
                log.warning("shared state reachable again")
                shared_failing = False
            for w in self.workers.values():
                w.others = others.get(w.id, 0)

    async def _share_registry(self) -> None:
        """Announces the workers heartbeating here; adopts those heartbeating elsewhere."""
        now = time.monotonic()
        mine: dict[str, tuple[str, float]] = {}
        for wid, heard in list(self._heard.items()):
            w = self.workers.get(wid)
            left = self.cfg.join_ttl - (now - heard)
            if w is None or left <= 0:
                self._heard.pop(wid, None)
                continue
            mine[wid] = (w.url, left)
        await self.shared.announce_workers(mine)
        shared = await self.shared.shared_workers()
        urls = {w.url for w in self.workers.values()}
        for wid, url in shared.items():
            if wid in self._heard:
                continue
            w = self.workers.get(wid)
            if not url:  # left through another replica
                if wid in self._from_shared:
                    log.warning("worker %s left through another gateway replica", wid)
                    self.leave(wid)
                continue
            if w is None:
                if url.rstrip("/") in urls:
                    continue  # known here already, under another id (e.g. --worker)
                self.add(wid, url, "joined")
                self._from_shared.add(wid)
            elif wid in self._from_shared:
                w.last_seen = now  # unannounced for join_ttl, housekeeping drops it
        # Health: a worker that failed a real request at one replica is ejected at all.
        ejected, self._ejections = self._ejections, {}
        try:
            await self.shared.mark_down(ejected)
        except Exception:
            for k, t in ejected.items():
                self._ejections.setdefault(k, t)
            raise
        wall = time.time()
        for wid, t in (await self.shared.down_marks(wall - DOWN_MARK_SECONDS)).items():
            w = self.workers.get(wid)
            if w is not None and t > self._down_applied.get(wid, 0.0):
                self._down_applied[wid] = t
                if w.healthy:
                    self.eject(w, "failed a request at another gateway replica", share=False)

    def learned_elsewhere(self, worker_id: str) -> bool:
        """Whether the worker heartbeats to another gateway replica, not to this one."""
        return worker_id in self._from_shared

    async def withdraw(self, worker_id: str) -> None:
        """A worker left through this replica: other replicas drop it too."""
        try:
            await self.shared.withdraw_worker(worker_id, self.cfg.join_ttl)
        except Exception as exc:  # noqa: BLE001 - it expires by itself anyway
            log.warning("shared state unreachable, %s expires there by itself: %s",
                        worker_id, type(exc).__name__)

    def placements(self) -> list[dict[str, Any]]:
        """Every model served today is a full replica on each worker that has it."""
        out = []
        for m in sorted(self.known_models):
            ids = sorted(w.id for w in self.workers.values() if m in w.models)
            out.append({"model": m, "mode": "replica", "workers": ids, "head": None})
        return out
