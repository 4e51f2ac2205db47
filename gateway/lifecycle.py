"""Boxes people also use: drain, sleep when idle, wake on demand (the gateway's side).

- Drain (`POST /cluster/workers/{id}/drain`, `corral drain`, or idle-sleep): the worker is
  `draining` here at once, so nothing new is routed to it, and is told the same through its
  control API (`POST /control/drain`), so every gateway replica reads it from the next
  probe. Its requests finish there; with a deadline, what is still running when it passes
  is moved off (the stall path: streams continue on another worker through
  continuation.py, waits are retried). Then it leaves (the worker exits, leaving the
  cluster; a static worker is dropped once it is gone) or sleeps.
- Sleep: a worker that reports a sleep command (`/status` `sleep`), has had nothing in
  flight and no role in the placer's plan for `idle_sleep_after` seconds is drained with
  `then: sleep`; it runs the command and reports `asleep`. An asleep worker that stops
  answering stays `asleep` (registry.py), with its models and Wake-on-LAN facts. The last
  awake worker of a model sleeps only if it can be woken (it reported a MAC).
- Wake: a request for a model whose workers are asleep is held (admission's `hold`) up to
  `wake_deadline`; once one has waited `wake_after`, a magic packet (the `wakeonlan`
  package) goes to the broadcast address of the LAN of one asleep worker serving it,
  again every `RESEND_SECONDS`, until it answers (then `POST /control/wake`, for a box that
  resumed rather than rebooted) or `wake_deadline` passes (logged, in `last_error`).

Every transition is a log line (registry.py) and counted here: corral_worker_drains_total,
corral_worker_sleeps_total, corral_worker_wakes_total{result}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import wakeonlan
from prometheus_client import Counter

from wire.errors import APIError, bad_request

if TYPE_CHECKING:
    from gateway.admission import Admission
    from gateway.config import GatewayConfig
    from gateway.metrics import Metrics
    from gateway.placer import Placer
    from gateway.registry import Registry
    from gateway.worker_record import Worker

log = logging.getLogger("corral.gateway")

RESEND_SECONDS = 3.0
WORKER_MARGIN = 3.0  # the worker's own deadline trails ours: we move the requests first
CONTROL_TIMEOUT = 5.0


@dataclass
class Drain:
    then: str
    reason: str
    started: float
    deadline: float | None  # monotonic
    moved: bool = False
    confirmed: bool = False  # the worker reported draining (registry.py)


@dataclass
class Waking:
    model: str
    started: float
    sent: float
    told: float = 0.0  # when /control/wake was last posted


class Lifecycle:
    def __init__(self, cfg: GatewayConfig, registry: Registry, admission: Admission,
                 placer: Placer, metrics: Metrics) -> None:
        self.cfg = cfg
        self.registry = registry
        self.admission = admission
        self.placer = placer
        r = metrics.prom
        self.drains = Counter("corral_worker_drains_total", "Drains begun, by who asked.",
                              ["reason"], registry=r)
        self.sleeps = Counter("corral_worker_sleeps_total", "Workers that went to sleep.",
                              registry=r)
        self.wakes = Counter("corral_worker_wakes_total", "Wake-ups: packets first sent, "
                             "boxes back, boxes that did not wake in time.", ["result"],
                             registry=r)
        self.busy_at: dict[str, float] = {}
        self.waking: dict[str, Waking] = {}
        self._kept_awake: set[str] = set()  # logged once: idle, but the last and unwakeable
        self._jobs: set[asyncio.Task[Any]] = set()
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        registry.state_listeners.append(self._on_state)
        admission.hold = self.hold_for

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=CONTROL_TIMEOUT, trust_env=False,
            headers={"Authorization": f"Bearer {self.cfg.cluster_token}"})
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        for t in [self._task, *self._jobs]:
            if t is not None:
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
        if self._client is not None:
            await self._client.aclose()

    # ------------------------------------------------------------------ drain
    async def drain(self, w: Worker, then: str = "leave", deadline: float | None = None,
                    reason: str = "api") -> dict[str, Any]:
        if then == "sleep" and not w.status.get("sleep"):
            raise bad_request(f"Worker {w.id!r} has no --sleep-command: it cannot sleep.",
                              param="then")
        if w.state == "asleep":
            return {"id": w.id, "state": w.state, "then": then}
        deadline = deadline or self.cfg.drain_timeout or None
        now = time.monotonic()
        w.drain = Drain(then, reason, now, now + deadline if deadline else None)
        if w.state != "draining":
            self.registry._set_state(w, "draining", f"drain ({reason}, then {then})")
        body = {"then": then, "deadline": deadline + WORKER_MARGIN if deadline else None}
        try:
            assert self._client is not None
            r = await self._client.post(f"{w.base}/control/drain", json=body)
            if r.status_code != 200:
                raise ValueError(f"it answered {r.status_code}: {r.text[:200]}")
            told = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            w.drain = None
            self.registry._set_state(w, "loading", f"drain refused: {exc!s:.200}")
            raise APIError(502, f"Worker {w.id!r} could not be told to drain: {exc!s:.200}",
                           "server_error", None, "drain_failed") from None
        return {"id": w.id, "state": "draining", "then": then, "deadline": deadline,
                "worker": told}

    def _on_state(self, w: Worker, old: str, new: str) -> None:
        now = time.monotonic()
        if new == "draining":
            self.drains.labels(w.drain.reason if w.drain else "worker").inc()
        if new == "asleep":
            self.sleeps.inc()
            w.drain = None
        if old == "asleep":
            self.busy_at[w.id] = now  # awake again: its idle time starts afresh
            wk = self.waking.pop(w.id, None)
            if wk is not None:
                self.wakes.labels("rejoined").inc()
                log.warning("worker %s woke and rejoined after %.1f s (for %s)", w.id,
                            now - wk.started, wk.model)
        if old == "draining" and new not in ("draining", "asleep", "down"):
            w.drain = None  # the drain ended without leaving (e.g. its sleep failed)

    # ------------------------------------------------------------------ decisions
    def hold_for(self, model: str) -> float | None:
        """Seconds a request for `model` may wait although no worker can take it now: a
        box asleep (or going to sleep) will be woken; a polite one will come back."""
        hold = None
        for w in self.registry.workers.values():
            if model not in w.models:
                continue
            if (w.state == "asleep" or (w.drain and w.drain.then == "sleep")) \
                    and w.status.get("wake"):
                return self.cfg.wake_deadline
            if w.healthy and w.offered == 0:
                hold = self.cfg.queue_timeout
        return hold

    def _needed(self) -> set[str]:
        placed: set[str] = set()
        for p in [*getattr(self.placer, "current", []), *getattr(self.placer, "draining", [])]:
            placed.update(p.workers)
        return placed

    def _wakeable(self, w: Worker) -> bool:
        return bool((w.status.get("wake") or {}).get("mac"))

    def _may_sleep(self, w: Worker) -> bool:
        """Not the last awake worker of a model unless a magic packet can bring it back."""
        if self._wakeable(w):
            return True
        alone = [m for m in w.models
                 if not any(x is not w and x.healthy and m in x.models
                            for x in self.registry.workers.values())]
        if alone and w.id not in self._kept_awake:
            self._kept_awake.add(w.id)
            log.warning("worker %s is idle but stays awake: it alone serves %s and reported "
                        "no MAC to wake it by", w.id, ", ".join(sorted(alone)))
        return not alone

    def _idle_sleep(self, now: float) -> None:
        after = self.cfg.idle_sleep_after
        needed = self._needed()
        for gone in self.busy_at.keys() - self.registry.workers.keys():
            del self.busy_at[gone]
        for w in list(self.registry.workers.values()):
            if w.load or w.slots_busy or w.queue_depth or w.id in needed or w.drain:
                self.busy_at[w.id] = now
                continue
            idle = now - self.busy_at.setdefault(w.id, now)
            if after <= 0 or idle < after or not w.healthy or not w.status.get("sleep"):
                continue
            if self.registry.learned_elsewhere(w.id) or not self._may_sleep(w):
                continue
            log.warning("worker %s: idle for %.0f s (idle_sleep_after %g s): draining it to "
                        "sleep", w.id, idle, after)
            self.busy_at[w.id] = now
            self._spawn(self.drain(w, "sleep", None, "idle_sleep"))

    def _spawn(self, coro: Any) -> None:
        async def run() -> None:
            try:
                await coro
            except APIError as exc:
                log.error("lifecycle: %s", exc.message)

        t = asyncio.create_task(run())
        self._jobs.add(t)
        t.add_done_callback(self._jobs.discard)

    def _drains(self, now: float) -> None:
        for w in list(self.registry.workers.values()):
            d = w.drain
            if d is None:
                continue
            if d.deadline is not None and now >= d.deadline and not d.moved:
                d.moved = True
                if w.watched:
                    log.warning("worker %s: drain deadline passed, moving its %d request(s) "
                                "elsewhere", w.id, len(w.watched))
                    for fn in self.registry.stall_listeners:
                        fn(w)
            if d.then == "leave" and w.state == "down" and w.fails >= 2:
                log.warning("worker %s drained and gone: dropping it", w.id)
                self.registry.leave(w.id)

    def _wake(self, now: float) -> None:
        oldest: dict[str, float] = {}
        for waiter in self.admission.queue.in_order():
            if not waiter.future.done():
                oldest[waiter.model] = min(oldest.get(waiter.model, now), waiter.since)
        for model, since in oldest.items():
            if now - since < self.cfg.wake_after:
                continue
            if any(wk.model == model for wk in self.waking.values()):
                continue
            w = next((x for x in self.registry.workers.values() if x.state == "asleep"
                      and model in x.models and self._wakeable(x)
                      and x.id not in self.waking), None)
            if w is not None:
                self.waking[w.id] = Waking(model, now, 0.0)
                self.wakes.labels("sent").inc()
                log.warning("worker %s: waking it (requests for %s waited %.1f s)", w.id,
                            model, now - since)
        for wid, wk in list(self.waking.items()):
            w = self.registry.workers.get(wid)
            if w is None or w.state != "asleep":
                self.waking.pop(wid, None)
                continue
            if now - wk.started > self.cfg.wake_deadline:
                self.waking.pop(wid)
                self.wakes.labels("timeout").inc()
                w.last_error = f"did not wake within wake_deadline ({self.cfg.wake_deadline:g} s)"
                log.error("worker %s %s", wid, w.last_error)
                continue
            if now - wk.sent >= RESEND_SECONDS:
                wk.sent = now
                self._send_packet(w)
            if w.fails == 0 and w.answered > wk.started and now - wk.told >= 1.0:
                wk.told = now  # it answers but still says asleep: it resumed, tell it
                self._spawn(self._tell_awake(w))

    def _send_packet(self, w: Worker) -> None:
        wk = w.status.get("wake") or {}
        try:
            wakeonlan.send_magic_packet(wk["mac"], ip_address=wk.get("broadcast")
                                        or "255.255.255.255", port=int(wk.get("port") or 9))
        except (OSError, ValueError, KeyError) as exc:
            w.last_error = f"magic packet not sent: {exc}"
            log.error("worker %s: %s", w.id, w.last_error)

    async def _tell_awake(self, w: Worker) -> None:
        assert self._client is not None
        with contextlib.suppress(httpx.HTTPError):
            await self._client.post(f"{w.base}/control/wake")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.probe_interval)
            now = time.monotonic()
            try:
                self._drains(now)
                self._idle_sleep(now)
                self._wake(now)
            except Exception:  # never stop deciding over one bad round; say why
                log.exception("lifecycle round failed")
