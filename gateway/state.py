"""Shared state: one async interface, so gateway replicas can share it (Redis, later).

Today it holds in-flight request counts per worker, per gateway replica, in this process
(`MemoryState`) or in Redis (`RedisState`, with `--redis-url`). Rate-limit windows, session
affinity and the worker registry join it in later issues, behind this same interface.

The hot path never awaits this. Routing reserves on the replica's own counters (atomic in
the event loop, see routing.py); the registry's housekeeping publishes a snapshot of them
every probe interval and reads what the *other* replicas have in flight, which routing then
counts as load too. Staleness is bounded by the same ~0.5 s as the workers' /status probes.
"""

from __future__ import annotations

import itertools
import logging
import time
from abc import ABC, abstractmethod

import orjson

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

    # Shared worker registry (issue 6). Workers heartbeat to one replica; that replica
    # announces them here so every replica serves them. A single replica needs none of it.
    async def announce_workers(self, workers: dict[str, tuple[str, float]]) -> None:  # noqa: B027
        """Workers this replica hears from directly: id -> (url, seconds left to live)."""

    async def shared_workers(self) -> dict[str, str]:
        """Workers some replica heard from recently: id -> url ("" for one that just left)."""
        return {}

    async def withdraw_worker(self, worker_id: str, ttl: float = 15.0) -> None:  # noqa: B027
        """A worker left (DELETE /cluster/workers/{id}): a tombstone for `ttl` seconds."""

    async def mark_down(self, ejected: dict[str, float]) -> None:  # noqa: B027
        """Workers a real request saw fail here: id -> wall-clock time of the ejection."""

    async def down_marks(self, newer_than: float) -> dict[str, float]:
        """Ejections any replica reported after `newer_than` (wall clock): id -> time."""
        return {}

    @property
    def redis_client(self) -> object | None:
        """The Redis client rate limits and usage share, or None when state is local."""
        return None

    # Session affinity (issue 8): conversation key -> the worker holding its KV cache.
    # affinity.py keeps a local cache in front of this and writes through.
    async def get_affinity(self, key: str) -> str | None:
        """The worker a conversation was last served by, if remembered."""
        return None

    async def set_affinity(self, key: str, worker_id: str, ttl: float) -> None:  # noqa: B027
        """Remembers a conversation's worker for `ttl` seconds."""


class MemoryState(SharedState):
    """State in this process: right for a single gateway replica."""

    def __init__(self, ttl: float = 10.0) -> None:
        self.ttl = ttl  # a replica that stopped publishing this long ago is forgotten
        self._inflight: dict[str, tuple[float, dict[str, int]]] = {}
        self._affinity: dict[str, tuple[str, float]] = {}  # key -> (worker, expires at)

    async def publish_inflight(self, replica: str, counts: dict[str, int]) -> None:
        self._inflight[replica] = (time.monotonic(), dict(counts))

    async def inflight_by_replica(self) -> dict[str, dict[str, int]]:
        now = time.monotonic()
        return {r: c for r, (t, c) in self._inflight.items() if now - t <= self.ttl}

    async def forget_worker(self, worker_id: str) -> None:
        for _, counts in self._inflight.values():
            counts.pop(worker_id, None)

    AFFINITY_MAX = 200_000  # conversations remembered at most (oldest dropped first)

    async def get_affinity(self, key: str) -> str | None:
        hit = self._affinity.get(key)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    async def set_affinity(self, key: str, worker_id: str, ttl: float) -> None:
        aff = self._affinity
        aff.pop(key, None)  # re-inserted last: dict order is age order
        aff[key] = (worker_id, time.monotonic() + ttl)
        if len(aff) > self.AFFINITY_MAX:
            for old in list(itertools.islice(aff, len(aff) - self.AFFINITY_MAX)):
                del aff[old]


class RedisState(SharedState):
    """State shared by gateway replicas through Redis.

    Each replica's in-flight snapshot is one key with a TTL, so a replica that dies stops
    counting by itself after `ttl` seconds.
    """

    def __init__(self, url: str, prefix: str = "corral:", ttl: float = 10.0) -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.prefix = f"{prefix}inflight:"
        self.ttl_ms = int(ttl * 1000)

    async def publish_inflight(self, replica: str, counts: dict[str, int]) -> None:
        await self.redis.set(self.prefix + replica, orjson.dumps(counts), px=self.ttl_ms)

    async def inflight_by_replica(self) -> dict[str, dict[str, int]]:
        keys = [k async for k in self.redis.scan_iter(match=self.prefix + "*", count=1000)]
        if not keys:
            return {}
        out: dict[str, dict[str, int]] = {}
        for key, raw in zip(keys, await self.redis.mget(keys), strict=True):
            if raw:
                name = key.decode() if isinstance(key, bytes) else key
                out[name[len(self.prefix):]] = orjson.loads(raw)
        return out

    async def forget_worker(self, worker_id: str) -> None:
        """Nothing to do: each replica's next snapshot no longer names the worker."""

    async def close(self) -> None:
        await self.redis.aclose()

    @property
    def redis_client(self) -> object | None:
        return self.redis

    def _worker_key(self, worker_id: str) -> str:
        return f"{self.prefix[:-len('inflight:')]}worker:{worker_id}"

    async def announce_workers(self, workers: dict[str, tuple[str, float]]) -> None:
        if not workers:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid, (url, ttl) in workers.items():
                pipe.set(self._worker_key(wid), url, px=max(1, int(ttl * 1000)))
            await pipe.execute()

    async def shared_workers(self) -> dict[str, str]:
        prefix = self._worker_key("")
        keys = [k async for k in self.redis.scan_iter(match=prefix + "*", count=1000)]
        if not keys:
            return {}
        out: dict[str, str] = {}
        for key, raw in zip(keys, await self.redis.mget(keys), strict=True):
            if raw is not None:
                name = key.decode() if isinstance(key, bytes) else key
                out[name[len(prefix):]] = raw.decode() if isinstance(raw, bytes) else raw
        return out

    async def withdraw_worker(self, worker_id: str, ttl: float = 15.0) -> None:
        await self.redis.set(self._worker_key(worker_id), "", px=max(1, int(ttl * 1000)))

    def _down_key(self) -> str:
        return f"{self.prefix[:-len('inflight:')]}down"

    async def mark_down(self, ejected: dict[str, float]) -> None:
        if not ejected:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self._down_key(), mapping={k: repr(v) for k, v in ejected.items()})
            pipe.expire(self._down_key(), 60)
            await pipe.execute()

    async def down_marks(self, newer_than: float) -> dict[str, float]:
        raw = await self.redis.hgetall(self._down_key())
        out: dict[str, float] = {}
        for k, v in raw.items():
            t = float(v)
            if t > newer_than:
                out[k.decode() if isinstance(k, bytes) else k] = t
        return out

    def _affinity_key(self, key: str) -> str:
        return f"{self.prefix[:-len('inflight:')]}affinity:{key}"

    async def get_affinity(self, key: str) -> str | None:
        raw = await self.redis.get(self._affinity_key(key))
        return raw.decode() if isinstance(raw, bytes) else raw

    async def set_affinity(self, key: str, worker_id: str, ttl: float) -> None:
        await self.redis.set(self._affinity_key(key), worker_id, px=max(1, int(ttl * 1000)))


def make_state(redis_url: str | None) -> SharedState:
    return RedisState(redis_url) if redis_url else MemoryState()
