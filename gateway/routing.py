"""Picking a worker: least load relative to capacity, reserved at pick time.

score = (this gateway's in-flight on the worker + other replicas' + load the worker reports
that no gateway counted + 1 for this request) / capacity, where capacity is slots x
measured tokens/s: the load per capacity *after* taking the request, so an idle cluster
sends it to its fastest box rather than to any idle one. A worker
is *full* at slots + `allowance` requests; a full worker is not picked (the request waits
in admission instead). Ties break at random. With more than `P2C_ABOVE` candidates, two
are sampled and the lighter one wins (power of two choices), which stays O(1) and avoids
herding when load views are stale.

With a request's `Job` (its prompt length and expected completion, cost.py) and
`cost_routing` on, the score is instead its expected finish time on each worker: the
prompt over that worker's prefill rate, the completion over its decode rate, plus the work
queued there, so a long prompt goes to the box that reads fast and a short one to whoever
is free; ties and power of two choices apply as without a job, and a worker past the
`allowance` stays open while its expected wait is under `queue_seconds` (cost.full).
The preferred worker (affinity) is taken within its load guard, as without a job; past the
guard it still competes, with its cached prefix counted as nearly free, and wins ties: a
long conversation leaves its cache only when waiting there costs more than reading it again.

Affinity (affinity.py): a request may name a preferred worker (the one holding its
conversation's KV cache). It gets it when that worker has room and is not much busier than
the least-loaded other candidate: at most `slack` more requests in flight. Otherwise the
normal choice applies.

This is the hot path: attribute reads and arithmetic only — no JSON, no pydantic, no logs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection

from gateway import cost
from gateway.cost import Job
from gateway.registry import Registry
from gateway.worker_record import Worker

P2C_ABOVE = 4

Need = tuple[int, int]
"""What a request with logprobs or n > 1 needs of a worker: (top_logprobs or -1, n)."""

EMBEDDINGS: Need = (-1, 0)
"""The need of an embeddings request (n = 0: no choices): only workers advertising
`capabilities.embeddings` qualify, and never any other (`Router.pick` returns None)."""


def capable(w: Worker, need: Need) -> bool:
    """Whether `w` advertises (`capabilities` in /status) what the request needs; a worker
    that advertises nothing honours no logprobs and n = 1."""
    caps = w.status.get("capabilities") or {}
    if need[1] == 0:
        return bool(caps.get("embeddings"))
    return caps.get("top_logprobs", -1) >= need[0] and caps.get("n", 1) >= need[1]


class Router:
    def __init__(self, registry: Registry, allowance: int, slack: int = 2,
                 cost_routing: bool = True, queue_seconds: float = 0.0) -> None:
        self.registry = registry
        self.allowance = allowance
        self.slack = slack  # affinity's load guard
        self.cost_routing = cost_routing
        self.queue_seconds = queue_seconds  # cost routing's room past the allowance
        # One admission pass's requests waiting for a full worker by choice (_pick_cost):
        # each counts as queued there for the next; `holding` says the last None was one.
        self.held: dict[str, int] = {}
        self.holding = False
        self.lengths = cost.Lengths()  # typical completions, learned (api/openai.py)
        self._rand = random.random
        self._sample = random.sample

    def pick(self, model: str, exclude: Collection[str] = (),
             prefer: str | None = None, need: Need | None = None,
             job: Job | None = None) -> Worker | None:
        """The best worker with room for `model`, already reserved; None if all are full.
        `need`: the request's (top_logprobs, n); only workers that honour it are picked,
        unless none does (then any: the worker's 400 names the limit). `job`: its expected
        work (cost.py); without it, the load/capacity score."""
        ws = self.registry.by_model.get(model)
        if not ws:
            return None
        if need is not None:
            ws = [w for w in ws if capable(w, need)] or (ws if need[1] else [])
            if not ws:
                return None
        if job is not None and self.cost_routing:
            return self._pick_cost(ws, exclude, prefer, job)
        allowance = self.allowance
        if prefer is not None:
            w = self._preferred(ws, prefer, exclude)
            if w is not None:
                w.inflight += 1
                return w
        if len(ws) > P2C_ABOVE:
            a, b = self._sample(ws, 2)
            la, lb = a.load, b.load
            ok_a = la < a.slots_total + allowance and a.id not in exclude
            ok_b = lb < b.slots_total + allowance and b.id not in exclude
            if ok_a and ok_b:
                w = a if (la + 1) * b.capacity <= (lb + 1) * a.capacity else b
                w.inflight += 1
                return w
            # One or both of the sample are full: fall back to the full scan below.
        best: Worker | None = None
        best_score = 0.0
        ties = 0
        rand = self._rand
        for w in ws:
            load = w.load
            if load >= w.slots_total + allowance or (exclude and w.id in exclude):
                continue
            score = (load + 1) / w.capacity
            if best is None or score < best_score:
                best, best_score, ties = w, score, 1
            elif score == best_score:
                ties += 1
                if rand() * ties < 1.0:  # reservoir sampling: uniform among equals
                    best = w
        if best is not None:
            best.inflight += 1
        return best

    def _pick_cost(self, ws: list[Worker], exclude: Collection[str], prefer: str | None,
                   job: Job) -> Worker | None:
        """The worker where `job` is expected to finish first (cost.finish), reserved."""
        now = time.monotonic()
        allowance, seconds = self.allowance, self.queue_seconds
        full = cost.full
        pref = None
        if prefer is not None:
            pref = next((x for x in ws if x.id == prefer), None)
            if pref is not None and (pref.id in exclude
                                     or full(pref, job, now, allowance, seconds)):
                pref = None
            if pref is not None and self._preferred(ws, prefer, exclude) is pref:
                return self._reserve(pref, job, now, True)  # within the load guard
            # Busier than the guard allows: it still competes, its prefix nearly free.
        finish = cost.finish
        if len(ws) > P2C_ABOVE:
            a, b = self._sample(ws, 2)
            if (a.id not in exclude and not full(a, job, now, allowance, seconds)
                    and b.id not in exclude and not full(b, job, now, allowance, seconds)):
                w = a if finish(a, job, now, a is pref) <= finish(b, job, now, b is pref) else b
                if pref is not None and pref is not w and \
                        finish(pref, job, now, True) <= finish(w, job, now):
                    w = pref
                return self._reserve(w, job, now, w is pref)
            # One or both of the sample are full: fall back to the full scan below.
        # Full workers compete too, with their wait and the requests already waiting for
        # them counted: when one is still where the job finishes first, the job waits in
        # admission for it (`holding`) instead of taking a worse worker now, so a long
        # prompt waits for the fast reader rather than hold a slow one three times as long.
        best = pref
        best_cost = finish(pref, job, now, True) if pref is not None else 0.0
        best_full = False
        any_open = pref is not None
        ties = 0 if pref is not None else 1
        rand = self._rand
        held = self.held
        for w in ws:
            if w is pref or (exclude and w.id in exclude):
                continue
            is_full = full(w, job, now, allowance, seconds)
            if is_full and w.external:
                continue  # full with load nobody can time: nothing to wait for there
            c = finish(w, job, now)
            if is_full:
                c += held.get(w.id, 0) * job.typical / (w.slots_total * w.decode_rate)
            else:
                any_open = True
            if best is None or c < best_cost:
                best, best_cost, best_full, ties = w, c, is_full, 1
            elif c == best_cost and ties:  # the preferred worker keeps its ties (ties = 0)
                ties += 1
                if rand() * ties < 1.0:  # reservoir sampling: uniform among equals
                    best, best_full = w, is_full
        if best is None or best_full:
            if best is not None and any_open:  # waits for `best` though others have room
                held[best.id] = held.get(best.id, 0) + 1
                self.holding = True
            return None
        return self._reserve(best, job, now, best is pref)

    def reopens_at(self, model: str) -> float | None:
        """When the first of `model`'s workers kept full only by its prompt-reading backlog
        gets room again (`time.monotonic()` clock): no request finishing marks that moment,
        so admission sets a timer for it rather than leave a fast reader idle."""
        if not self.cost_routing:
            return None
        at = [w.reader_free - self.queue_seconds
              for w in self.registry.by_model.get(model, ())
              if w.reader_free - self.queue_seconds > time.monotonic()]
        return min(at) if at else None

    @staticmethod
    def _reserve(w: Worker, job: Job, now: float, cached: bool) -> Worker:
        w.inflight += 1
        cost.reserve(w, job, now, cached)
        return w

    def _preferred(self, ws: list[Worker], prefer: str,
                   exclude: Collection[str]) -> Worker | None:
        """The preferred worker if it serves the model, has room and passes the load guard."""
        w = next((x for x in ws if x.id == prefer), None)
        if w is None or (exclude and w.id in exclude):
            return None
        load = w.load
        if load >= w.slots_total + self.allowance:
            return None
        least = min((x.load for x in ws if x is not w), default=load)
        return w if load <= least + self.slack else None

    @staticmethod
    def release(w: Worker) -> None:
        w.inflight -= 1

    def any_unexcluded(self, model: str, exclude: Collection[str],
                       need: Need | None = None) -> bool:
        strict = need is not None and need[1] == 0  # embeddings: capable workers only
        return any(w.id not in exclude and (not strict or capable(w, need))  # type: ignore[arg-type]
                   for w in self.registry.by_model.get(model, ()))
