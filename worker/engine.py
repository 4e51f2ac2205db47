"""The engine: admission into a bounded queue, slots, stop strings and accounting.

It sits between the HTTP API and a backend. A request waits for a free slot in a bounded
queue (its depth is what the gateway routes by), is handed to the backend, and its tokens
come back through an asyncio queue. Stop strings are matched here, with a hold-back
buffer so that a stop sequence split over tokens never leaks to the client.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from wire.errors import APIError, bad_request, overloaded
from wire.openai import new_id
from worker.backends import wakes
from worker.backends.base import Backend, SamplingParams, Sequence


@dataclass
class Delta:
    """A piece of output text; the last one carries `finish` and final counts."""

    text: str
    finish: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    # Single-sequence decode speed, tokens/s: the backend's start-up calibration, then an
    # exponentially weighted average over requests that ran alone. (Requests decoded in a
    # batch run slower each; counting them would make a busy worker look slow and an idle
    # one keep its last figure, and the gateway, which weighs capacity by this, skews.)
    tokens_per_second: float = 0.0
    # Prompt reading speed, tokens/s: the start-up calibration, then the same average over
    # the time to first token of long prompts (at least PREFILL_MIN_TOKENS not taken from
    # the prompt cache, where fixed overhead does not dominate) read with nobody else on
    # the worker. The gateway weighs a prompt's cost by it (gateway/cost.py).
    prefill_tokens_per_second: float = 0.0
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=256))

    @property
    def decode_tokens_per_second(self) -> float:
        """The decode figure under its explicit name (`tokens_per_second` is kept for
        compatibility: it has always meant single-sequence decode speed)."""
        return self.tokens_per_second

    def observe_decode(self, tokens: int, seconds: float) -> None:
        if tokens < 4 or seconds <= 0:
            return
        self.tokens_per_second = _ewma(self.tokens_per_second, tokens / seconds)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens < PREFILL_MIN_TOKENS or seconds <= 0:
            return
        self.prefill_tokens_per_second = _ewma(self.prefill_tokens_per_second, tokens / seconds)


PREFILL_MIN_TOKENS = 256  # shorter prompts: the first token's fixed cost dominates


def _ewma(old: float, rate: float, a: float = 0.2) -> float:
    return rate if not old else (1 - a) * old + a * rate


class _Handoff:
    """The backend thread's callbacks, run on the event loop in order, one wake-up for
    however many arrive before it runs (a decode step of 4 sequences hands over 4 token
    deltas: one self-pipe write and one loop iteration instead of four). A decode thread
    holds the wake-up back until its next `llama_decode` (backends/wakes.py)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: deque[tuple[Any, tuple[Any, ...]]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, fn: Any, *args: Any) -> None:
        with self._lock:
            self._items.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
        wakes.wake(self._wake)

    def _wake(self) -> None:
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, deque()
            self._scheduled = False
        for fn, args in items:
            fn(*args)


class _StopMatcher:
    """Finds the earliest stop string in a growing text, holding back possible prefixes."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        self.buf += text
        cut = min((i for s in self.stops if (i := self.buf.find(s)) >= 0), default=-1)
        if cut >= 0:
            out, self.buf = self.buf[:cut], ""
            return out, True
        # Keep the longest tail that is a prefix of some stop string.
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if s.startswith(self.buf[-k:]):
                    keep = k
                    break
        out = self.buf[: len(self.buf) - keep]
        self.buf = self.buf[len(self.buf) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Engine:
    """Admits requests into `backend.slots` slots, queueing at most `max_queue` more: the
    first `backend.backlog` of those in the backend itself, which starts one the step a
    slot frees, the rest here."""

    def __init__(self, backend: Backend, max_queue: int = 64) -> None:
        self.backend = backend
        self.max_queue = max_queue
        self._held = 0  # slots' worth handed to the backend: up to slots + backlog
        self.admitted = 0  # sequences given a slot so far: tells whether one ran alone
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()
        self.stats = EngineStats()
        self.ready = False
        self._handoff: _Handoff | None = None

    def handoff(self) -> _Handoff:
        """The hand-over to the running event loop (made on first use, in that loop)."""
        loop = asyncio.get_running_loop()
        h = self._handoff
        if h is None or h.loop is not loop:
            h = self._handoff = _Handoff(loop)
        return h

    def calibrate(self) -> None:
        """Starts both speeds from the backend's measurement at load (0: not measured)."""
        b = self.backend
        self.stats.tokens_per_second = float(getattr(b, "calibrated_tokens_per_second", 0.0))
        self.stats.prefill_tokens_per_second = float(
            getattr(b, "calibrated_prefill_tokens_per_second", 0.0))

    @property
    def learns_prefill(self) -> bool:
        """A backend whose prefix cache does not say per request what it reused (OpenVINO)
        would make a cache hit look like a fast read: it keeps its calibrated figure."""
        return getattr(self.backend, "reports_cached_tokens", True)

    # ------------------------------------------------------------------ load
    @property
    def slots_busy(self) -> int:
        return min(self._held, self.backend.slots)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot, here or in the backend's backlog."""
        return len(self._waiters) + max(0, self._held - self.backend.slots)

    @property
    def _capacity(self) -> int:
        """Slots' worth the backend holds at most (its backlog counts as queue)."""
        return self.backend.slots + min(self.backend.backlog, self.max_queue)

    def check_context(self, prompt_len: int, max_tokens: int | None) -> int:
        """Validates the prompt against the context window; returns the token budget."""
        n_ctx = self.backend.n_ctx
        if prompt_len >= n_ctx:
            raise bad_request(
                f"This model's maximum context length is {n_ctx} tokens. However, your "
                f"prompt is {prompt_len} tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        room = n_ctx - prompt_len
        if max_tokens is None:
            return min(room, self.backend.default_max_tokens or room)
        if max_tokens > room:
            raise bad_request(
                f"This model's maximum context length is {n_ctx} tokens. However, you "
                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                f"{max_tokens} for the completion). Reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    async def _acquire(self, k: int = 1) -> None:
        """Takes `k` slots at once (n choices); waits in the bounded queue when they are
        not free. All or nothing, so two n > 1 requests can never deadlock on halves."""
        if self._held + k <= self._capacity and not self._waiters:
            self._held += k
            self.admitted += 1
            return
        if self.queue_depth >= self.max_queue:
            raise overloaded("The worker's queue is full; retry shortly.", retry_after=1)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, k))
        try:
            await fut
            self.admitted += 1
        except BaseException:
            if (fut, k) in self._waiters:
                self._waiters.remove((fut, k))
            elif fut.done() and not fut.cancelled():
                self._release(k)  # we were handed the slots but are leaving: pass them on
            raise

    def _release(self, k: int = 1) -> None:
        self._held -= k
        # Hand freed slots to the waiters in order; the first one that does not fit yet
        # keeps its place (nobody overtakes it).
        while self._waiters:
            fut, need = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self._held + need > self._capacity:
                return
            self._waiters.popleft()
            self._held += need
            fut.set_result(None)

    # ------------------------------------------------------------------ generate
    async def generate(
        self,
        prompt: list[int],
        max_tokens: int,
        params: SamplingParams,
        stop: list[str] | None = None,
        constraint: Any = None,
    ) -> AsyncIterator[Delta]:
        """Yields text deltas; the final one has `finish` set. Cancels the backend on exit."""
        handoff = self.handoff()
        out: asyncio.Queue[tuple[str, int] | tuple[None, str, str | None]] = asyncio.Queue()

        def on_tokens(text: str, n: int) -> None:
            handoff.put(out.put_nowait, (text, n))

        # The slot is given back when the backend reports the sequence finished, not when
        # this generator exits: a cancelled sequence may still occupy the backend for a step.
        await self._acquire()
        alone_since = self.admitted if self._held == 1 else -1  # nobody else running
        submitted_at = time.perf_counter()
        released = False
        finished = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release()

        def finished_in_loop(reason: str, error: str | None) -> None:
            release()
            out.put_nowait((None, reason, error))

        def on_finish(reason: str, error: str | None) -> None:
            handoff.put(finished_in_loop, reason, error)

        seq = Sequence(new_id("seq"), prompt, max_tokens, params, on_tokens, on_finish,
                       constraint=constraint)
        matcher = _StopMatcher(stop or [])
        produced = 0
        first_at: float | None = None
        submitted = False
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prompt)
        try:
            self.backend.submit(seq)
            submitted = True
            while True:
                item = await out.get()
                if item[0] is None:
                    _, reason, error = item
                    finished = True
                    if reason == "error":
                        raise APIError(500, error or "generation failed", "server_error")
                    yield Delta(matcher.flush(), reason, produced, seq.cached_tokens)
                    break
                text, n = item
                produced += n
                self.stats.generated_tokens += n
                if first_at is None:
                    first_at = time.perf_counter()
                    if alone_since == self.admitted and self.learns_prefill:  # read alone
                        self.stats.observe_prefill(len(prompt) - seq.cached_tokens,
                                                   first_at - submitted_at)
                safe, hit = matcher.feed(text)
                if hit:
                    self.backend.cancel(seq)
                    yield Delta(safe, "stop", produced, seq.cached_tokens)
                    break
                if safe:
                    yield Delta(safe)
        finally:
            if first_at is not None and produced > 1 and alone_since == self.admitted:
                self.stats.observe_decode(produced - 1, time.perf_counter() - first_at)
            if not submitted:
                release()
            elif not finished:
                self.backend.cancel(seq)
