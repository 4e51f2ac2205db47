"""Shared state: one async interface, so gateway replicas can share it later (Redis).

Today it holds in-flight request counts per worker. Rate-limit windows, session affinity
and the worker registry join it in later issues; the Redis implementation will implement
this same interface. The routing decision never awaits this: it reserves on the gateway's
own counters (atomic in the event loop) and publishes here; `others_inflight` is what the
other replicas have in flight, read periodically, so routing can count it too.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

log = logging.getLogger("corral.gateway")


class SharedState(ABC):
    @abstractmethod
    async def add_inflight(self, worker_id: str, delta: int) -> None:
        """Adds `delta` (+1 on reserve, -1 on release) to this replica's count for a worker."""

    @abstractmethod
    async def inflight(self) -> dict[str, int]:
        """In-flight requests per worker, summed over all gateway replicas."""

    async def others_inflight(self, mine: dict[str, int]) -> dict[str, int]:
        """In flight per worker at the *other* replicas (total minus this replica's own)."""
        total = await self.inflight()
        return {w: n - mine.get(w, 0) for w, n in total.items() if n - mine.get(w, 0) > 0}

    @abstractmethod
    async def forget_worker(self, worker_id: str) -> None:
        """Drops what is kept about a worker that left the cluster."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Releases connections."""


class MemoryState(SharedState):
    """Single-replica state in this process."""

    def __init__(self) -> None:
        self._inflight: dict[str, int] = {}

    async def add_inflight(self, worker_id: str, delta: int) -> None:
        n = self._inflight.get(worker_id, 0) + delta
        if n > 0:
            self._inflight[worker_id] = n
        else:
            self._inflight.pop(worker_id, None)

    async def inflight(self) -> dict[str, int]:
        return dict(self._inflight)

    async def forget_worker(self, worker_id: str) -> None:
        self._inflight.pop(worker_id, None)


def make_state(redis_url: str | None) -> SharedState:
    if redis_url:
        log.warning("--redis-url is not supported yet: state stays in this process, so run "
                    "one gateway replica")
    return MemoryState()
