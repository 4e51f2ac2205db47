"""llama.cpp's short calls, bound so that they keep the GIL.

ctypes lets go of the GIL around every foreign call. Between two `llama_decode`s the
decode thread makes a few short calls per sequence (a logits row, an end-of-generation
check, a KV trim: microseconds; a sampled request's sampler chain: ~0.1-0.3 ms); each
let-go can hand the GIL to the event loop, and the step then waits until the event loop
gives it back. Bound through `ctypes.PyDLL`, these calls keep it, so the gap between two
steps is one stretch of Python. `llama_decode` and the other long calls (KV copies to the
host cache, the grammar sampler) still release it, and the event loop runs beside them.
With layers on other devices (an RPC split) the loop calls `llama_synchronize` (letting
go) after each decode, so no call here waits for a step still computing (an RPC split's is
asynchronous: reading its logits would otherwise hold the GIL for the whole step, or
forever on a frozen peer); on the CPU alone a decode has ended when it returns.
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp
import numpy as np

_LIB = ctypes.PyDLL(llama_cpp.llama_cpp._lib._name)


def _bind(name: str) -> Any:
    """`name` from libllama with llama-cpp-python's signature, called holding the GIL."""
    slow = getattr(llama_cpp, name)
    fast = getattr(_LIB, name)
    fast.argtypes, fast.restype = slow.argtypes, slow.restype
    return fast


vocab_is_eog = _bind("llama_vocab_is_eog")
memory_seq_rm = _bind("llama_memory_seq_rm")
memory_seq_cp = _bind("llama_memory_seq_cp")
sampler_sample = _bind("llama_sampler_sample")
sampler_free = _bind("llama_sampler_free")
token_to_piece = _bind("llama_token_to_piece")


_logits_at = _bind("llama_get_logits_ith")
_logits_at.restype = ctypes.c_void_p  # the row's address as an int, for LogitsRows


class LogitsRows:
    """numpy views of a context's logits rows, made once per row address.

    `np.ctypeslib.as_array` on the pointer `llama_get_logits_ith` returns costs ~50 us a call in
    the decode loop (a new ctypes array type and a buffer-protocol parse each time): a
    sixth of a greedy step's Python. A row's address repeats from step to step while
    llama.cpp keeps its output buffer, so its view is made once. Only an address just
    returned is ever looked up, and that address holds `n_vocab` floats now, so a view
    kept from a buffer since freed is never read unless the new buffer reuses its place."""

    def __init__(self, n_vocab: int) -> None:
        self._row = ctypes.c_float * n_vocab
        self._views: dict[int, np.ndarray] = {}

    def get(self, ctx: Any, i: int) -> np.ndarray:
        addr = _logits_at(ctx, i)
        if not addr:
            raise RuntimeError(f"llama.cpp has no logits for batch row {i}")
        view = self._views.get(addr)
        if view is None:
            if len(self._views) >= 4096:  # output buffers come and go: never grow unbounded
                self._views.clear()
            view = self._views[addr] = np.frombuffer(self._row.from_address(addr),
                                                     dtype=np.float32)
        return view
