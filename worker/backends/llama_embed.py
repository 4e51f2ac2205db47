"""Embeddings from the model the llama backend already holds: a second llama.cpp context.

The context is created with `embeddings=True` on the same `llama_model` (no second copy of
the weights) the first time someone asks, on the decode loop's thread, and every
`llama_decode` on it runs there too, between generation steps (`BatchLoop.call_soon`): one
thread decodes for the whole process, so no two thread pools fight over the cores and no
context is decoded from two threads (which made tokens 2-3x slower, bench/llama_threads.py).

A request's inputs go in few decodes: as many whole inputs per `llama_batch` as fit the
window (one KV sequence each, up to `MAX_SEQS`), then the memory is cleared. While some
sequence is generating, a decode carries only the loop's shared step budget of tokens (at
least one input), so generation's next token waits about as long as for a prefill chunk.

Pooling is the one the GGUF declares (mean, CLS or last). A GGUF that declares none (a chat
model such as the bundled SmolLM2) gets mean pooling, and says so: a log line at load and
`embeddings.pooling_note` in /status. Vectors are L2-normalised, as llama-server's are.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from worker.backends.base import BackendError
from worker.backends.llama_batch import BatchLoop

log = logging.getLogger("corral.llama")

#: Tokens one embedding context holds: the longest input, and a batch's total. llama.cpp
#: sizes its compute buffer by it (the output head's logits: n_vocab floats per token,
#: ~100 MB at 512 tokens for a 49k vocabulary), so it is not the generation context's size.
EMBED_WINDOW = 512
#: Inputs (KV sequences) in one decode.
MAX_SEQS = 64

POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}


def declared_pooling(model: Any) -> int | None:
    """The pooling type the GGUF declares (`<arch>.pooling_type`), None if it declares none."""
    buf = ctypes.create_string_buffer(128)
    if llama_cpp.llama_model_meta_val_str(model, b"general.architecture", buf, len(buf)) < 0:
        return None
    key = buf.value + b".pooling_type"
    if llama_cpp.llama_model_meta_val_str(model, key, buf, len(buf)) < 0:
        return None
    try:
        return int(buf.value)
    except ValueError:
        return None


@dataclass
class EmbedJob:
    """One request's inputs; the future gets one normalised float32 vector per input."""

    inputs: list[list[int]]
    future: concurrent.futures.Future[list[np.ndarray]] = field(
        default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    vectors: list[np.ndarray] = field(default_factory=list)
    decodes: int = 0


class Embedder:
    """The embedding context beside the generation one; everything runs on `loop`'s thread."""

    def __init__(self, model: Any, loop: BatchLoop, threads: int, window: int) -> None:
        self.model = model
        self.loop = loop
        self.threads = threads
        self.window = window
        self.n_embd = llama_cpp.llama_model_n_embd(model)
        declared = declared_pooling(model)
        self.pooling = declared if declared in (1, 2, 3, 4) else 1
        self.note: str | None = None
        if declared not in (1, 2, 3, 4):
            self.note = ("the GGUF declares no pooling type (a chat model): embeddings use "
                         "mean pooling over the tokens, L2-normalised")
            log.warning("llama: %s", self.note)
        self._ctx: Any = None
        self._mem: Any = None
        self._batch: Any = None
        self._broken: str | None = None
        # Counted on the loop's thread; read by /status (ints: a torn read is impossible).
        self.stats = {"requests": 0, "inputs": 0, "decodes": 0}

    @property
    def available(self) -> bool:
        """False for a reranker GGUF (rank pooling gives a score, not a vector)."""
        return self.pooling != 4 and self._broken is None

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pooling": POOLING[self.pooling], "dimensions": self.n_embd,
                               "window": self.window, "normalized": "l2",
                               "context": "open" if self._ctx else "on first use",
                               **self.stats}
        if self.note:
            out["pooling_note"] = self.note
        if self._broken:
            out["error"] = self._broken
        return out

    def submit(self, job: EmbedJob) -> None:
        self.loop.call_soon(lambda error: self._step(job, error))

    def close(self) -> None:
        """Frees the context; call after the loop has stopped."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    # ------------------------------------------------------------------ loop thread
    def _open(self) -> None:
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = self.window  # a sequence never spans ubatches
        cp.n_seq_max = min(MAX_SEQS, self.window)
        cp.kv_unified = True  # the batch's inputs share the window's cells
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.embeddings = True
        cp.pooling_type = self.pooling
        cp.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not ctx:
            self._broken = "llama.cpp could not create the embedding context"
            raise BackendError(self._broken)
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(self.window, 0, 1)
        self.n_seq_max = llama_cpp.llama_n_seq_max(ctx)

    def _step(self, job: EmbedJob, error: str | None) -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(BackendError(error))
            return
        if job.cancelled.is_set():
            job.future.cancel()
            return
        try:
            if self._ctx is None:
                self._open()
            self._decode_some(job)
        except Exception as exc:
            job.future.set_exception(exc if isinstance(exc, BackendError)
                                     else BackendError(f"embedding failed: {exc}"))
            return
        if len(job.vectors) < len(job.inputs):
            self.submit(job)  # the rest after the next generation step
        else:
            self.stats["requests"] += 1
            job.future.set_result(job.vectors)

    def _decode_some(self, job: EmbedJob) -> None:
        budget = self.window
        if self.loop.generating():
            budget = min(budget, self.loop.shared_budget())
        start, total = len(job.vectors), 0
        end = start
        while end < len(job.inputs) and end - start < self.n_seq_max:
            n = len(job.inputs[end])
            if end > start and total + n > budget:
                break
            total += n
            end += 1
        b = self._batch
        i = 0
        for s, tokens in enumerate(job.inputs[start:end]):
            for pos, t in enumerate(tokens):
                b.token[i] = t
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = s
                b.logits[i] = True  # pooled embeddings need every token as an output
                i += 1
        b.n_tokens = i
        rc = llama_cpp.llama_decode(self._ctx, b)
        job.decodes += 1
        self.stats["decodes"] += 1
        self.stats["inputs"] += end - start
        try:
            if rc != 0:
                raise BackendError(f"llama_decode returned {rc} for an embedding batch")
            for s in range(end - start):
                ptr = llama_cpp.llama_get_embeddings_seq(self._ctx, s)
                if not ptr:
                    raise BackendError("llama.cpp returned no embedding for an input")
                v = np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).astype(np.float32)
                norm = float(np.linalg.norm(v))
                job.vectors.append(v / norm if norm > 0 else v)
        finally:
            llama_cpp.llama_memory_clear(self._mem, True)
