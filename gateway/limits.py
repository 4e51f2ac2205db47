"""Per-key rate limits: requests and tokens per minute, shared by every gateway replica.

Both limits are a GCRA (generic cell rate algorithm, a token bucket kept as one number): a
key's *theoretical arrival time* `tat` moves forward by `cost x 60 s / limit` per admitted
unit, and a request is admitted while `tat` stays within one minute of now. So a key may
burst its whole per-minute allowance at once and then refills evenly. rpm costs 1 per
request; tpm costs the request's estimated tokens (prompt estimate + max_tokens, or a
conservative default), reserved at admission and reconciled with the real usage when the
request ends (`settle`). A front end's key (identity.py) adds its end user's own buckets
(`user_rpm`, `user_tpm`), charged together with the key's: a request passes only when
every bucket has room, and then all of them are charged.

With Redis, the check and the reservation of both limits are one Lua script (atomic, one
round trip, Redis's clock so replicas on different hosts agree). Settlements are batched:
they accumulate locally and are flushed in one pipeline every `FLUSH_SECONDS`, off the
request path. Without Redis, or while it is unreachable, the same arithmetic runs in this
process: limits then hold per replica only (said once in the log). While degraded, requests
never wait on Redis; a background task pings it and switches back when it answers.

Redis keys are named by a digest of the API key (and of the end user), never the key itself.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.config import ApiKey
from gateway.flush import PeriodicFlush
from wire.errors import APIError

log = logging.getLogger("corral.gateway")

WINDOW_MS = 60_000.0
DEFAULT_COMPLETION_ESTIMATE = 1024  # tokens reserved when a request names no max_tokens
FLUSH_SECONDS = 0.25  # also how often a degraded limiter checks whether Redis is back

# KEYS: one bucket each (a key's or an end user's rpm or tpm). ARGV: limit, cost per bucket.
# Returns {1, 0, 0} when admitted (every bucket charged), else {0, wait_ms, index of the
# bucket that must wait longest} and nothing is charged.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local W = 60000
local news, worst, worst_i = {}, 0, 0
for i = 1, #KEYS do
  local limit, cost = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if tat < now then tat = now end
  news[i] = tat + cost * W / limit
  local wait = news[i] - now - W
  if wait > worst then worst, worst_i = wait, i end
end
if worst_i > 0 then return {0, math.ceil(worst), worst_i} end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], tostring(news[i]), 'PX', math.ceil(news[i] - now) + 1000)
end
return {1, 0, 0}
"""

# KEYS: tpm key. ARGV: tpm limit, token delta (positive charges more, negative refunds).
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local limit, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
tat = tat + delta * 60000 / limit
if tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil(tat - now) + 1000)
end
return 1
"""


def rate_limited(message: str, wait_seconds: float) -> APIError:
    """429 as OpenAI sends it for a key over its limits."""
    return APIError(429, message, "rate_limit_error", None, "rate_limit_exceeded",
                    {"Retry-After": str(max(1, math.ceil(wait_seconds)))})


def estimate_tokens(prompt_chars: int, max_tokens: int | None) -> int:
    """What a request may cost: ~4 characters a token for the prompt, plus its output cap."""
    return prompt_chars // 4 + 8 + (max_tokens or DEFAULT_COMPLETION_ESTIMATE)


@dataclass(frozen=True)
class Bucket:
    """One limit to charge: `name` is `<digest>:rpm`, `<digest>:tpm`, or the same under an
    end user (`<digest>:u:<end user digest>:tpm`)."""

    name: str
    limit: int
    cost: int
    what: str  # for the 429 message


@dataclass
class Reservation:
    """What admission took from a key's limits; `settle` gives back the difference."""

    key: ApiKey | None
    tokens: int = 0
    tpm: list[tuple[str, int]] = field(default_factory=list)  # (bucket, limit) to settle


class _Gcra:
    """The same arithmetic as the Lua scripts, on this process's clock."""

    def __init__(self) -> None:
        self.tat: dict[str, float] = {}

    def _now(self) -> float:
        return time.monotonic() * 1000.0

    def admit(self, buckets: list[Bucket]) -> tuple[bool, float, int]:
        now = self._now()
        news = []
        worst, worst_i = 0.0, -1
        for i, b in enumerate(buckets):
            new = max(self.tat.get(b.name, 0.0), now) + b.cost * WINDOW_MS / b.limit
            news.append(new)
            if new - now - WINDOW_MS > worst:
                worst, worst_i = new - now - WINDOW_MS, i
        if worst_i >= 0:
            return False, worst, worst_i
        for b, new in zip(buckets, news, strict=True):
            self.tat[b.name] = new
        if len(self.tat) > 4096:  # forget keys idle past their window
            self.tat = {k: v for k, v in self.tat.items() if v > now}
        return True, 0.0, -1

    def settle(self, bucket: str, tpm: int, delta: int) -> None:
        now = self._now()
        tat = max(self.tat.get(bucket, 0.0), now) + delta * WINDOW_MS / tpm
        if tat <= now:
            self.tat.pop(bucket, None)
        else:
            self.tat[bucket] = tat


class Limiter:
    """Admission against per-key limits; Redis-backed when given a client."""

    def __init__(self, redis: Any = None, prefix: str = "corral:limit:") -> None:
        self.redis = redis
        self.prefix = prefix
        self.local = _Gcra()
        self._pending: dict[str, tuple[int, int]] = {}  # bucket -> (tpm, token delta)
        self._degraded = False
        self._flusher = PeriodicFlush(self._tick, self._flush, FLUSH_SECONDS)
        if redis is not None:
            self._admit = redis.register_script(_ADMIT)
            self._settle = redis.register_script(_SETTLE)

    def ident(self, key: ApiKey) -> str:
        return key.digest[:20]  # the same name on every replica, never the key itself

    async def start(self) -> None:
        if self.redis is not None:
            self._flusher.start()

    async def stop(self) -> None:
        await self._flusher.stop()

    # ------------------------------------------------------------------ admission
    async def admit(self, key: ApiKey | None, tokens: int, end_user: str | None = None
                    ) -> Reservation:
        """Reserves one request and `tokens` from the key's limits and, for a front end's
        `end_user` (a stable id), from that end user's `user_rpm`/`user_tpm`; or raises 429."""
        if key is None:
            return Reservation(key)
        ident = self.ident(key)
        buckets: list[Bucket] = []
        whom = [(ident, key.rpm or 0, key.tpm or 0, f"user {key.user!r}")]
        if end_user is not None and (key.user_rpm or key.user_tpm):
            eu = hashlib.blake2b(end_user.encode(), digest_size=8).hexdigest()
            whom.append((f"{ident}:u:{eu}", key.user_rpm or 0, key.user_tpm or 0,
                         f"end user {end_user!r} of {key.user!r}"))
        for name, rpm, tpm, who in whom:
            if rpm:
                buckets.append(Bucket(f"{name}:rpm", rpm, 1,
                                      f"{who} on requests per minute (RPM)"))
            if tpm:  # a single request can always fit a minute
                buckets.append(Bucket(f"{name}:tpm", tpm, min(tokens, tpm),
                                      f"{who} on tokens per minute (TPM)"))
        if not buckets:
            return Reservation(key)
        ok, wait, i = await self._check(buckets)
        if not ok:
            b = buckets[i]
            raise rate_limited(f"Rate limit reached for {b.what}: Limit {b.limit}. Please "
                               f"try again in {wait / 1000:.1f}s.", wait / 1000)
        tpm_buckets = [(b.name, b.limit) for b in buckets if b.name.endswith(":tpm")]
        return Reservation(key, tokens if tpm_buckets else 0, tpm_buckets)

    async def _check(self, buckets: list[Bucket]) -> tuple[bool, float, int]:
        if self.redis is not None and not self._degraded:
            try:
                args: list[int] = []
                for b in buckets:
                    args += [b.limit, b.cost]
                ok, wait, i = await self._admit(
                    keys=[f"{self.prefix}{b.name}" for b in buckets], args=args)
            except Exception as exc:  # noqa: BLE001 - any Redis failure: go local
                self._went_down(exc)
            else:
                self._came_back()
                return bool(ok), float(wait), int(i) - 1
        return self.local.admit(buckets)

    def settle(self, res: Reservation, actual_tokens: int) -> None:
        """Corrects the token reservations to what the request really used."""
        if not res.tpm:
            return
        for name, tpm in res.tpm:
            reserved = min(res.tokens, tpm)
            delta = actual_tokens - reserved
            if not delta:
                continue
            if self.redis is None or self._degraded:
                self.local.settle(name, tpm, delta)
                continue
            limit, d = self._pending.get(name, (tpm, 0))
            self._pending[name] = (limit, d + delta)

    # ------------------------------------------------------------------ Redis health
    def _went_down(self, exc: BaseException) -> None:
        if not self._degraded:
            self._degraded = True
            log.warning("rate limits: Redis unreachable (%s); enforcing them per gateway "
                        "replica in memory until it is back", type(exc).__name__)

    def _came_back(self) -> None:
        if self._degraded:
            self._degraded = False
            log.warning("rate limits: Redis reachable again; limits are shared again")

    async def _tick(self) -> None:
        try:
            if self._degraded:
                await self.redis.ping()
                self._came_back()
            await self._flush()
        except Exception as exc:  # noqa: BLE001
            self._went_down(exc)

    async def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for name, (tpm, delta) in pending.items():
                    await self._settle(keys=[f"{self.prefix}{name}"], args=[tpm, delta],
                                       client=pipe)
                await pipe.execute()
        except Exception:
            for ident, (tpm, delta) in pending.items():  # keep them for the next flush
                _, d = self._pending.get(ident, (tpm, 0))
                self._pending[ident] = (tpm, d + delta)
            raise
