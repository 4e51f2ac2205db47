"""Per-key rate limits: requests and tokens per minute, shared by every gateway replica.

Both limits are a GCRA (generic cell rate algorithm, a token bucket kept as one number): a
key's *theoretical arrival time* `tat` moves forward by `cost x 60 s / limit` per admitted
unit, and a request is admitted while `tat` stays within one minute of now. So a key may
burst its whole per-minute allowance at once and then refills evenly. rpm costs 1 per
request; tpm costs the request's estimated tokens (prompt estimate + max_tokens, or a
conservative default), reserved at admission and reconciled with the real usage when the
request ends (`settle`).

With Redis, the check and the reservation of both limits are one Lua script (atomic, one
round trip, Redis's clock so replicas on different hosts agree). Settlements are batched:
they accumulate locally and are flushed in one pipeline every `FLUSH_SECONDS`, off the
request path. Without Redis, or while it is unreachable, the same arithmetic runs in this
process: limits then hold per replica only (said once in the log). While degraded, requests
never wait on Redis; a background task pings it and switches back when it answers.

Redis keys are named by a digest of the API key, never the key itself.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from gateway.config import ApiKey
from gateway.flush import PeriodicFlush
from wire.errors import APIError

log = logging.getLogger("corral.gateway")

WINDOW_MS = 60_000.0
DEFAULT_COMPLETION_ESTIMATE = 1024  # tokens reserved when a request names no max_tokens
FLUSH_SECONDS = 0.25  # also how often a degraded limiter checks whether Redis is back

# KEYS: rpm key, tpm key. ARGV: rpm limit, tpm limit (0 = none), tokens.
# Returns {1, 0, ""} when admitted, else {0, wait_ms, "rpm"|"tpm"}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local W = 60000
local function step(key, limit, cost)
  if limit <= 0 then return nil, -1 end
  local tat = tonumber(redis.call('GET', key) or '0') or 0
  if tat < now then tat = now end
  local new = tat + cost * W / limit
  return new, new - now - W
end
local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local r_new, r_wait = step(KEYS[1], rpm, 1)
local t_new, t_wait = step(KEYS[2], tpm, tokens)
if r_wait > 0 or t_wait > 0 then
  if r_wait >= t_wait then return {0, math.ceil(r_wait), 'rpm'} end
  return {0, math.ceil(t_wait), 'tpm'}
end
if r_new then redis.call('SET', KEYS[1], tostring(r_new), 'PX', math.ceil(r_new - now) + 1000) end
if t_new then redis.call('SET', KEYS[2], tostring(t_new), 'PX', math.ceil(t_new - now) + 1000) end
return {1, 0, ''}
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


@dataclass
class Reservation:
    """What admission took from a key's limits; `settle` gives back the difference."""

    key: ApiKey | None
    tokens: int = 0


class _Gcra:
    """The same arithmetic as the Lua scripts, on this process's clock."""

    def __init__(self) -> None:
        self.tat: dict[str, float] = {}

    def _now(self) -> float:
        return time.monotonic() * 1000.0

    def admit(self, ident: str, rpm: int, tpm: int, tokens: int) -> tuple[bool, float, str]:
        now = self._now()
        steps = []
        for dim, limit, cost in (("rpm", rpm, 1), ("tpm", tpm, tokens)):
            if limit > 0:
                tat = max(self.tat.get(f"{ident}:{dim}", 0.0), now)
                new = tat + cost * WINDOW_MS / limit
                steps.append((new - now - WINDOW_MS, dim, new))
        waits = [(w, d) for w, d, _ in steps if w > 0]
        if waits:
            wait, dim = max(waits)
            return False, wait, dim
        for _, dim, new in steps:
            self.tat[f"{ident}:{dim}"] = new
        if len(self.tat) > 4096:  # forget keys idle past their window
            self.tat = {k: v for k, v in self.tat.items() if v > now}
        return True, 0.0, ""

    def settle(self, ident: str, tpm: int, delta: int) -> None:
        now = self._now()
        k = f"{ident}:tpm"
        tat = max(self.tat.get(k, 0.0), now) + delta * WINDOW_MS / tpm
        if tat <= now:
            self.tat.pop(k, None)
        else:
            self.tat[k] = tat


class Limiter:
    """Admission against per-key limits; Redis-backed when given a client."""

    def __init__(self, redis: Any = None, prefix: str = "corral:limit:") -> None:
        self.redis = redis
        self.prefix = prefix
        self.local = _Gcra()
        self._ids: dict[str, str] = {}
        self._pending: dict[str, tuple[int, int]] = {}  # ident -> (tpm, token delta)
        self._degraded = False
        self._flusher = PeriodicFlush(self._tick, self._flush, FLUSH_SECONDS)
        if redis is not None:
            self._admit = redis.register_script(_ADMIT)
            self._settle = redis.register_script(_SETTLE)

    def ident(self, key: ApiKey) -> str:
        i = self._ids.get(key.key)
        if i is None:
            digest = hashlib.sha256(key.key.encode()).hexdigest()[:20]
            i = self._ids[key.key] = digest
        return i

    async def start(self) -> None:
        if self.redis is not None:
            self._flusher.start()

    async def stop(self) -> None:
        await self._flusher.stop()

    # ------------------------------------------------------------------ admission
    async def admit(self, key: ApiKey | None, tokens: int) -> Reservation:
        """Reserves one request and `tokens` from the key's limits, or raises 429."""
        if key is None or not (key.rpm or key.tpm):
            return Reservation(key)
        rpm, tpm = key.rpm or 0, key.tpm or 0
        tokens = min(tokens, tpm) if tpm else 0  # a single request can always fit a minute
        ident = self.ident(key)
        ok, wait, dim = await self._check(ident, rpm, tpm, tokens)
        if not ok:
            what = ("requests per minute (RPM)" if dim == "rpm" else "tokens per minute (TPM)")
            limit = rpm if dim == "rpm" else tpm
            raise rate_limited(f"Rate limit reached for user {key.user!r} on {what}: Limit "
                               f"{limit}. Please try again in {wait / 1000:.1f}s.",
                               wait / 1000)
        return Reservation(key, tokens)

    async def _check(self, ident: str, rpm: int, tpm: int, tokens: int
                     ) -> tuple[bool, float, str]:
        if self.redis is not None and not self._degraded:
            try:
                ok, wait, dim = await self._admit(
                    keys=[f"{self.prefix}{ident}:rpm", f"{self.prefix}{ident}:tpm"],
                    args=[rpm, tpm, tokens])
            except Exception as exc:  # noqa: BLE001 - any Redis failure: go local
                self._went_down(exc)
            else:
                self._came_back()
                return bool(ok), float(wait), dim.decode() if isinstance(dim, bytes) else dim
        return self.local.admit(ident, rpm, tpm, tokens)

    def settle(self, res: Reservation, actual_tokens: int) -> None:
        """Corrects the token reservation to what the request really used."""
        key = res.key
        if key is None or not key.tpm:
            return
        delta = actual_tokens - res.tokens
        if not delta:
            return
        ident = self.ident(key)
        if self.redis is None or self._degraded:
            self.local.settle(ident, key.tpm, delta)
            return
        tpm, d = self._pending.get(ident, (key.tpm, 0))
        self._pending[ident] = (tpm, d + delta)

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
                for ident, (tpm, delta) in pending.items():
                    await self._settle(keys=[f"{self.prefix}{ident}:tpm"], args=[tpm, delta],
                                       client=pipe)
                await pipe.execute()
        except Exception:
            for ident, (tpm, delta) in pending.items():  # keep them for the next flush
                _, d = self._pending.get(ident, (tpm, 0))
                self._pending[ident] = (tpm, d + delta)
            raise
