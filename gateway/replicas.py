"""Replicas on a worker that holds several models: what the placer pushes, model by model.

The plan says which models each worker holds (`placement.hosted`); the worker reports what
it holds in `/status` `placement.models` (name and state: fetching, loading, ready,
draining, failed). `Reconciler.worker` closes the gap for one worker through its control
API (cluster token):

- a model it holds that the plan does not want there is unloaded (`DELETE
  /control/models/{name}`: the worker drains it first, so no request is cut), unless it is
  moving and its new home is not ready yet while this worker needs no room for another
  model (make before break);
- a model the plan wants there is loaded (`POST /control/models` with its file's URL,
  sha256 and size) once no unwanted model is left on it: memory is freed before it is
  taken again;
- a failed load is retried at once, then after 1, 2, 4 ... 60 s.

A worker that was a split member is told `none` first (a split takes the whole box).
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.worker_record import Worker

log = logging.getLogger("corral.gateway")

Push = Callable[["Worker", str, str, dict[str, Any] | None], Awaitable[dict[str, Any] | None]]


def reported(w: Worker) -> dict[str, Any]:
    return w.status.get("placement") or {}


def held(w: Worker) -> dict[str, str]:
    """model -> state, as the worker last reported (an older worker: its one replica)."""
    r = reported(w)
    models = r.get("models")
    if isinstance(models, list):
        return {m["name"]: m.get("state", "") for m in models if isinstance(m, dict)}
    if r.get("role") == "replica" and r.get("model"):
        return {r["model"]: {"broken": "failed"}.get(r.get("state", ""), r.get("state", ""))}
    return {}


def failures(w: Worker) -> dict[str, str]:
    """model -> why its load failed on `w`, as the worker last reported."""
    return {m["name"]: str(m.get("error") or "unknown error")
            for m in reported(w).get("models") or []
            if isinstance(m, dict) and m.get("state") == "failed"}


def broken_loads(plan: list[Any], by_id: dict[str, Worker]) -> dict[str, str]:
    """Models whose every planned replica failed to load, with the first reason."""
    why: dict[str, list[str]] = {}
    for p in plan:
        if p.mode == "replica" and p.workers[0] in by_id:
            why.setdefault(p.model, []).append(failures(by_id[p.workers[0]]).get(p.model, ""))
    return {m: errs[0] for m, errs in why.items() if all(errs)}


class Backoff:
    """Retries of something that failed: at once, then after 1, 2, 4 ... 60 s; `clear` once
    it works again starts the count afresh."""

    def __init__(self, most: float = 60.0) -> None:
        self.most = most
        self._next: dict[Hashable, tuple[int, float]] = {}  # key -> (tries, not before)

    def may_retry(self, key: Hashable) -> bool:
        return time.monotonic() >= self._next.get(key, (0, 0.0))[1]

    def retried(self, key: Hashable) -> None:
        n, _ = self._next.get(key, (0, 0.0))
        self._next[key] = (n + 1, time.monotonic() + min(self.most, 2.0 ** n))

    def clear(self, key: Hashable) -> None:
        self._next.pop(key, None)


class Reconciler:
    def __init__(self, push: Push, file_fields: Callable[[str], dict[str, Any]]) -> None:
        self.push = push  # (worker, method, path, body) -> the worker's answer or None
        self.file_fields = file_fields
        self._retries = Backoff()  # (worker id, model) of a failed load

    async def worker(self, w: Worker, want: list[str], ready_elsewhere: set[str],
                     planned: set[str]) -> None:
        """Brings `w` to hold exactly `want`. `ready_elsewhere`: models already serving
        on a worker the plan keeps them on; `planned`: every model the plan places."""
        r = reported(w)
        if r.get("role") in ("head", "shard"):
            await self.push(w, "POST", "/control/placement", {"role": "none"})
            return
        have = held(w)
        for name, state in have.items():
            if state == "ready":
                self._retries.clear((w.id, name))
        unwanted = [m for m in have if m not in want and have[m] != "draining"]
        needs_room = any(m not in have for m in want)
        for name in unwanted:
            moving = name in planned and name not in ready_elsewhere
            if moving and not needs_room:
                continue  # make before break: serve here until the new home is ready
            await self.push(w, "DELETE", f"/control/models/{urllib.parse.quote(name)}", None)
        if any(m not in want for m in held(w)):
            return  # memory first: load once what leaves is gone
        for name in want:
            state = have.get(name)
            if state in ("ready", "loading", "fetching", "draining"):
                continue
            key = (w.id, name)
            if state == "failed":
                if not self._retries.may_retry(key):
                    continue
                self._retries.retried(key)
            await self.push(w, "POST", "/control/models", self.file_fields(name))

    def keeping(self, w: Worker, want: list[str], ready_elsewhere: set[str],
                planned: set[str]) -> list[str]:
        """Models `w` still serves only until their new home is ready (make before break)."""
        have = held(w)
        if any(m not in have for m in want):
            return []
        return [m for m, s in have.items() if m not in want and s == "ready"
                and m in planned and m not in ready_elsewhere]
