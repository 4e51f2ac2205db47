"""Token budgets: tokens per UTC day or month, per key and per end user of a front end.

Rate limits (limits.py) smooth a minute; a budget caps what a key or a person may spend in
a day or a month. A request is refused with OpenAI's 429 `insufficient_quota` when a budget
that applies to it is already spent; one admitted request may overshoot it by its own
tokens (its cost is known only when it ends), never more.

Spending is counted when a request ends (`spend`, its real tokens). With Redis the counters
are shared by every replica: one key per window (`corral:budget:<digest>:d:<YYYYMMDD>`,
`...:m:<YYYYMM>`, under `:u:<end user digest>` for an end user) with an expiry past the
window; increments are batched and flushed every `FLUSH_SECONDS`, and admission reads the
counters with one MGET. Without Redis, or while it is unreachable, this replica's own
counts are used (said once in the log).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from typing import Any

from gateway.config import ApiKey
from gateway.flush import PeriodicFlush
from wire.errors import APIError

log = logging.getLogger("corral.gateway")

FLUSH_SECONDS = 0.25
_TTL = {"d": 2 * 86400, "m": 32 * 86400}  # seconds a window's counter outlives its start


def insufficient_quota(message: str) -> APIError:
    """429 as OpenAI sends it for spent quota (no Retry-After: waiting a moment won't help)."""
    return APIError(429, message, "insufficient_quota", None, "insufficient_quota")


def _windows(now: float) -> dict[str, str]:
    t = time.gmtime(now)
    return {"d": time.strftime("%Y%m%d", t), "m": time.strftime("%Y%m", t)}


class Budgets:
    def __init__(self, redis: Any = None, prefix: str = "corral:budget:") -> None:
        self.redis = redis
        self.prefix = prefix
        self.local: dict[str, int] = defaultdict(int)  # counter name -> tokens (this replica)
        self._pending: dict[str, int] = defaultdict(int)
        self._failing = False
        self._flusher = PeriodicFlush(self._tick, self._flush, FLUSH_SECONDS)

    async def start(self) -> None:
        if self.redis is not None:
            self._flusher.start()

    async def stop(self) -> None:
        await self._flusher.stop()

    def _limits(self, key: ApiKey, end_user: str | None, now: float
                ) -> list[tuple[str, int, str]]:
        """(counter name, budget, whose and which) for every budget that applies."""
        win = _windows(now)
        base = key.digest[:20]
        out = []
        for w, budget in (("d", key.tokens_per_day), ("m", key.tokens_per_month)):
            if budget:
                out.append((f"{base}:{w}:{win[w]}", budget,
                            f"key {key.user!r}: {budget} tokens per {_WORD[w]}"))
        if end_user is not None:
            eu = hashlib.blake2b(end_user.encode(), digest_size=8).hexdigest()
            for w, budget in (("d", key.user_tokens_per_day), ("m", key.user_tokens_per_month)):
                if budget:
                    out.append((f"{base}:u:{eu}:{w}:{win[w]}", budget,
                                f"end user {end_user!r} of {key.user!r}: {budget} tokens "
                                f"per {_WORD[w]}"))
        return out

    async def check(self, key: ApiKey | None, end_user: str | None) -> None:
        """Raises 429 insufficient_quota when a budget of this request is spent."""
        if key is None or not key.has_budget:
            return
        limits = self._limits(key, end_user, time.time())
        if not limits:
            return
        spent = await self._read([n for n, _, _ in limits])
        for (_, budget, what), used in zip(limits, spent, strict=True):
            if used >= budget:
                raise insufficient_quota(f"You exceeded your current quota ({what}, "
                                         f"{used} spent); it renews with the next "
                                         f"{what.rsplit(' ', 1)[-1]} (UTC).")

    def spend(self, key: ApiKey | None, end_user: str | None, tokens: int) -> None:
        if key is None or not key.has_budget or tokens <= 0:
            return
        for name, _, _ in self._limits(key, end_user, time.time()):
            self.local[name] += tokens
            if self.redis is not None:
                self._pending[name] += tokens

    async def _read(self, names: list[str]) -> list[int]:
        if self.redis is not None and not self._failing:
            try:
                got = await self.redis.mget([self.prefix + n for n in names])
            except Exception as exc:  # noqa: BLE001
                self._went_down(exc)
            else:
                return [int(v or 0) + self._pending.get(n, 0)
                        for n, v in zip(names, got, strict=True)]
        return [self.local.get(n, 0) for n in names]

    # ------------------------------------------------------------------ Redis
    def _went_down(self, exc: BaseException) -> None:
        if not self._failing:
            log.warning("budgets: Redis unreachable (%s); counting them per gateway replica "
                        "until it is back", type(exc).__name__)
        self._failing = True

    async def _tick(self) -> None:
        try:
            if self._failing:
                await self.redis.ping()
            await self._flush()
        except Exception as exc:  # noqa: BLE001
            self._went_down(exc)
        else:
            if self._failing:
                log.warning("budgets: Redis reachable again; budgets are shared again")
            self._failing = False

    async def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, defaultdict(int)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for name, n in pending.items():
                    pipe.incrby(self.prefix + name, n)
                    pipe.expire(self.prefix + name, _TTL[name.rsplit(":", 2)[-2]])
                await pipe.execute()
        except Exception:
            for name, n in pending.items():
                self._pending[name] += n
            raise


_WORD = {"d": "day", "m": "month"}
