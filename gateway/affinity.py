"""Session affinity: the turns of one conversation go to the worker that holds its KV cache.

A conversation is named by a key, computed once per request at the edge (`session_key`): the
client's `x-session-id` header, else the chat id a trusted front end forwards (identity.py:
Open WebUI's `X-OpenWebUI-Chat-Id`), else its `user` field, else (chat only) a hash of the
leading messages — the system prompt and the first user message, the same for every turn of
one chat. Every request records where its key went; routing *prefers* that worker for
requests that continue something: an explicit session/user, or a chat that already holds an
assistant turn. So identical one-shot requests still spread over the workers, while a
conversation's later turns go back to its cache — unless that worker is much busier than the
least-loaded one (routing.py's load guard, `affinity_slack`).

The map lives in shared state (state.py: memory, or Redis for several replicas) with a
TTL. A local dict in front of it answers the hot path without a round trip; only a key
this replica has not seen goes to shared state (bounded by a short timeout), and writes go
through in the background, at most once per key per quarter TTL unless the worker changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from typing import Any

import orjson

from gateway.config import GatewayConfig
from gateway.state import MemoryState, SharedState

log = logging.getLogger("corral.gateway")

SESSION_HEADER = "x-session-id"
LOCAL_MAX = 100_000  # keys cached in this process (oldest dropped first)
LOOKUP_TIMEOUT = 0.05  # seconds a shared-state lookup may add to a request


def session_key(model: str, header: str | None, body: dict[str, Any], chat: str | None = None
                ) -> tuple[str, bool] | None:
    """(the conversation's affinity key, whether to prefer its worker), or None. `chat`: the
    chat id a trusted front end forwarded (identity.py), which names one conversation better
    than its `user` field (every chat of that person)."""
    if header:
        return f"{model}\x00s\x00{header[:256]}", True
    if chat:
        return f"{model}\x00c\x00{chat[:256]}", True
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"{model}\x00u\x00{user[:256]}", True
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return None  # legacy completions: no turns to follow without an explicit id
    first = msgs[0]
    lead = msgs[:2] if isinstance(first, dict) and first.get("role") in (
        "system", "developer") else msgs[:1]
    digest = hashlib.blake2b(orjson.dumps(lead), digest_size=12).hexdigest()
    later_turn = any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs)
    return f"{model}\x00h\x00{digest}", later_turn


class Affinity:
    def __init__(self, cfg: GatewayConfig, state: SharedState) -> None:
        self.ttl = cfg.affinity_ttl
        self.state = state
        self.local: dict[str, tuple[str, float]] = {}  # key -> (worker id, written at)
        self._writes: set[asyncio.Task[None]] = set()
        self._failing = False
        self.remote = not isinstance(state, MemoryState)

    async def lookup(self, key: str) -> str | None:
        """The worker this conversation went to last, or None."""
        hit = self.local.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[1] < self.ttl:
            return hit[0]
        try:
            if self.remote:
                wid = await asyncio.wait_for(self.state.get_affinity(key), LOOKUP_TIMEOUT)
            else:  # in-process state answers at once
                wid = await self.state.get_affinity(key)
        except Exception as exc:  # shared state slow or down: route without affinity
            self._warn(exc)
            return None
        if wid:
            # Cached as written a quarter-TTL ago: the next record() refreshes the TTL.
            self._put(key, wid, now - self.ttl / 4)
        return wid

    def record(self, key: str, worker_id: str) -> None:
        """This conversation was served by `worker_id` (write-through, in the background)."""
        now = time.monotonic()
        hit = self.local.get(key)
        if hit is not None and hit[0] == worker_id and now - hit[1] < self.ttl / 4:
            return
        self._put(key, worker_id, now)
        task = asyncio.ensure_future(self._write(key, worker_id))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def _put(self, key: str, worker_id: str, at: float) -> None:
        local = self.local
        local.pop(key, None)
        local[key] = (worker_id, at)
        if len(local) > LOCAL_MAX:
            for old in list(itertools.islice(local, len(local) - LOCAL_MAX + LOCAL_MAX // 10)):
                del local[old]

    async def _write(self, key: str, worker_id: str) -> None:
        try:
            await self.state.set_affinity(key, worker_id, self.ttl)
        except Exception as exc:
            self._warn(exc)
        else:
            self._failing = False

    def _warn(self, exc: BaseException) -> None:
        if not self._failing:
            log.warning("affinity: shared state unavailable, routing without it: %r", exc)
        self._failing = True

    async def close(self) -> None:
        for t in list(self._writes):
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
