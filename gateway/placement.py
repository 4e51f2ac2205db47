"""Where each model runs: replicated where it fits, split with llama.cpp RPC where it fits nowhere.

A pure planner (no I/O: what each model needs on one box is `gateway.memory_need`'s
estimate), so it is tested alone.

Plan (`plan`): models are packed onto workers by memory, several per worker as long as
their needs add up to no more than it offers. Each model has a target number of replicas
(`ModelSpec.replicas`: 1, a pinned model's `min_replicas`, more while it is busy).
  0. What runs stays where it is (up to each target), so a re-plan moves nothing that fits.
  1. A model that fits no single worker is split with llama.cpp RPC over the FEWEST workers
     holding nothing (largest first, the largest the head, `tensor_split` by memory).
  2. Every other model without a home, pinned ones first, then the biggest first, goes to
     the best fit: a worker already in use before an empty one (boxes no placement needs
     stay free), then the least memory left over. If none has room and it is pinned or
     `demanded` (requests wait for it), the least recently used unpinned models (or extra
     replicas) on one worker are evicted for it: a pinned model evicts any unpinned one, a
     demanded one only those used less recently. Any other is simply not loaded now.
  3. Replicas beyond the first, up to each target, by the same best fit, evicting nothing.
The plan comes in a canonical order (`canonical`), so two plans that place the same roles
compare equal even when free memory that moved between two probes changed an order.

A model left out of the plan is explained (`explain`): what it needs, the largest single
offer and what all the workers together offer, so it is never silently missing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.memory_need import MemoryNeed


@dataclass(frozen=True)
class ModelSpec:
    name: str
    need: int  # bytes on one box (MemoryNeed.total)
    replicas: int = 1  # how many the plan should give it (when memory allows)
    pinned: bool = False  # never evicted for another model
    last_used: float = 0.0  # when it was last asked for: the LRU order of eviction
    demanded: bool = False  # requests wait for it, served nowhere: it may evict others


@dataclass(frozen=True)
class WorkerSpec:
    id: str
    memory: int  # bytes this worker offers a model


@dataclass(frozen=True)
class Placement:
    model: str
    mode: str  # "replica" | "split"
    workers: tuple[str, ...]
    head: str | None = None
    tensor_split: tuple[float, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "mode": self.mode, "workers": list(self.workers),
                "head": self.head, "tensor_split": list(self.tensor_split)}


def _proportional(memories: Sequence[int]) -> tuple[float, ...]:
    total = sum(memories)
    return tuple(round(m / total, 6) for m in memories)


def canonical(placements: Iterable[Placement]) -> list[Placement]:
    """The placements sorted by model, mode and members: one form per set of roles."""
    return sorted(placements, key=lambda p: (p.model, p.mode, p.workers, p.head or ""))


SplitCost = Callable[[str, Sequence[str]], float]
MAX_SEARCH = 12  # free workers searched for the fastest split set (C(12, 6) = 924 sets)


def _fastest(by_size: Sequence[WorkerSpec], k: int, need: int,
             cost: SplitCost) -> list[WorkerSpec] | None:
    """The `k` workers holding `need` together whose links cost least; ties go to the
    largest-first order. Each set's head is its largest worker, as without a topology."""
    best: tuple[float, int, list[WorkerSpec]] | None = None
    pool = list(by_size[:MAX_SEARCH])
    for rank, combo in enumerate(itertools.combinations(pool, k)):
        if sum(w.memory for w in combo) < need:
            continue
        c = cost(combo[0].id, [w.id for w in combo])
        if best is None or (c, rank) < (best[0], best[1]):
            best = (c, rank, list(combo))
    return best[2] if best else None


def _clearly_faster(cost: SplitCost, new: Sequence[str], old: Sequence[str]) -> bool:
    """A running split gives way only to a set at least 1.5x and 0.5 ms per token faster:
    RTT noise must not restart a split that serves fine."""
    return cost(new[0], new) * 1.5 + 0.5 < cost(old[0], old)


def plan(models: Sequence[ModelSpec], workers: Iterable[WorkerSpec],
         current: Iterable[Placement] = (), cost: SplitCost | None = None) -> list[Placement]:
    """Placements for `models` on `workers`, in canonical order (the module docstring has
    the rules). A model that fits nowhere, even split or by eviction, is left out
    (`explain` says why).

    `cost(head, members)` (the measured topology's network ms per token) picks, among the
    sets of the fewest workers that hold a split, the fastest-linked one; a running split
    is kept unless another set is clearly faster (`_clearly_faster`).

    Replicas come one placement per worker and model (mode "replica", one id in
    `workers`); a worker may hold several models' replicas, or one split role.
    """
    return _Packer(models, workers, current, cost).run()


class _Packer:
    def __init__(self, models: Sequence[ModelSpec], workers: Iterable[WorkerSpec],
                 current: Iterable[Placement], cost: SplitCost | None) -> None:
        self.pool = {w.id: w for w in workers}
        self.current = list(current)
        self.cost = cost
        self.spec = {m.name: m for m in models}
        self.order = sorted(models, key=lambda m: (not m.pinned, -m.need, m.name))
        self.free = {w: self.pool[w].memory for w in self.pool}
        self.on: dict[str, list[str]] = {w: [] for w in self.pool}
        self.count = {m.name: 0 for m in models}
        self.split: dict[str, Placement] = {}
        self.held = {(p.workers[0], p.model) for p in self.current
                     if p.mode == "replica" and p.workers}

    def run(self) -> list[Placement]:
        for m in self.order:  # 0. what runs stays
            for wid in sorted(w for w in self.pool if (w, m.name) in self.held):
                if self.count[m.name] < m.replicas and self._fits(m, wid):
                    self._put(m, wid)
        for m in self.order:  # 1. splits, for what no single worker holds
            if not self.count[m.name] and not any(w.memory >= m.need
                                                  for w in self.pool.values()):
                self._split(m)
        homeless: list[ModelSpec] = []
        for m in self.order:  # 2. a home for the others: best fit, else evict
            if self.count[m.name] or m.name in self.split:
                continue
            if not any(w.memory >= m.need for w in self.pool.values()):
                continue
            wid = self._best_fit(m)
            if wid is None:
                wid = self._evict_for(m, homeless)
            if wid is not None:
                self._put(m, wid)
        for m in homeless:  # the evicted: elsewhere, if memory is left
            if not self.count[m.name] and (wid := self._best_fit(m)) is not None:
                self._put(m, wid)
        for m in self.order:  # 3. more replicas up to the target
            while m.name not in self.split and self.count[m.name] < m.replicas:
                wid = self._best_fit(m)
                if wid is None:
                    break
                self._put(m, wid)
        out = [Placement(m, "replica", (w,), w, (1.0,))
               for w, ms in self.on.items() for m in ms]
        return canonical([*out, *self.split.values()])

    def _fits(self, m: ModelSpec, wid: str) -> bool:
        return m.name not in self.on[wid] and self.free[wid] >= m.need \
            and wid not in self._split_members()

    def _split_members(self) -> set[str]:
        return {w for p in self.split.values() for w in p.workers}

    def _put(self, m: ModelSpec, wid: str) -> None:
        self.free[wid] -= m.need
        self.on[wid].append(m.name)
        self.count[m.name] += 1

    def _take(self, name: str, wid: str) -> None:
        self.free[wid] += self.spec[name].need
        self.on[wid].remove(name)
        self.count[name] -= 1

    def _best_fit(self, m: ModelSpec) -> str | None:
        fits = [w for w in self.pool if self._fits(m, w)]
        if not fits:
            return None
        return min(fits, key=lambda w: (not self.on[w], (w, m.name) not in self.held,
                                        self.free[w] - m.need, w))

    def _evictable(self, v: str, m: ModelSpec) -> bool:
        if not (m.pinned or m.demanded):
            return False  # only a model someone waits for (or a pinned one) makes room
        s = self.spec[v]
        if self.count[v] > max(1, s.replicas if s.pinned else 1):
            return True  # an extra replica: the model keeps its others
        return not s.pinned and (m.pinned or s.last_used < m.last_used)

    def _evict_for(self, m: ModelSpec, homeless: list[ModelSpec]) -> str | None:
        """The worker where evicting the least recently used makes room for `m`; evicts."""
        best: tuple[tuple[int, float, int, str], list[str]] | None = None
        for wid, w in self.pool.items():
            if w.memory < m.need or m.name in self.on[wid] or wid in self._split_members():
                continue
            victims = sorted((v for v in self.on[wid] if self._evictable(v, m)),
                             key=lambda v: (self.count[v] <= 1, self.spec[v].last_used, v))
            room, chosen = self.free[wid], []
            for v in victims:
                if room >= m.need:
                    break
                chosen.append(v)
                room += self.spec[v].need
            if room < m.need:
                continue
            lost = [v for v in chosen if self.count[v] <= 1]
            score = (len(lost), max((self.spec[v].last_used for v in lost), default=0.0),
                     len(chosen), wid)
            if best is None or score < best[0]:
                best = (score, chosen)
        if best is None:
            return None
        wid = best[0][3]
        for v in best[1]:
            self._take(v, wid)
            if not self.count[v]:
                homeless.append(self.spec[v])
        return wid

    def _split(self, m: ModelSpec) -> None:
        pool = self.pool
        members_taken = self._split_members()
        empty = [w for w in pool if not self.on[w] and w not in members_taken]
        by_size = sorted((pool[w] for w in empty),
                         key=lambda w: (-w.memory, self._kept_split(w.id, m.name), w.id))
        chosen: list[WorkerSpec] = []
        for w in by_size:
            chosen.append(w)
            if sum(c.memory for c in chosen) >= m.need:
                break
        else:
            return  # not even all free workers together hold it
        cost = self.cost
        if cost is not None:
            chosen = _fastest(by_size, len(chosen), m.need, cost) or chosen
        prev = next((p for p in self.current if p.model == m.name and p.mode == "split"
                     and p.workers and len(p.tensor_split) == len(p.workers)), None)
        if prev is not None and (kept := self._survivors(prev, by_size, m.need)) and not (
                cost and _clearly_faster(cost, [c.id for c in chosen], [c.id for c in kept])):
            chosen = kept  # a member left: the others (and the head) stay, RTT noise aside
        members = tuple(c.id for c in chosen)
        ratios = _proportional([c.memory for c in chosen])
        if (prev is not None and len(prev.workers) <= len(members)
                and all(w in empty for w in prev.workers)
                and sum(pool[w].memory for w in prev.workers) >= m.need
                and not (cost and _clearly_faster(cost, members, prev.workers))):
            # The running split still holds it with no more workers: keep its members, head
            # and ratios. Free memory moves between probes; a new head or tensor_split
            # would restart a split that serves fine.
            members, ratios = prev.workers, prev.tensor_split
        for wid in members:
            self.free[wid] = 0
        self.split[m.name] = Placement(m.name, "split", members, members[0], ratios)

    @staticmethod
    def _survivors(prev: Placement, by_size: Sequence[WorkerSpec],
                   need: int) -> list[WorkerSpec] | None:
        """The running split's members still free, head first, topped up from `by_size`
        until they hold `need`; None when none survives or they cannot hold it."""
        free = {w.id: w for w in by_size}
        out = [free[w] for w in prev.workers if w in free]
        if not out:
            return None
        for w in by_size:
            if sum(c.memory for c in out) >= need:
                break
            if w not in out:
                out.append(w)
        return out if sum(c.memory for c in out) >= need else None

    def _kept_split(self, wid: str, model: str) -> int:
        return 0 if any(p.model == model and p.mode == "split" and wid in p.workers
                        for p in self.current) else 1


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class Unplaceable:
    """A model the plan left out, and the numbers that say why."""

    model: str
    need: MemoryNeed
    largest: int  # bytes the largest single worker offers
    largest_worker: str
    split: int  # bytes all the workers offer together (the best any split could get)
    workers: int

    @property
    def reason(self) -> str:
        n = self.need
        head = (f"it needs {_mib(n.total)} (weights {_mib(n.weights)}, KV cache "
                f"{_mib(n.kv_cache)}, compute {_mib(n.compute)}, runtime {_mib(n.runtime)})")
        if self.split >= n.total:  # enough memory in all, but other models hold it
            return (f"{head}; the {self.workers} worker(s) offer {_mib(self.split)} together, "
                    "but other models are placed on the workers it would need")
        return (f"{head}, but the largest worker ({self.largest_worker}) offers "
                f"{_mib(self.largest)} and all {self.workers} worker(s) together "
                f"{_mib(self.split)}")

    def to_json(self) -> dict[str, Any]:
        """The `/cluster` placement entry of a model that cannot be placed."""
        return {"model": self.model, "mode": None, "workers": [], "head": None,
                "tensor_split": [], "state": "unplaceable", "need": self.need.to_json(),
                "offer": {"largest": self.largest, "largest_worker": self.largest_worker,
                          "split": self.split, "workers": self.workers},
                "reason": self.reason}


def explain(needs: dict[str, MemoryNeed], workers: Sequence[WorkerSpec],
            placements: Iterable[Placement]) -> dict[str, Unplaceable]:
    """The models in `needs` that `placements` leave out, each with its numbers. Nothing
    without workers: no worker at all is "no healthy worker", not a model too big."""
    if not workers:
        return {}
    placed = {p.model for p in placements}
    big = max(workers, key=lambda w: (w.memory, w.id))
    total = sum(w.memory for w in workers)
    return {name: Unplaceable(name, need, big.memory, big.id, total, len(workers))
            for name, need in needs.items() if name not in placed}


def roles(placements: Iterable[Placement]) -> dict[str, tuple[str, Placement]]:
    """worker id -> (role, placement): "replica", "head" or "shard" (for a worker holding
    several replicas, the last of them)."""
    out: dict[str, tuple[str, Placement]] = {}
    for p in placements:
        for wid in p.workers:
            if p.mode == "replica":
                out[wid] = ("replica", p)
            else:
                out[wid] = ("head" if wid == p.head else "shard", p)
    return out


def hosted(placements: Iterable[Placement]) -> dict[str, list[str]]:
    """worker id -> the models it holds as replicas, by name."""
    out: dict[str, list[str]] = {}
    for p in placements:
        if p.mode == "replica":
            out.setdefault(p.workers[0], []).append(p.model)
    return {w: sorted(ms) for w, ms in out.items()}


def summary(placements: Iterable[Placement]) -> list[dict[str, Any]]:
    """The contract's `/cluster` view: one entry per model and mode, replicas merged."""
    merged: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    for p in placements:
        key = (p.model, p.mode, None if p.mode == "replica" else p.head)
        e = merged.setdefault(key, {"model": p.model, "mode": p.mode, "workers": [],
                                    "head": None if p.mode == "replica" else p.head,
                                    "tensor_split": [] if p.mode == "replica"
                                    else list(p.tensor_split)})
        e["workers"].extend(p.workers)
    return list(merged.values())
