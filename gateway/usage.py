"""Usage per user: requests (by status) and tokens (prompt, completion), cluster-wide.

Every finished request is recorded here once, off the hot path: the metrics
`corral_user_requests_total{user,status}` and `corral_user_tokens_total{user,kind}` count
this replica's share (Prometheus sums replicas); the totals for `GET /admin/usage` are
kept in memory, or — with Redis — accumulated locally and added to one Redis hash per user
(`HINCRBY`, pipelined) every `FLUSH_SECONDS`, so every replica reads the same totals.
While Redis is unreachable the deltas wait in memory and are added when it is back.

The `user` is the configured user name of the caller's key (`anonymous` with no keys
configured): a bounded label set, never a key and never a client-supplied string. Behind a
front end's key (identity.py) each end user is counted too, under the key: the report
lists them by their forwarded id (`users[u]["end_users"][id]`, which add up to the key's
own totals), the metrics by `end_user` = `EndUser.metric_id`, a digest (never a name or an
email; empty for a key's own calls); past `MAX_END_USER_LABELS` distinct ones in this
process they share `end_user="eu-other"`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from gateway.flush import PeriodicFlush
from gateway.identity import EndUser

log = logging.getLogger("corral.gateway")

ANONYMOUS = "anonymous"
FLUSH_SECONDS = 0.25
MAX_END_USER_LABELS = 1000
Row = tuple[str, str]  # (key user, end user id or "")
FIELDS = ("requests", "prompt_tokens", "completion_tokens")


class Usage:
    def __init__(self, prom: CollectorRegistry, users: list[str], redis: Any = None,
                 prefix: str = "corral:usage:") -> None:
        self.redis = redis
        self.prefix = prefix
        self.users = list(dict.fromkeys([*users, ANONYMOUS]))
        self.end_users: dict[str, set[str]] = defaultdict(set)  # seen here or in Redis
        self.metric_ids: dict[str, str] = {}  # end user id -> its label (bounded)
        self.totals: dict[Row, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._pending: dict[Row, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._flusher = PeriodicFlush(self._tick, self._flush, FLUSH_SECONDS)
        self._failing = False
        self.requests = Counter("corral_user_requests_total", "Requests answered, by user (end "
                                "user: a digest, behind a front end) and HTTP status.",
                                ["user", "end_user", "status"], registry=prom)
        self.tokens = Counter("corral_user_tokens_total", "Tokens processed, by user.",
                              ["user", "end_user", "kind"], registry=prom)

    def _label(self, end: EndUser | None) -> str:
        if end is None:
            return ""
        label = self.metric_ids.get(end.queue_user)
        if label is None:
            label = end.metric_id if len(self.metric_ids) < MAX_END_USER_LABELS else "eu-other"
            self.metric_ids[end.queue_user] = label
        return label

    def record(self, user: str | None, status: int, prompt: int, completion: int,
               end: EndUser | None = None) -> None:
        user = user or ANONYMOUS
        label = self._label(end)
        self.requests.labels(user, label, str(status)).inc()
        if prompt:
            self.tokens.labels(user, label, "prompt").inc(prompt)
        if completion:
            self.tokens.labels(user, label, "completion").inc(completion)
        rows: list[Row] = [(user, "")]
        if end is not None:
            rows.append((user, end.id))
            self.end_users[user].add(end.id)
        for row in rows:
            for target in (self.totals[row], self._pending[row] if self.redis else None):
                if target is None:
                    continue
                target["requests"] += 1
                target[f"status:{status}"] += 1
                target["prompt_tokens"] += prompt
                target["completion_tokens"] += completion

    def _hash(self, row: Row) -> str:
        user, eid = row
        return self.prefix + user + (f":eu:{eid}" if eid else "")

    def _members(self, user: str) -> str:
        return f"{self.prefix}{user}:end_users"

    # ------------------------------------------------------------------ reading
    async def report(self) -> dict[str, Any]:
        """Totals per user (and per end user under it): the cluster's, from Redis when it
        answers, else this replica's."""
        source = "memory"
        raw: dict[Row, dict[str, int]] = {r: dict(v) for r, v in self.totals.items()}
        if self.redis is not None:
            try:
                raw = await self._from_redis()
                source = "redis"
            except Exception as exc:  # noqa: BLE001
                log.warning("usage: Redis unreachable (%s); reporting this replica's view",
                            type(exc).__name__)
                source = "local (Redis unreachable)"
        users: dict[str, Any] = {}
        for (u, eid), d in sorted(raw.items()):
            if not eid:
                users.setdefault(u, {}).update(_summary(d))
        for (u, eid), d in sorted(raw.items()):
            if eid:
                entry = users.setdefault(u, _summary({})).setdefault("end_users", {})
                mid = EndUser(eid, u, "").metric_id
                entry[eid] = {**_summary(d), "metric_id": mid}
        return {"object": "usage", "source": source, "users": users}

    async def _from_redis(self) -> dict[Row, dict[str, int]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for u in self.users:
                pipe.smembers(self._members(u))
            got = await pipe.execute()
        rows: list[Row] = [(u, "") for u in self.users]
        for u, members in zip(self.users, got, strict=True):
            ids = {_s(m) for m in members or ()} | self.end_users.get(u, set())
            rows += [(u, e) for e in sorted(ids)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for r in rows:
                pipe.hgetall(self._hash(r))
            got = await pipe.execute()
        raw: dict[Row, dict[str, int]] = {}
        for r, h in zip(rows, got, strict=True):
            d = {_s(k): int(v) for k, v in (h or {}).items()}
            for k, v in self._pending.get(r, {}).items():  # not flushed yet
                d[k] = d.get(k, 0) + v
            if d:
                raw[r] = d
        return raw

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
                for (u, eid), d in pending.items():
                    if u not in self.users:
                        self.users.append(u)
                    if eid:
                        pipe.sadd(self._members(u), eid)
                    for k, v in d.items():
                        if v:
                            pipe.hincrby(self._hash((u, eid)), k, v)
                await pipe.execute()
        except Exception:
            for r, d in pending.items():
                for k, v in d.items():
                    self._pending[r][k] += v
            raise


def _summary(d: dict[str, int]) -> dict[str, Any]:
    return {
        **{f: d.get(f, 0) for f in FIELDS},
        "total_tokens": d.get("prompt_tokens", 0) + d.get("completion_tokens", 0),
        "by_status": {k[7:]: v for k, v in sorted(d.items()) if k.startswith("status:")},
    }


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
