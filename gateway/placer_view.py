"""What `/cluster` shows of the placer: its placements with their states, and the loads
in progress (models being fetched, loaded or drained on managed workers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.placement import summary
from gateway.replicas import held, reported

if TYPE_CHECKING:
    from gateway.placer import Placer


def placements(placer: Placer, unmanaged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours (with a state each), plus self-placed replicas, draining ones, unplaceable."""
    ours = {w.id for w in placer.managed()}
    out = []
    for p in unmanaged:
        ids = [i for i in p.get("workers", []) if i not in ours]
        if ids:
            out.append({**p, "workers": ids})
    for e in summary(placer.current):
        e["state"] = _state(placer, e)
        if e.get("mode") == "split" and placer.topology is not None:
            # What the chosen set's links add to each decoded token (topology.cost).
            e["expected_network_ms_per_token"] = round(
                placer.topology.cost(e["head"], e["workers"]), 3)
        out.append(e)
    for e in summary(placer.draining):
        e["state"] = "draining"
        out.append(e)
    out.extend(u.to_json() for u in placer.unplaceable.values())
    return out


def loads(placer: Placer) -> list[dict[str, Any]]:
    out = []
    for w in placer.managed():
        for m in reported(w).get("models") or []:
            if isinstance(m, dict) and m.get("state") in ("fetching", "loading", "draining",
                                                          "failed"):
                out.append({"model": m.get("name"), "worker": w.id, "state": m["state"],
                            "since": m.get("since"), "error": m.get("error"),
                            "download": m.get("download")})
    return out


def _state(placer: Placer, e: dict[str, Any]) -> str:
    states = []
    for wid in e["workers"]:
        w = placer.registry.workers.get(wid)
        if w is not None and e.get("mode") == "replica":
            st = held(w).get(e["model"])
            states.append({"failed": "broken", "draining": "loading"}.get(st or "", st))
            continue
        states.append(reported(w).get("state") if w else "down")
    if any(s in ("broken", "down", None) for s in states):
        return "broken"
    if all(s == "ready" for s in states):
        return "ready"
    return "loading"
