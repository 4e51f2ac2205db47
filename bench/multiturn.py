"""More conversations than slots, several turns each: the llama worker against llama-server.

    .venv/bin/python bench/multiturn.py [--write] [--conversations 8] [--turns 4] [--passes 2]
        [--corral "label=extra worker args"]...

A team chat's normal load: each conversation's slot is taken by other conversations
between its turns, and every turn re-sends the whole history. llama-server answers from
its host-memory prompt cache (`--cache-ram`); the worker from its own
(`CORRAL_LLAMA_CACHE_MIB`, worker/backends/llama_cache.py). The `no-cache` setup is the
worker with that cache off: what every turn costs when the history is read again.

Both load the bundled SmolLM2-135M Q4_1 with 2 threads and 4 slots, are up at once and are
measured in turn. Per pass: `--conversations` new conversations (their text is new in every
pass), round robin, one request at a time; the first user message carries a ~300-token
document, later turns ask short questions about it; `--max-tokens` greedy tokens each,
the server's own answers kept in the history. Reported: TTFT p50 of the first turns and of
the later ones, the later turns' cached prompt tokens, each as a ratio to llama-server in
the same pass. `--write` replaces the `multiturn` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import httpx
from common import MODEL, Proc, command_line, in_turn, machine, write_section
from engine import BR
from llama_server import CTX, REF, SLOTS, describe_setups, parse_setups, start_all
from llama_server_build import build, installed_version

QUESTIONS = ("Which horse jumped the north fence?", "How many bales were counted?",
             "What happened at the river?", "Who mended the gate?", "Summarise the notes.")


def document(conv: str) -> str:
    lines = [f"Note {i} of {conv}: the grey mare crossed the river at dawn and the old rancher "
             f"counted {7 + i} bales in the barn." for i in range(12)]
    return "Here are the ranch notes. " + " ".join(lines)


def turn(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed turn on a fresh connection (llama-server closes a connection after a
    streamed answer, though it announces keep-alive)."""
    body = {"model": MODEL, "messages": messages, "stream": True, "max_tokens": max_tokens,
            "temperature": 0, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, parts, usage = None, [], {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            d = json.loads(line[6:])
            usage = d.get("usage") or usage
            for ch in d.get("choices") or []:
                text = (ch.get("delta") or {}).get("content")
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"ttft_ms": 1000 * ((first or time.perf_counter()) - t0), "text": "".join(parts),
            "prompt": usage.get("prompt_tokens", 0), "cached": cached}


def one_pass(url: str, tag: str, convs: int, turns: int, max_tokens: int) -> dict:
    """Round robin over `convs` conversations for `turns` turns; per-turn figures."""
    histories = [[{"role": "system", "content": "You keep the ranch's records."},
                  {"role": "user", "content": document(f"{tag} ranch {k}")}]
                 for k in range(convs)]
    out: dict[str, list] = {"first": [], "later": [], "cached_later": [], "prompt_later": []}
    t0 = time.perf_counter()
    for t in range(turns):
        for k, h in enumerate(histories):
            if t:
                h.append({"role": "user", "content": QUESTIONS[(t + k) % len(QUESTIONS)]})
            r = turn(url, h, max_tokens)
            h.append({"role": "assistant", "content": r["text"]})
            if t == 0:
                out["first"].append(r["ttft_ms"])
            else:
                out["later"].append(r["ttft_ms"])
                out["cached_later"].append(r["cached"])
                out["prompt_later"].append(r["prompt"])
    return {"ttft_first": statistics.median(out["first"]),
            "ttft_later": statistics.median(out["later"]) if out["later"] else None,
            "cached_later": statistics.median(out["cached_later"]) if out["later"] else None,
            "prompt_later": statistics.median(out["prompt_later"]) if out["later"] else None,
            "seconds": time.perf_counter() - t0}


def render(out: dict) -> str:
    a = out["args"]
    runs = out["runs"]
    ref = runs[REF]

    def cell(name: str, key: str) -> str:
        xs = [r[key] / q[key] for r, q in zip(runs[name], ref, strict=False)
              if r.get(key) and q.get(key)]
        if not xs:
            return "-"
        return f"{statistics.median(xs):.2f}" + (
            f" ({min(xs):.2f}-{max(xs):.2f})" if len(xs) > 1 else "")

    lines = ["| setup | first turn TTFT p50 ms | ratio | later turns TTFT p50 ms | **ratio** "
             "| later turns: cached / prompt tokens | pass seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in
               ("ttft_first", "ttft_later", "cached_later", "prompt_later", "seconds")}
        lines.append(f"| {name} | {med['ttft_first']:.0f} | {cell(name, 'ttft_first')} | "
                     f"{med['ttft_later']:.0f} | **{cell(name, 'ttft_later')}** | "
                     f"{med['cached_later']:.0f} / {med['prompt_later']:.0f} | "
                     f"{med['seconds']:.1f} |")
    setups = describe_setups(out["setups"], a["threads"])
    return f"""## Multi-turn chat: more conversations than slots, against llama-server

Command: `{out['command']}`{BR}
Machine: {out['machine']}.

llama-server {out['version']} (`--threads {a['threads']} --parallel {SLOTS} --ctx-size
{CTX * SLOTS}`, its default `--cache-ram`) against {setups}. Per pass, {a['convs']} new
conversations, round robin, one request at a time, {a['turns']} turns each: the first
user message carries a ~400-token document, later turns a short question; {a['max_tokens']}
greedy tokens per answer, kept in the history. With {a['convs']} conversations on {SLOTS}
slots, every conversation's slot has been taken by the time of its next turn.
Ratios are to llama-server in the same pass (median over {a['passes']} passes, range in
brackets). Load average after the run: {out.get('load_after', '?')}.

{chr(10).join(lines)}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--corral", action="append", default=[],
                    help='"label=extra worker args and NAME=value variables"')
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    exe = str(build())
    setups = parse_setups({"corral": "", "no-cache": "CORRAL_LLAMA_CACHE_MIB=0"}, a.corral)
    where = machine()
    procs: list[Proc] = []
    try:
        targets, _ = start_all(setups, exe, a.threads, [], procs)
        runs: dict[str, list[dict]] = {n: [] for n in targets}
        for p in range(a.passes):
            order = in_turn(list(targets.items()), p)  # each place in turn
            for name, url in order:
                r = one_pass(url, f"pass {p}", a.conversations, a.turns, a.max_tokens)
                runs[name].append(r)
                print(json.dumps({"pass": p, "setup": name, **r}), file=sys.stderr, flush=True)
    finally:
        for proc in reversed(procs):
            proc.stop()
    out = {"machine": where, "command": command_line(), "runs": runs, "setups": setups,
           "version": installed_version(), "load_after": f"{os.getloadavg()[0]:.1f}",
           "args": {"threads": a.threads, "passes": a.passes, "convs": a.conversations,
                    "turns": a.turns, "max_tokens": a.max_tokens}}
    text = render(out)
    print(text)
    if a.write:
        write_section("multiturn", text)


if __name__ == "__main__":
    os.environ.setdefault("NO_PROXY", "*")
    main()
