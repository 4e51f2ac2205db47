"""Usage per user: requests (by status) and tokens (prompt, completion), cluster-wide.

Every finished request is recorded here once, off the hot path: the metrics
`corral_user_requests_total{user,status}` and `corral_user_tokens_total{user,kind}` count
this replica's share (Prometheus sums replicas); the totals for `GET /admin/usage` are
kept in memory, or — with Redis — accumulated locally and added to one Redis hash per user
(`HINCRBY`, pipelined) every `FLUSH_SECONDS`, so every replica reads the same totals.
While Redis is unreachable the deltas wait in memory and are added when it is back.

The `user` is the configured user name of the caller's key (`anonymous` with no keys
configured): a bounded label set, never a key and never a client-supplied string.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from gateway.flush import PeriodicFlush

log = logging.getLogger("corral.gateway")

ANONYMOUS = "anonymous"
FLUSH_SECONDS = 0.25
FIELDS = ("requests", "prompt_tokens", "completion_tokens")


class Usage:
    def __init__(self, prom: CollectorRegistry, users: list[str], redis: Any = None,
                 prefix: str = "corral:usage:") -> None:
        self.redis = redis
        self.prefix = prefix
        self.users = list(dict.fromkeys([*users, ANONYMOUS]))
        self.totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._pending: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._flusher = PeriodicFlush(self._tick, self._flush, FLUSH_SECONDS)
        self._failing = False
        self.requests = Counter("corral_user_requests_total", "Requests answered, by user and HTTP "
                                "status.", ["user", "status"], registry=prom)
        self.tokens = Counter("corral_user_tokens_total", "Tokens processed, by user.",
                              ["user", "kind"], registry=prom)

    def record(self, user: str | None, status: int, prompt: int, completion: int) -> None:
        user = user or ANONYMOUS
        self.requests.labels(user, str(status)).inc()
        if prompt:
            self.tokens.labels(user, "prompt").inc(prompt)
        if completion:
            self.tokens.labels(user, "completion").inc(completion)
        for target in (self.totals[user], self._pending[user] if self.redis else None):
            if target is None:
                continue
            target["requests"] += 1
            target[f"status:{status}"] += 1
            target["prompt_tokens"] += prompt
            target["completion_tokens"] += completion

    # ------------------------------------------------------------------ reading
    async def report(self) -> dict[str, Any]:
        """Totals per user: the cluster's, from Redis when it answers, else this replica's."""
        source = "memory"
        raw: dict[str, dict[str, int]] = {u: dict(v) for u, v in self.totals.items()}
        if self.redis is not None:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for u in self.users:
                        pipe.hgetall(self.prefix + u)
                    got = await pipe.execute()
                raw = {}
                for u, h in zip(self.users, got, strict=True):
                    d = {_s(k): int(v) for k, v in (h or {}).items()}
                    for k, v in self._pending.get(u, {}).items():  # not flushed yet
                        d[k] = d.get(k, 0) + v
                    if d:
                        raw[u] = d
                source = "redis"
            except Exception as exc:  # noqa: BLE001
                log.warning("usage: Redis unreachable (%s); reporting this replica's view",
                            type(exc).__name__)
                source = "local (Redis unreachable)"
        users = {}
        for u, d in sorted(raw.items()):
            users[u] = {
                **{f: d.get(f, 0) for f in FIELDS},
                "total_tokens": d.get("prompt_tokens", 0) + d.get("completion_tokens", 0),
                "by_status": {k[7:]: v for k, v in sorted(d.items()) if k.startswith("status:")},
            }
        return {"object": "usage", "source": source, "users": users}

    # ------------------------------------------------------------------ Redis
    async def start(self) -> None:
        if self.redis is not None:
            self._flusher.start()

    async def stop(self) -> None:
        await self._flusher.stop()

    async def _tick(self) -> None:
        try:
            await self._flush()
        except Exception as exc:  # noqa: BLE001
            if not self._failing:
                log.warning("usage: Redis unreachable (%s); keeping counts in memory "
                            "until it is back", type(exc).__name__)
            self._failing = True
        else:
            if self._failing:
                log.warning("usage: Redis reachable again; counts flushed")
            self._failing = False

    async def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, defaultdict(lambda: defaultdict(int))
        try:
            async with self.redis.pipeline(transaction=True) as pipe:  # all or nothing
                for u, d in pending.items():
                    if u not in self.users:
                        self.users.append(u)
                    for k, v in d.items():
                        if v:
                            pipe.hincrby(self.prefix + u, k, v)
                await pipe.execute()
        except Exception:
            for u, d in pending.items():
                for k, v in d.items():
                    self._pending[u][k] += v
            raise


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
