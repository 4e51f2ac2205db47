"""Fault-injection soak: mixed traffic through a gateway while workers are SIGKILLed.

    python bench/soak.py [--duration 120] [--workers 4] [--concurrency 24] [--llama] [--json]

Everything runs on 127.0.0.1: one gateway, N sim workers on fixed ports (optionally one
real llama.cpp worker too, `--llama`), a load of streamed and non-streamed chat and legacy
completions, and a chaos loop that SIGKILLs a random worker every `--kill-every` seconds
on average (never the last one alive) and restarts it on the same port a moment later.
Every `--freeze-every`-th fault is a freeze instead: SIGSTOP, so the worker stays alive
with its sockets open but silent, for longer than the gateway's `stall_timeout`, then
SIGCONT.

Every request ends in exactly one bucket:
- completed: 200 with a whole answer (a stream ends with `[DONE]` and no error event);
  with sim workers the answer must also have exactly `max_tokens` tokens, failover or not
  (otherwise it counts as `wrong`);
- clean error: an OpenAI-shaped error body, or a stream's final SSE error event;
- lost: no answer by the deadline, a connection cut without an error or `[DONE]`, or a
  malformed response.
The run fails (exit 1) when anything was lost or wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from procs import (  # noqa: E402
    Gateway,
    Worker,
    free_port,
    metric,
    start_gateway,
    start_worker,
    stop_all,
    wait_for,
)

MODEL = "smollm2-135m"


class Tally:
    def __init__(self) -> None:
        self.buckets: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.lost: list[str] = []
        self.wrong: list[str] = []
        self.kinds: collections.Counter[str] = collections.Counter()

    def add(self, bucket: str, kind: str, detail: str = "") -> None:
        self.buckets[bucket] += 1
        self.kinds[kind] += 1
        if bucket == "clean_error":
            self.errors[detail] += 1
        elif bucket == "lost" and len(self.lost) < 20:
            self.lost.append(f"{kind}: {detail}")
        elif bucket == "wrong" and len(self.wrong) < 20:
            self.wrong.append(f"{kind}: {detail}")


def _openai_error(obj: Any) -> str | None:
    """The error's code/type if `obj` is an OpenAI-shaped error, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("error"), dict):
        return None
    err = obj["error"]
    if not {"message", "type", "param", "code"} <= set(err) or not err["message"]:
        return None
    return f"{err.get('code') or err.get('type')}: {str(err['message'])[:60]}"


async def one(http: httpx.AsyncClient, url: str, rng: random.Random, exact: bool,
              deadline: float, tally: Tally) -> None:
    chat = rng.random() < 0.7
    stream = rng.random() < 0.6
    max_tokens = rng.randint(4, 48)
    kind = ("chat" if chat else "text") + ("-stream" if stream else "")
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "stream": stream,
                            "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": f"soak {rng.random()}"}]
    else:
        body["prompt"] = f"soak {rng.random()}"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    try:
        await asyncio.wait_for(_request(http, url + path, body, kind, exact, tally), deadline)
    except TimeoutError:
        tally.add("lost", kind, f"no answer within {deadline}s")
    except httpx.HTTPError as exc:
        tally.add("lost", kind, f"{type(exc).__name__}: {exc}")


async def _request(http: httpx.AsyncClient, url: str, body: dict[str, Any], kind: str,
                   exact: bool, tally: Tally) -> None:
    want = body["max_tokens"]
    async with http.stream("POST", url, json=body) as r:
        raw = b""
        if r.status_code != 200 or not body["stream"]:
            raw = await r.aread()
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                tally.add("lost", kind, f"HTTP {r.status_code}, not JSON: {raw[:120]!r}")
                return
            if r.status_code != 200:
                code = _openai_error(obj)
                if code is None:
                    tally.add("lost", kind, f"HTTP {r.status_code}, not OpenAI-shaped")
                else:
                    tally.add("clean_error", kind, f"{r.status_code} {code}")
                return
            got = (obj.get("usage") or {}).get("completion_tokens")
            if exact and got != want:
                tally.add("wrong", kind, f"{got} tokens, asked for {want}")
            else:
                tally.add("completed", kind)
            return
        tokens = 0
        done = False
        error = None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            ev = orjson.loads(line[6:])
            code = _openai_error(ev)
            if code is not None:
                error = code
                continue
            for ch in ev.get("choices") or ():
                part = ch["delta"].get("content") if "delta" in ch else ch.get("text")
                if part:
                    tokens += 1
        if error is not None:
            tally.add("clean_error", kind, f"stream {error}")
        elif not done:
            tally.add("lost", kind, f"stream cut after {tokens} tokens, no [DONE]")
        elif exact and tokens != want:
            tally.add("wrong", kind, f"{tokens} tokens streamed, asked for {want}")
        else:
            tally.add("completed", kind)


class Chaos:
    """SIGKILLs a random live worker now and then and restarts it on its port shortly after;
    every `freeze_every`-th fault SIGSTOPs it instead (alive, sockets open, silent) and
    SIGCONTs it a few seconds later, past the gateway's stall timeout."""

    def __init__(self, workers: list[Worker], every: float, rng: random.Random,
                 sim_args: list[str], freeze_every: int, freeze_for: tuple[float, float]
                 ) -> None:
        self.workers = workers
        self.every = every
        self.rng = rng
        self.sim_args = sim_args
        self.freeze_every = freeze_every
        self.freeze_for = freeze_for
        self.kills = 0
        self.freezes = 0
        self.restarts = 0
        self.down: set[int] = set()

    async def run(self, gateway: str, until: float) -> None:
        pending: list[asyncio.Task[None]] = []
        try:
            while time.monotonic() < until:
                await asyncio.sleep(self.rng.expovariate(1.0 / self.every))
                # Never the last worker the gateway can route to (a restarted one counts
                # once it is ready again).
                try:
                    ready = await asyncio.to_thread(_ready_ids, gateway)
                except httpx.HTTPError:
                    continue
                live = [i for i, w in enumerate(self.workers)
                        if i not in self.down and w.proc.alive() and w.id in ready]
                if len(ready) < 2 or not live:
                    continue
                i = self.rng.choice(live)
                self.down.add(i)
                faults = self.kills + self.freezes + 1
                if self.freeze_every and faults % self.freeze_every == 0:
                    self.workers[i].proc.freeze()
                    self.freezes += 1
                    pending.append(asyncio.create_task(self._thaw(i)))
                else:
                    await asyncio.to_thread(self.workers[i].proc.kill)
                    self.kills += 1
                    pending.append(asyncio.create_task(self._restart(i)))
        finally:
            for t in pending:
                await t

    async def _thaw(self, i: int) -> None:
        try:
            await asyncio.sleep(self.rng.uniform(*self.freeze_for))
        finally:
            self.workers[i].proc.thaw()
            self.down.discard(i)

    async def _restart(self, i: int) -> None:
        await asyncio.sleep(self.rng.uniform(0.3, 2.5))
        old = self.workers[i]
        old.proc.stop()  # its log file and any leftovers
        self.workers[i] = await asyncio.to_thread(
            start_worker, *self.sim_args, port=old.port, backend="sim", wait=False)
        self.restarts += 1
        self.down.discard(i)


_STATE_CHANGE = re.compile(r" worker \S+: \w+ -> \w+")  # the chaos makes dozens of these


def _log_tail(log: str, keep: int = 60) -> list[str]:
    """The gateway's warnings and tracebacks, without the worker up/down lines the chaos
    causes by design (they would push a traceback out of the window); last `keep` lines."""
    lines = [ln for ln in log.splitlines()
             if not ln.startswith("INFO") and not _STATE_CHANGE.search(ln)]
    return lines[-keep:]


def _ready_ids(gateway: str) -> set[str]:
    workers = httpx.get(f"{gateway}/cluster", timeout=5).json()["workers"]
    return {w["id"] for w in workers if w["state"] in ("ready", "busy")}


async def load(url: str, args: argparse.Namespace, tally: Tally, until: float) -> None:
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=args.deadline + 5, limits=limits,
                                 trust_env=False) as http:
        async def loop(k: int) -> None:
            rng = random.Random(args.seed * 1000 + k)
            while time.monotonic() < until:
                await one(http, url, rng, not args.llama, args.deadline, tally)

        await asyncio.gather(*(loop(k) for k in range(args.concurrency)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    ap.add_argument("--workers", type=int, default=4, help="sim workers")
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--kill-every", type=float, default=3.0,
                    help="mean seconds between two SIGKILLs")
    ap.add_argument("--freeze-every", type=int, default=4,
                    help="every Nth fault SIGSTOPs the worker instead (0: never)")
    ap.add_argument("--stall-timeout", type=float, default=2.0,
                    help="the gateway's stall_timeout; a freeze lasts 1-4 s longer")
    ap.add_argument("--deadline", type=float, default=60.0,
                    help="a request without an answer after this long is lost")
    ap.add_argument("--rate", type=float, default=150.0, help="sim tokens/s per slot")
    ap.add_argument("--llama", action="store_true",
                    help="also one real llama.cpp worker, never killed (token counts are then not "
                    "checked: its answers may stop early)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--write", action="store_true",
                    help="also write the report into docs/BENCHMARKS.md (its own section)")
    args = ap.parse_args(argv)
    load_at_start = os.getloadavg()[0]
    # A SIGTERM (a CI timeout, a `kill`) still runs the cleanup below: no stray workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    rng = random.Random(args.seed)
    sim_args = ["--sim-tokens-per-second", str(args.rate), "--parallel", "4",
                "--sim-ttft", "0.02"]
    workers: list[Worker] = []
    extra: list[Worker] = []
    g: Gateway | None = None
    chaos: Chaos | None = None
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)  # noqa: SIM115
    cfg.write("[gateway]\nqueue_timeout = 10.0\nprobe_interval = 0.25\nprobe_timeout = 1.0\n"
              f"stall_timeout = {args.stall_timeout}\n")
    cfg.close()
    tally = Tally()
    gateway_log: list[str] = []
    started = time.monotonic()
    try:
        # Started together, then waited for: each start is mostly its own Python import.
        for _ in range(args.workers):
            workers.append(start_worker(*sim_args, port=free_port(), backend="sim",
                                        wait=False))
        if args.llama:
            extra.append(start_worker("--parallel", "2", "--threads", "1", wait=False))
        for w in workers + extra:
            w.wait_ready()
        g = start_gateway("--config", cfg.name,
                          *[a for w in workers + extra for a in ("--worker", w.url)])
        n = len(workers) + len(extra)
        wait_for(lambda: sum(w["state"] in ("ready", "busy") for w in httpx.get(
            f"{g.url}/cluster", timeout=5).json()["workers"]) == n, 60, 0.1, "workers ready")
        freeze_for = (args.stall_timeout + 1, args.stall_timeout + 4)
        chaos = Chaos(workers, args.kill_every, rng, sim_args, args.freeze_every, freeze_for)
        until = time.monotonic() + args.duration

        async def both() -> None:
            await asyncio.gather(load(g.url, args, tally, until), chaos.run(g.url, until))

        asyncio.run(both())
        midstream = metric(g.url, "corral_retries_total", reason="midstream")
        retries = metric(g.url, "corral_retries_total")
        if tally.lost or tally.wrong:  # what the gateway said about it, for the report
            gateway_log = _log_tail(g.proc.log())
    finally:  # the workers first, while the gateway still probes them (procs.stop_all)
        stop_all(w.proc for w in workers + extra)
        if g is not None:
            g.proc.stop()
        os.unlink(cfg.name)
    total = sum(tally.buckets.values())
    report = {
        "seconds": round(time.monotonic() - started, 1),
        "requests": total,
        "completed": tally.buckets["completed"],
        "clean_errors": tally.buckets["clean_error"],
        "lost": tally.buckets["lost"],
        "wrong": tally.buckets["wrong"],
        "by_kind": dict(tally.kinds),
        "errors": dict(tally.errors),
        "kills": chaos.kills if chaos else 0,
        "freezes": chaos.freezes if chaos else 0,
        "restarts": chaos.restarts if chaos else 0,
        "retries_midstream": midstream,
        "retries_total": retries,
        "lost_samples": tally.lost,
        "wrong_samples": tally.wrong,
        "gateway_log": gateway_log,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"soak: {total} requests in {args.duration:g}s of load, {report['kills']} "
              f"workers SIGKILLed ({report['restarts']} restarted), {report['freezes']} "
              "SIGSTOPped for a while")
        print(f"  completed     {report['completed']}")
        print(f"  clean errors  {report['clean_errors']}  {report['errors']}")
        print(f"  lost          {report['lost']}  {tally.lost[:5]}")
        print(f"  wrong         {report['wrong']}  {tally.wrong[:5]}")
        print(f"  retries       {retries:g} ({midstream:g} mid-stream continuations)")
    if args.write:
        from affinity import write_section  # bench/ is on sys.path when run as a script

        write_section("soak", "\n".join([
            "## Fault-injection soak: workers SIGKILLed under load",
            "",
            f"Command: `.venv/bin/python {' '.join(sys.argv)}` (`make soak`)  ",
            f"Machine: {os.cpu_count()} CPU, load average {load_at_start:.1f} at start, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            f"{args.workers} sim workers ({args.rate:g} tokens/s per slot, 4 slots), "
            f"{args.concurrency} clients in closed loop, 70% chat / 30% legacy completions, "
            f"60% streamed, 4-48 tokens; a random ready worker SIGKILLed every "
            f"{args.kill_every:g} s on average and restarted 0.3-2.5 s later; every "
            f"{args.freeze_every}th fault a SIGSTOP instead, for {freeze_for[0]:g}-"
            f"{freeze_for[1]:g} s (gateway stall_timeout {args.stall_timeout:g} s).",
            "",
            "| requests | completed | clean errors | lost | wrong | kills | freezes | "
            "mid-stream continuations |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {total} | {report['completed']} | {report['clean_errors']} | "
            f"{report['lost']} | {report['wrong']} | {report['kills']} | "
            f"{report['freezes']} | {midstream:g} |",
            "",
            f"Clean errors by kind: {report['errors'] or 'none'}.",
        ]))
    return 1 if report["lost"] or report["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
