"""What prompt-lookup drafts earn on one stream, with no HTTP and no other server in the way.

    .venv/bin/python bench/llama_drafts.py [--requests 24] [--tokens 64,128] [--repeat]
        [--write]

Two `LlamaBackend`s in this process on the bundled model (4 slots, 2 threads), drafts on
(the default) and off (`lookup=0`), get the same greedy requests one at a time, who goes
first alternating, so the box's drifting speed weighs on both alike. The requests are
bench/llama_server.py's varied ones (a new form and subject each), or with `--repeat`
its text that repeats its input. Per setting of `--tokens`: the time from each answer's
first token to its last, summed, drafts on over off (below 1: drafts pay), the decode
steps each took, the draft tokens decoded and kept, and whether every answer was the same.
It prices the batch loop's draft policy (llama_batch.BatchLoop._draft_rows); the served
comparison is bench/llama_server.py. `--write` replaces the `llama-drafts` section of
docs/BENCHMARKS.md (or `llama-drafts-repeat`).
"""

from __future__ import annotations

import argparse
import os
import threading
import time

from common import MODEL, command_line, machine, write_section
from llama_server import REPEAT, varied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--tokens", default="64,128")
    ap.add_argument("--repeat", action="store_true")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    from worker.backends.base import SamplingParams, Sequence
    from worker.backends.llama import LlamaBackend
    from worker.backends.llama_lookup import DEFAULT_DRAFT
    from worker.models import resolve

    where = machine()
    path = str(resolve(MODEL)[1])
    backends = {}
    for name, lookup in (("on", DEFAULT_DRAFT), ("off", 0)):
        be = LlamaBackend(path, parallel=4, threads=2, ctx_size=2048, lookup=lookup)
        be.load()
        backends[name] = be

    def answer(be: LlamaBackend, text: str, tokens: int) -> tuple[float, str]:
        done = threading.Event()
        marks: list[tuple[float, str]] = []
        seq = Sequence("bench", be.tokenize(be.render_chat([{"role": "user",
                                                             "content": text}])),
                       tokens, SamplingParams(temperature=0.0),
                       on_tokens=lambda t, _n: marks.append((time.perf_counter(), t)),
                       on_finish=lambda _r, _e: done.set())
        be.submit(seq)
        if not done.wait(300):
            raise SystemExit("a request did not finish in 300 s")
        return marks[-1][0] - marks[0][0], "".join(t for _, t in marks)

    rows = []
    k = 0
    for tokens in (int(t) for t in a.tokens.split(",")):
        took = {"on": 0.0, "off": 0.0}
        before = {n: dict(be.stats()) for n, be in backends.items()}
        same = 0
        for i in range(a.requests):
            text = f"{REPEAT} ({k})" if a.repeat else varied(k)
            k += 1
            texts = {}
            for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
                t, texts[name] = answer(backends[name], text, tokens)
                took[name] += t
            same += texts["on"] == texts["off"]
        after = {n: be.stats() for n, be in backends.items()}
        d = {n: {key: after[n][key] - before[n].get(key, 0) for key in
                 ("decode_steps", "lookup_drafted_tokens", "lookup_accepted_tokens")}
             for n in backends}
        rows.append((tokens, took["on"] / took["off"], d["on"]["decode_steps"],
                     d["off"]["decode_steps"], d["on"]["lookup_drafted_tokens"],
                     d["on"]["lookup_accepted_tokens"], same))
        print(rows[-1], flush=True)
    for be in backends.values():
        be.close()
    kind = "text that repeats its input" if a.repeat else "varied requests"
    table = "\n".join(
        ["| tokens | requests | time, drafts on / off | steps on / off | drafted | kept | "
         "answers the same |", "|---:|---:|---:|---:|---:|---:|---:|"]
        + [f"| {t} | {a.requests} | **{r:.2f}** | {s_on} / {s_off} | {dr} | {kept} | "
           f"{same} of {a.requests} |" for t, r, s_on, s_off, dr, kept, same in rows])
    text = f"""## llama: what drafts earn on one stream ({kind}), in one process

Command: `{command_line()}`{"  "}
Machine: {where}.

Two `LlamaBackend`s (4 slots, 2 threads), drafts on (longest {DEFAULT_DRAFT}) and off, the
same greedy requests one at a time, who goes first alternating; time = first to last token
of each answer, summed (below 1: drafts pay); no HTTP.

{table}
"""
    print(text)
    if a.write:
        write_section("llama-drafts-repeat" if a.repeat else "llama-drafts", text)


if __name__ == "__main__":
    os.environ.setdefault("NO_PROXY", "*")
    main()
