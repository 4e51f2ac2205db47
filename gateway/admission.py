"""Admission: who may wait for a worker, and for how long.

When every eligible worker is full, a request waits in a bounded gateway queue with a
deadline. The queue's order is its own class behind a `put`/`remove`/`in_order` interface:
`fairqueue.FairQueue` (round-robin across users, the default) or `FifoQueue`. Hand-off is
atomic: when capacity frees, `dispatch` reserves a worker *for* the first waiter that can
use it and resolves that waiter's future with it, so nobody overtakes the queue.

Outcomes: a reserved worker; 429 `queue_full` when the queue is at its bound; 429
`queue_timeout` past the deadline; 503 when no healthy worker serves the model; 404 when no
worker has ever served it. Nothing waits without a deadline.

A model that lost its last healthy worker less than `down_grace` seconds ago is in an
outage that may end any moment (a worker restarting, a probe blip): new requests wait in the
queue until a worker is back or the grace is over (then 503), instead of failing at once.
A catalogued model loaded nowhere (`loadable`, the placer's: it loads on demand) lets its
requests wait up to `model_load_timeout` for its first worker; if the placer finds it
cannot be placed after all, `fail` answers them at once with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator

from gateway.config import GatewayConfig
from gateway.cost import Job
from gateway.fairqueue import FairQueue
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.routing import Need, Router
from gateway.waiter import Waiter
from gateway.worker_record import Worker
from wire.errors import APIError, not_found, overloaded, unavailable


class Exhausted(Exception):
    """Every healthy worker for the model was tried already (by this request's retries)."""


class FifoQueue:
    """First come, first served."""

    def __init__(self) -> None:
        self._q: deque[Waiter] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def put(self, w: Waiter) -> None:
        self._q.append(w)

    def remove(self, w: Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._q.remove(w)

    def in_order(self) -> Iterator[Waiter]:
        """Waiters in the order they should be served (a snapshot; removal is safe)."""
        return iter(list(self._q))


class Admission:
    def __init__(self, cfg: GatewayConfig, registry: Registry, router: Router,
                 metrics: Metrics, queue: FifoQueue | FairQueue | None = None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.router = router
        self.metrics = metrics
        self.queue = queue if queue is not None else FairQueue()
        # A catalogued model that loads on demand (set by core: the placer's `loadable`).
        self.loadable: Callable[[str], bool] = lambda model: False
        self._timer: asyncio.TimerHandle | None = None  # dispatch when a reader frees up
        registry.listeners.append(self.dispatch)
        # Seconds a request may wait for a model no worker can take now but one will
        # (an asleep box being woken, a polite one yielding): lifecycle.py sets it.
        self.hold: Callable[[str], float | None] | None = None
        metrics.collector.queue_length = self.queue.__len__

    def check_model(self, model: str) -> float | None:
        """Raises when `model` cannot be served; returns the seconds left of its outage
        grace when it has no healthy worker right now but may have one shortly."""
        if self.registry.by_model.get(model):
            return None
        if self.loadable(model):
            return self.cfg.model_load_timeout
        if model in self.registry.known_models:
            held = self.hold(model) if self.hold is not None else None
            if held:
                return held
            lost = self.registry.lost_at.get(model)
            left = (lost + self.cfg.down_grace - time.monotonic()) if lost is not None else 0
            if left > 0:
                return left
            self.metrics.rejected.labels("no_healthy_worker").inc()
            raise unavailable(f"No healthy worker serves the model {model!r} right now.",
                              retry_after=2)
        self.metrics.rejected.labels("unknown_model").inc()
        raise not_found(f"The model {model!r} does not exist.")

    async def acquire(self, model: str, exclude: Collection[str] = (),
                      user: str | None = None, prefer: str | None = None,
                      need: Need | None = None, job: Job | None = None) -> Worker:
        """A worker reserved for this request (release it with `release`). `prefer`: the
        worker holding the conversation's cache (affinity; honoured when not queueing)."""
        grace = self.check_model(model)
        if exclude and not self.router.any_unexcluded(model, exclude, need):
            raise Exhausted
        if not self.queue:
            w = self.router.pick(model, exclude, prefer, need, job)
            if w is not None:
                return w
        if len(self.queue) >= self.cfg.queue_size:
            self.metrics.rejected.labels("queue_full").inc()
            raise overloaded("Every worker is busy and the gateway queue is full; retry "
                             "shortly.", retry_after=self._retry_after())
        loop = asyncio.get_running_loop()
        waiter = Waiter(model, exclude, loop.create_future(), user, need, job)
        self.queue.put(waiter)
        wait = self.cfg.queue_timeout if grace is None else (
            grace if self.loadable(model) else min(self.cfg.queue_timeout, grace))
        if self.hold is not None:
            wait = max(wait, self.hold(model) or 0.0)
        timer = loop.call_later(wait, self._expire, waiter)
        self.dispatch()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            # The client left. If a worker was handed to us meanwhile, pass it on.
            self.queue.remove(waiter)
            f = waiter.future
            if f.done() and not f.cancelled() and f.exception() is None:
                self.release(f.result())
            raise
        finally:
            timer.cancel()
            self.metrics.queue_wait.observe(time.monotonic() - waiter.since)

    def release(self, w: Worker) -> None:
        w.inflight -= 1
        if self.queue:
            self.dispatch()

    def dispatch(self) -> None:
        """Hands freed capacity to waiters, in the queue's order."""
        if not self.queue:
            return
        blocked: set[str] = set()  # models with no room left in this pass
        router = self.router
        pick = router.pick
        router.held.clear()
        held_models: set[str] = set()
        for waiter in self.queue.in_order():
            if waiter.future.done():
                self.queue.remove(waiter)
                continue
            if waiter.model in blocked:
                continue
            router.holding = False
            w = pick(waiter.model, waiter.exclude, None, waiter.need, waiter.job)
            if w is None:
                # Waiting by choice for a full worker (cost routing) leaves the room
                # elsewhere to those behind it; otherwise the model is full this pass.
                if not router.holding and not waiter.exclude and waiter.need is None:
                    blocked.add(waiter.model)
                elif router.holding:
                    held_models.add(waiter.model)
                continue
            self.queue.remove(waiter)
            waiter.future.set_result(w)
        router.held.clear()
        router.holding = False
        if blocked or held_models:
            self._wake_at(min((t for m in blocked | held_models
                               if (t := router.reopens_at(m))), default=None))

    def _wake_at(self, at: float | None) -> None:
        """One timer: the next moment a blocked model's worker has room by the clock."""
        if at is None or (self._timer is not None and not self._timer.cancelled()
                          and self._timer.when() <= at):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # dispatched outside the event loop (a unit test)
            return
        if self._timer is not None:
            self._timer.cancel()
        # loop.time() and time.monotonic() are the same clock in asyncio's default loops.
        self._timer = loop.call_at(at + 0.001, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.dispatch()

    def waiting(self, model: str) -> int:
        """Requests queued for `model` (the placer replicates a model others wait for)."""
        return sum(1 for w in self.queue.in_order() if w.model == model
                   and not w.future.done())

    def fail(self, model: str, err: APIError) -> None:
        """Answers every request waiting for `model` with `err` (it cannot be placed)."""
        for waiter in self.queue.in_order():
            if waiter.model == model and not waiter.future.done():
                self.queue.remove(waiter)
                waiter.future.set_exception(err)

    def _expire(self, waiter: Waiter) -> None:
        self.queue.remove(waiter)
        if waiter.future.done():
            return
        err: APIError
        if not self.registry.by_model.get(waiter.model) and self.loadable(waiter.model):
            self.metrics.rejected.labels("load_timeout").inc()
            err = unavailable(f"The model {waiter.model!r} did not finish loading within "
                              f"{self.cfg.model_load_timeout:g}s; retry shortly.",
                              retry_after=5)
        elif not self.registry.by_model.get(waiter.model):
            self.metrics.rejected.labels("no_healthy_worker").inc()
            err = unavailable(f"No healthy worker serves the model {waiter.model!r} right now.",
                              retry_after=2)
        else:
            self.metrics.rejected.labels("queue_timeout").inc()
            err = overloaded(f"Waited {self.cfg.queue_timeout:g}s for a free worker; retry "
                             "shortly.", retry_after=self._retry_after(), code="queue_timeout")
        waiter.future.set_exception(err)

    def _retry_after(self) -> float:
        return 1.0 + len(self.queue) / max(1, sum(
            w.slots_total for w in self.registry.workers.values() if w.healthy))
