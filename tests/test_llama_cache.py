"""The host-memory prompt cache's bookkeeping (worker/backends/llama_cache.py): its byte
budget, least-recently-used eviction, and entries that a longer one covers.

llama.cpp's state copy is stood in for by a fake of the two calls the cache makes (a state
of 10 bytes a token), so these run without a model; the real copy and restore are tested
end to end in test_worker_llama.py.
"""

from __future__ import annotations

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from worker.backends import llama_cache  # noqa: E402
from worker.backends.llama_cache import HostCache, cache_mib  # noqa: E402
from worker.backends.llama_slots import common_prefix  # noqa: E402

PER_TOKEN = 10


@pytest.fixture
def held(monkeypatch) -> dict[int, list[int]]:
    """What each fake KV sequence holds; its state's size follows its length."""
    seqs: dict[int, list[int]] = {}
    monkeypatch.setattr(llama_cache.llama_cpp, "llama_state_seq_get_size",
                        lambda _ctx, seq: PER_TOKEN * len(seqs.get(seq, [])))
    monkeypatch.setattr(llama_cache.llama_cpp, "llama_state_seq_get_data",
                        lambda _ctx, _dst, size, _seq: size)
    return seqs


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_the_budget_evicts_the_least_recently_used(held):
    cache = HostCache(None, budget=3 * 40 * PER_TOKEN)  # three 40-token states
    for i in range(3):
        held[i] = toks(1000 * i, 40)
        assert cache.save(i, held[i], common_prefix)
    entry, n = cache.best(held[0] + [7], common_prefix)  # touches nothing: best() only finds
    assert n == 40 and entry is not None
    entry.used += 1e6  # as a restore would: the first is now the most recently used
    held[3] = toks(3000, 40)
    assert cache.save(3, held[3], common_prefix)
    kept = [e.tokens[0] for e in cache.entries]
    assert kept == [0, 2000, 3000]  # the second one, least recently used, went
    assert cache.bytes == 3 * 40 * PER_TOKEN <= cache.budget


def test_a_longer_state_replaces_the_ones_it_covers(held):
    cache = HostCache(None, budget=1 << 20)
    turn1 = toks(0, 30)
    held[0] = turn1
    assert cache.save(0, turn1, common_prefix)
    turn2 = turn1 + toks(500, 30)
    held[1] = turn2
    assert cache.save(1, turn2, common_prefix)
    assert [len(e.tokens) for e in cache.entries] == [60]  # turn 1 is inside turn 2
    assert cache.bytes == 60 * PER_TOKEN
    assert not cache.save(0, turn1, common_prefix)  # covered: no second copy
    assert cache.saves == 2


def test_a_full_cache_copies_into_the_buffer_it_just_freed(held):
    """Fresh memory is the slow part of a copy (page faults, while every sequence waits):
    once full, the cache makes room first and copies into the evicted entry's buffer."""
    cache = HostCache(None, budget=2 * 40 * PER_TOKEN)
    for i in range(2):
        held[i] = toks(1000 * i, 40)
        assert cache.save(i, held[i], common_prefix)
    oldest = cache.entries[0].data
    held[2] = toks(2000, 36)  # a little smaller: fits the freed buffer
    assert cache.save(2, held[2], common_prefix)
    assert [e.tokens[0] for e in cache.entries] == [1000, 2000]
    assert cache.entries[-1].data is oldest and cache.entries[-1].size == 36 * PER_TOKEN
    assert cache.bytes == 2 * 40 * PER_TOKEN <= cache.budget  # the buffers, as they are
    assert cache.stats()["host_cache_reused_buffers"] == 1
    held[3] = toks(3000, llama_cache.MIN_TOKENS + 1)  # under half the next spare: new
    assert cache.save(3, held[3], common_prefix)
    assert len(cache.entries[-1].data) == (llama_cache.MIN_TOKENS + 1) * PER_TOKEN
    assert cache.reused == 1 and cache.bytes <= cache.budget


def test_short_or_oversized_states_are_not_kept(held):
    cache = HostCache(None, budget=50 * PER_TOKEN)
    held[0] = toks(0, llama_cache.MIN_TOKENS - 1)
    assert not cache.save(0, held[0], common_prefix)
    held[1] = toks(0, 60)  # bigger than the whole budget
    assert not cache.save(1, held[1], common_prefix)
    assert cache.entries == [] and cache.bytes == 0


def test_the_budget_is_a_knob(monkeypatch):
    monkeypatch.delenv("CORRAL_LLAMA_CACHE_MIB", raising=False)
    assert cache_mib() == llama_cache.DEFAULT_MIB
    monkeypatch.setenv("CORRAL_LLAMA_CACHE_MIB", "0")
    assert cache_mib() == 0
    monkeypatch.setenv("CORRAL_LLAMA_CACHE_MIB", "plenty")
    with pytest.raises(ValueError, match="CORRAL_LLAMA_CACHE_MIB"):
        cache_mib()
