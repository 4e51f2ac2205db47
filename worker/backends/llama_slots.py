"""Slots of the llama.cpp backend's batch loop, the runs in them, and who gets which.

Each slot remembers which tokens its KV sequence holds. A new request takes the free slot
whose tokens share the longest prefix with its prompt, drops the rest of that KV, and
prefills only the remainder (at least the last prompt token, to get logits). What a slot
drops goes to the host-memory prompt cache first (`llama_cache.py`), and a prompt that an
entry there covers further than any free slot gets that entry copied into a slot.

`SlotAdmission` is a part of `llama_batch.BatchLoop`, on its thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from worker.backends import llama_quick as quick
from worker.backends.base import Sequence
from worker.backends.llama_cache import MIN_TOKENS, HostCache
from worker.backends.llama_history import History
from worker.backends.llama_lookup import Lookup
from worker.backends.llama_sampling import Detokenizer, sampler_chain

log = logging.getLogger("corral.llama")


@dataclass
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what this KV sequence holds
    run: Run | None = None
    last_used: float = 0.0


@dataclass
class Run:
    """A sequence occupying a slot."""

    seq: Sequence
    slot: Slot
    sampler: Any
    detok: Detokenizer = field(default_factory=Detokenizer)
    generated: int = 0
    next_token: int | None = None  # sampled, to be decoded in the next step
    out: int = -1  # index of this run's logits in the current batch, -1 if none
    chunk: int = 0  # prompt tokens this run adds in the current batch
    grammar: Any = None  # llama_grammar.GrammarSampler of a constrained sequence
    # n > 1: a fork waits (decodes nothing) until its parent has evaluated the prompt,
    # then gets a copy of the parent's KV sequence and samples from the same logits.
    waiting: bool = False
    forks: list[Run] = field(default_factory=list)
    lookup: Lookup | None = None  # unconstrained, single choice: prompt-lookup drafts
    argmax: bool = False  # greedy, unconstrained, no penalties: the top logit, read directly
    draft: list[int] = field(default_factory=list)  # decoded after next_token this step

    @property
    def prefilling(self) -> bool:
        return self.next_token is None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    # Compare in strides first: cheap on long shared histories.
    step = 64
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotAdmission:
    """Admission and departure: the part of the batch loop that moves runs in and out."""

    mem: Any
    n_vocab: int
    n_ctx_seq: int
    lookup: int
    host: HostCache | None
    history: History | None
    slots: list[Slot]
    stats: dict[str, int]
    _waiting: deque[Sequence]

    def _reap_cancelled(self) -> None:
        if self._waiting:
            keep = deque(s for s in self._waiting if not s.cancelled.is_set())
            for s in self._waiting:
                if s.cancelled.is_set():
                    _finish_once(s, "stop", None)
            self._waiting = keep
        for slot in self.slots:
            if slot.run is not None and slot.run.seq.cancelled.is_set():
                self._leave(slot.run, "stop", None)

    def _admit(self) -> None:
        while self._waiting:
            free = [s for s in self.slots if s.run is None]
            if not free:
                return
            if len(free) < 1 + len(self._waiting[0].forks):
                return  # n choices start together; the engine frees the slots they need
            seq = self._waiting.popleft()
            prompt = seq.prompt
            best, best_len = None, 0
            for s in free:
                k = common_prefix(s.tokens, prompt)
                if k > best_len:
                    best, best_len = s, k
            empty = [s for s in free if not s.tokens]
            if (self.host is None and best is not None and empty
                    and best_len * 2 < len(best.tokens)):
                best = None  # reusing a sliver would throw away most of a warm cache
            if best is None:  # no reuse: take an empty slot, else the least recently used
                best = min(free, key=lambda s: (bool(s.tokens), s.last_used))
                best_len = common_prefix(best.tokens, prompt)
            restored = False
            if self.host is not None:
                best, best_len, restored = self._from_host(prompt, free, best, best_len)
            keep = min(best_len, len(prompt) - 1)
            if restored and self.host is not None:
                self.host.restored_tokens += keep
            run = self._start(seq, best, keep)
            others = sorted((s for s in free if s is not best),
                            key=lambda s: (bool(s.tokens), s.last_used))
            for fork, slot in zip(seq.forks, others, strict=False):
                if run is None:  # the parent could not start: neither can its forks
                    _finish_once(fork, "error", "the request could not start")
                    continue
                child = self._start(fork, slot, 0)
                if child is not None:
                    child.waiting = True
                    run.forks.append(child)

    def _from_host(self, prompt: list[int], free: list[Slot], best: Slot, best_len: int
                   ) -> tuple[Slot, int, bool]:
        """A host-cache entry sharing more of `prompt` than the best free slot, copied into
        the emptiest free slot (whose own KV is kept in the cache first)."""
        assert self.host is not None
        entry, n = self.host.best(prompt, common_prefix)
        if entry is None or n < best_len + MIN_TOKENS:
            return best, best_len, False
        target = min(free, key=lambda s: (bool(s.tokens), s.last_used))
        self._keep_in_host(target, 0)
        target.tokens.clear()
        if not self.host.restore(entry, target.seq_id):
            return (target, 0, False) if target is best else (best, best_len, False)
        target.tokens = list(entry.tokens)
        return target, n, True

    def _keep_in_host(self, slot: Slot, keep: int) -> None:
        """Copies a slot's KV to the host cache before all but `keep` of it is dropped."""
        if self.host is not None and len(slot.tokens) - keep >= MIN_TOKENS:
            self.host.save(slot.seq_id, slot.tokens, common_prefix)

    def _start(self, seq: Sequence, slot: Slot, keep: int) -> Run | None:
        if not seq.prompt or len(seq.prompt) > self.n_ctx_seq:
            _finish_once(seq, "error", "the prompt does not fit this model's context")
            return None
        self._keep_in_host(slot, keep)
        if keep < len(slot.tokens) and not quick.memory_seq_rm(
            self.mem, slot.seq_id, keep, -1
        ):
            quick.memory_seq_rm(self.mem, slot.seq_id, -1, -1)
            keep = 0
        del slot.tokens[keep:]
        seq.cached_tokens = keep
        if keep:
            self.stats["prompt_cache_hits"] += 1
            self.stats["prompt_cache_reused_tokens"] += keep
        params = seq.params
        if seq.index and params.seed is not None:  # choice i of a seeded request: seed + i
            params = dataclasses.replace(params, seed=params.seed + seq.index)
        try:
            sampler = sampler_chain(params, self.n_vocab, self.n_ctx_seq)
        except Exception as exc:  # a broken sampler must not take the loop down
            _finish_once(seq, "error", f"sampler setup failed: {exc}")
            return None
        slot.run = Run(seq, slot, sampler, grammar=seq.constraint,
                       argmax=_argmax_only(seq))
        if self.lookup and _draftable(seq):
            slot.run.lookup = Lookup(history=self.history)
            slot.run.lookup.extend(seq.prompt)
        return slot.run

    def _leave(self, run: Run, reason: str, error: str | None) -> None:
        slot = run.slot
        slot.run = None
        slot.last_used = time.monotonic()
        with contextlib.suppress(Exception):
            quick.sampler_free(run.sampler)
        if run.grammar is not None:
            run.grammar.free()
        if reason != "error":
            # The tokens decoded so far stay in the KV for the next request to reuse;
            # still uncounted tokens (an incomplete character) are reported now.
            n = run.detok.take()
            if n:
                _emit(run.seq, run.detok.flush(), n)
            if run.lookup is not None and self.history is not None:
                # drafts for the requests after it
                self.history.add(run.lookup.tokens, len(run.seq.prompt))
        _finish_once(run.seq, reason, error)
        for f in run.forks:  # left before the prompt was evaluated: so do its forks
            if f.slot.run is f:
                self._leave(f, reason if reason == "error" else "stop", error)
        run.forks = []


def _draftable(seq: Sequence) -> bool:
    """Whether a sequence takes drafts: unconstrained, no logprobs, a single choice.
    Greedy or sampled, penalties or not: a draft is verified by sampling each of its
    positions in turn with the sequence's own chain, up to the first token that is not
    the draft's (llama_tokens.TokenOutput._verify), so the chain sees exactly the tokens
    it emits, in order, each from the logits plain decoding would give it."""
    return seq.constraint is None and seq.logprobs is None and not seq.forks and seq.index == 0


def _argmax_only(seq: Sequence) -> bool:
    """Whether the sampler chain is greedy alone (no grammar, no penalties to apply)."""
    p = seq.params
    return (p.greedy and seq.constraint is None and p.repeat_penalty == 1.0
            and not p.presence_penalty and not p.frequency_penalty)


def _emit(seq: Sequence, text: str, n: int) -> None:
    seq.on_tokens(text, n)


def _finish_once(seq: Sequence, reason: str, error: str | None) -> None:
    # on_finish releases the engine's slot: it must run exactly once, and a failing
    # callback must not stop the loop from serving the others.
    if getattr(seq, "_llama_finished", False):
        return
    seq._llama_finished = True  # type: ignore[attr-defined]
    try:
        seq.on_finish(reason, error)
    except Exception:
        log.exception("on_finish callback failed")
