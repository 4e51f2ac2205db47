"""Prompt-lookup drafts for speculative decoding (llama backend): greedy and sampled
sequences alike, unconstrained and single-choice.

A sequence that quotes its prompt (summarise, edit, translate code, answer from a document)
repeats runs of tokens it has already seen. The decode loop asks `Lookup.draft` for the
tokens that followed the last occurrence of the sequence's latest n-gram (prompt and text
so far), decodes them in the same `llama_decode` as the sequence's next token, and keeps
the longest prefix the sequence's sampler agrees with (llama_tokens.TokenOutput._verify):
every kept token is one plain decoding would have sampled from the same logits with the
same chain state, so greedy text is the same and sampled text keeps its distribution,
only fewer steps are spent on it. No model, no extra memory beyond an index of n-grams.

A draft row costs nearly a plain step on a small CPU (a 135M model is compute bound on 2
cores: 2 rows took 2.2x one row on an EPYC), so the batch loop decodes a draft only as long
as the sequence's measured continuation rate pays for, and none where it does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.backends.knobs import env_number
from worker.backends.llama_history import LONG, START_RATE, History, learned

#: Longest draft per step (tokens); CORRAL_LLAMA_LOOKUP overrides it (0 turns drafting off).
#: On by default: the batch loop decodes a draft only where its expected tokens per second
#: beat a plain step (its rows' measured cost against the run's continuation rate,
#: llama_batch.BatchLoop._draft_rows), and the rate is measured on every step, drafted or
#: not (`watch`), so free text drafts almost nothing and text that repeats its input
#: drafts long runs (docs/BENCHMARKS.md); no greedy answer changes where the prompt caches
#: pass through the same states (bench/greedy_identity.py).
DEFAULT_DRAFT = 8
NGRAMS = (3, 2)  # tried longest first: a 3-gram match predicts better than a 2-gram one


def draft_limit(value: int | None = None) -> int:
    """The configured longest draft: `value`, else CORRAL_LLAMA_LOOKUP, else the default."""
    if value is not None:
        return max(0, int(value))
    return int(env_number("CORRAL_LLAMA_LOOKUP", DEFAULT_DRAFT))


@dataclass
class Lookup:
    """The n-gram index of one sequence's tokens and how well its drafts predict it.

    Drafting costs whole rows of a step, so the loop decodes drafts only where they are
    expected to pay; on the other steps it still asks for the draft it would have made
    (`watch`) and checks it against the tokens decoded plainly (`extend`), at no decode
    cost. So `rate` is measured on every step: a sequence that starts quoting its prompt
    drafts within a few tokens, and free text never pays for the drafts it would miss."""

    tokens: list[int] = field(default_factory=list)
    # n-gram -> index of the token that followed its latest occurrence
    index: dict[tuple[int, ...], int] = field(default_factory=dict)
    proposed: int = 0
    accepted: int = 0
    # P(a draft position is kept | the one before it was), recent (learned): what the
    # batch loop weighs against the cost of a draft row (llama_batch.BatchLoop._draft_rows).
    rate: float = START_RATE
    # Earlier sequences' tokens (llama_history.py): drafts where they match a longer
    # context than this one's own tokens do.
    history: History | None = None
    from_history: bool = False  # the last draft (or watched one) came from `history`
    shadow: list[int] = field(default_factory=list)  # a watched draft's untested rest

    def __post_init__(self) -> None:
        if self.history is not None and self.history.rate is not None:
            self.rate = self.history.rate  # what drafts from history earned lately

    def extend(self, new: list[int]) -> None:
        toks = self.tokens
        for t in new:
            if self.shadow:
                self._watched(t)
            j = len(toks)
            toks.append(t)
            for n in NGRAMS:
                if j >= n:
                    self.index[tuple(toks[j - n : j])] = j

    def draft(self, room: int) -> list[int]:
        """Up to `room` tokens predicted to follow the tokens so far, to be decoded."""
        self.shadow = []
        return self._predict(room)

    def watch(self, room: int) -> None:
        """The draft not decoded this step: checked against the tokens that come plainly."""
        if not self.shadow:
            self.shadow = self._predict(room)

    def _watched(self, token: int) -> None:
        hit = token == self.shadow[0]
        self._learn(int(hit), int(not hit))
        self.shadow = self.shadow[1:] if hit else []

    def _predict(self, k: int) -> list[int]:
        if k <= 0:
            return []
        toks = self.tokens
        history = self.history
        # The longest context seen wins: history's 6- and 4-grams, then this sequence's
        # 3-gram, history's, and this sequence's 2-gram.
        if history is not None and (d := history.draft(toks, k, LONG)):
            self.from_history = True
            return d
        for n in NGRAMS:
            if len(toks) <= n:
                continue
            at = self.index.get(tuple(toks[-n:]))
            if at is not None:
                self.from_history = False
                return toks[at : at + k]
            if n == NGRAMS[0] and history is not None and (d := history.draft(toks, k, (n,))):
                self.from_history = True
                return d
        return []

    def result(self, proposed: int, accepted: int) -> None:
        """A decoded draft's outcome: its first `accepted` tokens were kept."""
        self.proposed += proposed
        self.accepted += accepted
        self._learn(accepted, int(accepted < proposed), decoded=True)

    def _learn(self, kept: int, missed: int, decoded: bool = False) -> None:
        self.rate = learned(self.rate, kept, missed)
        if self.from_history and self.history is not None:
            self.history.observe(kept, missed, decoded)


__all__ = ["DEFAULT_DRAFT", "Lookup", "draft_limit"]
