"""A split head: the model loaded with RPC shards as devices, in a child process.

A lost RPC peer aborts the process that holds the model (SIGABRT, uncatchable) and a frozen
one hangs it forever, so the head never runs inside the worker: the worker starts
`python -m worker.rpc.head`, which probes every shard (HELLO with a timeout), registers
them, loads the GGUF with layers offloaded to them and serves the ordinary worker API on a
loopback port. The worker relays `/v1/*` to it (`worker.rpc.relay`) and supervises it with
`HeadProcess`: readiness, a watchdog that kills a head that makes no progress (no token
out, no prompt chunk in) for `stall_seconds` while a request is active, and the reason it
broke for `/status`.

Layers: the head keeps the first `round(n_layer x tensor_split[0])` layers on its own CPU;
the rest and the output layer go to the shards, shared in proportion to the remaining
`tensor_split` entries (llama.cpp's n_gpu_layers counts the output layer as one more).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx

from worker.rpc.shard import child_env, die_with_parent

log = logging.getLogger("corral.rpc")

PROBE_SECONDS = 30.0
LOAD_TIMEOUT = 600.0
EXIT_PROBE_FAILED = 3
EXIT_LOAD_FAILED = 4


def n_layers(path: str) -> int:
    from worker import gguf_meta

    return int(gguf_meta.read(path).arch_get("block_count"))


def offload(n_layer: int, split: list[float]) -> tuple[int, list[float]]:
    """(n_gpu_layers, tensor_split over the shards) for the head's share `split[0]`."""
    total = sum(split) or 1.0
    on_head = max(0, min(n_layer, round(n_layer * split[0] / total)))
    return n_layer + 1 - on_head, [s / total for s in split[1:]]


# --------------------------------------------------------------------------- the child


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.rpc.head")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", required=True, help="path to the GGUF")
    ap.add_argument("--model-id", required=True)
    ap.add_argument("--id", required=True, help="the worker's id, for x-corral-worker")
    ap.add_argument("--shards", required=True, help="comma-separated host:port")
    ap.add_argument("--tensor-split", required=True, help="head first, then each shard")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--ctx-size", type=int, default=2048)
    ap.add_argument("--probe-seconds", type=float, default=PROBE_SECONDS)
    a = ap.parse_args(argv)
    die_with_parent()
    logging.basicConfig(level="WARNING", format="%(asctime)s head %(name)s %(message)s")
    shards = [s for s in a.shards.split(",") if s]
    split = [float(x) for x in a.tensor_split.split(",")]
    if len(split) != len(shards) + 1:
        print("--tensor-split needs one entry for the head and one per shard", file=sys.stderr)
        return 2

    from worker.rpc.ggml import ggml
    from worker.rpc.probe import ProbeError, wait_hello

    deadline = time.monotonic() + a.probe_seconds
    for ep in shards:  # before ggml connects: it aborts on a peer that does not answer
        try:
            wait_hello(ep, deadline)
        except ProbeError as exc:
            print(f"RPC shard unreachable: {exc}", file=sys.stderr, flush=True)
            return EXIT_PROBE_FAILED
    g = ggml()
    for ep in shards:
        g.add_rpc_server(ep)

    import uvicorn

    from worker.app import create_app
    from worker.backends.llama import LlamaBackend
    from worker.config import WorkerConfig

    gpu_layers, shard_split = offload(n_layers(a.model), split)
    backend = LlamaBackend(a.model, a.parallel, a.ctx_size, a.threads,
                           n_gpu_layers=gpu_layers, tensor_split=shard_split)
    cfg = WorkerConfig(host="127.0.0.1", port=a.port, backend="llama", model=a.model,
                       id=a.id, parallel=a.parallel, threads=a.threads, ctx_size=a.ctx_size)
    app = create_app(cfg, backend=backend)
    state = app.state.worker
    state.model_id = a.model_id
    state.model_names.clear()
    state.model_names.add(a.model_id)

    @app.get("/progress")
    async def progress() -> dict[str, Any]:
        e = state.engine
        steps = backend.stats()
        return {"ready": e.ready, "error": state.load_error,
                # Anything the model computed: tokens out, prompt chunks in, decode steps.
                "progress": e.stats.generated_tokens + steps.get("decode_steps", 0)
                + steps.get("prompt_tokens_evaluated", 0),
                "generated": e.stats.generated_tokens, "requests": e.stats.requests,
                "slots_busy": e.slots_busy, "slots_total": backend.slots,
                "queue_depth": e.queue_depth,
                "tokens_per_second": round(e.stats.tokens_per_second, 2),
                "n_ctx": backend.n_ctx, "capabilities": backend.capabilities(),
                "offload": {"n_gpu_layers": gpu_layers,
                                                    "tensor_split": shard_split}}

    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=2)
    return 0


# --------------------------------------------------------------------------- the parent


class HeadProcess:
    """The worker's handle on its head child: start, readiness, watchdog, stop."""

    def __init__(self, worker_id: str, model_path: str, model_id: str, shards: list[str],
                 tensor_split: list[float], threads: int, parallel: int, ctx_size: int,
                 stall_seconds: float = 30.0) -> None:
        self.worker_id = worker_id
        self.model_path = model_path
        self.model_id = model_id
        self.shards = shards
        self.tensor_split = tensor_split
        self.threads = threads
        self.parallel = parallel
        self.ctx_size = ctx_size
        self.stall_seconds = stall_seconds
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.broken: str | None = None
        self.progress: dict[str, Any] = {}
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0))

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self) -> None:
        from worker.rpc.shard import _free_loopback_port

        self.port = _free_loopback_port()
        args = [sys.executable, "-m", "worker.rpc.head", "--port", str(self.port),
                "--model", self.model_path, "--model-id", self.model_id,
                "--id", self.worker_id, "--shards", ",".join(self.shards),
                "--tensor-split", ",".join(str(x) for x in self.tensor_split),
                "--threads", str(self.threads), "--parallel", str(self.parallel),
                "--ctx-size", str(self.ctx_size)]
        self.proc = subprocess.Popen(args, env=child_env(self.threads), start_new_session=True)

    async def start(self) -> None:
        """Starts the child and waits until it serves; raises with the reason if it fails."""
        self._spawn()
        deadline = time.monotonic() + LOAD_TIMEOUT
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(self._exit_reason())
            with contextlib.suppress(httpx.HTTPError, ValueError):
                r = await self.client.get(self.base + "/progress")
                if r.status_code == 200:
                    self.progress = r.json()
                    if self.progress.get("error"):
                        raise RuntimeError(f"the head failed to load: {self.progress['error']}")
                    if self.progress.get("ready"):
                        self.ready = True
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError("the head did not load in time")

    def _exit_reason(self) -> str:
        rc = self.proc.poll() if self.proc else None
        if rc == EXIT_PROBE_FAILED:
            return "an RPC shard did not answer HELLO"
        if rc is not None and rc < 0:
            name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else rc
            why = " (an RPC peer was lost)" if rc == -signal.SIGABRT else ""
            return f"the head process died of {name}{why}"
        return f"the head process exited with code {rc}"

    async def watch(self, on_broken: Any) -> None:
        """Runs while placed: notices a dead child, and kills one that stopped producing."""
        last_progress = -1
        last_change = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            if not self.alive():
                self._break(self._exit_reason(), on_broken)
                return
            try:
                r = await self.client.get(self.base + "/progress", timeout=2.0)
                p = r.json()
            except (httpx.HTTPError, ValueError):
                continue
            self.progress = p
            now = time.monotonic()
            busy = p.get("slots_busy", 0) > 0
            if p.get("progress") != last_progress or not busy:
                last_progress, last_change = p.get("progress", 0), now
            elif now - last_change > self.stall_seconds:
                self.kill()
                self._break(f"no token for {self.stall_seconds:g}s while a request was "
                            "active (an RPC peer froze); killed the head", on_broken)
                return

    def _break(self, why: str, on_broken: Any) -> None:
        if self.broken is None:
            self.broken = why
            self.ready = False
            log.error("split head broken: %s", why)
            on_broken(why)

    def kill(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)

    async def stop(self) -> None:
        self.ready = False
        self.kill()
        self.proc = None
        await self.client.aclose()


if __name__ == "__main__":
    sys.exit(main())
