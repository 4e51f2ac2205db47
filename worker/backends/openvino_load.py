"""Loading the OpenVINO pipeline: its CPU properties, the IR cache, the load-time calibration.

Kept apart from the decode loop (openvino_loop.py): all of it runs once, on the loading thread,
before the decode thread owns the pipeline.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ovg

from worker.backends.knobs import cache_home

log = logging.getLogger("corral.worker.openvino")


def cache_root() -> Path:
    return cache_home() / "openvino"


def properties(device: str, compiled_cache: Path | None, batch_invariant: bool,
                threads: int | None = None) -> dict[str, Any]:
    props: dict[str, Any] = {}
    if device == "CPU" and threads:
        # The worker's share of the host's cores. Fixed at load: OpenVINO cannot re-size a
        # compiled model's CPU streams, so a worker coming or going later changes nothing.
        props["INFERENCE_NUM_THREADS"] = int(threads)
    if device == "CPU" and batch_invariant:
        # Greedy text the same alone or batched (the gateway's failover continuation relies
        # on it) needs three CPU plugin defaults changed, each measured on an AMD EPYC with
        # AVX-512 (bench/openvino_invariance.py): bf16 inference, the default wherever the CPU
        # has AVX512_BF16 or AMX, rounds differently by batch shape; dynamic quantization of
        # activations quantizes a whole step's rows together; and the u8 KV cache quantizes
        # per block, so what a sequence reads back depends on what shared its steps. f32
        # compute and an f16 KV cache are the same on AVX2 and AVX-512 hosts.
        # CORRAL_OPENVINO_BATCH_INVARIANT=0 trades this for throughput.
        props["INFERENCE_PRECISION_HINT"] = "f32"
        props["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
        props["KV_CACHE_PRECISION"] = "f16"
    if compiled_cache is not None:
        props["CACHE_DIR"] = str(compiled_cache)
    return props


def open_pipeline(src: Path, sc: Any, device: str,
                  props: Callable[[Path | None], dict[str, Any]],
                  cache_dir: Path) -> tuple[Any, str]:
    """The pipeline and where it came from: the cached IR when there is one, else the GGUF
    (saving its IR to `cache_dir` for the next load)."""
    if src.suffix != ".gguf":  # an OpenVINO IR directory: load as it is
        return ovg.ContinuousBatchingPipeline(str(src), sc, device, props(None)), "ir"
    try:
        st = src.stat()
        key = hashlib.sha256(
            f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}:{ovg.get_version()}".encode()
        ).hexdigest()[:16]
        ready = cache_dir / key
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("openvino: no model cache (%s); converting the GGUF every load", exc)
        return ovg.ContinuousBatchingPipeline(str(src), sc, device, props(None)), "gguf"
    compiled = cache_dir / "compiled"
    if (ready / "openvino_model.xml").is_file() and (ready / "openvino_model.bin").is_file():
        try:
            tok = ovg.Tokenizer(str(src), CACHE_DIR=str(compiled))
            pipe = ovg.ContinuousBatchingPipeline(
                str(ready), tok, sc, device, **props(compiled)
            )
            return pipe, f"cached IR {ready}"
        except RuntimeError as exc:  # a damaged cache: convert again
            log.warning("openvino: cached IR at %s failed (%s); reconverting", ready, exc)
            shutil.rmtree(ready, ignore_errors=True)
    # OpenVINO writes the IR next to the GGUF it reads: read it through a link in a
    # private directory, then publish the directory with one rename (workers may race).
    work = cache_dir / f".{key}.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    link = work / "model.gguf"
    link.symlink_to(src.resolve())
    try:
        saving = {**props(compiled), "enable_save_ov_model": True}
        pipe = ovg.ContinuousBatchingPipeline(str(link), sc, device, saving)
    except Exception:
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        link.unlink()
        work.rename(ready)
        return pipe, f"gguf (IR saved to {ready})"
    except OSError:
        shutil.rmtree(work, ignore_errors=True)  # another worker published it first
        return pipe, "gguf"


def calibrate_decode(pipe: Any, prompt: list[int], tokens: int) -> float:
    """Single-stream greedy decode speed: run twice (the first warms the kernels), the
    second one timed from its first token."""
    ids = ov.Tensor(np.asarray([prompt], dtype=np.int64))
    cfg = ovg.GenerationConfig()
    cfg.max_new_tokens = tokens
    cfg.do_sample = False
    cfg.ignore_eos = True
    rate = 0.0
    for rid in (1 << 62, (1 << 62) + 1):
        handle = pipe.add_request(rid, ids, cfg)
        got, first, first_n = 0, 0.0, 0
        while pipe.has_non_finished_requests():
            pipe.step()
            if handle.can_read():
                for out in handle.read().values():
                    got += len(out.generated_ids)
                if not first_n and got:
                    first, first_n = time.perf_counter(), got
        if first_n and got > first_n:
            rate = (got - first_n) / max(time.perf_counter() - first, 1e-6)
    return round(rate, 2)


def calibrate_prefill(pipe: Any, prompt: list[int]) -> float:
    """Prompt tokens per second: one long prompt, new to the prefix cache, read to its
    first token."""
    ids = ov.Tensor(np.asarray([prompt], dtype=np.int64))
    cfg = ovg.GenerationConfig()
    cfg.max_new_tokens = 1
    cfg.do_sample = False
    cfg.ignore_eos = True
    sent = time.perf_counter()
    handle = pipe.add_request((1 << 62) + 2, ids, cfg)
    first = 0.0
    while pipe.has_non_finished_requests():
        pipe.step()
        if handle.can_read() and any(o.generated_ids for o in handle.read().values()):
            first = first or time.perf_counter()
    return round(len(prompt) / (first - sent), 2) if first > sent else 0.0
