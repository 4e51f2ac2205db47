"""llama.cpp's short calls, bound so that they keep the GIL.

ctypes lets go of the GIL around every foreign call. Between two `llama_decode`s the
decode thread makes a few short calls per sequence (a logits row, an end-of-generation
check, a KV trim: microseconds; a sampled request's sampler chain: ~0.1-0.3 ms); each
let-go can hand the GIL to the event loop, and the step then waits until the event loop
gives it back. Bound through `ctypes.PyDLL`, these calls keep it, so the gap between two
steps is one stretch of Python. `llama_decode` and the other long calls (KV copies to the
host cache, the grammar sampler) still release it, and the event loop runs beside them.
The loop calls `llama_synchronize` (letting go) after each decode, so no call here waits
for a step still computing (an RPC split's is asynchronous: reading its logits would
otherwise hold the GIL for the whole step, or forever on a frozen peer).
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp

_LIB = ctypes.PyDLL(llama_cpp.llama_cpp._lib._name)


def _bind(name: str) -> Any:
    """`name` from libllama with llama-cpp-python's signature, called holding the GIL."""
    slow = getattr(llama_cpp, name)
    fast = getattr(_LIB, name)
    fast.argtypes, fast.restype = slow.argtypes, slow.restype
    return fast


get_logits_ith = _bind("llama_get_logits_ith")
vocab_is_eog = _bind("llama_vocab_is_eog")
memory_seq_rm = _bind("llama_memory_seq_rm")
memory_seq_cp = _bind("llama_memory_seq_cp")
sampler_sample = _bind("llama_sampler_sample")
sampler_free = _bind("llama_sampler_free")
token_to_piece = _bind("llama_token_to_piece")
