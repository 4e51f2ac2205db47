"""A worker's own lifecycle: serving, draining, asleep.

A drain (SIGTERM, or the gateway's `POST /control/drain`) takes nothing new from the
gateway: `/status` says `draining`, which the gateway's next probe (0.5 s) reads, so it
routes elsewhere. Requests already here finish; the drain ends when none is left (and the
gateway has seen the state: one `/status` answered since it began) or at its deadline.
Then `leave` exits the process (which leaves the gateway on the way out), and `sleep` runs
`--sleep-command` and reports `asleep` until the gateway says `POST /control/wake` or the
box comes back from a suspend by itself (CLOCK_BOOTTIME ran ahead of CLOCK_MONOTONIC).

Requests reaching a draining worker anyway (a race with the probe, a direct client) are
served: the drain counts them too, so it never cuts one that was accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from wire.http import json_response, read_model
from wire.status import DrainRequest, WorkerStatus
from worker.auth import authorize

if TYPE_CHECKING:
    from worker.state import WorkerState

log = logging.getLogger("corral.worker")

Phase = Literal["serving", "draining", "asleep"]
POLL_SECONDS = 0.05
SEEN_MAX = 1.5  # a drain waits at most this long for a gateway probe to see it
PROBED_RECENTLY = 3.0  # a worker probed this recently has a gateway to tell first
SLEEP_COMMAND_TIMEOUT = 60.0
RESUME_GAP = 2.0  # suspended seconds (boot clock ahead of monotonic) that mean "resumed"


def _suspended_seconds() -> float:
    """Seconds this box has spent suspended since boot (0 where the clock is unknown)."""
    boot = getattr(time, "CLOCK_BOOTTIME", None)
    if boot is None:
        return 0.0
    return time.clock_gettime(boot) - time.monotonic()


class Lifecycle:
    def __init__(self, state: WorkerState) -> None:
        self.state = state
        self.phase: Phase = "serving"
        self.then: str | None = None
        self.requests = 0  # /v1/* requests open here (Tracker)
        self.last_status = 0.0  # when /status was last answered (monotonic)
        self.exit: Callable[[], None] | None = None  # ends the server (worker/serve.py)
        self.last_error: str | None = None
        self.drains = 0
        self._task: asyncio.Task[None] | None = None
        self._deadline: float | None = None
        self._suspended = 0.0

    # ------------------------------------------------------------------ reading
    def empty(self) -> bool:
        e = self.state.engine
        return self.requests == 0 and e.slots_busy == 0 and e.queue_depth == 0

    def reported(self) -> str | None:
        """The state `/status` says instead of the engine's, or None while serving."""
        if self.phase == "asleep" and _suspended_seconds() - self._suspended > RESUME_GAP:
            self.wake("the box resumed from a suspend")
        return None if self.phase == "serving" else self.phase

    # ------------------------------------------------------------------ transitions
    def drain(self, then: str, deadline: float | None) -> dict[str, object]:
        """Starts (or tightens) a drain; returns what it is doing."""
        now = time.monotonic()
        until = now + deadline if deadline else None
        if self.phase == "asleep":
            return self.view()
        if self._task is not None and not self._task.done():
            if then == "leave":
                self.then = "leave"  # leaving wins over sleeping
            if until is not None and (self._deadline is None or until < self._deadline):
                self._deadline = until
            return self.view()
        self.phase, self.then, self._deadline = "draining", then, until
        self.drains += 1
        log.warning("worker %s: serving -> draining (then %s%s; %d request(s) in flight)",
                    self.state.worker_id, then,
                    f", deadline {deadline:g} s" if deadline else "", self.requests)
        self._task = asyncio.create_task(self._run(now))
        return self.view()

    async def _run(self, began: float) -> None:
        probed = began - self.last_status < PROBED_RECENTLY
        while True:
            now = time.monotonic()
            seen = not probed or self.last_status > began or now - began > SEEN_MAX
            if seen and self.empty():
                why = "empty"
                break
            if self._deadline is not None and now >= self._deadline:
                why = f"deadline reached with {self.requests} request(s) still open"
                break
            await asyncio.sleep(POLL_SECONDS)
        log.warning("worker %s: drained (%s) after %.1f s", self.state.worker_id, why,
                    time.monotonic() - began)
        if self.then == "sleep":
            await self._sleep()
        elif self.exit is not None:
            log.warning("worker %s: draining -> exiting", self.state.worker_id)
            self.exit()
        else:  # no server to stop (an app run without worker.serve): stay drained
            log.warning("worker %s: drained; nothing to exit", self.state.worker_id)

    async def _sleep(self) -> None:
        cmd = self.state.cfg.sleep_command
        wid = self.state.worker_id
        if not cmd:
            self.last_error = "asked to sleep, but no --sleep-command is configured"
            log.error("worker %s: %s; serving again", wid, self.last_error)
            self.phase = "serving"
            return
        log.warning("worker %s: draining -> asleep (running %r)", wid, cmd)
        self.phase = "asleep"
        self._suspended = _suspended_seconds()
        try:
            proc = await asyncio.create_subprocess_shell(cmd)
            rc = await asyncio.wait_for(proc.wait(), SLEEP_COMMAND_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            rc, self.last_error = -1, f"sleep command failed: {type(exc).__name__}: {exc}"
        else:
            self.last_error = None if rc == 0 else f"sleep command exited with {rc}"
        if rc != 0:
            log.error("worker %s: %s; serving again", wid, self.last_error)
            self.phase = "serving"

    def wake(self, why: str) -> dict[str, object]:
        if self.phase == "asleep":
            log.warning("worker %s: asleep -> serving (%s)", self.state.worker_id, why)
            self.phase = "serving"
        return self.view()

    def view(self) -> dict[str, object]:
        left = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        return {"phase": self.phase, "then": self.then, "requests": self.requests,
                "deadline_left": left, "last_error": self.last_error}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


class Tracker:
    """ASGI middleware: counts the `/v1/*` requests open here, so a drain waits for them
    (the engine alone misses a response still being sent); notes each `/status` answered."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.life = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path == "/status":
            self.life.last_status = time.monotonic()
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        self.life.requests += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.life.requests -= 1


router = APIRouter()


def _life(request: Request) -> Lifecycle:
    return request.app.state.lifecycle


@router.post("/control/drain")
async def drain(request: Request) -> Response:
    authorize(request)
    body = await read_model(request, DrainRequest)
    return json_response(_life(request).drain(body.then, body.deadline))


@router.post("/control/wake")
async def wake(request: Request) -> Response:
    authorize(request)
    return json_response(_life(request).wake("the gateway woke it"))


def install(app: FastAPI, state: WorkerState, decorate: Callable[[WorkerStatus],
            WorkerStatus] | None = None) -> Lifecycle:
    """Adds the drain/wake routes, the request tracker and the lifecycle fields of
    `/status` (`decorate`, e.g. polite mode's capacity, runs after them)."""
    life = Lifecycle(state)
    app.state.lifecycle = life
    app.include_router(router)
    app.add_middleware(Tracker, lifecycle=life)
    base_status = app.state.status

    def status() -> WorkerStatus:
        st = base_status()
        phase = life.reported()
        if phase is not None:
            st.state = phase  # type: ignore[assignment]
        st.sleep = bool(state.cfg.sleep_command)
        return decorate(st) if decorate else st

    app.state.status = status
    return life
