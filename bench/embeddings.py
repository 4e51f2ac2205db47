"""Embeddings per second: a Corral llama worker against llama-server `--embeddings`.

    .venv/bin/python bench/embeddings.py [--requests 20] [--threads 2]
        [--llama-server /path/to/llama-server] [--write]

Both serve the bundled SmolLM2 GGUF with mean pooling (the GGUF declares none; llama-server
needs `--pooling mean`, since it refuses "none" on its OpenAI route), L2-normalised, on the
same threads. One client, sequential requests of 1, 8 and 32 short texts (~10 tokens each),
after two warm-up requests; embeddings/s = texts sent / wall time. For Corral the worker's
/status also gives the llama_decode calls per request. llama-server is built from the
llama.cpp source in llama-cpp-python's sdist (the same llama.cpp as the worker's); without
`--llama-server` its rows are skipped with a note.

`--write` replaces the `embeddings` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

import httpx
from common import HOST, command_line, free_port, machine, start_worker, wait_for, write_section

from worker.models import resolve

MODEL = "smollm2-135m"
BATCHES = (1, 8, 32)
_THINGS = ("cup book lamp phone key pen plate bowl box bag hat shoe sock coin card map ball "
           "toy fork knife spoon glass bottle jar vase clock watch ring chain leaf shell stone")
TEXTS = [f"Note {i}: the {w} is on the table." for i, w in enumerate(_THINGS.split(" "))]


READING = """
llama-server runs with `--parallel 1`: it gives each input of a request to its one slot in
turn, one decode per input, where the Corral worker puts all of a request's inputs in one
`llama_decode` (last column); so llama-server is ahead for a single text (no batch to build,
C++ all the way) and behind from 8 texts on. The box is shared with other suites (the load
average above): absolute numbers are low and noisy; compare rows of one run. llama-server
was built from the llama.cpp in llama-cpp-python 0.3.36's sdist (`pip download --no-deps
--no-binary :all: llama-cpp-python==0.3.36`, `cmake -B build -DLLAMA_CURL=OFF`,
`cmake --build build --target llama-server`), outside the repository.
"""


def run(url: str, batch: int, requests: int) -> tuple[float, float]:
    """(embeddings per second, median seconds per request) for `requests` sequential calls."""
    body = {"model": MODEL, "input": TEXTS[:batch], "encoding_format": "float"}
    with httpx.Client(timeout=300) as c:
        for _ in range(2):
            c.post(f"{url}/v1/embeddings", json=body).raise_for_status()
        times = []
        start = time.perf_counter()
        for _ in range(requests):
            t = time.perf_counter()
            r = c.post(f"{url}/v1/embeddings", json=body)
            r.raise_for_status()
            assert len(r.json()["data"]) == batch
            times.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
    return batch * requests / wall, statistics.median(times)


def corral_rows(threads: int, requests: int) -> list[tuple[str, int, float, float, str]]:
    w = start_worker("--threads", str(threads), "--parallel", "2")
    try:
        rows = []
        for b in BATCHES:
            before = httpx.get(f"{w.url}/status").json()["embeddings"]
            rate, med = run(w.url, b, requests)
            after = httpx.get(f"{w.url}/status").json()["embeddings"]
            per = (after["decodes"] - before["decodes"]) / (after["requests"] - before["requests"])
            rows.append(("corral worker", b, rate, med, f"{per:.1f}"))
        return rows
    finally:
        w.proc.stop()


def server_rows(exe: str, threads: int, requests: int) -> list[tuple[str, int, float, float, str]]:
    port = free_port()
    gguf = str(resolve(MODEL)[1])
    args = [exe, "-m", gguf, "--embeddings", "--pooling", "mean", "--host", HOST, "--port",
            str(port), "-t", str(threads), "-tb", str(threads), "-c", "2048", "-b", "512",
            "-ub", "512", "--parallel", "1", "--log-disable"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://{HOST}:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 120, 0.1,
                 "llama-server")
        return [("llama-server --embeddings", b, *run(url, b, requests), "") for b in BATCHES]
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", ""))
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    where = machine()
    rows = corral_rows(a.threads, a.requests)
    note = ""
    if a.llama_server and Path(a.llama_server).is_file():
        rows += server_rows(a.llama_server, a.threads, a.requests)
    else:
        note = "\nllama-server: not measured (no `--llama-server` binary given).\n"
    lines = ["## Embeddings", "", f"`{command_line()}`", "", where, "",
             f"{a.requests} sequential requests per row, {a.threads} threads, mean pooling, "
             "the bundled SmolLM2-135M (Q4_1).", "",
             "| server | texts per request | embeddings/s | median latency (ms) | "
             "llama_decode calls per request |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {b} | {rate:.1f} | {med * 1000:.1f} | {per or 'n/a'} |"
              for s, b, rate, med, per in rows]
    body = "\n".join(lines) + "\n" + note + READING
    print(body)
    if a.write:
        write_section("embeddings", body)


if __name__ == "__main__":
    main()
