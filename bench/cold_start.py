"""Real models: time to first token for a cold model (loaded nowhere) vs a loaded one.

    .venv/bin/python bench/cold_start.py [--write] [--rounds 3]

One gateway cataloguing SmolLM2-135M and Gemma 3 270M, both unpinned (`[[models]]`), with a
short `model_idle_ttl`; one llama worker joined to it (`--parallel 2`). Each round, for each
model: wait until the gateway reports it unloaded (the idle TTL), send one streamed chat
completion (cold: the request waits in the gateway queue while the placer loads the model
on demand, the stream carrying `: loading` keep-alives), then three more at once after it
(loaded). TTFT is client-side, from sending the request to the first content token.
`--write` replaces the `cold_start` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from common import (
    MODEL,
    command_line,
    machine,
    start_gateway,
    start_worker,
    wait_for,
    write_section,
)

GEMMA = "gemma3-270m"
TTL = 3.0
PROMPT = [{"role": "user", "content": "Write one sentence about horses."}]


def ttft(url: str, model: str) -> tuple[float, int]:
    """Seconds to the first content token, and the `: loading` keep-alives before it."""
    t0 = time.perf_counter()
    keepalives = 0
    body = {"model": model, "messages": PROMPT, "max_tokens": 8, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        first = None
        for line in r.iter_lines():
            if line.startswith(": loading"):
                keepalives += 1
            elif first is None and line.startswith("data: {") and '"content":"' in line \
                    and '"content":""' not in line:
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError(f"{model}: no content token")
    return first, keepalives


def state(url: str, model: str) -> str:
    cards = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
    return next(c["state"] for c in cards if c["id"] == model)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    where = machine()
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "corral.toml"
        conf.write_text(f"[gateway]\nmodel_idle_ttl = {TTL}\nmodel_load_timeout = 600\n"
                        f'[[models]]\nname = "{MODEL}"\n[[models]]\nname = "{GEMMA}"\n')
        g = start_gateway("--config", str(conf))
        w = start_worker("--join", g.url, "--parallel", "2", wait=False,
                         env={"CORRAL_CLUSTER_TOKEN": g.token})
        try:
            wait_for(lambda: len(httpx.get(f"{g.url}/cluster").json()["workers"]) == 1,
                     120, 0.2, "the worker joined")
            got: dict[str, dict[str, list[float]]] = {
                m: {"cold": [], "warm": [], "keepalives": []} for m in (MODEL, GEMMA)}
            for rnd in range(a.rounds):
                for m in (MODEL, GEMMA):
                    wait_for(lambda m=m: state(g.url, m) == "unloaded", 120, 0.1,
                             f"{m} unloaded")
                    cold, ka = ttft(g.url, m)
                    warm = [ttft(g.url, m)[0] for _ in range(3)]
                    got[m]["cold"].append(cold)
                    got[m]["warm"] += warm
                    got[m]["keepalives"].append(ka)
                    print(f"round {rnd + 1} {m}: cold {cold * 1000:.0f} ms ({ka} keep-alives),"
                          f" loaded {', '.join(f'{x * 1000:.0f}' for x in warm)} ms",
                          flush=True)
        finally:
            w.proc.stop()
            g.proc.stop()
    rows = []
    for m, r in got.items():
        cold, warm = statistics.median(r["cold"]), statistics.median(r["warm"])
        rows.append(f"| {m} | {cold * 1000:.0f} ms | {warm * 1000:.0f} ms | {cold / warm:.0f}x "
                    f"| {min(r['cold']) * 1000:.0f}-{max(r['cold']) * 1000:.0f} ms |")
    body = "\n".join([
        "## Cold start: first token from a model loaded nowhere vs a loaded one",
        "",
        f"`{command_line()}` on {where}. One llama worker (`--parallel 2`) joined to a",
        "gateway cataloguing both models unpinned, `model_idle_ttl` "
        f"{TTL:g} s; each round waits until the model is unloaded, then times one streamed",
        "request (cold: placed on demand, fetched from the gateway's path in place, loaded,",
        "calibrated, then served; the client sees `: loading` keep-alives) and three after it",
        f"(loaded). Medians over {a.rounds} rounds; TTFT client-side, to the first content "
        "token.",
        "",
        "| model | cold TTFT | loaded TTFT | ratio | cold range |",
        "|---|---|---|---|---|",
        *rows,
    ])
    print(body)
    print(json.dumps(got))
    if a.write:
        write_section("cold_start", body)


if __name__ == "__main__":
    main()
