"""Shared state: one async interface, so gateway replicas can share it (Redis, later).

Today it holds in-flight request counts per worker, per gateway replica. Rate-limit windows,
session affinity and the worker registry join it in later issues, and a Redis
implementation will implement this same interface (a hash per replica with a TTL fits it).

The hot path never awaits this. Routing reserves on the replica's own counters (atomic in
the event loop, see routing.py); the registry's housekeeping publishes a snapshot of them
every probe interval and reads what the *other* replicas have in flight, which routing then
counts as load too. Staleness is bounded by the same ~0.5 s as the workers' /status probes.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod

log = logging.getLogger("corral.gateway")


class SharedState(ABC):
    @abstractmethod
    async def publish_inflight(self, replica: str, counts: dict[str, int]) -> None:
        """Replaces this replica's in-flight counts per worker."""

    @abstractmethod
    async def inflight_by_replica(self) -> dict[str, dict[str, int]]:
        """Every live replica's last published counts."""

    async def others_inflight(self, replica: str) -> dict[str, int]:
        """In flight per worker at every replica but `replica`, summed."""
        total: dict[str, int] = {}
        for r, counts in (await self.inflight_by_replica()).items():
            if r != replica:
                for w, n in counts.items():
                    total[w] = total.get(w, 0) + n
        return total

    @abstractmethod
    async def forget_worker(self, worker_id: str) -> None:
        """Drops what is kept about a worker that left the cluster."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Releases connections."""


class MemoryState(SharedState):
    """State in this process: right for a single gateway replica."""

    def __init__(self, ttl: float = 10.0) -> None:
        self.ttl = ttl  # a replica that stopped publishing this long ago is forgotten
        self._inflight: dict[str, tuple[float, dict[str, int]]] = {}

    async def publish_inflight(self, replica: str, counts: dict[str, int]) -> None:
        self._inflight[replica] = (time.monotonic(), dict(counts))

    async def inflight_by_replica(self) -> dict[str, dict[str, int]]:
        now = time.monotonic()
        return {r: c for r, (t, c) in self._inflight.items() if now - t <= self.ttl}

    async def forget_worker(self, worker_id: str) -> None:
        for _, counts in self._inflight.values():
            counts.pop(worker_id, None)


def make_state(redis_url: str | None) -> SharedState:
    if redis_url:
        log.warning("--redis-url is not supported yet: state stays in this process, so run "
                    "one gateway replica")
    return MemoryState()
