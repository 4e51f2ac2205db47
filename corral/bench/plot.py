"""A PNG of the latency, TTFT and inter-token latency distributions (matplotlib, lazy)."""

from __future__ import annotations

from typing import Any

from corral.bench.load import Result

INSTALL_HINT = "plotting needs matplotlib: pip install 'corral[bench]'"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _cdf(ax: Any, values: list[float], label: str) -> None:
    v = sorted(x * 1000 for x in values)
    if not v:
        return
    ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", label=label)


def write(path: str, results: list[Result], summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    panels: list[tuple[str, list[float]]] = [("end-to-end latency", [r.latency for r in ok])]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    if ttft:
        panels.append(("time to first token", ttft))
    itl = [x for r in ok for x in r.itls]
    if itl:
        panels.append(("inter-token latency", itl))

    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 6.4), squeeze=False)
    for col, (label, values) in enumerate(panels):
        ms = [x * 1000 for x in values]
        top, bottom = axes[0][col], axes[1][col]
        top.hist(ms, bins=min(50, max(10, len(ms) // 5)), color="#3b7dd8")
        top.set_title(label)
        top.set_ylabel("requests" if label != "inter-token latency" else "token gaps")
        _cdf(bottom, values, label)
        for q, style in ((50, "--"), (99, ":")):
            key = {"end-to-end latency": "latency_ms", "time to first token": "ttft_ms",
                   "inter-token latency": "itl_ms"}[label]
            d = summary.get(key)
            if d:
                bottom.axvline(d[f"p{q}"], linestyle=style, color="#d83b3b",
                               label=f"p{q} {d[f'p{q}']:.1f} ms")
        bottom.set_xlabel("ms")
        bottom.set_ylabel("fraction ≤ x")
        bottom.legend(fontsize=8, loc="lower right")
        bottom.grid(alpha=0.3)
    load = (f"Poisson {summary['rate']:g} req/s" if summary["mode"] == "open"
            else f"concurrency {summary['concurrency']}")
    fig.suptitle(f"{summary['base_url']} · {load} · {summary['completed']} ok, "
                 f"{summary['errors']} errors · {summary['requests_per_second']:.1f} req/s, "
                 f"{summary['output_tokens_per_second']:.0f} tok/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
