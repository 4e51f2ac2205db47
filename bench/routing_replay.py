"""The gateway's routing replayed on a virtual clock: the prefill scenario without processes.

    .venv/bin/python bench/routing_replay.py [--requests 2000] [--seeds 5] [--seconds 0.5,2,5]

The real benchmark (bench/balancing.py --scenario prefill) runs sim workers and gateways as
processes, so on a busy 2-core box its p99 moves with the machine's load as much as with
the policy. This replays the same workload (prefill_mix: 20% 3,000-token prompts, readers at
1x/1x/3x, 4 slots, decode equal) through the gateway's own `Router` and `Admission` code on
an event-driven virtual clock, with a model of the sim backend (a slot per sequence; one
prompt read at a time; decode at a fixed rate per slot), so policies can be compared
exactly and over many seeds. It is a model: the figures that count are the real run's.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gateway.cost  # noqa: E402
import gateway.routing  # noqa: E402
from gateway.cost import Job, Lengths  # noqa: E402
from gateway.routing import Router  # noqa: E402
from gateway.worker_record import Worker  # noqa: E402

LONG, SHORT, LONG_SHARE = 3000, 50, 0.2


class Clock:
    now = 0.0

    def monotonic(self) -> float:
        return self.now


@dataclass
class Box:
    """The sim backend behind one worker: slots, a FIFO for them, one prompt reader."""

    prefill: float
    decode: float
    slots: int
    busy: int = 0
    queue: list = field(default_factory=list)
    reader_free: float = 0.0


class _Registry:
    def __init__(self, ws: list[Worker]) -> None:
        self.workers = {w.id: w for w in ws}
        self.by_model = {"m": ws}


def replay(policy: str, seed: int, n: int, util: float, seconds: float,
           allowance: int = 2, base: float = 1000.0, decode: float = 50.0,
           slots: int = 4, max_tokens: int = 16) -> list[float]:
    """Latencies (s) of `n` Poisson arrivals at `util` of the readers' capacity."""
    clock = Clock()
    gateway.routing.time.monotonic = clock.monotonic  # type: ignore[attr-defined]
    speeds = (1, 1, 3)
    boxes = [Box(base * m, decode, slots) for m in speeds]
    ws = []
    for i, b in enumerate(boxes):
        w = Worker(f"w{i}", f"sim://{i}", "static")
        w.state, w.models, w.slots_total = "ready", frozenset({"m"}), slots
        w.decode_tps = w.tokens_per_second = decode
        w.prefill_tps = b.prefill if policy != "today" else 0.0
        w.capacity = slots * decode
        ws.append(w)
    gateway.cost.weigh(ws)
    cost = policy != "today"
    router = Router(_Registry(ws), 1000 if policy == "unbounded" else allowance,  # type: ignore[arg-type]
                    2, cost, seconds)
    lengths = Lengths()
    rng = random.Random(seed)
    mean = LONG_SHARE * LONG + (1 - LONG_SHARE) * SHORT
    rate = util * sum(b.prefill for b in boxes) / mean
    events: list = []  # (time, order, kind, payload)
    order = itertools.count()
    t = 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        tokens = LONG if rng.random() < LONG_SHARE else SHORT
        heapq.heappush(events, (t, next(order), "arrive", (i, tokens)))
    waiting: list[tuple[int, int, Job]] = []  # the gateway queue, FIFO
    arrived: dict[int, float] = {}
    done: list[float] = []
    timer: list[float] = []

    def start(bi: int, rid: int, tokens: int) -> None:
        b = boxes[bi]
        b.busy += 1
        b.reader_free = max(clock.now, b.reader_free) + tokens / b.prefill
        end = b.reader_free + (max_tokens - 1) / b.decode
        heapq.heappush(events, (end, next(order), "finish", (bi, rid)))

    def send(w: Worker, rid: int, tokens: int) -> None:
        bi = ws.index(w)
        b = boxes[bi]
        if b.busy < b.slots:
            start(bi, rid, tokens)
        else:
            b.queue.append((rid, tokens))

    def dispatch() -> None:  # admission.dispatch, in FIFO order
        router.held.clear()
        rest = []
        blocked = False
        for item in waiting:
            rid, tokens, job = item
            if blocked:
                rest.append(item)
                continue
            router.holding = False
            w = router.pick("m", job=job if cost else None)
            if w is None:
                blocked = not router.holding
                rest.append(item)
                continue
            send(w, rid, tokens)
        waiting[:] = rest
        router.held.clear()
        at = router.reopens_at("m") if rest else None
        if at is not None and not timer:
            timer.append(at)
            heapq.heappush(events, (at + 0.001, next(order), "tick", None))

    sizes = {}
    while events:
        clock.now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            rid, tokens = payload
            arrived[rid], sizes[rid] = clock.now, tokens
            job = lengths.job("m", tokens * 4, tokens * 4, max_tokens)
            w = router.pick("m", job=job if cost else None) if not waiting else None
            if w is None:
                waiting.append((rid, tokens, job))
                dispatch()
            else:
                send(w, rid, tokens)
        elif kind == "finish":
            bi, rid = payload
            b = boxes[bi]
            b.busy -= 1
            done.append(clock.now - arrived[rid])
            lengths.observe("m", max_tokens)
            ws[bi].inflight -= 1
            if b.queue:
                start(bi, *b.queue.pop(0))
            dispatch()
        else:
            timer.clear()
            dispatch()
    return done


def p99(v: list[float]) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(0.99 * len(v)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--utilization", type=float, default=0.8)
    ap.add_argument("--seconds", default="0.5,2,5", help="worker_queue_seconds to try")
    ap.add_argument("--utilizations", default="0.5,0.7,0.8,0.9")
    ap.add_argument("--write", action="store_true", help="write docs/BENCHMARKS.md's section")
    a = ap.parse_args()
    utils = [float(u) for u in a.utilizations.split(",")]
    rows = [("today", 0.0), ("unbounded", 0.0)] + [
        ("cost", float(s)) for s in a.seconds.split(",")]
    names = {"today": "today's score (`cost_routing = false`)",
             "unbounded": "cost routing, no queue bound (as the oracle)"}
    lines = ["| policy | " + " | ".join(f"p99 at {u:g}" for u in utils) + " |",
             "|---|" + "---:|" * len(utils)]
    for policy, secs in rows:
        cells = []
        for u in utils:
            p99s = [p99(replay(policy, seed, a.requests, u, secs)) for seed in range(a.seeds)]
            cells.append(f"{statistics.median(p99s):.2f}")
        label = (f"cost routing, `worker_queue_seconds = {secs:g}`" if policy == "cost"
                 else names[policy])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if a.write:
        from common import command_line, write_section

        write_section("routing-replay", "\n".join([
            "## Routing replayed on a virtual clock (the prefill scenario, no processes)",
            "",
            f"Command: `{command_line()}`",
            "",
            "The gateway's own `Router` and admission rules on an event-driven clock, with a "
            "model of the sim backend (prefill_mix's workload: readers 1x/1x/3x at 1000 "
            "tokens/s, decode 50 tokens/s per slot, 4 slots, 20% 3,000-token prompts, 16 "
            "tokens out). Latency p99 in seconds, median over "
            f"{a.seeds} seeds of {a.requests} Poisson arrivals, at each utilization of what "
            "the readers can take. It does not depend on the machine's load, so it is where "
            "`worker_queue_seconds` was chosen; the real processes' run is the section above.",
            "",
            table]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
