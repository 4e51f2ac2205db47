"""Memory a model needs on one box (`estimate`), from the GGUF's metadata and tensor table.

  weights  = the bytes of its tensors;
  kv_cache = n_layer x n_ctx x n_head_kv x (key_length + value_length) x 2 bytes (f16) x slots;
  compute  = llama.cpp's compute buffer: 4 bytes x n_ubatch x (n_vocab + n_embd + n_ff) (the
             logits of one micro-batch dominate; measured 99.4 MiB for SmolLM2-135M at
             n_ubatch 512, this gives 100.1 MiB);
  runtime  = one worker process (Python, llama.cpp, the HTTP stack), measured: 80 MiB RSS.

The planner (`gateway.placement`) packs models by these totals. The placer asks every
round, so `estimate` is cached by the file's size and mtime: a header is read again only
when its file changes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from worker import gguf_meta

RUNTIME_BYTES = 80 << 20
KV_BYTES_PER_ELEMENT = 2  # f16 K and V, llama.cpp's default cache type
N_UBATCH = 512


@dataclass(frozen=True)
class MemoryNeed:
    weights: int
    kv_cache: int
    compute: int
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.runtime

    def to_json(self) -> dict[str, int]:
        return {"weights": self.weights, "kv_cache": self.kv_cache, "compute": self.compute,
                "runtime": self.runtime, "total": self.total}


def _per_layer_max(v: Any, default: int) -> int:
    if v is None:
        return default
    if isinstance(v, list):
        return max((int(x) for x in v), default=default)
    return int(v)


def estimate(path: str | os.PathLike[str], n_ctx: int = 2048, slots: int = 1,
             n_ubatch: int = N_UBATCH) -> MemoryNeed:
    st = os.stat(path)
    return _estimate(os.fspath(path), st.st_size, st.st_mtime_ns, n_ctx, slots, n_ubatch)


@functools.lru_cache(maxsize=64)
def _estimate(path: str, _size: int, _mtime: int, n_ctx: int, slots: int,
              n_ubatch: int) -> MemoryNeed:
    g = gguf_meta.read(path)
    n_layer = int(g.arch_get("block_count", 0))
    n_embd = int(g.arch_get("embedding_length", 0))
    n_head = _per_layer_max(g.arch_get("attention.head_count"), 1) or 1
    n_head_kv = _per_layer_max(g.arch_get("attention.head_count_kv"), n_head)
    head_dim = n_embd // n_head if n_head else 0
    k_len = int(g.arch_get("attention.key_length", head_dim))
    v_len = int(g.arch_get("attention.value_length", head_dim))
    n_ff = _per_layer_max(g.arch_get("feed_forward_length"), 4 * n_embd)
    n_vocab = g.arch_get("vocab_size")
    if n_vocab is None:
        n_vocab = len(g.get("tokenizer.ggml.tokens", ()))
    n_train = int(g.arch_get("context_length", 0) or 0)
    per_seq = min(n_ctx, n_train) if n_train > 0 else n_ctx
    weights = g.tensor_bytes
    kv = n_layer * per_seq * n_head_kv * (k_len + v_len) * KV_BYTES_PER_ELEMENT * slots
    compute = 4 * n_ubatch * (int(n_vocab) + n_embd + n_ff)
    return MemoryNeed(weights, kv, compute)
