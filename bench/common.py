"""Shared by the bench/ scripts: processes, load runs, CPU accounting, BENCHMARKS.md sections.

Processes come from tests/procs.py (real `corral worker` / `corral gateway` on 127.0.0.1,
stopped by PID). Load comes from `corral.bench` in this process. Each script owns one
section of docs/BENCHMARKS.md between `<!-- bench:NAME -->` markers and rewrites only it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from procs import (  # noqa: E402
    HOST,
    Gateway,
    Proc,
    Worker,
    free_port,
    start_gateway,
    start_worker,
    wait_for,
)

from corral.bench import LoadSpec, bench  # noqa: E402

MODEL = "smollm2-135m"
DOC = ROOT / "docs" / "BENCHMARKS.md"
IMG = ROOT / "docs" / "img"

__all__ = [
    "HOST", "MODEL", "Gateway", "Proc", "Worker", "CpuMeter", "LoadSpec", "bench",
    "command_line", "fmt_ms", "free_port", "gateway_for", "load", "machine", "plot",
    "sim_worker",
    "sim_workers",
    "started", "start_gateway", "start_worker", "wait_for", "write_section",
]


def sim_worker(rate: float, slots: int, ttft: float = 0.05, max_queue: int = 256,
               port: int | None = None) -> Worker:
    return start_worker("--sim-tokens-per-second", str(rate), "--sim-ttft", str(ttft),
                        "--parallel", str(slots), "--max-queue", str(max_queue),
                        backend="sim", port=port)


def sim_workers(count: int, rate: float, slots: int, ttft: float = 0.05,
                max_queue: int = 256) -> list[Worker]:
    """`count` sim workers started at once (each still polled until ready)."""
    ws = [start_worker("--sim-tokens-per-second", str(rate), "--sim-ttft", str(ttft),
                       "--parallel", str(slots), "--max-queue", str(max_queue),
                       backend="sim", wait=False) for _ in range(count)]
    try:
        for w in ws:
            w.wait_ready()
    except Exception:
        for w in ws:
            w.proc.stop()
        raise
    return ws


def gateway_for(workers: list[Worker], *extra: str) -> Gateway:
    """A gateway in front of `workers`, returned once all of them are routable."""
    args: list[str] = []
    for w in workers:
        args += ["--worker", w.url]
    g = start_gateway(*args, *extra)

    def all_ready() -> bool:
        r = httpx.get(f"{g.url}/cluster", timeout=2)
        ws = r.json().get("workers", [])
        return sum(1 for x in ws if x.get("state") in ("ready", "busy")) >= len(workers)

    wait_for(all_ready, 60, 0.1, f"gateway {g.url} to see {len(workers)} workers")
    return g


@contextlib.contextmanager
def started(*procs: Worker | Gateway | Proc) -> Iterator[None]:
    """Stops every process given (and any appended later to the tuple's lists) on exit."""
    try:
        yield
    finally:
        for p in procs:
            (p if isinstance(p, Proc) else p.proc).stop()


def load(base_url: str, requests: int, *, concurrency: int | None = None,
         rate: float | None = None, max_tokens: int = 64, stream: bool = True,
         timeout: float = 60.0, seed: int = 0, prompt: str | None = None,
         distinct: bool = True) -> tuple[dict[str, Any], list]:
    spec = LoadSpec(base_url=base_url, model=MODEL, requests=requests,
                    concurrency=concurrency, rate=rate, max_tokens=max_tokens, stream=stream,
                    timeout=timeout, seed=seed, distinct_prompts=distinct)
    if prompt:
        spec.prompt = prompt
    return bench(spec)


@dataclass
class CpuMeter:
    """CPU seconds (user + system) a process and its children used between two reads."""

    pid: int

    def read(self) -> float:
        p = psutil.Process(self.pid)
        total = 0.0
        for q in [p, *p.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = q.cpu_times()
                total += t.user + t.system
        return total

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        out: dict[str, float] = {}
        c0, t0, idle0 = self.read(), time.perf_counter(), psutil.cpu_times().idle
        try:
            yield out
        finally:
            out["cpu_s"] = self.read() - c0
            out["wall_s"] = time.perf_counter() - t0
            out["cores"] = out["cpu_s"] / max(out["wall_s"], 1e-9)
            # Idle CPU on the whole box meanwhile: near 0 means the run was CPU-starved.
            out["box_idle_cores"] = (psutil.cpu_times().idle - idle0) / max(out["wall_s"], 1e-9)


def fmt_ms(d: dict[str, float] | None, key: str) -> str:
    return "-" if not d else f"{d[key]:.1f}"


def plot(file: str, alt: str, figsize: tuple[float, float], draw: Callable[[Any], None]) -> str:
    """Draws one figure (`draw(ax)`) into docs/img/`file`; returns the Markdown line that
    shows it in a section, or says why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "\n(no plot: matplotlib is not installed; `pip install -e '.[bench]'`)\n"
    IMG.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=figsize)
    draw(ax)
    fig.tight_layout()
    fig.savefig(IMG / file, dpi=110)
    plt.close(fig)
    return f"\n![{alt}](img/{file})\n"


def in_turn(items: list[Any], p: int) -> list[Any]:
    """`items` rotated by pass `p`: over len(items) passes each takes each place once
    (reversing every other pass would leave a middle one always in the middle)."""
    k = p % len(items) if items else 0
    return items[k:] + items[:k]


def command_line() -> str:
    """The command that produced a result, as a reader would type it from the repo root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return " ".join([".venv/bin/python", str(script), *map(shlex.quote, sys.argv[1:])])


def machine() -> str:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load1 = os.getloadavg()[0]
    return (f"{os.cpu_count()} CPU ({cpu or 'unknown'}), load average {load1:.1f} at start, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


_HEADER = """# Benchmarks

Every table below was written by the script named in its section, with the exact command
shown; rerun it (or `make bench` for all of them) to refresh the section in place. All
traffic is loopback on one small box, with `sim` workers (deterministic tokens at a fixed
rate per slot), so the numbers measure Corral's routing and relaying, not a model.
Load comes from `corral bench` (httpx, client-side timing, own SSE parser).
"""


def write_section(name: str, body: str) -> None:
    """Replaces (or appends) the `name` section of docs/BENCHMARKS.md, leaving others be."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = DOC.read_text() if DOC.exists() else _HEADER
    pat = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = (pat.sub(lambda _m: block, text) if pat.search(text)
            else text.rstrip() + "\n\n" + block + "\n")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text if text.endswith("\n") else text + "\n")
    print(f"wrote the {name!r} section of {DOC.relative_to(ROOT)}")


# --------------------------------------------------------------------------- LiteLLM

LITELLM_VENV = ROOT / ".bench-venv"


def litellm_missing() -> str | None:
    """Why LiteLLM's proxy cannot be compared here, or None when it can."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        return (f"LiteLLM's proxy is not installed in {LITELLM_VENV.name}/ "
                "(python3 -m venv .bench-venv && .bench-venv/bin/pip install 'litellm[proxy]')")
    return None


def start_litellm(workers: list[Worker], strategy: str = "simple-shuffle",
                  timeout: float = 120.0) -> Proc:
    """LiteLLM's proxy (from .bench-venv) in front of `workers`, one process, no database."""
    import json
    import tempfile

    port = free_port()
    config = {
        "model_list": [
            {"model_name": MODEL,
             "litellm_params": {"model": f"openai/{MODEL}", "api_base": f"{w.url}/v1",
                                "api_key": "none"}}
            for w in workers
        ],
        "router_settings": {"routing_strategy": strategy, "num_retries": 0},
        "litellm_settings": {"telemetry": False, "drop_params": True, "num_retries": 0},
    }
    fd, path = tempfile.mkstemp(prefix="corral-litellm-", suffix=".yaml")  # JSON is YAML
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    # Quiet access logs, as Corral's gateway runs by default: per-request log lines would
    # be charged to LiteLLM's CPU per request otherwise.
    fd, log_config = tempfile.mkstemp(prefix="corral-litellm-log-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"version": 1, "disable_existing_loggers": False,
                   "loggers": {"uvicorn.access": {"level": "WARNING"},
                               "uvicorn.error": {"level": "WARNING"}}}, f)
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
           "LITELLM_LOG": "ERROR", "NO_PROXY": "*", "HTTP_PROXY": "", "HTTPS_PROXY": ""}
    proc = Proc([str(LITELLM_VENV / "bin" / "litellm"), "--config", path, "--host", HOST,
                 "--port", str(port), "--num_workers", "1", "--log_config", log_config],
                env, f"litellm-{port}").start()
    proc.url = f"http://{HOST}:{port}"  # type: ignore[attr-defined]
    try:
        proc.wait_http(f"{proc.url}/health/liveliness", timeout=timeout)  # type: ignore[attr-defined]
    except Exception:
        log = proc.log()[-2000:]
        proc.stop()
        raise RuntimeError(f"LiteLLM's proxy did not come up: {log}") from None
    finally:
        for p in (path, log_config):  # read at startup; not needed once it answers
            with contextlib.suppress(OSError):
                os.unlink(p)
    return proc
