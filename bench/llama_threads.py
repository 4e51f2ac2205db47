"""llama.cpp on this box, below Corral: what one decode step costs, and from which thread.

    .venv/bin/python bench/llama_threads.py [--write] [--steps 30]

No server, no HTTP: llama-cpp-python's low-level API on the bundled GGUF, a context shaped
like the llama backend's (8 sequences, one KV stream each).

1. Step cost: B sequences decode one token each in one `llama_decode`, B = 1/2/4/8, on 1
   thread and on every core. Medians of `--steps` steps after a 40-token prompt each.
   This is the ceiling for continuous batching: B tokens per step / step time.
2. Which thread decodes: one sequence decoding on a worker thread, (a) when that thread is
   the only one that ever decoded on the context, (b) when the process's main thread ran
   a few decode steps first (as the backend's start-up calibration once did). Each case in
   a fresh process, every core.

`--write` replaces the `llama-threads` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from common import command_line, machine, write_section

BATCHES = (1, 2, 4, 8)
PROMPT = 40


class Model:
    """The bundled model and a context like the llama backend's."""

    def __init__(self, threads: int) -> None:
        import llama_cpp

        from worker.backends.llama import _quiet
        from worker.backends.llama_cpu import model_params
        from worker.models import resolve

        _quiet()
        llama_cpp.llama_backend_init()
        self.ll = llama_cpp
        path = str(resolve("smollm2-135m")[1]).encode()
        self.model = llama_cpp.llama_model_load_from_file(path, model_params())
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 8 * 1024, 512, 512, 8
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = False
        cp.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> float:
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        t = time.perf_counter()
        if self.ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - t

    def steps(self, seqs: int, n: int) -> list[float]:
        """Prefills `seqs` prompts, then times `n` steps of one token per sequence."""
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)
        for s in range(seqs):
            self.decode([(100 + j, j, s, j == PROMPT - 1) for j in range(PROMPT)])
        return [self.decode([(200 + k, PROMPT + k, s, True) for s in range(seqs)])
                for k in range(n)]


def step_costs(threads: int, n: int) -> dict[int, float]:
    m = Model(threads)
    m.steps(1, 5)  # warm-up
    return {b: statistics.median(m.steps(b, n)) * 1000 for b in BATCHES}


def child(case: str, threads: int, n: int) -> None:
    """One single-stream run on a worker thread, in this (fresh) process."""
    m = Model(threads)
    if case == "main-first":
        m.steps(1, 8)  # the main thread computes first
    out: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: out.update(ms=m.steps(1, n)))
    worker.start()
    worker.join()
    print(json.dumps({"ms": statistics.median(out["ms"]) * 1000}))


def thread_case(case: str, threads: int, n: int) -> float:
    r = subprocess.run([sys.executable, __file__, "--child", case, "--threads", str(threads),
                        "--steps", str(n)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", choices=("alone", "main-first"), help=argparse.SUPPRESS)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.threads, a.steps)
        return
    header = machine()
    counts = sorted({1, a.threads})
    costs = {t: step_costs(t, a.steps) for t in counts}
    cases = {c: thread_case(c, a.threads, a.steps * 2) for c in ("alone", "main-first")}
    lines = [
        "## llama.cpp below Corral: step cost by batch size, and the decoding thread",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {header}.",
        "",
        "SmolLM2-135M-Instruct Q4_1 through llama-cpp-python's low-level API, no server: a "
        "context like the llama backend's (8 sequences, one KV stream each). B sequences "
        f"decode one token each per `llama_decode`; medians of {a.steps} steps.",
        "",
        "| threads | " + " | ".join(f"B={b} ms" for b in BATCHES) + " | "
        + " | ".join(f"B={b} tok/s" for b in BATCHES) + " | B=4 / B=1 tok/s |",
        "|---:|" + "---:|" * (2 * len(BATCHES) + 1),
    ]
    for t, c in costs.items():
        tps = {b: b / c[b] * 1000 for b in BATCHES}
        lines.append(f"| {t} | " + " | ".join(f"{c[b]:.1f}" for b in BATCHES) + " | "
                     + " | ".join(f"{tps[b]:.0f}" for b in BATCHES)
                     + f" | **{tps[4] / tps[1]:.2f}x** |")
    alone, first = cases["alone"], cases["main-first"]
    lines += [
        "",
        f"One sequence decoding on a worker thread, {a.threads} threads, fresh process each:",
        "",
        "| case | ms per token | tok/s |",
        "|---|---:|---:|",
        f"| only that thread ever decodes | {alone:.1f} | {1000 / alone:.0f} |",
        f"| the main thread decoded first | {first:.1f} | {1000 / first:.0f} |",
        "",
        f"Reading: on {a.threads} threads a step of 4 sequences costs "
        f"{costs[a.threads][4] / costs[a.threads][1]:.1f}x a step of 1 (Q4_1 matmuls on this "
        "CPU gain little from batching), so 4 streams cannot reach 2x one stream's tokens/s "
        "on this model and box, whatever the scheduler does. Decoding on a thread after "
        f"the main thread had decoded ran {first / alone:.1f}x slower per token: the llama "
        "backend now calibrates on its decode thread, the only thread that ever calls "
        "`llama_decode`.",
    ]
    text = "\n".join(lines)
    print(text)
    if a.write:
        write_section("llama-threads", text)


if __name__ == "__main__":
    main()
