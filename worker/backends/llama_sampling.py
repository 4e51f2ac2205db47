"""Per-sequence sampler chains and incremental detokenization for the llama.cpp backend."""

from __future__ import annotations

import codecs
from typing import Any

import llama_cpp

from worker.backends.base import SamplingParams

_RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp picks a random seed


def sampler_chain(params: SamplingParams, n_vocab: int, penalty_window: int) -> Any:
    """A llama_sampler chain for one sequence; free it with `llama_sampler_free`.

    Penalties (presence, frequency, repeat) see the tokens this sequence generates, over
    the last `penalty_window` of them; the prompt is not penalised (vLLM's semantics for
    presence and frequency). Temperature 0 is greedy.
    """
    cp = llama_cpp.llama_sampler_chain_default_params()
    cp.no_perf = True
    chain = llama_cpp.llama_sampler_chain_init(cp)

    def add(sampler: Any) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    if params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
        add(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab,
                max(1, penalty_window),
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        )
    if params.greedy:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(params.temperature))
    add(llama_cpp.llama_sampler_init_dist(seed_of(params.seed)))
    return chain


def seed_of(seed: int | None) -> int:
    if seed is None:
        return _RANDOM_SEED
    s = seed & 0xFFFFFFFF
    return s - 1 if s == _RANDOM_SEED else s  # never the "random" sentinel


class Detokenizer:
    """Token bytes in, complete UTF-8 text out; incomplete characters are held back."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending_tokens = 0  # tokens whose bytes have not come out as text yet

    def push(self, piece: bytes) -> str:
        self.pending_tokens += 1
        return self._dec.decode(piece)

    def take(self) -> int:
        n, self.pending_tokens = self.pending_tokens, 0
        return n

    def flush(self) -> str:
        """At the end: drop an incomplete trailing character rather than emit half of it."""
        self._dec.reset()
        return ""
