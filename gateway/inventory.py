"""The placer's view of its managed workers, from what their `/status` last reported.

What each offers to models (`capacity`), the slots one model gets on it
(`slots_per_model`), what the workers already run (`running`, so the plan keeps it after a
gateway restart) and whether a placement serves (`serving`). Pure functions of the reports,
kept apart so the placer's round reads plan, then push.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.placement import Placement
from gateway.replicas import held, reported

if TYPE_CHECKING:
    from gateway.memory_need import MemoryNeed
    from gateway.worker_record import Worker


def capacity(w: Worker, needs: dict[str, MemoryNeed] | None = None) -> int:
    """What `w` offers to models: with --memory-limit, the limit (its models' files
    are what it reports as taken); without, the box's free memory plus what the
    models it holds take by the planner's estimate (their KV cache and compute buffers
    are gone from the free memory too), so a model held is not pushed out by itself."""
    mem = w.status.get("memory") or {}
    avail = int(mem.get("available") or 0)
    files = int(mem.get("model_bytes") or 0)
    physical = mem.get("physical_total")
    if physical is not None and int(mem.get("total") or 0) != int(physical):
        return avail + files  # a limit: total minus file bytes, plus them back
    if needs:
        held_need = sum(needs[m].total for m, st in held(w).items()
                        if m in needs and st in ("ready", "draining"))
        if held_need:
            return avail + max(files, held_need)
    return avail + files


def slots_per_model(w: Worker) -> int:
    """Slots one model gets on `w` (the top-level figure sums a worker's models)."""
    per = w.status.get("per_model") or []
    if per:
        return max(int(m.get("slots_total") or 1) for m in per)
    return int(w.status.get("slots_total") or 1)


def serving(p: Placement, by_id: dict[str, Worker]) -> bool:
    """Whether every worker of `p` reports it ready in its role."""
    if p.mode == "replica":
        w = by_id.get(p.workers[0])
        return w is not None and held(w).get(p.model) == "ready"
    for wid in p.workers:
        r = reported(by_id[wid])
        role = "head" if wid == p.head else "shard"
        if r.get("role") != role or r.get("model") != p.model or r.get("state") != "ready":
            return False
    return True


def running(workers: list[Worker]) -> list[Placement]:
    """What the workers already run (after a gateway restart), so the plan keeps it."""
    out: list[Placement] = []
    by_endpoint = {reported(w).get("rpc_endpoint"): w.id for w in workers
                   if reported(w).get("role") == "shard"}
    for w in workers:
        r = reported(w)
        if r.get("role") == "replica":
            out += [Placement(m, "replica", (w.id,), w.id, (1.0,))
                    for m, st in held(w).items() if st not in ("failed", "draining")]
        elif r.get("state") == "broken" or not r.get("model"):
            continue
        elif r.get("role") == "head":
            shards = tuple(by_endpoint.get(e) for e in r.get("shards") or ())
            if shards and all(shards):
                out.append(Placement(r["model"], "split", (w.id, *shards), w.id,
                                     tuple(r.get("tensor_split") or ())))
    return out
