"""Log-probabilities from a llama.cpp logits row, for the sequences that ask for them.

What is reported is the model's own distribution: a log-softmax of the raw logits, before
penalties, logit processors, temperature and top-k/top-p/min-p truncation. That is what
OpenAI reports, and what makes `logprobs` comparable across sampling settings; with greedy
decoding and no penalties the chosen token is therefore the top one. The row is read only
for sequences that asked (others pay nothing); one pass over the vocabulary per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from worker.backends.base import TokenLogprob


def logprob_entry(row: Any, token: int, piece: bytes, top: int,
                  piece_of: Callable[[int], bytes]) -> TokenLogprob:
    """`row`: the float32 logits of one batch position (a view into llama.cpp's buffer)."""
    peak = float(row.max())
    lse = peak + float(np.log(np.exp(row - peak, dtype=np.float32).sum(dtype=np.float64)))
    alts: tuple[tuple[bytes, float], ...] = ()
    if top > 0:
        k = min(top, row.shape[0])
        ids = np.argpartition(row, -k)[-k:]
        ids = ids[np.argsort(-row[ids], kind="stable")]
        alts = tuple((piece_of(int(i)), float(row[i]) - lse) for i in ids)
    return TokenLogprob(piece, float(row[token]) - lse, alts)
