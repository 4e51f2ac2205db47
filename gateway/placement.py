"""Where each model runs: replicated where it fits, split with llama.cpp RPC where it fits nowhere.

A pure planner (no I/O besides reading GGUF headers in `estimate`), so it is tested alone.

Memory a model needs on one box (`estimate`), from the GGUF's metadata and tensor table:
  weights  = the bytes of its tensors;
  kv_cache = n_layer x n_ctx x n_head_kv x (key_length + value_length) x 2 bytes (f16) x slots;
  compute  = llama.cpp's compute buffer: 4 bytes x n_ubatch x (n_vocab + n_embd + n_ff) (the
             logits of one micro-batch dominate; measured 99.4 MiB for SmolLM2-135M at
             n_ubatch 512, this gives 100.1 MiB);
  runtime  = one worker process (Python, llama.cpp, the HTTP stack), measured: 80 MiB RSS.

Plan (`plan`): every worker holds at most one role. First every model gets a home, biggest
model first: the smallest free worker that holds it (best fit), or, if none can, the FEWEST
free workers whose memory adds up (largest first) as one split, the largest of them the
head, `tensor_split` proportional to their memory. Then each remaining worker takes a
replica of a model it holds, the model with the fewest replicas first. Current members are
preferred on ties, so a re-plan on the same inventory changes nothing. The plan comes in a
canonical order (`canonical`), so two plans that place the same roles compare equal even when
free memory that moved between two probes changed which worker was picked first.

A model left out of the plan is explained (`explain`): what it needs, the largest single
offer and what all the workers together offer, so it is never silently missing.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker import gguf_meta

RUNTIME_BYTES = 80 << 20
KV_BYTES_PER_ELEMENT = 2  # f16 K and V, llama.cpp's default cache type
N_UBATCH = 512


@dataclass(frozen=True)
class MemoryNeed:
    weights: int
    kv_cache: int
    compute: int
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.runtime

    def to_json(self) -> dict[str, int]:
        return {"weights": self.weights, "kv_cache": self.kv_cache, "compute": self.compute,
                "runtime": self.runtime, "total": self.total}


def _per_layer_max(v: Any, default: int) -> int:
    if v is None:
        return default
    if isinstance(v, list):
        return max((int(x) for x in v), default=default)
    return int(v)


def estimate(path: str | os.PathLike[str], n_ctx: int = 2048, slots: int = 1,
             n_ubatch: int = N_UBATCH) -> MemoryNeed:
    st = os.stat(path)
    return _estimate(os.fspath(path), st.st_size, st.st_mtime_ns, n_ctx, slots, n_ubatch)


@functools.lru_cache(maxsize=64)
def _estimate(path: str, _size: int, _mtime: int, n_ctx: int, slots: int,
              n_ubatch: int) -> MemoryNeed:
    g = gguf_meta.read(path)
    n_layer = int(g.arch_get("block_count", 0))
    n_embd = int(g.arch_get("embedding_length", 0))
    n_head = _per_layer_max(g.arch_get("attention.head_count"), 1) or 1
    n_head_kv = _per_layer_max(g.arch_get("attention.head_count_kv"), n_head)
    head_dim = n_embd // n_head if n_head else 0
    k_len = int(g.arch_get("attention.key_length", head_dim))
    v_len = int(g.arch_get("attention.value_length", head_dim))
    n_ff = _per_layer_max(g.arch_get("feed_forward_length"), 4 * n_embd)
    n_vocab = g.arch_get("vocab_size")
    if n_vocab is None:
        n_vocab = len(g.get("tokenizer.ggml.tokens", ()))
    n_train = int(g.arch_get("context_length", 0) or 0)
    per_seq = min(n_ctx, n_train) if n_train > 0 else n_ctx
    weights = g.tensor_bytes
    kv = n_layer * per_seq * n_head_kv * (k_len + v_len) * KV_BYTES_PER_ELEMENT * slots
    compute = 4 * n_ubatch * (int(n_vocab) + n_embd + n_ff)
    return MemoryNeed(weights, kv, compute)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    need: int  # bytes on one box (MemoryNeed.total)


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
    """Placements for `models` on `workers`, in canonical order. A model that fits nowhere,
    even split, is left out (`explain` says why).

    `cost(head, members)` (the measured topology's network ms per token) picks, among the
    sets of the fewest workers that hold a split, the fastest-linked one; a running split
    is kept unless another set is clearly faster (`_clearly_faster`).

    Replicas come one placement per worker (mode "replica", one id in `workers`), so a
    worker's role is always read from exactly one placement.
    """
    pool = {w.id: w for w in workers}
    current = list(current)
    was = {(wid, p.model, p.mode) for p in current for wid in p.workers}
    splits = {p.model: p for p in current
              if p.mode == "split" and p.workers and len(p.tensor_split) == len(p.workers)}
    free = set(pool)
    out: list[Placement] = []
    replicas: dict[str, int] = {m.name: 0 for m in models}

    def kept(wid: str, model: str, mode: str) -> int:
        return 0 if (wid, model, mode) in was else 1

    # 1. A home for every model, the biggest first.
    for m in sorted(models, key=lambda m: -m.need):
        fits = [pool[w] for w in free if pool[w].memory >= m.need]
        if fits:
            best = min(fits, key=lambda w: (kept(w.id, m.name, "replica"), w.memory, w.id))
            free.discard(best.id)
            out.append(Placement(m.name, "replica", (best.id,), best.id, (1.0,)))
            replicas[m.name] += 1
            continue
        by_size = sorted((pool[w] for w in free),
                         key=lambda w: (-w.memory, kept(w.id, m.name, "split"), w.id))
        chosen: list[WorkerSpec] = []
        for w in by_size:
            chosen.append(w)
            if sum(c.memory for c in chosen) >= m.need:
                break
        else:
            continue  # not even all free workers together hold it
        if cost is not None:
            chosen = _fastest(by_size, len(chosen), m.need, cost) or chosen
        members = tuple(c.id for c in chosen)
        ratios = _proportional([c.memory for c in chosen])
        prev = splits.get(m.name)
        if (prev is not None and len(prev.workers) <= len(members)
                and all(w in free for w in prev.workers)
                and sum(pool[w].memory for w in prev.workers) >= m.need
                and not (cost and _clearly_faster(cost, members, prev.workers))):
            # The running split still holds it with no more workers: keep its members, head
            # and ratios. Free memory moves between probes; a new head or tensor_split
            # would restart a split that serves fine.
            members, ratios = prev.workers, prev.tensor_split
        free.difference_update(members)
        out.append(Placement(m.name, "split", members, members[0], ratios))

    # 2. Every other worker replicates a model it holds, the least replicated first.
    order = {m.name: i for i, m in enumerate(models)}
    for wid in sorted(free, key=lambda w: (-pool[w].memory, w)):
        w = pool[wid]
        fits = [m for m in models if m.need <= w.memory and replicas[m.name] > 0]
        if not fits:
            continue
        m = min(fits, key=lambda m: (kept(wid, m.name, "replica"), replicas[m.name],
                                     order[m.name]))
        replicas[m.name] += 1
        out.append(Placement(m.name, "replica", (wid,), wid, (1.0,)))
    return canonical(out)


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
    """worker id -> (role, placement): "replica", "head" or "shard"."""
    out: dict[str, tuple[str, Placement]] = {}
    for p in placements:
        for wid in p.workers:
            if p.mode == "replica":
                out[wid] = ("replica", p)
            else:
                out[wid] = ("head" if wid == p.head else "shard", p)
    return out


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
