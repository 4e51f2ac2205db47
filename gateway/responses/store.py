"""Stored responses (`store: true`): what `previous_response_id` and `GET /v1/responses` read.

A record is one JSON object: the owner (who may read it), the response object, its input
items and the conversation so far as chat turns (`history`, without instructions, which
OpenAI does not carry over), plus the conversation's root id (the affinity key of every
later turn). It lives in Redis when the gateway has one, so any replica continues a
conversation another started, else in this process. Both are bounded: a TTL per record, a
size cap per record (a bigger one is not stored, and the log says so), and in memory a
count cap and a total-bytes cap (oldest dropped first).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

log = logging.getLogger("corral.gateway")


class ResponseStore:
    MEMORY_BYTES = 256 * 1024 * 1024  # records kept in this process at most (oldest first)

    def __init__(self, redis: Any = None, ttl: float = 30 * 86400.0,
                 max_bytes: int = 4 * 1024 * 1024, max_entries: int = 10_000,
                 prefix: str = "corral:response:") -> None:
        self.redis = redis
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.prefix = prefix
        self._mem: dict[str, tuple[float, bytes]] = {}  # id -> (expires at, record)
        self._bytes = 0  # the records' sizes in memory

    async def put(self, rid: str, record: dict[str, Any]) -> bool:
        """Stores `record`; False (and a log line) when it is too big or the store failed."""
        raw = orjson.dumps(record)
        if len(raw) > self.max_bytes:
            log.warning("response %s not stored: %d bytes over the %d-byte bound",
                        rid, len(raw), self.max_bytes)
            return False
        if self.redis is not None:
            try:
                await self.redis.set(self.prefix + rid, raw, px=max(1, int(self.ttl * 1000)))
            except Exception as exc:
                log.error("response %s not stored: Redis failed: %r", rid, exc)
                return False
            return True
        mem, now = self._mem, time.monotonic()
        if rid in mem:
            self._bytes -= len(mem.pop(rid)[1])
        mem[rid] = (now + self.ttl, raw)
        self._bytes += len(raw)
        # Insertion order is expiry order (one TTL): drop expired, then oldest over a bound.
        while mem and (len(mem) > self.max_entries or self._bytes > self.MEMORY_BYTES
                       or next(iter(mem.values()))[0] <= now):
            self._bytes -= len(mem.pop(next(iter(mem)))[1])
        return True

    async def get(self, rid: str) -> dict[str, Any] | None:
        """The record, or None if unknown or expired. Raises if Redis is down."""
        if self.redis is not None:
            raw = await self.redis.get(self.prefix + rid)
        else:
            hit = self._mem.get(rid)
            raw = hit[1] if hit is not None and hit[0] > time.monotonic() else None
        return orjson.loads(raw) if raw else None

    async def delete(self, rid: str) -> None:
        if self.redis is not None:
            await self.redis.delete(self.prefix + rid)
        else:
            hit = self._mem.pop(rid, None)
            if hit is not None:
                self._bytes -= len(hit[1])
