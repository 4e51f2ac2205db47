"""The Corral llama worker against llama.cpp's own C++ `llama-server`, same GGUF, same threads.

    .venv/bin/python bench/llama_server.py [--write] [--levels 1,4,8] [--passes 2]
        [--corral "label=extra worker args"]... [--prompt TEXT | --repeat | --varied]
        [--max-tokens 64] [--temperature 0]

`llama-server` is built (once, cached) from the llama.cpp that llama-cpp-python vendors
(bench/llama_server_build.py). Both servers load the bundled SmolLM2-135M Q4_1 with
`--threads` threads and 4 slots of 2048 tokens, are up at once and are measured in turn
(who goes first rotates, `--passes` rounds, so the box's other load weighs on all alike;
make the passes a multiple of the setups so each takes each place equally often). Load:
`corral bench` closed loop at each concurrency c, `--rounds` x c streamed chat completions
of `--max-tokens` tokens (greedy, or sampled at `--temperature`), prompts distinct across
the run: `--prompt` numbered (alike requests), `--repeat` (an answer that quotes its
prompt) or `--varied` (a new form and subject every request). Every figure is
reported as a ratio to llama-server's in the same run; the absolute numbers are only for
reading the ratios.
Each `--corral` adds a worker setup, arguments and NAME=value environment variables (e.g.
`--corral "no-lookup=CORRAL_LLAMA_LOOKUP=0"`); the first,
`corral` with no extra arguments, is always there. `--write` replaces the `llama-server`
section of docs/BENCHMARKS.md. Never part of `make test`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys

import httpx
from common import (
    HOST,
    MODEL,
    CpuMeter,
    LoadSpec,
    Proc,
    bench,
    command_line,
    free_port,
    in_turn,
    machine,
    start_worker,
    write_section,
)
from engine import BR, PROMPT
from llama_server_build import build, installed_version

#: A prompt whose answer repeats its input: where prompt-lookup drafts are kept.
REPEAT = ("Repeat the following text exactly, word for word:\n\nThe corral stood at the edge "
          "of the valley. Every morning the horses came down from the hills to drink at the "
          "river, and the old rancher counted them one by one as they passed the gate. In "
          "winter the snow covered the fences and the horses stayed in the barn, eating hay "
          "and waiting for spring.")
#: `--varied`: requests unlike each other, none asked twice in a run (12 forms x 24
#: subjects), so that drafts from earlier answers (llama_history.py) meet new text only.
FORMS = ("Write a short story about", "Explain to a child all about", "Write a news report on",
         "List five surprising facts about", "Write a poem about",
         "Give step-by-step advice on", "Describe the history of", "Argue for and against",
         "Write a letter to a friend about", "Summarise what experts say about",
         "Write a product review of", "Write a dialogue between two people about")
SUBJECTS = ("the moon landing", "growing tomatoes", "a lost dog", "the printing press",
            "learning to swim", "volcanoes", "a busy train station", "chess openings",
            "the water cycle", "a medieval castle", "electric cars", "sourdough bread",
            "honey bees", "the Roman aqueducts", "a thunderstorm", "jazz music", "glaciers",
            "a robot that paints", "the stock market", "coral reefs", "the first telephone",
            "a mountain village", "recycling plastic", "the night sky")


def varied(k: int) -> str:
    """The k-th varied request: form and subject both change from one to the next, and
    k = 0..287 are all different (13 is invertible mod 24)."""
    b, a = k % len(FORMS), k // len(FORMS)
    return f"{FORMS[b]} {SUBJECTS[(13 * a + b) % len(SUBJECTS)]}."


CTX = 2048
SLOTS = 4
REF = "llama-server"


def start_llama_server(exe: str, threads: int, extra: list[str]) -> Proc:
    from worker.backends.llama_cpu import repack
    from worker.models import resolve

    if not repack().on:  # the same kernels as the worker (AMX: both crash otherwise)
        extra = ["--no-repack", *extra]
    port = free_port()
    proc = Proc([exe, "-m", str(resolve(MODEL)[1]), "--host", HOST, "--port", str(port),
                 "--threads", str(threads), "--threads-batch", str(threads),
                 "--parallel", str(SLOTS), "--ctx-size", str(CTX * SLOTS), "--no-webui",
                 "--alias", MODEL, *extra], name=f"llama-server-{port}").start()
    proc.url = f"http://{HOST}:{port}"  # type: ignore[attr-defined]
    proc.wait_http(f"{proc.url}/health", timeout=300)  # type: ignore[attr-defined]
    return proc


def parse_setups(base: dict[str, str], specs: list[str]) -> dict[str, str]:
    """`base` plus each `--corral "label=extra args and NAME=value variables"`."""
    setups = dict(base)
    for spec in specs:
        name, _, extra = spec.partition("=")
        setups[name] = extra
    return setups


def describe_setups(setups: dict[str, str], threads: int) -> str:
    """Each setup's worker command line, for a BENCHMARKS.md section."""
    return "; ".join(f"`{n}`: `corral worker --backend llama --parallel {SLOTS} --threads "
                     f"{threads} --ctx-size {CTX} {x}`".replace(" `", "`")
                     for n, x in setups.items())


def start_all(setups: dict[str, str], exe: str, threads: int, server_args: list[str],
              procs: list[Proc]) -> tuple[dict[str, str], dict[str, int]]:
    """Starts a worker per setup ("extra args and NAME=value variables") and llama-server,
    side by side, appending each to `procs` at once (so a failed start still stops them);
    returns each one's URL and PID, llama-server's as REF, once all are ready."""
    workers = []
    for name, extra in setups.items():
        words = shlex.split(extra)
        env = dict(x.split("=", 1) for x in words if _is_env(x))
        w = start_worker("--parallel", str(SLOTS), "--threads", str(threads),
                         "--ctx-size", str(CTX), *(x for x in words if not _is_env(x)),
                         env=env, wait=False)
        procs.append(w.proc)
        workers.append((name, w))
    server = start_llama_server(exe, threads, server_args)
    procs.append(server)
    targets = {REF: server.url}  # type: ignore[attr-defined]
    pids = {REF: server.pid}
    for name, w in workers:
        w.proc.wait_http(f"{w.url}/status", timeout=600,
                         ok=lambda r: r.json().get("state") in ("ready", "busy"))
        targets[name] = w.url
        pids[name] = w.proc.pid
    return targets, pids


def _is_env(word: str) -> bool:
    """`NAME=value` with an upper-case name: an environment variable for the worker."""
    name, eq, _ = word.partition("=")
    return bool(eq) and name.isupper() and not name.startswith("-")


def level(url: str, c: int, requests: int, max_tokens: int, prompt: str,
          pid: int | None = None, prompts: tuple[str, ...] = (), worker: bool = False,
          temperature: float = 0.0) -> dict:
    """One closed-loop load; with `pid`, also the CPU seconds that server's processes used;
    for a corral `worker`, also the share of its decode loop's time spent between two
    `llama_decode`s (its Python: /status `prompt_cache.step_gap_us` and `decode_us`)."""
    meter = CpuMeter(pid) if pid else None
    before = _loop_times(url) if worker else None
    with meter.measure() if meter else contextlib.nullcontext({}) as cpu:
        r = _level(url, c, requests, max_tokens, prompt, prompts, temperature)
    r["cpu_s"] = cpu.get("cpu_s")
    if before is not None:
        gap, dec = (b - a for a, b in zip(before, _loop_times(url), strict=True))
        r["gap_share"] = gap / (gap + dec) if gap + dec > 0 else None
    return r


def _loop_times(url: str) -> tuple[int, int]:
    pc = httpx.get(f"{url}/status", timeout=30).json().get("prompt_cache", {})
    return pc.get("step_gap_us", 0), pc.get("decode_us", 0)


def _level(url: str, c: int, requests: int, max_tokens: int, prompt: str,
           prompts: tuple[str, ...] = (), temperature: float = 0.0) -> dict:
    spec = LoadSpec(base_url=url, model=MODEL, requests=requests, concurrency=c,
                    max_tokens=max_tokens, stream=True, timeout=600, distinct_prompts=True,
                    prompt=prompt, prompts=prompts, extra_body={"temperature": temperature})
    s, _ = bench(spec)
    return {"tokens": s["output_tokens"], "seconds": s["duration_s"], "errors": s["errors"],
            "errors_by_kind": s["errors_by_kind"], "error_examples": s["error_examples"],
            "ttft_p50_ms": (s.get("ttft_ms") or {}).get("p50"),
            "tpot_p50_ms": (s.get("tpot_ms") or {}).get("p50")}


def _agg(rs: list[dict]) -> dict:
    def med(key: str) -> float:
        vals = [r[key] for r in rs if r.get(key) is not None]
        return statistics.median(vals) if vals else float("nan")

    secs = sum(r["seconds"] for r in rs)
    return {"tok_s": sum(r["tokens"] for r in rs) / secs if secs else 0.0,
            "per_pass": [r["tokens"] / r["seconds"] if r["seconds"] else 0.0 for r in rs],
            "ttft": med("ttft_p50_ms"), "tpot": med("tpot_p50_ms"),
            "errors": sum(r["errors"] for r in rs)}


def ratios(rs: list[dict], ref: list[dict], key: str) -> list[float]:
    """Per pass: this setup's figure over llama-server's in the same pass."""
    def val(r: dict) -> float | None:
        if key == "tok_s":
            return r["tokens"] / r["seconds"] if r["seconds"] else None
        if key == "cpu_ms_per_token":
            return 1000 * r["cpu_s"] / r["tokens"] if r.get("cpu_s") and r["tokens"] else None
        return r.get(key)

    out = []
    for r, q in zip(rs, ref, strict=False):
        a, b = val(r), val(q)
        if a is not None and b:
            out.append(a / b)
    return out


def _ratio_cell(xs: list[float], bold: bool = False) -> str:
    if not xs:
        return "-"
    m = f"{statistics.median(xs):.2f}"
    return (f"**{m}**" if bold else m) + (f" ({min(xs):.2f}-{max(xs):.2f})" if len(xs) > 1
                                          else "")


def render(out: dict) -> str:
    a = out["args"]
    levels = sorted(int(c) for c in out["runs"][REF])
    runs = {n: {int(c): rs for c, rs in by.items()} for n, by in out["runs"].items()}
    agg = {n: {c: _agg(rs) for c, rs in by.items()} for n, by in runs.items()}
    lines = ["| setup | c | tok/s, per pass | tok/s ratio, median (range) | TTFT p50 ms "
             "| TTFT ratio | CPU ms/token | CPU/token ratio | Python's share of a step "
             "| errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, by in agg.items():
        for c in levels:
            r = by[c]
            passes = " / ".join(f"{x:.0f}" for x in r["per_pass"])
            tok = ratios(runs[name][c], runs[REF][c], "tok_s")
            ttft = ratios(runs[name][c], runs[REF][c], "ttft_p50_ms")
            cpu = ratios(runs[name][c], runs[REF][c], "cpu_ms_per_token")
            cpu_s = sum(x.get("cpu_s") or 0 for x in runs[name][c])
            toks = sum(x["tokens"] for x in runs[name][c])
            per = f"{1000 * cpu_s / toks:.1f}" if cpu_s and toks else "-"
            shares = [x["gap_share"] for x in runs[name][c] if x.get("gap_share") is not None]
            gap = f"{statistics.median(shares):.1%}" if shares else "-"
            lines.append(
                f"| {name} | {c} | {passes} | {_ratio_cell(tok, True)} | {r['ttft']:.0f} | "
                f"{_ratio_cell(ttft)} | {per} | {_ratio_cell(cpu)} | {gap} | {r['errors']} |")
    examples = {}
    for name, by in out["runs"].items():
        for rs in by.values():
            for r in rs:
                for kind, msg in (r.get("error_examples") or {}).items():
                    examples.setdefault(f"{name}: {kind}", msg)
    errs = ("Errors: " + "; ".join(f"{k} (e.g. `{v[:160]}`)" for k, v in examples.items())
            + "." if examples else "No request failed.")
    setups = describe_setups(out["setups"], a["threads"])
    kind = ("varied requests" if out.get("varied") else "text that repeats its input"
            if out["prompt"] == REPEAT else "alike requests")
    temp = a.get("temperature", 0.0)
    if temp:
        kind += f", sampled at temperature {temp:g}"
    tokens = (f"tokens sampled at temperature {temp:g} (truncation: both servers' default, "
              "top-k 40, top-p 0.95, min-p 0.05; unseeded)" if temp else "greedy tokens")
    return f"""## Against llama-server ({kind}): the llama worker and llama.cpp's own server

Command: `{out['command']}`{BR}
Machine: {out['machine']}.

Same GGUF (SmolLM2-135M-Instruct Q4_1), same llama.cpp (llama-server built from the source
llama-cpp-python {out['version']} vendors, bench/llama_server_build.py), {a['threads']}
threads, {SLOTS} slots of {CTX} tokens each: `llama-server --threads {a['threads']}
--threads-batch {a['threads']} --parallel {SLOTS} --ctx-size {CTX * SLOTS}` against
{setups}. All up at once, measured in turn, who goes first rotating ({a['passes']}
passes). Load: `corral bench` closed loop at concurrency c, {a['rounds']} x c streamed
chat completions of {a['max_tokens']} {tokens} per pass, prompts distinct across the whole run
({_prompt_text(out)}: llama-server's host-memory prompt cache,
`--cache-ram`, would answer a repeated prompt without reading it).
tok/s = output tokens / wall time of each pass; TTFT is the median
of the passes' p50s; CPU ms/token = CPU time (user + system) of the server's
processes over its output tokens, the efficiency figure least moved by the box's other
load (though llama.cpp's threads spin while they wait, so a starved pass costs CPU too);
Python's share of a step = the worker's decode-loop time between two `llama_decode`s over
its whole busy time (`/status` `prompt_cache.step_gap_us`, `decode_us`), median of passes.
**Ratios are to llama-server in the same pass** (median
over passes, range in brackets): the box is shared and its load swings within a run, so
only those carry over. Load average after the run: {out.get('load_after', '?')}.

{chr(10).join(lines)}

{errs}
"""


def _prompt_text(out: dict) -> str:
    if out.get("varied"):
        return (f"`Request i. (pass p, c streams) <form> <subject>.`, a new pair for every "
                f"request of the run from {len(FORMS)} forms x {len(SUBJECTS)} subjects, "
                f"e.g. `{varied(0)}`, `{varied(1)}`")
    return f"`Request i. (pass p, c streams) {out['prompt']}`"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,4,8")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--repeat", action="store_true", help="the repeat-the-input prompt")
    ap.add_argument("--varied", action="store_true",
                    help="a different request every time (forms x subjects), not --prompt")
    ap.add_argument("--section", default="llama-server", help="BENCHMARKS.md section")
    ap.add_argument("--corral", action="append", default=[],
                    help="label=extra corral worker arguments (repeatable)")
    ap.add_argument("--server-args", default="", help="extra llama-server arguments")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample at this temperature (0: greedy); truncation is both servers' "
                         "default, top-k 40, top-p 0.95, min-p 0.05")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--render", default=None, help="re-render from this script's saved JSON")
    a = ap.parse_args()
    if a.render:
        with open(a.render) as f:
            write_section(a.section, render(json.load(f)))
        return
    if a.repeat:
        a.prompt = REPEAT
    exe = str(build())
    levels = [int(x) for x in a.levels.split(",")]
    setups = parse_setups({"corral": ""}, a.corral)
    where = machine()
    procs: list[Proc] = []
    try:
        targets, pids = start_all(setups, exe, a.threads, shlex.split(a.server_args), procs)
        for url in targets.values():  # warm up
            level(url, 1, 1, 8, a.prompt)
        runs: dict[str, dict[int, list[dict]]] = {n: {c: [] for c in levels} for n in targets}
        next_k = 0  # --varied: the next request's form and subject
        for p in range(a.passes):
            for c in levels:
                # Each setup takes each place in turn (a rotation per pass): with three
                # setups, reversing every other pass left the middle one always second,
                # always right after another server's burst.
                order = in_turn(list(targets.items()), p)
                # New text every pass and level (the same for every setup within one):
                # llama-server keeps prompts it has seen in host memory (`--cache-ram`, 8 GiB
                # by default) and would answer repeats from there, which the worker cannot.
                prompt = f"(pass {p}, {c} streams) {a.prompt}"
                n = c * a.rounds
                asks = (tuple(f"(pass {p}, {c} streams) {varied(next_k + i)}" for i in range(n))
                        if a.varied else ())
                next_k += n
                for name, url in order:
                    r = level(url, c, n, a.max_tokens, prompt, pids[name], asks,
                              worker=name != REF, temperature=a.temperature)
                    runs[name][c].append(r)
                    print(json.dumps({"pass": p, "setup": name, "concurrency": c, **r}),
                          file=sys.stderr, flush=True)
    finally:
        for proc in reversed(procs):
            proc.stop()
    out = {"machine": where, "command": command_line(), "runs": runs, "setups": setups,
           "version": installed_version(), "prompt": a.prompt, "varied": a.varied,
           "load_after": f"{os.getloadavg()[0]:.1f}",
           "args": {"threads": a.threads, "passes": a.passes, "rounds": a.rounds,
                    "max_tokens": a.max_tokens, "temperature": a.temperature}}
    with open(f"/tmp/corral-{a.section}.json", "w") as f:  # for --render
        json.dump(out, f)
    text = render(out)
    print(text)
    if a.write:
        write_section(a.section, text)


if __name__ == "__main__":
    os.environ.setdefault("NO_PROXY", "*")
    main()
