"""Drafts from what the backend said before: an n-gram index over recent finished sequences.

Prompt lookup (llama_lookup.py) drafts from one sequence's own prompt and text. Many
requests to one model are alike, though: an app's fixed instructions answered again for the
next user, an agent's tool calls in the same JSON shape, a summary in the house style, the
same question reworded. At greedy decoding such answers share long runs of tokens with
earlier ones, so the tokens that followed the same few tokens last time are a good draft.
This is the idea of suffix decoding (Oliaro et al., 2024, for agentic workloads) on a plain
n-gram table: each finished drafted sequence's answer (greedy or sampled) goes in, with
the end of its prompt, bounded by a token budget, oldest out first.

A draft is only a guess: the batch loop verifies it in the same `llama_decode` and keeps
what greedy sampling agrees with, so the text is the one plain decoding gives, and the
runs' acceptance rate keeps drafting off where history does not predict (varied requests).
Used on the decode thread only.
"""

from __future__ import annotations

from collections import OrderedDict

from worker.backends.knobs import env_number

#: Tokens of finished sequences kept for drafting (CORRAL_LLAMA_HISTORY_TOKENS; 0: off).
#: Three index entries per token: ~19 MB of Python objects at the default (measured, 96-token
#: answers); adding a finished sequence costs the decode thread ~1 ms.
DEFAULT_TOKENS = 32768
#: Context matched, longest first: a shorter one predicts worse across requests. LONG are
#: tried before a sequence's own 3-gram (six or four tokens seen before say more than three).
NGRAMS = (6, 4, 3)
LONG = (6, 4)
#: Prompt tokens kept before an answer: the end of the instructions and the template.
PROMPT_TAIL = 32


def history_tokens() -> int:
    """CORRAL_LLAMA_HISTORY_TOKENS, or DEFAULT_TOKENS; 0 turns history drafts off."""
    return int(env_number("CORRAL_LLAMA_HISTORY_TOKENS", DEFAULT_TOKENS))


#: A run's first estimate of P(the next draft token is kept | the one before it was) while
#: no draft from history has been tested: below what a draft needs to pay on a small CPU
#: (most free text repeats little), so a run drafts once its own tokens show it would pay.
START_RATE = 0.5
#: Weight of one observed draft position in the rate (EWMA): ~10 positions learn it.
LEARN = 0.12


def learned(rate: float, kept: int, missed: int) -> float:
    """`rate` after `kept` draft positions that matched and `missed` (0 or 1) that did not:
    the chance a draft's next position is kept, given the one before it was."""
    rate = 1.0 - (1.0 - rate) * (1.0 - LEARN) ** kept
    return rate * (1.0 - LEARN) ** missed


class History:
    """The last `budget` tokens of finished sequences, indexed by n-gram."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.seqs: OrderedDict[int, list[int]] = OrderedDict()  # oldest first
        # n-gram -> (sequence, index of the token that followed its latest occurrence)
        self.index: dict[tuple[int, ...], tuple[int, int]] = {}
        self.tokens = 0
        self.drafts = 0  # drafts from here that were decoded
        # P(a history draft's next position is kept), recent (None before any was tested,
        # decoded or watched): a new sequence starts from what history earned for the ones
        # before it, rather than learn it again in every request.
        self.rate: float | None = None
        self._next = 0

    def add(self, tokens: list[int], answer_at: int = 0) -> None:
        """Keeps a finished sequence: its answer (`tokens[answer_at:]`) and the last
        PROMPT_TAIL tokens of its prompt, which predict how an alike request's answer
        begins (a long prompt's body is the sequence's own lookup's to quote, and would
        cost the decode thread a few ms to index). The oldest go when over the budget."""
        toks = list(tokens[max(0, answer_at - PROMPT_TAIL):][-self.budget:])
        if len(toks) <= NGRAMS[-1]:
            return
        sid = self._next
        self._next += 1
        self.seqs[sid] = toks
        self.tokens += len(toks)
        index = self.index
        for n in NGRAMS:
            for j in range(n, len(toks)):
                index[tuple(toks[j - n : j])] = (sid, j)
        while self.tokens > self.budget:
            old_id, old = self.seqs.popitem(last=False)
            self.tokens -= len(old)
            self._forget(old_id, old)

    def draft(self, tail: list[int], k: int, ngrams: tuple[int, ...] = NGRAMS) -> list[int]:
        """Up to `k` tokens that followed `tail`'s last n-gram (the longest of `ngrams`
        seen) the latest time it was seen."""
        if k <= 0:
            return []
        for n in ngrams:
            if len(tail) < n:
                continue
            hit = self.index.get(tuple(tail[-n:]))
            if hit is None:
                continue
            seq = self.seqs.get(hit[0])
            if seq is None:  # forgotten since
                continue
            return seq[hit[1] : hit[1] + k]
        return []

    def observe(self, kept: int, missed: int, decoded: bool = False) -> None:
        """Positions of a history draft tested (`decoded`, or watched): `kept` matched,
        `missed` (0 or 1) did not."""
        self.drafts += decoded
        self.rate = learned(START_RATE if self.rate is None else self.rate, kept, missed)

    def stats(self) -> dict[str, int]:
        return {"lookup_history_tokens": self.tokens, "lookup_history_drafts": self.drafts}

    def _forget(self, sid: int, toks: list[int]) -> None:
        """Drops the index entries still pointing into a sequence that left (a later
        sequence's occurrence of the same n-gram has replaced the others)."""
        index = self.index
        for n in NGRAMS:
            for j in range(n, len(toks)):
                key = tuple(toks[j - n : j])
                if index.get(key, (-1, 0))[0] == sid:
                    del index[key]


__all__ = ["DEFAULT_TOKENS", "START_RATE", "History", "history_tokens", "learned"]
