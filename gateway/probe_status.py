"""A worker's `/status` answer, copied into its `Worker` record.

Kept apart from the registry because it is the one place that knows the status fields and
their history (older workers report one speed, say `loading` before they said `idle`), while
the registry only decides what a state change means (listeners, routing's rebuild).
"""

from __future__ import annotations

from typing import Any

from gateway.worker_record import HEALTHY, STATES, Worker


def apply(w: Worker, st: dict[str, Any], inflight_sent: int) -> tuple[str, bool]:
    """Copies `st` into `w`, except its state; returns the state `w` should now be in and
    whether anything routing weighs changed (models, slots, speeds, capacity offered).
    `inflight_sent`: this gateway's requests on `w` when the probe left."""
    w.status = st
    models = frozenset(st.get("models") or ())
    slots = int(st.get("slots_total") or 1)
    busy = int(st.get("slots_busy") or 0)
    queued = int(st.get("queue_depth") or 0)
    tps = float(st.get("tokens_per_second") or 0.0)
    # Older workers report one speed: decode.
    dec = float(st.get("decode_tokens_per_second") or 0.0) or tps
    pre = float(st.get("prefill_tokens_per_second") or 0.0)
    # Requests the worker holds that no gateway counted (clients hitting it directly).
    # Requests of ours that finished during the probe make this an underestimate, the
    # safe side.
    ours = max(inflight_sent, w.inflight) + w.others
    w.external = max(0, busy + queued - ours)
    w.slots_busy, w.queue_depth = busy, queued
    reported = st.get("state", "ready")
    new_state = reported if reported in STATES else "ready"
    if new_state in HEALTHY and not models:
        new_state = "loading"
    if w.drain is not None:  # ordered here (lifecycle.py)
        if new_state in ("draining", "asleep"):
            w.drain.confirmed = True  # the worker has taken it up
        elif w.drain.confirmed:
            w.drain = None  # and is serving again: its drain ended (a sleep failed)
        elif new_state in HEALTHY:
            new_state = "draining"  # until the worker says so from its next probe
    cap = st.get("capacity")
    offered = None if cap is None else max(0, min(int(cap), slots))
    if offered:  # routing fills a worker to what it offers
        slots = offered
    pl = st.get("placement") or {}
    if new_state == "loading" and not models and pl.get("managed") \
            and pl.get("state") == "idle":
        # A worker that says `loading` with placement phase `idle` (before workers said
        # `idle` themselves) is waiting to be placed, not loading anything.
        new_state = "idle"
    changed = (models != w.models or slots != w.slots_total
               or tps != w.tokens_per_second or dec != w.decode_tps
               or pre != w.prefill_tps or offered != w.offered)
    w.models, w.slots_total, w.tokens_per_second = models, slots, tps
    w.decode_tps, w.prefill_tps = dec, pre
    w.offered = offered
    return new_state, changed
