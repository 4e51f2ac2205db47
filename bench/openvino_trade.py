"""What OpenVINO's batch invariance costs a worker: `--batch-invariant on` against `off`.

    .venv/bin/python bench/openvino_trade.py [--levels 1,8] [--passes 2] [--write]

Two OpenVINO workers on the bundled SmolLM2-135M Q4_1 (`--device CPU --parallel 8`), one
with the batch-invariant CPU properties (the default: f32 compute, no dynamic
quantization, an f16 KV cache) and one with OpenVINO's own defaults, both up at once and
measured in turn: `corral bench` closed loop, 64 greedy tokens streamed, distinct prompts.
Reported: tok/s and TTFT of `off` as ratios to `on` in the same pass (median over passes),
and what each worker's load-time probe says (`hardware.batch_invariant`).
"""

from __future__ import annotations

import argparse
import statistics

import httpx
from common import command_line, machine, start_worker, write_section
from engine import PROMPT
from llama_server import _level


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,8")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="requests per client per level")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    where = machine()
    levels = [int(x) for x in a.levels.split(",")]
    setups = ("on", "off")
    ws = {s: start_worker("--device", "CPU", "--parallel", "8", "--batch-invariant", s,
                          backend="openvino") for s in setups}
    got: dict[tuple[str, int], list[dict]] = {}
    try:
        probe = {s: httpx.get(f"{w.url}/status", timeout=10).json()["hardware"]
                 for s, w in ws.items()}
        for p in range(a.passes):
            for c in levels:
                for s in (setups if p % 2 == 0 else setups[::-1]):
                    r = _level(f"{ws[s].url}/v1", c, a.rounds * c, 64, PROMPT)
                    got.setdefault((s, c), []).append(r)
                    print(p, s, c, round(r["tokens"] / r["seconds"], 1), r["ttft_p50_ms"],
                          flush=True)
    finally:
        for w in ws.values():
            w.proc.stop()

    def rate(r: dict) -> float:
        return r["tokens"] / r["seconds"]

    lines = [f"`{command_line()}` on {where}. Two OpenVINO workers (`--device CPU --parallel 8`)"
             f", measured in turn, {a.passes} passes; `corral bench` closed loop, {a.rounds} x c "
             "streamed chats of 64 greedy tokens. Probe verdict (`hardware.batch_invariant`): "
             f"on {probe['on'].get('batch_invariant')}, off {probe['off'].get('batch_invariant')}.",
             "", "| c | tok/s on | tok/s off | off / on, tok/s | TTFT p50 ms on / off |",
             "|---:|---:|---:|---:|---:|"]
    for c in levels:
        on, off = got[("on", c)], got[("off", c)]
        ratio = statistics.median(rate(b) / rate(x) for x, b in zip(on, off, strict=True))
        lines.append(f"| {c} | {statistics.median(map(rate, on)):.0f} | "
                     f"{statistics.median(map(rate, off)):.0f} | **{ratio:.2f}x** | "
                     f"{statistics.median(r['ttft_p50_ms'] for r in on):.0f} / "
                     f"{statistics.median(r['ttft_p50_ms'] for r in off):.0f} |")
    print("\n".join(lines))
    if a.write:
        write_section("openvino-trade", "## OpenVINO: what batch invariance costs a worker\n\n"
                      + "\n".join(lines))


if __name__ == "__main__":
    main()
