"""The summary as a rich table for a terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

_ROWS = (
    ("latency_ms", "latency (end to end)"),
    ("ttft_ms", "TTFT"),
    ("itl_ms", "inter-token (ITL)"),
    ("tpot_ms", "per output token"),
    ("client_lag_ms", "client send lag"),
)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:,.2f}"
    return f"{v:,}"


def render(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    s = summary
    load = (f"open loop, Poisson {s['rate']:g} req/s" if s["mode"] == "open"
            else f"closed loop, concurrency {s['concurrency']}")
    head = Table(title=f"corral bench: {s['base_url']}  model {s['model']}",
                 show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    head.add_row("load", f"{load}, {'streamed' if s['stream'] else 'not streamed'}, "
                         f"max_tokens {s['max_tokens']}")
    head.add_row("requests", f"{s['completed']} ok / {s['requests']} sent in "
                             f"{s['duration_s']:.2f} s")
    head.add_row("request/s", _fmt(s["requests_per_second"]))
    source = s["tokens_source"] or "-"
    head.add_row("output tokens/s", f"{_fmt(s['output_tokens_per_second'])} "
                                    f"({s['output_tokens']} tokens, from {source})")
    err = s["errors"]
    if err:
        kinds = ", ".join(f"{k}: {n}" for k, n in s["errors_by_kind"].items())
        head.add_row("errors", f"[red]{err}[/red] ({kinds})")
        for kind, msg in s["error_examples"].items():
            head.add_row("", f"{kind}: {msg[:120]}")
    else:
        head.add_row("errors", "0")
    if s.get("stale_connection_retries"):
        head.add_row("resent", f"{s['stale_connection_retries']} (the server closed a "
                               "kept-alive connection before answering)")
    if s.get("workers"):
        head.add_row("served by", ", ".join(f"{w}: {n}" for w, n in s["workers"].items()))
    console.print(head)

    table = Table(title="milliseconds", title_justify="left")
    table.add_column("metric")
    for col in ("mean", "min", "p50", "p90", "p99", "max", "count"):
        table.add_column(col, justify="right")
    for key, label in _ROWS:
        d = s.get(key)
        if d:
            table.add_row(label, *(_fmt(d[c]) for c in
                                   ("mean", "min", "p50", "p90", "p99", "max", "count")))
    if table.row_count:
        console.print(table)
