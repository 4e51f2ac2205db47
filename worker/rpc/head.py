"""A split head: the model loaded with RPC shards as devices, in a child process.

A lost RPC peer aborts the process that holds the model (SIGABRT, uncatchable) and a frozen
one hangs it forever, so the head never runs inside the worker: the worker starts
`python -m worker.rpc.head` (this module, the child's entry point), which probes every
shard (HELLO with a timeout), registers them, loads the GGUF with layers offloaded to them
and serves the ordinary worker API on a loopback port. The worker relays `/v1/*` to it
(`worker.rpc.relay`) and supervises it with `worker.rpc.supervisor.HeadProcess`. Nothing in
the worker imports this module: it imports the worker app (to serve), so the dependency
points one way (head → app → control_api → control → supervisor).

Layers: the head keeps the first `round(n_layer x tensor_split[0])` layers on its own CPU;
the rest and the output layer go to the shards, shared in proportion to the remaining
`tensor_split` entries (llama.cpp's n_gpu_layers counts the output layer as one more).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from worker.rpc.shard import die_with_parent
from worker.rpc.supervisor import EXIT_PROBE_FAILED

PROBE_SECONDS = 30.0


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
                "prefill_tokens_per_second": round(e.stats.prefill_tokens_per_second, 2),
                "n_ctx": backend.n_ctx, "capabilities": backend.capabilities(),
                "offload": {"n_gpu_layers": gpu_layers,
                                                    "tensor_split": shard_split}}

    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
