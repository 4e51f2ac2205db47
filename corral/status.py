"""`corral status`: the cluster as a table in the terminal, from the gateway's /cluster."""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

_STATE_STYLE = {"ready": "green", "busy": "yellow", "loading": "cyan", "idle": "blue",
                "down": "red", "unplaceable": "bold red", "broken": "red", "draining": "yellow",
                "asleep": "magenta"}


def _gib(n: object) -> str:
    return f"{n / (1 << 30):.1f}G" if isinstance(n, int | float) and n else "-"


def run(a: argparse.Namespace) -> int:
    base = a.gateway.rstrip("/")
    secret = (getattr(a, "api_key", None) or getattr(a, "token", None)
              or os.environ.get("CORRAL_CLUSTER_TOKEN", ""))
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    try:
        r = httpx.get(f"{base}/cluster", timeout=5.0, headers=headers)
        if r.status_code == 401:
            print(f"corral status: {base}/cluster is closed (API keys are configured): pass "
                  "--token (or CORRAL_CLUSTER_TOKEN) or --api-key", file=sys.stderr)
            return 1
        r.raise_for_status()
        data = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"corral status: cannot read {base}/cluster: {exc}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(data, indent=2))
        return 0
    render(data, Console() if sys.stdout.isatty() else Console(width=200))
    return 0


def render(data: dict, console: Console) -> None:
    workers = data.get("workers", [])
    table = Table(title=f"Corral cluster: {len(workers)} worker(s)", title_justify="left")
    # Two speeds per worker: prompt reading (prefill) and generation (decode), tokens/s.
    for col in ("id", "state", "backend", "models", "queue", "slots", "prefill tok/s",
                "decode tok/s", "memory", "cpu"):
        table.add_column(col, justify="right" if col in (
            "queue", "slots", "prefill tok/s", "decode tok/s") else "left")
    for w in workers:
        state = w.get("state", "?")
        hw = w.get("hardware") or {}
        mem = w.get("memory") or {}
        cpu = hw.get("cpu") or "-"
        if hw.get("cores"):
            cpu = f"{cpu} ({hw.get('cores')}c/{hw.get('threads')}t)"
        table.add_row(
            str(w.get("id", "?")),
            f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]",
            w.get("backend") or "-",
            _models_cell(w),
            str(w.get("queue_depth", 0)),
            f"{w.get('slots_busy', 0)}/{w.get('slots_total', 0)}",
            f"{w.get('prefill_tokens_per_second') or 0:.0f}" if w.get(
                "prefill_tokens_per_second") else "-",
            f"{w.get('decode_tokens_per_second') or w.get('tokens_per_second') or 0:.1f}",
            f"{_gib(mem.get('available'))} free / {_gib(mem.get('total'))}",
            cpu,
        )
    console.print(table)
    for p in data.get("placements") or []:
        console.print(_placement_line(p), highlight=False)
    for load in data.get("loads") or []:  # models being loaded, drained or that failed
        why = f": {escape(str(load['error']))}" if load.get("error") else ""
        console.print(f"model {load.get('model')} on {load.get('worker')}: "
                      f"{load.get('state')}{why}", highlight=False)
    links = data.get("links") or []
    if links:
        lt = Table(title="Links (measured)", title_justify="left")
        for col in ("from", "to", "RTT ms", "Mbit/s"):
            lt.add_column(col)
        for k in links:
            rtt, mbit = k.get("rtt_ms"), k.get("mbit_s")
            lt.add_row(str(k.get("from")), str(k.get("to")),
                       "-" if rtt is None else f"{rtt:.2f}",
                       "-" if mbit is None else f"{mbit:.0f}")
        console.print(lt)
    for warning in data.get("warnings") or []:  # e.g. a host oversubscribed by its workers
        console.print(Text.assemble(("warning: ", "bold yellow"),
                                    str(warning.get("message", warning))))


def _models_cell(w: dict) -> str:
    """The worker's models; one holding several, each with its state when not serving."""
    per = w.get("per_model") or []
    if not per:
        return ", ".join(w.get("models") or []) or "-"
    return ", ".join(m["name"] if m.get("state") == "ready" else f"{m['name']} ({m['state']})"
                     for m in per) or "-"


def _placement_line(p: dict) -> str:
    """One line per placement; one that cannot be placed says why, with the numbers."""
    state = p.get("state") or "ready"
    tag = f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]"
    if state == "unplaceable":
        return f"placement {p.get('model')}: {tag}: {escape(str(p.get('reason') or ''))}"
    workers = ", ".join(p.get("workers") or []) or "none"
    head = f", head {p['head']}" if p.get("mode") == "split" and p.get("head") else ""
    return f"placement {p.get('model')} ({p.get('mode')}) on {workers}{head}: {tag}"
