"""API keys added at run time (`corral keys ...`, the admin API): no restart needed.

A key is stored by the SHA-256 digest of its secret, never the secret itself: the secret is
shown once, when it is made. With Redis the keys live in one hash (`corral:keys`, digest ->
JSON record) shared by every gateway replica; every change bumps `corral:keys:version`,
which each replica polls every `POLL_SECONDS` and reloads on change, so an added, revoked or
re-limited key holds at every replica within a second. Without Redis they live in this
process (and die with it). Config-file keys keep working beside them and cannot be changed
here.

The first key added closes `/v1/*` as a configured key does, and it stays closed (a
`closed` mark, also shared): revoking every key must not silently open the API again.

A front end's `frontend_jwt_secret` is needed in clear to verify signatures, so it is
stored as given (in Redis when configured); it is never listed, logged or returned.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from dataclasses import asdict, fields, replace
from typing import Any

import orjson

from gateway.config import ApiKey
from gateway.flush import PeriodicFlush

log = logging.getLogger("corral.gateway")

POLL_SECONDS = 0.25
LIMIT_FIELDS = ("rpm", "tpm", "user_rpm", "user_tpm", "tokens_per_day", "tokens_per_month",
                "user_tokens_per_day", "user_tokens_per_month")
_STORED = {f.name for f in fields(ApiKey)} - {"key", "source"}


def new_secret() -> str:
    return "sk-corral-" + secrets.token_urlsafe(24)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def public(key: ApiKey, created: float | None = None) -> dict[str, Any]:
    """What a listing shows of a key: its id, user and limits; never a secret."""
    out: dict[str, Any] = {"id": key.id, "object": "api_key", "user": key.user,
                           "source": key.source, "frontend": key.frontend,
                           "frontend_jwt": bool(key.frontend_jwt_secret)}
    out.update({f: getattr(key, f) for f in LIMIT_FIELDS})
    if created is not None:
        out["created"] = int(created)
    return out


def _encode(key: ApiKey, created: float) -> bytes:
    rec = {k: v for k, v in asdict(key).items() if k in _STORED}
    rec["created"] = created
    return orjson.dumps(rec)


def _decode(raw: bytes | str) -> tuple[ApiKey, float]:
    rec = orjson.loads(raw)
    created = float(rec.pop("created", 0))
    rec["frontend_headers"] = tuple(tuple(p) for p in rec.get("frontend_headers") or ())
    rec = {k: v for k, v in rec.items() if k in _STORED}
    return ApiKey(key="", source="runtime", **rec), created


class KeyStore:
    """Run-time keys, by digest; `by_digest` is read on every request (no I/O)."""

    def __init__(self, redis: Any = None, prefix: str = "corral:keys") -> None:
        self.redis = redis
        self.hash = prefix
        self.version_key = f"{prefix}:version"
        self.closed_key = f"{prefix}:closed"
        self.by_digest: dict[str, ApiKey] = {}
        self.created: dict[str, float] = {}
        self.closed = False
        self._version: bytes | None = None
        self._failing = False
        self._lock = asyncio.Lock()
        self._poller = PeriodicFlush(self._tick, self._noop, POLL_SECONDS)

    async def start(self) -> None:
        if self.redis is not None:
            await self._tick()
            self._poller.start()

    async def stop(self) -> None:
        await self._poller.stop()

    async def _noop(self) -> None:
        return None

    def lookup(self, secret: str) -> ApiKey | None:
        return self.by_digest.get(digest(secret)) if self.by_digest and secret else None

    def find(self, key_id: str) -> ApiKey | None:
        for k in self.by_digest.values():
            if k.id == key_id:
                return k
        return None

    # ------------------------------------------------------------------ changes
    async def add(self, key: ApiKey, secret: str) -> ApiKey:
        """Stores `key` (its secret only as a digest) and closes /v1/* if still open."""
        key = replace(key, key="", digest=digest(secret), source="runtime")
        now = time.time()
        if self.redis is None:
            self.by_digest[key.digest] = key
            self.created[key.digest] = now
            self._set_closed(True)
            return key
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.hash, key.digest, _encode(key, now))
            pipe.set(self.closed_key, "1")
            pipe.incr(self.version_key)
            await pipe.execute()
        await self._reload()
        return key

    async def revoke(self, key: ApiKey) -> None:
        if self.redis is None:
            self.by_digest.pop(key.digest, None)
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.hash, key.digest)
            pipe.incr(self.version_key)
            await pipe.execute()
        await self._reload()

    async def set_limits(self, key: ApiKey, limits: dict[str, int | None]) -> ApiKey:
        new = replace(key, **limits)
        if self.redis is None:
            self.by_digest[key.digest] = new
            return new
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.hash, key.digest, _encode(new, self.created.get(key.digest, 0)))
            pipe.incr(self.version_key)
            await pipe.execute()
        await self._reload()
        return new

    # ------------------------------------------------------------------ Redis
    async def _tick(self) -> None:
        try:
            version = await self.redis.get(self.version_key)
            if version != self._version:
                await self._reload()
        except Exception as exc:  # noqa: BLE001 - keep the last known keys
            if not self._failing:
                log.warning("api keys: Redis unreachable (%s); using the run-time keys last "
                            "read until it is back", type(exc).__name__)
            self._failing = True
        else:
            if self._failing:
                log.warning("api keys: Redis reachable again; run-time keys reloaded")
            self._failing = False

    async def _reload(self) -> None:
        async with self._lock:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(self.version_key)
                pipe.hgetall(self.hash)
                pipe.get(self.closed_key)
                version, raw, closed = await pipe.execute()
            keys: dict[str, ApiKey] = {}
            created: dict[str, float] = {}
            for rec in (raw or {}).values():
                try:
                    k, c = _decode(rec)
                except (ValueError, TypeError) as exc:
                    log.warning("api keys: skipping an unreadable stored key (%s)",
                                type(exc).__name__)
                    continue
                keys[k.digest] = k
                created[k.digest] = c
            self.by_digest, self.created, self._version = keys, created, version
            self._set_closed(bool(closed))

    def _set_closed(self, closed: bool) -> None:
        if closed and not self.closed:
            log.warning("api keys: a key was added at run time; /v1/* now needs an API key "
                        "(and stays closed when keys are revoked)")
        self.closed = self.closed or closed
