"""The llama backend's prompt cache in host memory: KV sequences that lost their slot.

A slot keeps the KV of what it last held, so a prompt sharing a prefix with it reads only
the rest. With more conversations than slots, a conversation's slot is soon taken by
someone else, and its next turn would read its whole history again (prefill is the slow
part of a turn on a CPU: ~5 ms a token on a small box). Before a slot's KV is dropped,
its state is copied out here (`llama_state_seq_get_data`: the cells' K and V, a few MB);
a later prompt that extends it further than any free slot does gets it copied back into a
slot (`llama_state_seq_set_data`) and reads only what is new. The bytes are the same, so
the answer is the one the slot would have given.

Bounded by bytes (CORRAL_LLAMA_CACHE_MIB, 0: off), least recently used first out. An entry
whose tokens are a prefix of a newer one's is dropped: the newer one serves it too. Used
on the decode thread only.

A copy is made on the decode thread while every running sequence waits for it, and fresh
memory is what makes it slow: a few MB newly allocated cost 2-20 ms of page faults on a
VM (the copy into memory already touched, ~0.5 ms). So room is made before the copy, and
the buffer of the entry dropped last is kept (one, outside the budget) for the next copy
it fits: once the cache is full, saves reuse memory instead of faulting in new.
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from worker.backends.knobs import env_number

log = logging.getLogger("corral.llama")

#: Host memory for KV states, MiB (llama-server's `--cache-ram` counterpart).
DEFAULT_MIB = 512
#: Fewer tokens than this are not worth a copy: reading them again is as quick.
MIN_TOKENS = 16


def cache_mib() -> int:
    """CORRAL_LLAMA_CACHE_MIB, or DEFAULT_MIB; 0 turns the cache off."""
    return int(env_number("CORRAL_LLAMA_CACHE_MIB", DEFAULT_MIB, int, 0, "MiB"))


@dataclass(eq=False)  # an entry is itself: `in` and `remove` by identity
class Entry:
    tokens: list[int]
    data: Any  # a ctypes uint8 array whose first `size` bytes hold one sequence's state
    size: int
    used: float = field(default_factory=time.monotonic)


class HostCache:
    """KV states of sequences by their tokens, at most `budget` bytes."""

    def __init__(self, ctx: Any, budget: int) -> None:
        self.ctx = ctx
        self.budget = budget
        self.entries: list[Entry] = []
        self.bytes = 0  # of the entries' buffers
        self._spare: Any = None  # the last dropped entry's buffer, for the next save
        self.saves = self.restores = self.restored_tokens = self.failures = 0
        self.reused = 0  # saves into a spare buffer

    def best(self, prompt: list[int], prefix: Any) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `prompt`, and that length."""
        best, best_len = None, 0
        for e in self.entries:
            k = prefix(e.tokens, prompt)
            if k > best_len:
                best, best_len = e, k
        return best, best_len

    def save(self, seq_id: int, tokens: list[int], prefix: Any) -> bool:
        """Copies sequence `seq_id`'s KV (holding `tokens`) in, unless a kept entry
        already covers it. Returns whether it was copied."""
        if len(tokens) < MIN_TOKENS:
            return False
        for e in self.entries:
            if len(e.tokens) >= len(tokens) and prefix(e.tokens, tokens) == len(tokens):
                e.used = time.monotonic()
                return False  # held already (this slot was restored from it, say)
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq_id)
        if not size or size > self.budget:
            return False
        covered = [e for e in self.entries
                   if len(e.tokens) <= len(tokens) and prefix(e.tokens, tokens) == len(e.tokens)]
        freed = sum(len(e.data) for e in covered)
        while self.bytes - freed + size > self.budget:  # room first: its buffer is reused
            self._drop(min((e for e in self.entries if e not in covered),
                           key=lambda e: e.used))
        data = self._buffer(size)
        if llama_cpp.llama_state_seq_get_data(self.ctx, data, size, seq_id) != size:
            self.failures += 1
            self._spare = data
            log.warning("could not copy a KV sequence to the host cache")
            return False
        for e in covered:
            self._drop(e)
        self.entries.append(Entry(list(tokens), data, size))
        self.bytes += len(data)
        self.saves += 1
        return True

    def _buffer(self, size: int) -> Any:
        """The spare buffer if `size` fits it without wasting over half of it, else new."""
        spare, self._spare = self._spare, None
        if spare is not None and size <= len(spare) <= 2 * size:
            self.reused += 1
            return spare
        return (ctypes.c_uint8 * size)()

    def restore(self, entry: Entry, seq_id: int) -> bool:
        """Replaces sequence `seq_id`'s KV with the entry's. False: the sequence is empty."""
        entry.used = time.monotonic()
        mem = llama_cpp.llama_get_memory(self.ctx)
        llama_cpp.llama_memory_seq_rm(mem, seq_id, -1, -1)
        if llama_cpp.llama_state_seq_set_data(self.ctx, entry.data, entry.size, seq_id) == 0:
            self.failures += 1
            log.warning("could not restore a KV sequence from the host cache; reading the "
                        "prompt instead")
            llama_cpp.llama_memory_seq_rm(mem, seq_id, -1, -1)
            self._drop(entry)
            return False
        self.restores += 1
        return True

    def clear(self) -> None:
        """Forgets every entry and the counters (after the load-time calibration)."""
        self.entries.clear()
        self.bytes = 0
        self._spare = None
        self.saves = self.restores = self.restored_tokens = self.failures = self.reused = 0

    def stats(self) -> dict[str, int]:
        return {"host_cache_entries": len(self.entries), "host_cache_bytes": self.bytes,
                "host_cache_saves": self.saves, "host_cache_restores": self.restores,
                "host_cache_restored_tokens": self.restored_tokens,
                "host_cache_failures": self.failures, "host_cache_reused_buffers": self.reused}

    def _drop(self, e: Entry) -> None:
        self.entries.remove(e)
        self.bytes -= len(e.data)
        if self._spare is None or len(e.data) > len(self._spare):
            self._spare = e.data
