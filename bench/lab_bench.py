"""The seeds' experiment over emulated Ethernet: local vs replicas vs split, per link profile.

    make lab-bench          # or: python bench/lab_bench.py [--profiles 1gbe,wifi] [--requests 8]

Boxes are network namespaces (tests/lab.py): one gateway box, three worker boxes whose
cables all have the profile under test, one client box running `corral bench`. Every
worker gets one thread (`--threads 1 --parallel 4`): this machine has two cores, so
compute, not the network, caps what three boxes can do together. Layouts:
- local: one worker holding the model; replicas-N: N workers each holding it (joined by
  mDNS, routed by the gateway);
- split-N: N workers too small for it alone (`--memory-limit`), so the gateway splits it
  with llama.cpp RPC over the namespaces' real TCP (the head and its shards on different
  boxes, the emulated link between them).
Prints one JSON line per run and a Markdown table at the end (output tokens/s, 1 and 4
concurrent streams).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from lab import PROFILES, Lab, unavailable  # noqa: E402
from procs import wait_for  # noqa: E402

MODEL = "smollm2-135m"
ENV = {"CORRAL_CLUSTER_TOKEN": "lab-bench-token"}
SLOTS = 4


def split_limit(n: int) -> int:
    """Memory per worker that holds the model over `n` workers but not over `n - 1`."""
    from gateway.memory_need import estimate
    from worker.models import resolve

    need = estimate(resolve(MODEL)[1], n_ctx=2048, slots=SLOTS).total
    return int(need / (n - 0.5))
LAYOUTS = ("local", "replicas-2", "replicas-3", "split-2", "split-3")


def run_layout(profiles: list[str], layout: str, streams: list[int], requests: int,
               max_tokens: int) -> list[dict]:
    """One lab for `layout`, measured on each of `profiles` in turn: rate-only profiles
    swap in place (Lab.reshape), so only a profile with a delay stage needs a lab of its own."""
    kind, _, n = layout.partition("-")
    n_workers = int(n or 1)
    first = profiles[0]
    boxes = {"gw": first, "cli": first} | {f"w{i}": first for i in range(n_workers)}
    out = []
    with Lab(boxes) as lab:
        base = f"http://{lab.addr('gw')}:8000"
        args = ["--model", MODEL] if kind == "split" else []
        gw = lab.start("gw", "gateway", "--host", lab.addr("gw"), "--port", "8000", *args,
                       env=ENV)
        for i in range(n_workers):
            role = (["--memory-limit", str(split_limit(n_workers))] if kind == "split"
                    else ["--model", MODEL])
            lab.start(f"w{i}", "worker", "--host", lab.addr(f"w{i}"), "--port", "8100",
                      "--threads", "1", "--parallel", str(SLOTS), *role, env=ENV)

        def ready() -> bool:
            if not gw.alive():
                raise RuntimeError(gw.log()[-3000:])
            c = lab["cli"].call(httpx.get, f"{base}/cluster", timeout=5).json()
            if kind == "split":
                return any(p.get("mode") == "split" and p.get("state") == "ready"
                           for p in c["placements"])
            return sum(w["state"] == "ready" for w in c["workers"]) == n_workers

        wait_for(ready, 600, 0.5, f"{layout} on {first}")
        c = lab["cli"].call(httpx.get, f"{base}/cluster", timeout=5).json()
        cost = next((p.get("expected_network_ms_per_token") for p in c["placements"]
                     if p.get("mode") == "split"), None)
        for profile in profiles:
            if profile != first:
                for box in boxes:
                    lab.reshape(box, profile)
            for conc in streams:
                b = lab.start("cli", "bench", "--base-url", f"{base}/v1", "--model", MODEL,
                              "--requests", str(max(requests, conc * 2)), "--concurrency",
                              str(conc), "--max-tokens", str(max_tokens), "--stream",
                              "--distinct-prompts", "--json", "--timeout", "300",
                              name="bench")
                b.popen.wait(900)
                line = [x for x in b.log().splitlines() if x.startswith("{")][-1]
                s = json.loads(line)
                row = {"profile": profile, "layout": layout, "streams": conc,
                       "tok_s": s["output_tokens_per_second"], "errors": s.get("errors"),
                       "ttft_p50_ms": s.get("ttft_ms", {}).get("p50"),
                       "expected_network_ms_per_token": cost}
                print(json.dumps(row), flush=True)
                out.append(row)
        if lab.delays:
            lab.close()
            for r in out:
                r["delay_stage"] = lab.delay_stats
    return out


def table(rows: list[dict], profiles: list[str], streams: list[int]) -> str:
    head = "| layout | " + " | ".join(f"{p} ×{s}" for p in profiles for s in streams) + " |"
    lines = [head, "|---" * (1 + len(profiles) * len(streams)) + "|"]
    for layout in LAYOUTS:
        cells = []
        for p in profiles:
            for s in streams:
                r = next((r for r in rows if (r["profile"], r["layout"], r["streams"])
                          == (p, layout, s)), None)
                cells.append(f"{r['tok_s']:.1f}" if r else "–")
        lines.append(f"| {layout} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", help="append each run's JSON line to this file too")
    a = ap.parse_args()
    why = unavailable()
    if why:
        print(f"lab-bench needs network namespaces: {why}", file=sys.stderr)
        return 2
    profiles, streams = a.profiles.split(","), [int(s) for s in a.streams.split(",")]
    rate_only = [p for p in profiles if not PROFILES[p].delay_ms]
    groups = ([rate_only] if rate_only else []) + [[p] for p in profiles if p not in rate_only]
    rows = []
    for group in groups:
        for layout in a.layouts.split(","):
            got = run_layout(group, layout, streams, a.requests, a.max_tokens)
            rows += got
            if a.out:
                with open(a.out, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in got)
    print(table(rows, profiles, streams))
    return 0


if __name__ == "__main__":
    sys.exit(main())
