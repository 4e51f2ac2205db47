"""What the OpenVINO backend asks of OpenVINO GenAI: the pipeline's scheduler and each
request's GenerationConfig, and the 400s for what it cannot honour.

What OpenVINO cannot do the way the OpenAI API means it is refused with a 400 in
`validate()` before a request starts, never silently ignored:

* `presence_penalty` / `frequency_penalty`: OpenVINO moves a logit *towards zero* (it adds
  the penalty to negative logits, making those tokens more likely), not down as OpenAI does.
* `min_p` of 1.0 or more while sampling (OpenVINO accepts [0, 1)).

`repeat_penalty` is honoured with the usual divide/multiply rule; OpenVINO applies it to
every prompt and generated token (llama.cpp: the last 64 tokens).
"""

from __future__ import annotations

import random

import openvino_genai as ovg

from wire.errors import bad_request
from worker.backends.base import SamplingParams, Sequence

#: Prompt tokens one `step()` may prefill (split-fuse chunk); bounds one step's latency.
MAX_BATCHED_TOKENS = 256
_SEED_MASK = (1 << 64) - 1


def scheduler_config(slots: int, n_ctx: int) -> ovg.SchedulerConfig:
    """Continuous batching of `slots` sequences, with prefix caching and split-fuse prefill."""
    sc = ovg.SchedulerConfig()
    sc.enable_prefix_caching = True
    sc.max_num_seqs = slots
    sc.max_num_batched_tokens = MAX_BATCHED_TOKENS
    sc.dynamic_split_fuse = True
    sc.cache_size = kv_cache_gb(slots, n_ctx)
    return sc


def kv_cache_gb(slots: int, n_ctx: int) -> int:
    """KV blocks for every slot's full context, with room left for cached prefixes. The
    pipeline preempts (never fails) when it runs short, so this is a performance knob."""
    need = slots * n_ctx
    return max(1, min(8, (need + 32767) // 32768))


def validate(params: SamplingParams) -> None:
    """Refuses (400) the sampling parameters OpenVINO would not honour as OpenAI means them."""
    if params.presence_penalty or params.frequency_penalty:
        raise bad_request(
            "presence_penalty and frequency_penalty are not supported by the openvino "
            "backend (its penalties differ from OpenAI's); use repeat_penalty or the "
            "llama backend",
            param="presence_penalty" if params.presence_penalty else "frequency_penalty",
            code="unsupported_parameter",
        )
    if not params.greedy and params.min_p >= 1.0:
        raise bad_request(
            "min_p must be below 1.0 on the openvino backend", param="min_p",
            code="unsupported_parameter",
        )


def generation_config(seq: Sequence, eos: int, stop_ids: set[int]) -> ovg.GenerationConfig:
    """The sequence's sampling as OpenVINO takes it; validated again for a sequence that
    reached `submit` without the API's check (the decode thread reports the error)."""
    p = seq.params
    validate(p)
    cfg = ovg.GenerationConfig()
    cfg.max_new_tokens = max(1, int(seq.max_tokens))
    if eos >= 0:
        cfg.eos_token_id = eos
    cfg.stop_token_ids = set(stop_ids)
    cfg.repetition_penalty = float(p.repeat_penalty)
    n = 1 + len(seq.forks)
    if seq.logprobs is not None:
        cfg.logprobs = 1  # the chosen token's, of the model's own distribution
    if p.greedy and n > 1:
        # n greedy choices: OpenVINO forks only when sampling; top-1 sampling is greedy.
        cfg.do_sample = True
        cfg.top_k = 1
        cfg.num_return_sequences = n
        cfg.rng_seed = 0
    elif p.greedy:
        cfg.do_sample = False
    else:
        cfg.num_return_sequences = n
        cfg.do_sample = True
        cfg.temperature = float(p.temperature)
        cfg.top_p = float(p.top_p)
        if p.top_k > 0:
            cfg.top_k = int(p.top_k)
        cfg.min_p = float(p.min_p)
        seed = random.getrandbits(63) if p.seed is None else p.seed & _SEED_MASK
        cfg.rng_seed = seed
    if seq.constraint is not None:
        cfg.structured_output_config = seq.constraint
    cfg.validate()
    return cfg
